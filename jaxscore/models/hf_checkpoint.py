"""Hugging Face checkpoint directories: `config.json` and safetensors (one file or
sharded with an index), read into and written from jaxscore's params."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxscore.models import families, weights
from jaxscore.models import model as model_lib

_CONFIG = "config.json"
_INDEX = "model.safetensors.index.json"


def _prefix(family: families.Family, files: dict[str, Any]) -> str:
  """Where this checkpoint keeps the tensors named `model.*` (a multimodal checkpoint's
  text tower sits deeper)."""
  for prefix in family.checkpoint_prefixes:
    if prefix + "embed_tokens.weight" in files:
      return prefix
  return "model."  # Whatever is missing is then named as transformers names it.


def _safetensors_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> file, from the sharded index or by listing the files."""

  index = directory / _INDEX
  if index.exists():

    def no_duplicates(pairs):
      seen = {}
      for k, v in pairs:
        if k in seen:
          raise weights.CheckpointError(
              f"{index}: tensor {k!r} is listed twice ({seen[k]}, {v})")
        seen[k] = v
      return seen

    try:
      weight_map = json.loads(index.read_text(), object_pairs_hook=no_duplicates)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise weights.CheckpointError(f"{index}: not a safetensors index ({e})") from None
    files = {name: directory / f for name, f in weight_map.items()}
    for f in set(files.values()):
      if not f.exists():
        raise weights.CheckpointError(f"{index}: lists {f.name}, which does not exist")
    return files
  shards = sorted(directory.glob("*.safetensors"))
  if not shards:
    raise weights.CheckpointError(f"{directory}: no *.safetensors files")
  files = {}
  for shard in shards:
    for name in _open_safetensors(shard).keys():
      if name in files:
        raise weights.CheckpointError(
            f"{shard}: tensor {name!r} is also in {files[name].name}")
      files[name] = shard
  return files


def _open_safetensors(path: pathlib.Path):
  try:
    return safe_open(str(path), framework="numpy")
  except Exception as e:  # SafetensorError, OSError: truncated or not safetensors.
    raise weights.CheckpointError(f"{path}: not a readable safetensors file "
                                  f"({type(e).__name__}: {e})") from None


def load_hf(directory: str | os.PathLike, *, param_dtype: str = "float32",
            dtype: str = "float32") -> tuple[model_lib.ModelConfig, model_lib.Params]:
  """Loads (config, params) from a Hugging Face checkpoint directory."""

  directory = pathlib.Path(directory)
  config_path = directory / _CONFIG
  if not config_path.exists():
    raise weights.CheckpointError(f"{directory}: no {_CONFIG}")
  try:
    hf = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise weights.CheckpointError(f"{config_path}: invalid JSON ({e})") from None
  cfg = weights.config_from_hf(hf, str(config_path), param_dtype=param_dtype, dtype=dtype)
  files = _safetensors_files(directory)
  handles: dict[pathlib.Path, Any] = {}
  prefix = _prefix(families.get(cfg.family), files)

  def get(name):
    stored = prefix + name[len("model."):] if name.startswith("model.") else name
    path = files[stored]  # KeyError -> missing tensor.
    if path not in handles:
      handles[path] = _open_safetensors(path)
    try:
      w = handles[path].get_tensor(stored)
    except Exception as e:  # A truncated or damaged shard.
      raise weights.CheckpointError(f"{path}: cannot read tensor {stored!r} "
                                            f"({type(e).__name__}: {e})") from None
    return weights.check_finite(np.asarray(w), repr(stored), str(path))

  params = weights.params_from_tensors(get, cfg, str(directory))
  return cfg, params


def save_hf(directory: str | os.PathLike, cfg: model_lib.ModelConfig,
            params: model_lib.Params, *, tokenizer=None, dtype: str = "float32") -> None:
  """Writes `config.json` + `model.safetensors` (+ tokenizer files) for transformers."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = weights.params_to_tensors(params, cfg, dtype)
  save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
  (directory / _CONFIG).write_text(json.dumps(weights.config_to_hf(cfg, dtype), indent=2))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(directory))




def stop_ids(directory: str | os.PathLike) -> tuple[int, ...]:
  """`eos_token_id` of the directory's generation_config.json (an id or a list of
  them): the tokens transformers' `generate` stops on; () without the file."""
  path = pathlib.Path(directory) / "generation_config.json"
  if not path.exists():
    return ()
  try:
    eos = json.loads(path.read_text()).get("eos_token_id")
  except json.JSONDecodeError as e:
    raise weights.CheckpointError(f"{path}: invalid JSON ({e})") from None
  ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
  if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
    raise weights.CheckpointError(f"{path}: eos_token_id={eos!r}: expected a token id or "
                                  "a list of them")
  return tuple(sorted(set(ids)))
