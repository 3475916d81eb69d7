"""The decoder stack of every model family (jaxscore.models.families) as pure functions.

Shapes follow the package legend (`jaxscore/__init__.py`).

  params = init(cfg, rng)
  logits_BxTxV, _ = apply(params, tokens_BxT, cfg)                 # full forward
  cache = init_cache(cfg, batch_size=B, max_len=S)
  logits_BxTxV, cache = apply(params, tokens_BxT, cfg, cache=cache)  # prefill / decode

A cache holds, per row, the keys and values of that row's tokens in slots 0..end-1; a
call with a cache writes the row's new tokens at slots end, end+1, ... and advances end by
the number of valid (mask=1) tokens. Valid tokens of a chunk must come first (right
padding), so padding written past `end` is overwritten by the row's next tokens and never
attended to. Layers are stacked on a leading axis and run under `lax.scan`; the family's
block is the scanned function, and a stack whose layers differ (sliding-window and global
layers, each with its own RoPE base) selects per layer inside the scan. Sliding-window
layers keep every slot of the cache and mask what lies outside the window: one cache
array for the whole stack, which a scan needs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxscore.models import families, layers, lora
from jaxscore.models.config import REMAT_POLICIES, LoraConfig, ModelConfig, RopeScaling
from jaxscore.models.layers import ACT_EMBED, ACT_MLP, apply_rope, rms_norm

Params = dict[str, Any]
__all__ = ["ACT_EMBED", "ACT_MLP", "Cache", "LoraConfig", "ModelConfig", "Params", "RopeScaling",
           "apply", "apply_rope", "cache_axes", "embed", "init", "init_cache",
           "param_axes", "param_shapes", "remat", "rms_norm", "unembed"]


@flax.struct.dataclass
class Cache:
  """Per-layer keys and values, and how many slots each row has filled."""

  # Slots before kv heads: a token's keys for every head are one (K, H) tile, the
  # layout the TPU compiler gives the cache inside a decode loop; stored (K, S, H), it
  # copied the whole cache into that layout and back at every decode call (twice the
  # cache in temporaries).
  k_LxBxSxKxH: jax.Array
  v_LxBxSxKxH: jax.Array
  end_B: jax.Array  # int32

  @property
  def max_len(self) -> int:
    return self.k_LxBxSxKxH.shape[2]


# Logical axis names. A sharding rules table maps them to mesh axes; see
# `flax.linen.logical_to_mesh_sharding`.
def param_axes(cfg: ModelConfig) -> Params:
  """Logical axis names of every parameter, a pytree shaped like `init`'s."""
  layer_axes = families.get(cfg.family).layer_axes(cfg)
  if cfg.lora_scale is not None:
    layer_axes |= lora.adapter_axes(cfg, layer_axes)
  axes = {"embed": ("vocab", "embed"), "layers": layer_axes, "final_norm": ("norm",)}
  if not cfg.tie_embeddings:
    axes["lm_head"] = ("embed", "vocab")
  return axes


def cache_axes() -> Cache:
  kv = ("layers", "cache_batch", "cache_sequence", "cache_kv_heads", "head_dim")
  return Cache(k_LxBxSxKxH=kv, v_LxBxSxKxH=kv, end_B=("cache_batch",))


def param_shapes(cfg: ModelConfig) -> Params:
  """Shape of every parameter, a pytree shaped like `init`'s."""
  sizes = {
      "layers": cfg.num_layers, "embed": cfg.embed_dim, "heads": cfg.num_heads,
      "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "mlp": cfg.mlp_dim,
      "vocab": cfg.vocab_size, "norm": cfg.embed_dim,
      "lora_rank": cfg.lora.rank if cfg.lora is not None else 0,
  }
  return jax.tree.map(lambda axes: tuple(sizes[a] for a in axes),
                      param_axes(cfg), is_leaf=_is_axes)


