"""Workdir files on a local disk or an object store (`gs://`, via etils.epath).

On Cloud TPU VMs every worker writes to one shared `gs://` workdir. Object stores
cannot append to a file, so appends there rewrite the file; callers batch them.
"""

from __future__ import annotations

import json
import os

from etils import epath


def path(p: str | os.PathLike) -> epath.Path:
  """A local path (made absolute) or a `gs://...` URI, kept as given (pathlib would
  collapse `gs://` to `gs:/`)."""
  return epath.Path(p if is_remote(p) else os.path.abspath(p))


def is_remote(p: str | os.PathLike) -> bool:
  return "://" in os.fspath(p)


def append_text(p: epath.Path, text: str) -> None:
  """Appends `text` to `p`, creating it if needed."""
  if not text:
    return
  if not is_remote(p):
    with open(p, "a", encoding="utf-8") as f:
      f.write(text)
    return
  old = p.read_text() if p.exists() else ""
  p.write_text(old + text)


def drop_steps_after(p: epath.Path, step: int) -> None:
  """Drops the JSONL records of `p` with "step" > `step`: after a crash, training resumes
  from the last checkpoint and logs those steps again."""
  if not p.exists():
    return
  lines = p.read_text().splitlines(keepends=True)
  kept = [l for l in lines if not l.strip() or json.loads(l).get("step", 0) <= step]
  if len(kept) < len(lines):
    p.write_text("".join(kept))
