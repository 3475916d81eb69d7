"""A trained checkpoint as a transformers model directory.

  jaxscore export --workdir=runs/score-cpu --step=best --out=exported/score-cpu

The run's own `config.json` (written by `jaxscore.main`) names the base model; the
checkpoint's params replace its weights, and the directory gets `config.json`,
`model.safetensors` and the tokenizer files with the chat template, so
`transformers.AutoModelForCausalLM.from_pretrained(out)` and any server that reads that
format load the trained policy.

With `--push_to_hub=org/name` the directory is then uploaded to that Hugging Face
model repository (created private if it does not exist; `HF_TOKEN` or `hf auth login`);
a `<out>/base` written for a GGUF base stays local.

A LoRA run also gets `<out>/adapter`: the adapters alone as a PEFT LoRA directory
(`adapter_config.json` + `adapter_model.safetensors`), which
`peft.PeftModel.from_pretrained(base, out/adapter)` puts on the base model. Its base is
the run's model directory; a base that is no transformers directory (a GGUF file, the
embedded model) is written beside it as `<out>/base`.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import ml_collections
import numpy as np
from safetensors.numpy import save_file

from jaxscore import errors
from jaxscore.infra import files
from jaxscore.loops import common
from jaxscore.models import hf_checkpoint, lora, pretrained, weights

ExportError = errors.ExportError


def run_config(workdir: str | os.PathLike):
  """The ml_collections config a run was started with (`<workdir>/config.json`)."""
  path = files.path(workdir) / "config.json"
  if not path.exists():
    raise ExportError(f"{path} does not exist: --workdir must be a directory that "
                      "`python -m jaxscore.main` trained in")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def export(workdir: str | os.PathLike, out: str | os.PathLike, step: str = "latest",
           dtype: str = "float32") -> dict:
  """Writes the `step` (latest | best | a number) checkpoint of `workdir` to `out`;
  returns what was written."""

  c = run_config(workdir)
  model = pretrained.from_config(c.model)
  params, restored = common.restore_params(c, workdir, model.cfg, model.params, step)
  if restored is None:
    raise ExportError(f"{files.path(workdir) / 'checkpoints'} has no {step} checkpoint")
  out = pathlib.Path(out)
  info = {"workdir": str(workdir), "step": restored, "which": step,
          "base_model": c.model.name, "dtype": dtype}
  if model.cfg.lora_scale is not None:
    base = model.path
    if not (base.is_dir() and (base / "config.json").exists()):
      base = out / "base"
      hf_checkpoint.save_hf(base, model.cfg, jax.tree.map(np.asarray, model.params),
                            tokenizer=model.tokenizer, dtype=dtype)
    save_peft_adapter(out / "adapter", model.cfg, lora.split(params)[1], str(base.resolve()))
    info |= {"adapter": str(out / "adapter"), "adapter_base": str(base)}
  # A LoRA run's adapters merged into the weights: a plain transformers checkpoint.
  params = jax.tree.map(np.asarray, lora.merge(params, model.cfg))
  hf_checkpoint.save_hf(out, model.cfg, params, tokenizer=model.tokenizer, dtype=dtype)
  (out / "jaxscore_export.json").write_text(json.dumps(info, indent=1))
  return info


def save_peft_adapter(directory: str | os.PathLike, cfg, adapters: dict,
                      base_model: str) -> None:
  """Writes `adapters` (jaxscore's `<w>_lora_a/_b` leaves) as a PEFT LoRA directory.

  A weight's Hugging Face matrix is (out, in), its inputs and outputs each flattened
  in jaxscore's row-major order, so A (in..., r) becomes lora_A (r, in) and B
  (r, out...) lora_B (out, r); PEFT scales B A by lora_alpha / r, as jaxscore does.
  """
  specs = weights.tensor_specs(cfg)["layers"]
  r = cfg.lora.rank
  tensors, modules = {}, set()
  for name in cfg.lora.target_names:
    a = np.asarray(adapters["layers"][name + lora.SUFFIX_A], np.float32)
    b = np.asarray(adapters["layers"][name + lora.SUFFIX_B], np.float32)
    module = specs[name].name.removesuffix(".weight")
    modules.add(module.rpartition(".")[2])
    for i in range(cfg.num_layers):
      key = "base_model.model." + module.format(i=i)
      tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
      tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": r, "lora_alpha": cfg.lora.alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": sorted(modules), "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None}
  (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


def push_to_hub(out: str | os.PathLike, repo_id: str, *, private: bool = True,
                token: str | None = None) -> str:
  """Uploads the exported directory `out` to the hub model repository `repo_id`, creating
  it (private unless told otherwise) if need be; returns the commit's URL."""
  from huggingface_hub import HfApi
  from huggingface_hub import errors as hub_errors

  out = pathlib.Path(out)
  if "/" not in repo_id or repo_id.count("/") > 1:
    raise ExportError(f"--push_to_hub={repo_id!r}: expected a repository id org/name")
  info = json.loads((out / "jaxscore_export.json").read_text())
  api = HfApi(token=token)
  try:
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, repo_type="model", folder_path=str(out), ignore_patterns=["base/*"],
        commit_message=f"jaxscore export: step {info['step']} ({info['which']}) of "
                       f"{info['base_model']}")
  except hub_errors.OfflineModeIsEnabled:
    raise ExportError(f"--push_to_hub={repo_id}: HF_HUB_OFFLINE is set; unset it to "
                      f"upload (the export itself is in {out})") from None
  except (hub_errors.HfHubHTTPError, OSError) as e:
    hint = ("log in with `hf auth login` or set HF_TOKEN to a token with write access"
            if getattr(getattr(e, "response", None), "status_code", None) in (401, 403)
            else "the export itself is in " + str(out))
    raise ExportError(f"--push_to_hub={repo_id}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}; {hint}") from None
  return commit.commit_url