def _is_axes(x) -> bool:
  """A leaf of `param_axes` (names) or `param_shapes` (sizes)."""
  return isinstance(x, tuple) and all(isinstance(a, (str, int)) for a in x)


def init(cfg: ModelConfig, rng: jax.Array, stddev: float = 0.02) -> Params:
  """Random parameters: normal(stddev) matrices, norms that start as the identity (1, or
  0 where the family stores them around `norm_offset`), zero biases; with QLoRA the
  projections as `lora.quantize_base` stores them."""
  shapes = param_shapes(cfg)
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_axes)
  rngs = jax.random.split(rng, len(with_paths))
  dtype = jnp.dtype(cfg.param_dtype)

  def one(path, shape, key):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      return jnp.full(shape, 1.0 - cfg.norm_offset, dtype)
    if "bias" in name or lora.SUFFIX_B in name:  # Fresh adapters change nothing.
      return jnp.zeros(shape, dtype)
    return (stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

  params = jax.tree.unflatten(
      treedef, [one(p, s, k) for (p, s), k in zip(with_paths, rngs)])
  return lora.quantize_base(params, cfg)  # QLoRA: the base's projections quantized.


def init_lora(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Fresh LoRA adapters for `cfg.lora`: they leave the model's output unchanged."""
  return lora.init_adapters(param_shapes(cfg)["layers"], cfg, rng)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> Cache:
  shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
  return Cache(
      k_LxBxSxKxH=jnp.zeros(shape, cfg.dtype),
      v_LxBxSxKxH=jnp.zeros(shape, cfg.dtype),
      end_B=jnp.zeros((batch_size,), jnp.int32),
  )


# ----------------------------------------------------------------------------
# The stack.


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """The global layers' RoPE inverse frequencies, scaled as the config says."""
  return layers.global_inv_freq(cfg)


class _Layers:
  """What differs between the layers of one stack: whether each slides, and so its
  mask and RoPE frequencies. A uniform stack picks them once, outside the scan; a mixed
  one (Gemma) scans a per-layer flag and selects inside."""

  def __init__(self, cfg: ModelConfig, global_visible, local_visible):
    sliding = cfg.layer_is_sliding
    self.mixed = len(set(sliding)) > 1
    self.sliding_L = jnp.asarray(sliding) if self.mixed else None
    self.uniform_sliding = sliding[0] if not self.mixed else None
    self.global_visible, self.local_visible = global_visible, local_visible
    self.global_freq, self.local_freq = layers.global_inv_freq(cfg), layers.local_inv_freq(cfg)

  def xs(self):
    """Scanned beside the layer params."""
    return self.sliding_L

  def select(self, sliding):
    """(visible, inv_freq) of a layer, given its scanned flag."""
    if not self.mixed:
      if self.uniform_sliding:
        return self.local_visible(), self.local_freq
      return self.global_visible(), self.global_freq
    return (jnp.where(sliding, self.local_visible(), self.global_visible()),
            jnp.where(sliding, self.local_freq, self.global_freq))


def remat(layer_fn, policy: str):
  """`layer_fn` wrapped so that its backward pass recomputes what `policy` does not keep
  (see `ModelConfig.remat`)."""
  if policy == "none":
    return layer_fn
  # Under a scan the recomputation cannot be merged with the forward pass, so CSE
  # prevention (which costs fusion) is not needed.
  if policy == "full":
    return jax.checkpoint(layer_fn, prevent_cse=False)
  if policy == "dots":
    return jax.checkpoint(layer_fn, prevent_cse=False,
                          policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  raise ValueError(f"remat={policy!r}: expected one of {', '.join(REMAT_POLICIES)}")


def embed(params: Params, tokens_BxT: jax.Array, cfg: ModelConfig) -> jax.Array:
  x = jnp.take(params["embed"], tokens_BxT, axis=0)
  if cfg.scale_embeddings:  # Gemma: in the weights' dtype, as transformers does.
    x = x * jnp.asarray(cfg.embed_dim**0.5, x.dtype)
  return x.astype(cfg.dtype)


def unembed(params: Params, x_BxTxD: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Final norm and vocabulary projection (soft-capped where the family does); logits
  in float32."""
  x_BxTxD = rms_norm(x_BxTxD, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  if cfg.tie_embeddings:
    w_DxV = params["embed"].astype(cfg.dtype).T
  else:
    w_DxV = params["lm_head"].astype(cfg.dtype)
  logits = jnp.einsum("btd,dv->btv", x_BxTxD, w_DxV, preferred_element_type=jnp.float32)
  if cfg.final_softcap is not None:
    logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
  return logits


def apply(
    params: Params,
    tokens_BxT: jax.Array,
    cfg: ModelConfig,
    *,
    mask_BxT: jax.Array | None = None,
    positions_BxT: jax.Array | None = None,
    cache: Cache | None = None,
    attend_len: int | None = None,
    return_hidden: bool = False,
) -> tuple[jax.Array, Cache | None]:
  """Forward pass.

  Args:
    params: from `init` or an importer.
    tokens_BxT: int token ids.
    cfg: the architecture.
    mask_BxT: 1 for real tokens, 0 for padding (default all ones). Padding keys are
      never attended to. With a cache, real tokens must precede padding in a row.
    positions_BxT: RoPE positions without a cache (default: count of real tokens
      before each one, so left and right padding both work). With a cache the
      position of a token is its slot.
    cache: if given, the new tokens are appended to it per row and attend to
      everything the row wrote before.
    attend_len: with a cache, attention reads only its first `attend_len` cached slots,
      which must hold every row's earlier tokens (cache end <= attend_len; rows past
      it compute garbage). Decoding a short episode in a long buffer then reads what
      is filled, not the whole buffer. None reads all slots.
    return_hidden: return the final hidden states `x_BxTxD` instead of logits.

  Returns:
    (logits_BxTxV in float32, or hidden states, updated cache or None).
  """
  b, t = tokens_BxT.shape
  if mask_BxT is None:
    mask_BxT = jnp.ones((b, t), jnp.bool_)
  mask_BxT = mask_BxT.astype(jnp.bool_)
  x_BxTxD = nn.with_logical_constraint(embed(params, tokens_BxT, cfg),
                                       ACT_EMBED)
  if cache is None:
    x_BxTxD, new_cache = _apply_full(params, x_BxTxD, mask_BxT, positions_BxT, cfg), None
  else:
    if positions_BxT is not None:
      raise ValueError("positions_BxT cannot be set with a cache: a cached "
                       "token's position is its slot")
    x_BxTxD, new_cache = _apply_cached(params, x_BxTxD, mask_BxT, cfg, cache, attend_len)
  if return_hidden:
    return x_BxTxD, new_cache
  return unembed(params, x_BxTxD, cfg), new_cache


def _visible(q_pos_BxT, k_pos_BxS, k_valid_BxS, q_idx_BxT, k_idx_S, window):
  """Which keys each query attends to: earlier-or-same slot, valid, in window."""
  visible = (k_idx_S[None, None, :] <= q_idx_BxT[:, :, None]) & k_valid_BxS[:, None, :]
  if window is not None:
    visible &= (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]) < window
  return visible


def _apply_full(params, x_BxTxD, mask_BxT, positions_BxT, cfg):
  """Every token attends to the earlier real tokens of its row; no cache."""
  b, t = mask_BxT.shape
  if positions_BxT is None:
    positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)
  idx_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
  visible = lambda window: _visible(positions_BxT, positions_BxT, mask_BxT, idx_BxT,
                                    jnp.arange(t), window)
  stack = _Layers(cfg, lambda: visible(None), lambda: visible(cfg.sliding_window))
  block, scale = families.get(cfg.family).block, layers.attention_scale(cfg)

  def layer(x, inputs):
    lp, sliding = inputs
    visible_BxTxT, inv_freq = stack.select(sliding)

    def attend(q, k, v):
      return layers.attention(q, [k], [v], visible_BxTxT, scale, cfg.attn_softcap), None

    return block(x, lp, cfg, positions_BxT, inv_freq, attend)

  x_BxTxD, _ = jax.lax.scan(remat(layer, cfg.remat), x_BxTxD, (params["layers"], stack.xs()))
  return x_BxTxD


def _apply_cached(params, x_BxTxD, mask_BxT, cfg, cache, attend_len=None):
  """Attends to the row's cached slots and to the new chunk, then writes the chunk.

  Inside the layer scan the cache is only read; each layer's new keys and values come
  out of the scan and are written with one scatter at the end. Updating the cache in
  the scan instead makes XLA copy large buffers every layer.
  """
  b, t = mask_BxT.shape
  s = cache.max_len if attend_len is None else min(attend_len, cache.max_len)
  end_B = cache.end_B
  slots_BxT = end_B[:, None] + jnp.arange(t)[None, :]
  idx_S = jnp.arange(s)
  # Cached slots: the row's own earlier tokens. New chunk: causal within itself.
  old_BxTxS = jnp.broadcast_to((idx_S[None, :] < end_B[:, None])[:, None, :], (b, t, s))
  new_BxTxT = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), jnp.bool_)), (b, t, t))

  def visible(window):
    old, new = old_BxTxS, new_BxTxT
    if window is not None:
      old = old & ((slots_BxT[:, :, None] - idx_S[None, None, :]) < window)
      new = new & ((jnp.arange(t)[:, None] - jnp.arange(t)[None, :]) < window)
    return jnp.concatenate([old, new], axis=-1)

  stack = _Layers(cfg, lambda: visible(None), lambda: visible(cfg.sliding_window))
  block, scale = families.get(cfg.family).block, layers.attention_scale(cfg)

  def layer(x, inputs):
    lp, i, sliding = inputs
    visible_BxTxR, inv_freq = stack.select(sliding)
    k_cache, v_cache = read(cache.k_LxBxSxKxH, i), read(cache.v_LxBxSxKxH, i)

    def attend(q, k_BxTxKxH, v_BxTxKxH):
      out = layers.attention(q, (k_cache, k_BxTxKxH), (v_cache, v_BxTxKxH), visible_BxTxR,
                             scale, cfg.attn_softcap)
      return out, (k_BxTxKxH, v_BxTxKxH)

    return block(x, lp, cfg, slots_BxT, inv_freq, attend)

  # Layer i's first s slots, sliced in one piece inside the scan: slicing the window
  # of the whole stack first copies every layer's cache once more at every step.
  def read(cache_LxBxSxKxH, i):
    _, b_, _, k_, h_ = cache_LxBxSxKxH.shape
    return jax.lax.dynamic_slice(cache_LxBxSxKxH, (i, 0, 0, 0, 0), (1, b_, s, k_, h_))[0]

  x_BxTxD, (k_LxBxTxKxH, v_LxBxTxKxH) = jax.lax.scan(
      layer, x_BxTxD, (params["layers"], jnp.arange(cfg.num_layers), stack.xs()))
  rows_BxT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))

  def write(cache_LxBxSxKxH, new_LxBxTxKxH):
    # Slots past the cache end are dropped; only padding can land there.
    out = cache_LxBxSxKxH.at[:, rows_BxT, slots_BxT].set(
        new_LxBxTxKxH.astype(cache_LxBxSxKxH.dtype), mode="drop")
    return nn.with_logical_constraint(out, cache_axes().k_LxBxSxKxH)

  new_cache = Cache(k_LxBxSxKxH=write(cache.k_LxBxSxKxH, k_LxBxTxKxH),
                    v_LxBxSxKxH=write(cache.v_LxBxSxKxH, v_LxBxTxKxH),
                    end_B=end_B + jnp.sum(mask_BxT, axis=1, dtype=jnp.int32))
  return x_BxTxD, new_cache
