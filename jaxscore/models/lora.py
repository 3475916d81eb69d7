"""LoRA as a transform of the params tree: low-rank adapters beside the frozen weights.

A targeted weight W (say q: D x Q x H) gets `<name>_lora_a` (D x r) and `<name>_lora_b`
(r x Q x H) in the same layer slice of `params["layers"]`; the layer computes
x W + (alpha / r) (x A) B, never the merged matrix, so the base weights stay frozen and
unchanged in memory. B starts at zero, so a model with fresh adapters is exactly its base
model, and the base params alone (no adapter leaves) are the reference policy: no second
copy of the weights.

qwix (Google's LoRA and quantization library) rewrites the matmuls of Flax modules; this
model is pure functions over a params dict, so LoRA is written here as leaves of that
dict and the branch in `layers`.

  cfg = cfg.replace(lora=lora.LoraConfig(rank=8, alpha=16))
  adapters = model.init_lora(cfg, rng)                 # only these are trained
  params = lora.combine(base_params, adapters)         # what model.apply runs
  merged = lora.merge(params, cfg)                     # plain weights, for export

QLoRA (`cfg.lora.quantize` int8 or nf4) stores the frozen base's seven projections as
qwix `QArray`s (quantized values and one absmax scale per block of `quant_block` inputs);
`layers.dense` dequantizes each inside its matmul, one scanned layer at a time, so the
full-precision base never exists on the device. The adapters are never quantized.
qwix's array-level `quantize`/`dequantize` fit a params tree directly; its Flax-module
rewriting does not apply here.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from jax.sharding import NamedSharding, PartitionSpec

from jaxscore.models.config import LORA_TARGETS as TARGETS
from jaxscore.models.config import LoraConfig

__all__ = ["LoraConfig", "TARGETS", "adapter_axes", "combine", "delta", "dequantize",
           "init_adapters", "is_adapter", "is_quantized", "merge", "num_params", "quantize_base",
           "quantized_shardings", "split"]

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


def init_adapters(layer_shapes: dict, cfg, rng: jax.Array) -> dict:
  """Fresh adapters of the layer weights shaped `layer_shapes` (model.param_shapes'
  "layers"; `model.init_lora` passes them): A ~ N(0, 1/fan_in) (PEFT draws it
  Kaiming-uniform), B = 0."""
  shapes = layer_shapes
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
  """Plain params: every adapted weight replaced by W + (alpha / r) A B, a quantized
  base dequantized first (for export, or to freeze a stage's adapters into the base of
  the next)."""
  base, adapters = split(params)
  base = dequantize_base(base)
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


# ----------------------------------------------------------------------------
# QLoRA: the frozen base's projections stored quantized.

_QTYPES = {"int8": jnp.int8, "nf4": "nf4"}


def is_quantized(w: Any) -> bool:
  return isinstance(w, qwix.QArray)


def dequantize(w: Any) -> jax.Array:
  """A weight as a plain array, whether or not it is stored quantized."""
  return qwix.dequantize(w) if is_quantized(w) else w


def dequantize_base(params: dict) -> dict:
  """Params with every quantized projection back at full precision."""
  return {**params, "layers": {k: dequantize(v) for k, v in params["layers"].items()}}


def _tiling(name: str, shape: tuple[int, ...], block: int) -> tuple[tuple[int, ...], int, int]:
  """(channelwise axes, tiled axis, block) of stacked weight `name`: blocks along its
  last input axis (the whole axis where it is shorter than `block`), one scale per block
  and per every other index, layers included."""
  tiled = _INPUT_AXES[name]
  block = min(block, shape[tiled])
  if shape[tiled] % block:
    raise ValueError(f"model.lora.quant_block={block} does not divide axis {tiled} "
                     f"(size {shape[tiled]}) of weight {name} {tuple(shape)}: pick a "
                     "divisor")
  return tuple(a for a in range(len(shape)) if a != tiled), tiled, block


def _quantize_one(name: str, w: jax.Array, cfg) -> qwix.QArray:
  channelwise, tiled, block = _tiling(name, w.shape, cfg.lora.quant_block)
  return qwix.quantize(w, _QTYPES[cfg.lora.quantize], channelwise_axes=channelwise,
                       tiled_axes={tiled: block})


def quantize_base(params: dict, cfg) -> dict:
  """The params with the base's projections stored as `cfg.lora.quantize` (unchanged
  when it is none; a weight already quantized is kept as it is)."""
  if cfg.quantize == "none":
    return params
  layers = dict(params["layers"])
  for name in TARGETS:
    if name in layers and not is_quantized(layers[name]):
      layers[name] = _quantize_one(name, layers[name], cfg)
  return {**params, "layers": layers}


def quantized_shardings(shardings: dict, shapes: dict, cfg) -> dict:
  """`shardings` (of full-precision params) with each quantized projection's sharding
  as a QArray of shardings: values laid out like the weight, scales too, except along
  the tiled axis when its number of blocks does not divide over the mesh axes there."""
  if cfg.quantize == "none":
    return shardings
  layers = dict(shardings["layers"])
  for name in TARGETS:
    if name not in layers:
      continue
    s, shape = layers[name], shapes["layers"][name]
    _, tiled, block = _tiling(name, shape, cfg.lora.quant_block)
    spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
    mesh_axes = spec[tiled] if isinstance(spec[tiled], tuple) else (spec[tiled],)
    size = math.prod(s.mesh.shape[a] for a in mesh_axes if a is not None)
    if (shape[tiled] // block) % size:
      spec[tiled] = None
    layers[name] = qwix.QArray(qvalue=s, scale=NamedSharding(s.mesh, PartitionSpec(*spec)),
                               zero_point=None, qtype=_QTYPES[cfg.lora.quantize])
  return {**shardings, "layers": layers}
