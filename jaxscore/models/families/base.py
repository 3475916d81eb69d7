"""What a model family is, and the registry that finds one by name or `model_type`.

A family owns everything that differs between architectures: the mapping from and to a
Hugging Face `config.json`, its layer's parameters (logical axes and HF tensor names) and
its block, the function the scanned layer stack runs. `jaxscore.models.model` (the
stack, the KV cache, sliding windows, sharding, remat) never asks which family it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from jaxscore import errors
from jaxscore.models.config import ModelConfig, RopeScaling

_CONFIG = "config.json"


CheckpointError = errors.CheckpointError


@dataclasses.dataclass(frozen=True)
class Tensor:
  """A parameter as a Hugging Face checkpoint stores it: name (per-layer names contain
  `{i}`), shape, and the maps to and from jaxscore's layout of it."""

  name: str
  shape: tuple[int, ...]
  to_ours: Callable = lambda w: w
  to_hf: Callable = lambda w: w


# `attend(q_BxTxQxH, k_BxTxKxH, v_BxTxKxH) -> (out_BxTxQxH, extra)`: attention with the
# caller's mask and cache; `extra` is what the stack collects from each layer.
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


class Family:
  """One architecture. Subclass, set the class attributes, implement the methods and
  `register` an instance; `ModelConfig.family` names it."""

  name: str = ""
  model_types: tuple[str, ...] = ()  # The config.json `model_type`s it loads.
  architecture: str = ""  # The transformers class an export names.
  # Where a checkpoint may keep the `model.` tensors (a multimodal checkpoint's text
  # tower sits deeper); the first one whose embedding exists is used.
  checkpoint_prefixes: tuple[str, ...] = ("model.",)

  def config_from_hf(self, hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """ModelConfig fields (without dtypes and memory options) from a config.json dict."""
    raise NotImplementedError

  def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields of `cfg` (the exporter adds dtype and architectures)."""
    raise NotImplementedError

  def layer_axes(self, cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Logical axes of each per-layer parameter, led by `layers` (they are stacked)."""
    raise NotImplementedError

  def layer_tensors(self, cfg: ModelConfig) -> dict[str, Tensor]:
    """Each per-layer parameter's Hugging Face tensor (one layer's, unstacked)."""
    raise NotImplementedError

  def block(self, x_BxTxD: jax.Array, lp: dict, cfg: ModelConfig, positions_BxT: jax.Array,
            inv_freq_H2: jax.Array, attend: Attend) -> tuple[jax.Array, Any]:
    """One layer: `lp` is this layer's slice of `params["layers"]`."""
    raise NotImplementedError


_BY_NAME: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}


def register(family: Family) -> Family:
  """Makes `family` selectable by `ModelConfig.family` and by its `model_types`."""
  if not family.name:
    raise ValueError(f"{type(family).__name__}: a family needs a name")
  for model_type in family.model_types:
    owner = _BY_MODEL_TYPE.get(model_type)
    if owner is not None and owner.name != family.name:
      raise ValueError(f"model_type {model_type!r} is already loaded by family {owner.name!r}")
  _BY_NAME[family.name] = family
  _BY_MODEL_TYPE.update({t: family for t in family.model_types})
  return family


def get(name: str) -> Family:
  if name not in _BY_NAME:
    raise ValueError(f"model family {name!r} is not registered (families: "
                     f"{', '.join(sorted(_BY_NAME))})")
  return _BY_NAME[name]


def names() -> list[str]:
  return sorted(_BY_NAME)


def model_types() -> list[str]:
  return sorted(_BY_MODEL_TYPE)


def for_model_type(model_type: Any, source: str = _CONFIG) -> Family:
  if model_type not in _BY_MODEL_TYPE:
    raise CheckpointError(
        f"{source}: model_type={model_type!r} is not supported; jaxscore supports "
        f"{', '.join(model_types())}")
  return _BY_MODEL_TYPE[model_type]


# ----------------------------------------------------------------------------
# config.json fields most families share.


def require(hf: Mapping[str, Any], source: str, *fields: str) -> None:
  missing = [k for k in fields if k not in hf]
  if missing:
    raise CheckpointError(f"{source}: missing field {missing[0]!r}")


