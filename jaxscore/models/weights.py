"""Parameters in Hugging Face's layout: config.json <-> ModelConfig and HF-named tensors
<-> the params pytree, for every registered family. Files are read and written by
`hf_checkpoint` (safetensors directories) and `gguf_checkpoint` (GGUF files)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from jaxscore.models import families
from jaxscore.models import model as model_lib
from jaxscore.models.families import CheckpointError

__all__ = ["CheckpointError", "check_finite", "config_from_hf", "config_to_hf",
           "np_dtype", "params_from_tensors", "params_to_tensors", "tensor_specs"]
_CONFIG = "config.json"


def config_from_hf(hf: Mapping[str, Any], source: str = _CONFIG,
                   **overrides) -> model_lib.ModelConfig:
  """ModelConfig from a Hugging Face `config.json` dict (transformers 4 or 5), by the
  family registered for its `model_type`."""
  family = families.for_model_type(hf.get("model_type"), source)
  return model_lib.ModelConfig(**(family.config_from_hf(hf, source) | overrides))


def config_to_hf(cfg: model_lib.ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """A config.json dict transformers loads as `cfg`'s family."""
  family = families.get(cfg.family)
  return {"architectures": [family.architecture], "model_type": family.model_types[0],
          **family.config_to_hf(cfg), "torch_dtype": dtype, "dtype": dtype}


def check_finite(w: np.ndarray, name: str, source: str) -> np.ndarray:
  if not np.all(np.isfinite(w)):
    bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
    raise CheckpointError(f"{source}: tensor {name} has {bad} non-finite values")
  return w


def tensor_specs(cfg: model_lib.ModelConfig) -> dict[str, Any]:
  """{"layers": {key: Tensor}, key: Tensor}: every parameter's Hugging Face tensor."""
  return {"layers": families.get(cfg.family).layer_tensors(cfg),
          **families.base.global_tensors(cfg)}


def params_from_tensors(get: Callable[[str], np.ndarray], cfg: model_lib.ModelConfig,
                        source: str, display: Callable[[str], str] = repr
                        ) -> model_lib.Params:
  """Builds params from HF-named tensors.

  Args:
    get: `get(hf_name)` returns the tensor in HF layout or raises KeyError.
    cfg: the architecture the tensors must fit.
    source: the file or directory named in errors.
    display: how errors spell a tensor name (e.g. its name in a GGUF file).
  """
  dtype = np_dtype(cfg.param_dtype)
  specs = tensor_specs(cfg)

  def fetch(spec: families.Tensor, name: str):
    try:
      w = np.asarray(get(name))
    except KeyError:
      raise CheckpointError(f"{source}: missing tensor {display(name)}") from None
    if w.shape != spec.shape:
      raise CheckpointError(
          f"{source}: tensor {display(name)} has shape {w.shape}, expected "
          f"{spec.shape} for this config")
    return spec.to_ours(w.astype(np.float32)).astype(dtype)

  params: model_lib.Params = {"layers": {}}
  for key, spec in specs["layers"].items():
    params["layers"][key] = np.stack(
        [fetch(spec, spec.name.format(i=i)) for i in range(cfg.num_layers)])
  for key, spec in specs.items():
    if key != "layers":
      params[key] = fetch(spec, spec.name)
  return params


def params_to_tensors(params: model_lib.Params, cfg: model_lib.ModelConfig,
                      dtype: str = "float32") -> dict[str, np.ndarray]:
  """HF-named numpy tensors (inverse of `params_from_tensors`)."""
  out_dtype = np_dtype(dtype)
  specs = tensor_specs(cfg)
  out = {}
  for key, spec in specs["layers"].items():
    stacked = np.asarray(params["layers"][key], np.float32)
    for i in range(cfg.num_layers):
      out[spec.name.format(i=i)] = np.ascontiguousarray(spec.to_hf(stacked[i]).astype(out_dtype))
  for key, spec in specs.items():
    if key != "layers":
      out[spec.name] = np.ascontiguousarray(
          spec.to_hf(np.asarray(params[key], np.float32)).astype(out_dtype))
  return out


def np_dtype(name: str) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
