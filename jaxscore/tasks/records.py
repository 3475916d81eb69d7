"""Reading dataset records from local files, the Hugging Face hub or TFDS, with clear
errors.

TFDS datasets are read through `tfds.data_source` (array_record files, random access),
which needs neither TensorFlow nor loading the dataset through tf.data: records are
decoded one at a time, when they are accessed, into plain Python values (text as `str`),
so a dataset larger than memory is never loaded whole.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from jaxscore import errors

T = TypeVar("T")


DataError = errors.DataError


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Records of a `.jsonl`, `.jsonl.gz` or `.json` (a list of objects) file."""
  path = pathlib.Path(path)
  if not path.exists():
    raise DataError(f"{path}: no such file")
  name = path.name
  opener = gzip.open if name.endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      if name.endswith((".jsonl", ".jsonl.gz")):
        records = [_parse_line(path, i, line) for i, line in enumerate(f, 1) if line.strip()]
      elif name.endswith((".json", ".json.gz")):
        records = _parse_json(path, f.read())
      else:
        raise DataError(f"{path}: unknown format (expected .jsonl, .jsonl.gz or .json)")
  except (OSError, UnicodeDecodeError, EOFError) as e:
    raise DataError(f"{path}: cannot read ({e})") from None
  if not records:
    raise DataError(f"{path}: the dataset is empty")
  return records


def _parse_line(path, lineno, line):
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
  if not isinstance(record, dict):
    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
  return record


def _parse_json(path, text):
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
    raise DataError(f"{path}: expected a JSON list of objects")
  return data


def require(record: dict[str, Any], fields: Sequence[str], where: str,
            types: dict[str, type | tuple[type, ...]] | None = None) -> None:
  """Raises DataError naming `where` (file:line) and the field that is missing or wrong."""
  for field in fields:
    if field not in record:
      raise DataError(f"{where}: missing field {field!r}")
    expected = (types or {}).get(field)
    if expected is not None and not isinstance(record[field], expected):
      raise DataError(f"{where}: field {field!r} has type {type(record[field]).__name__}")


def require_optional(record: dict[str, Any], where: str,
                     types: dict[str, type | tuple[type, ...]]) -> None:
  """Like `require` for fields that may be absent or null."""
  for field, expected in types.items():
    value = record.get(field)
    if value is not None and not isinstance(value, expected):
      raise DataError(f"{where}: field {field!r} has type {type(value).__name__}, "
                      f"expected {_names(expected)}")


def require_items(record: dict[str, Any], field: str, where: str,
                  expected: type | tuple[type, ...]) -> None:
  """Every item of list field `field` (if present) has type `expected`."""
  for i, item in enumerate(record.get(field) or ()):
    if not isinstance(item, expected):
      raise DataError(f"{where}: field {field!r} item {i} has type {type(item).__name__}, "
                      f"expected {_names(expected)}")


def _names(types: type | tuple[type, ...]) -> str:
  return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _plain(value: Any) -> Any:
  """A TFDS feature value as JSON-like Python: bytes -> str, arrays -> lists."""
  import numpy as np

  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def tfds_source(source: str, split: str | None):
  """The `tfds.data_source` of `tfds:<name>[/<config>][:<split>]` (data from
  TFDS_DATA_DIR or TFDS's default directory) or of a prepared dataset's directory (the
  one holding `dataset_info.json`)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataError(f"{source}: reading TFDS needs tensorflow-datasets "
                    f"(pip install tensorflow-datasets array_record): {e}") from None
  try:
    if source.startswith("tfds:"):
      name, _, own_split = source[len("tfds:"):].partition(":")
      # Read at call time (tfds reads it once, at import).
      data_dir = os.environ.get("TFDS_DATA_DIR") or None
      return tfds.data_source(name, split=own_split or split, data_dir=data_dir,
                              download=False)
    return tfds.builder_from_directory(source).as_data_source(split=split)
  except (FileNotFoundError, KeyError, ValueError, AssertionError) as e:
    raise DataError(f"{source} [{split}]: cannot open as a TFDS dataset ({e})") from None


class LazySequence(Sequence[T]):
  """`fn(i)` for i in range(n), computed on each access, never stored; slices are lazy
  too."""

  def __init__(self, n: int, fn: Callable[[int], T]):
    self._n, self._fn = n, fn

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index):
    if isinstance(index, slice):
      positions = range(self._n)[index]
      return LazySequence(len(positions), lambda i: self._fn(positions[i]))
    index = int(index)  # numpy integers from permutations.
    if not -self._n <= index < self._n:
      raise IndexError(f"index {index} out of range for {self._n} items")
    return self._fn(index % self._n)

  def __repr__(self) -> str:
    return f"LazySequence(len={self._n})"


def is_tfds(source: str) -> bool:
  return source.startswith("tfds:") or (pathlib.Path(source) / "dataset_info.json").exists()


def load_records(source: str, split: str | None = None,
                 **hub_kwargs) -> Sequence[tuple[str, dict]]:
  """(where, record) pairs from a local file, a hub dataset or a TFDS dataset.

  `source` is a path (`.jsonl`, `.jsonl.gz`, `.json`); `hub:<name>[:<config>]`, loaded
  with `datasets.load_dataset(name, config, split=split)`; `tfds:<name>[/<config>][:<split>]`
  or the directory of a prepared TFDS dataset, read with `tfds.data_source`. Files and
  hub datasets come as a list; TFDS as a `LazySequence` that reads a record when it is
  accessed.
  """
  if is_tfds(source):
    data = tfds_source(source, split)
    if not len(data):
      raise DataError(f"{source} [{split}]: the dataset is empty")
    return LazySequence(len(data), lambda i: (f"{source}[{split}]#{i}", _plain(data[i])))
  if source.startswith("hub:"):
    import datasets

    name, _, config = source[4:].partition(":")
    ds = datasets.load_dataset(name, config or None, split=split, **hub_kwargs)
    records = [dict(r) for r in ds]
    if not records:
      raise DataError(f"{source} [{split}]: the dataset is empty")
    return [(f"{source}[{split}]#{i}", r) for i, r in enumerate(records)]
  records = read_records(source)
  jsonl = source.endswith((".jsonl", ".jsonl.gz"))
  # Blank lines are skipped, so count them back for exact line numbers.
  lines = _line_numbers(source) if jsonl else None
  return [(f"{source}:{lines[i] if lines else i}" if jsonl else f"{source}[{i}]", r)
          for i, r in enumerate(records)]


def _line_numbers(path: str) -> list[int]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [i for i, line in enumerate(f, 1) if line.strip()]
