"""A trained checkpoint as a transformers model directory.

  jaxscore export --workdir=runs/score-cpu --step=best --out=exported/score-cpu

The run's own `config.json` (written by `jaxscore.main`) names the base model; the
checkpoint's params replace its weights, and the directory gets `config.json`,
`model.safetensors` and the tokenizer files with the chat template, so
`transformers.AutoModelForCausalLM.from_pretrained(out)` and any server that reads that
format load the trained policy.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np


class ExportError(ValueError):
  """A user error: a missing run, config or checkpoint."""


def run_config(workdir: str | os.PathLike):
  """The ml_collections config a run was started with (`<workdir>/config.json`)."""
  import ml_collections

  from jaxscore.infra import files

  path = files.path(workdir) / "config.json"
  if not path.exists():
    raise ExportError(f"{path} does not exist: --workdir must be a directory that "
                      "`python -m jaxscore.main` trained in")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def export(workdir: str | os.PathLike, out: str | os.PathLike, step: str = "latest",
           dtype: str = "float32") -> dict:
  """Writes the `step` (latest | best | a number) checkpoint of `workdir` to `out`;
  returns what was written."""
  from jaxscore.infra import files
  from jaxscore.loops import common
  from jaxscore.models import hf_checkpoint, lora, pretrained

  c = run_config(workdir)
  model = pretrained.from_config(c.model)
  params, restored = common.restore_params(c, workdir, model.cfg, model.params, step)
  if restored is None:
    raise ExportError(f"{files.path(workdir) / 'checkpoints'} has no {step} checkpoint")
  # A LoRA run's adapters merged into the weights: a plain transformers checkpoint.
  params = jax.tree.map(np.asarray, lora.merge(params, model.cfg))
  out = pathlib.Path(out)
  hf_checkpoint.save_hf(out, model.cfg, params, tokenizer=model.tokenizer, dtype=dtype)
  info = {"workdir": str(workdir), "step": restored, "which": step,
          "base_model": c.model.name, "dtype": dtype}
  (out / "jaxscore_export.json").write_text(json.dumps(info, indent=1))
  return info