def common_fields(hf: Mapping[str, Any], source: str, eps_default: float = 1e-6
                  ) -> dict[str, Any]:
  """Sizes, norm epsilon, context length and tied embeddings."""
  require(hf, source, "num_attention_heads", "vocab_size", "num_hidden_layers",
          "hidden_size", "intermediate_size")
  heads = hf["num_attention_heads"]
  return dict(
      vocab_size=hf["vocab_size"],
      num_layers=hf["num_hidden_layers"],
      embed_dim=hf["hidden_size"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      mlp_dim=hf["intermediate_size"],
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rms_norm_eps=hf.get("rms_norm_eps", eps_default),
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
  )


def common_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return {
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings,
  }


def parse_rope(rope: Mapping[str, Any], default_theta: float, source: str,
               max_position_embeddings: int = 8192) -> tuple[float, RopeScaling | None]:
  """(theta, scaling) from a `rope_parameters` (transformers 5) or `rope_scaling` dict."""
  theta = float(rope.get("rope_theta", default_theta))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type not in ("llama3", "linear"):
    raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported "
                          "(default, llama3, linear)")
  if "factor" not in rope:
    raise CheckpointError(f"{source}: rope scaling has no 'factor'")
  return theta, RopeScaling(
      rope_type=rope_type, factor=float(rope["factor"]),
      low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
      high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(
          rope.get("original_max_position_embeddings", max_position_embeddings)))


def rope_to_hf(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
  if scaling is None:
    return {"rope_type": "default", "rope_theta": theta}
  out = {"rope_type": scaling.rope_type, "rope_theta": theta, "factor": scaling.factor}
  if scaling.rope_type == "llama3":
    out |= {"low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings}
  return out


def sliding_from_layer_types(hf: Mapping[str, Any], num_layers: int, source: str,
                             default: list[bool] | None = None) -> tuple[bool, ...] | None:
  """Per layer, is it a sliding-window layer (`layer_types`, else `default`)."""
  types = hf.get("layer_types")
  if types is None:
    return None if default is None else tuple(default)
  unknown = set(types) - {"sliding_attention", "full_attention"}
  if unknown:
    raise CheckpointError(f"{source}: layer_types has {sorted(unknown)[0]!r} "
                          "(sliding_attention, full_attention)")
  if len(types) != num_layers:
    raise CheckpointError(f"{source}: layer_types has {len(types)} entries for "
                          f"num_hidden_layers={num_layers}")
  return tuple(t == "sliding_attention" for t in types)


def layer_types_to_hf(cfg: ModelConfig) -> list[str]:
  return ["sliding_attention" if s else "full_attention" for s in cfg.layer_is_sliding]


# ----------------------------------------------------------------------------
# Hugging Face tensors most families share.


def attention_tensors(cfg: ModelConfig, prefix: str = "model.layers.{i}.self_attn."
                      ) -> dict[str, Tensor]:
  d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out = {
      "q": Tensor(prefix + "q_proj.weight", (n * h, d),
                  lambda w: w.T.reshape(d, n, h), lambda w: w.reshape(d, n * h).T),
      "k": Tensor(prefix + "k_proj.weight", (k * h, d),
                  lambda w: w.T.reshape(d, k, h), lambda w: w.reshape(d, k * h).T),
      "v": Tensor(prefix + "v_proj.weight", (k * h, d),
                  lambda w: w.T.reshape(d, k, h), lambda w: w.reshape(d, k * h).T),
      "o": Tensor(prefix + "o_proj.weight", (d, n * h),
                  lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T),
  }
  if cfg.qkv_bias:
    out |= {
        "q_bias": Tensor(prefix + "q_proj.bias", (n * h,), lambda w: w.reshape(n, h),
                         lambda w: w.reshape(n * h)),
        "k_bias": Tensor(prefix + "k_proj.bias", (k * h,), lambda w: w.reshape(k, h),
                         lambda w: w.reshape(k * h)),
        "v_bias": Tensor(prefix + "v_proj.bias", (k * h,), lambda w: w.reshape(k, h),
                         lambda w: w.reshape(k * h)),
    }
  if cfg.qk_norm:
    out |= {"q_norm": Tensor(prefix + "q_norm.weight", (h,)),
            "k_norm": Tensor(prefix + "k_norm.weight", (h,))}
  return out


def mlp_tensors(cfg: ModelConfig, prefix: str = "model.layers.{i}.mlp.") -> dict[str, Tensor]:
  d, f = cfg.embed_dim, cfg.mlp_dim
  t = lambda w: w.T
  return {"gate": Tensor(prefix + "gate_proj.weight", (f, d), t, t),
          "up": Tensor(prefix + "up_proj.weight", (f, d), t, t),
          "down": Tensor(prefix + "down_proj.weight", (d, f), t, t)}


def global_tensors(cfg: ModelConfig) -> dict[str, Tensor]:
  """Embedding, final norm and (untied) output projection: every family's."""
  d, v = cfg.embed_dim, cfg.vocab_size
  out = {"embed": Tensor("model.embed_tokens.weight", (v, d)),
         "final_norm": Tensor("model.norm.weight", (d,))}
  if not cfg.tie_embeddings:
    out["lm_head"] = Tensor("lm_head.weight", (v, d), lambda w: w.T, lambda w: w.T)
  return out
