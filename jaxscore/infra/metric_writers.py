"""Metrics (JSONL, TensorBoard and optionally W&B) and transcripts of a run, written by
process 0 only.

On resume, records logged after the restored checkpoint are dropped first, so the files
read as if the run had never stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
from absl import logging
from etils import epath

from jaxscore.infra import files

METRICS, TRANSCRIPTS = "metrics.jsonl", "transcripts.jsonl"


class MetricsWriter:
  """JSONL metrics and TensorBoard scalars.

  Local files get each line at once; on an object store (gs://) lines are held until
  `flush` (called with every checkpoint), since each flush rewrites the file.
  """

  def __init__(self, workdir: epath.Path, start_step: int = 0, wandb_run=None):
    self.enabled = jax.process_index() == 0
    self.wandb = wandb_run  # A W&B run (jaxscore.infra.wandb_log), or None.
    if not self.enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    self.workdir = workdir
    self.path = workdir / METRICS
    for name in (METRICS, TRANSCRIPTS):
      files.drop_steps_after(workdir / name, start_step)
    self.buffered = files.is_remote(workdir)
    self.pending: list[str] = []
    self.tb = _tensorboard(workdir / "tensorboard")

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self.pending.append(json.dumps({"step": step, **metrics}) + "\n")
    if not self.buffered:
      self.flush()
    if self.tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self.tb.add_scalar(k, v, step)
    if self.wandb is not None:
      from jaxscore.infra import wandb_log

      self.wandb.log(wandb_log.scalars(metrics), step=step)

  def write_transcripts(self, step: int, records: Sequence[dict]) -> None:
    """Appends sampled episodes (JSON-serialisable dicts) under `step`."""
    if self.enabled and records:
      files.append_text(self.workdir / TRANSCRIPTS,
                        "".join(json.dumps({"step": step, **r}) + "\n" for r in records))

  def flush(self) -> None:
    if self.enabled:
      files.append_text(self.path, "".join(self.pending))
      self.pending = []
      if self.tb is not None:
        self.tb.flush()

  def close(self):
    if self.enabled:
      self.flush()
      if self.tb is not None:
        self.tb.close()
      if self.wandb is not None:
        self.wandb.finish()


def _tensorboard(logdir: epath.Path):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return None
  if files.is_remote(logdir):
    try:
      from google.cloud import storage  # noqa: F401  (tensorboardX writes gs:// with it)
    except ImportError:
      logging.warning("no TensorBoard events in %s: gs:// needs google-cloud-storage "
                      "(pip install 'jaxscore[gcs]')", logdir)
      return None
  return SummaryWriter(os.fspath(logdir))
