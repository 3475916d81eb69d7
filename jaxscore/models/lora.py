"""LoRA as a transform of the params tree: low-rank adapters beside the frozen weights.

A targeted weight W (say q: D x N x H) gets `<name>_lora_a` (D x r) and `<name>_lora_b`
(r x N x H) in the same layer slice of `params["layers"]`; the layer computes
x W + (alpha / r) (x A) B, never the merged matrix, so the base weights stay frozen and
unchanged in memory. B starts at zero, so a model with fresh adapters is exactly its base
model, and the base params alone (no adapter leaves) are the reference policy: no second
copy of the weights.

qwix (Google's LoRA and quantization library) rewrites the matmuls of Flax modules; this
model is pure functions over a params dict, so LoRA is written here as leaves of that
dict and the branch in `layers`.

  cfg = cfg.replace(lora=lora.LoraConfig(rank=8, alpha=16))
  adapters = lora.init(cfg, rng)                       # only these are trained
  params = lora.combine(base_params, adapters)         # what model.apply runs
  merged = lora.merge(params, cfg)                     # plain weights, for export
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxscore.models.config import LORA_TARGETS as TARGETS
from jaxscore.models.config import LoraConfig

__all__ = ["LoraConfig", "TARGETS", "adapter_axes", "combine", "delta", "init",
           "is_adapter", "merge", "num_params", "split"]

# Each target's einsum layout: how many leading (after `layers`) axes are its input.
_INPUT_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"


def adapter_axes(cfg, weight_axes: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
  """Logical axes of the adapters of `cfg.lora`, from the layer's weight axes: A keeps
  the weight's input axes, B its output axes; the rank axis is never split."""
  out = {}
  for name in cfg.lora.target_names:
    axes = weight_axes[name]
    n_in = _INPUT_AXES[name]
    out[name + SUFFIX_A] = ("layers", *axes[1:1 + n_in], "lora_rank")
    out[name + SUFFIX_B] = ("layers", "lora_rank", *axes[1 + n_in:])
  return out


def is_adapter(key: str) -> bool:
  return key.endswith(SUFFIX_A) or key.endswith(SUFFIX_B)


def split(params: dict) -> tuple[dict, dict]:
  """(base, adapters) of params that hold both."""
  layers = params["layers"]
  base = {**params, "layers": {k: v for k, v in layers.items() if not is_adapter(k)}}
  return base, {"layers": {k: v for k, v in layers.items() if is_adapter(k)}}


def combine(base: dict, adapters: dict) -> dict:
  """The params `model.apply` runs: the base's leaves and the adapters' side by side."""
  return {**base, "layers": {**base["layers"], **adapters["layers"]}}


def init(cfg, rng: jax.Array) -> dict:
  """Fresh adapters: A ~ N(0, 1/fan_in) (PEFT draws it Kaiming-uniform), B = 0."""
  from jaxscore.models import model as model_lib

  shapes = model_lib.param_shapes(cfg)["layers"]
  dtype = jnp.dtype(cfg.param_dtype)
  out = {}
  for i, name in enumerate(cfg.lora.target_names):
    a_shape, b_shape = shapes[name + SUFFIX_A], shapes[name + SUFFIX_B]
    fan_in = math.prod(a_shape[1:-1])
    key = jax.random.fold_in(rng, i)
    out[name + SUFFIX_A] = (jax.random.normal(key, a_shape, jnp.float32)
                            / math.sqrt(fan_in)).astype(dtype)
    out[name + SUFFIX_B] = jnp.zeros(b_shape, dtype)
  return {"layers": out}


def delta(x: jax.Array, lp: dict, name: str, scale: float) -> jax.Array | None:
  """(alpha / r) (x A) B of weight `name` in layer slice `lp`, or None without
  adapters; x's last axes are the weight's input axes."""
  a = lp.get(name + SUFFIX_A)
  if a is None:
    return None
  n_in = a.ndim - 1
  xa = jnp.tensordot(x, a.astype(x.dtype), axes=n_in)
  return scale * jnp.tensordot(xa, lp[name + SUFFIX_B].astype(x.dtype), axes=1)


def merge(params: dict, cfg) -> dict:
  """Plain params: every adapted weight replaced by W + (alpha / r) A B (for export, or
  to freeze a stage's adapters into the base of the next)."""
  base, adapters = split(params)
  if not adapters["layers"]:
    return base
  layers = dict(base["layers"])
  for name in cfg.lora.target_names:
    a, b = adapters["layers"][name + SUFFIX_A], adapters["layers"][name + SUFFIX_B]
    w = layers[name]
    update = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(
        a.astype(jnp.float32), b.astype(jnp.float32))
    layers[name] = (w.astype(jnp.float32) + cfg.lora.scale * update).astype(w.dtype)
  return {**base, "layers": layers}


def num_params(adapters: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
