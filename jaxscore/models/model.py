"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) as pure functions.

Shapes follow the package legend (`jaxscore/__init__.py`); here N counts query heads.

  params = init(cfg, rng)
  logits_BxTxV, _ = apply(params, tokens_BxT, cfg)                 # full forward
  cache = init_cache(cfg, batch_size=B, max_len=S)
  logits_BxTxV, cache = apply(params, tokens_BxT, cfg, cache=cache)  # prefill / decode

A cache holds, per row, the keys and values of that row's tokens in slots 0..end-1; a
call with a cache writes the row's new tokens at slots end, end+1, ... and advances end by
the number of valid (mask=1) tokens. Valid tokens of a chunk must come first (right
padding), so padding written past `end` is overwritten by the row's next tokens and never
attended to. Layers are stacked on a leading axis and run under `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 (`llama3`) or position-interpolation (`linear`) RoPE scaling."""

  rope_type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a Llama-family decoder."""

  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  head_dim: int | None = None  # None: embed_dim // num_heads.
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2.
  sliding_window: int | None = None  # Mistral: a key is seen while q - k < window.
  max_position_embeddings: int = 4096
  param_dtype: str = "float32"
  dtype: str = "float32"  # Compute dtype; softmax and norms always run in float32.
  # What the backward pass keeps of each scanned layer (training memory, not results):
  # none (every activation), full (only the layer's input; the rest is recomputed),
  # dots (the weight matmuls' outputs; norms, RoPE, attention and SiLU are recomputed).
  remat: str = "none"
  # Per-token log-probs from logits `logits_chunk` positions at a time, so the
  # B x T x vocabulary float32 logits never exist at once (backward pass included);
  # 0 computes them all at once.
  logits_chunk: int = 0

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
    if self.logits_chunk < 0:
      raise ValueError(f"logits_chunk={self.logits_chunk}: expected >= 0 (0: no chunks)")
    for field in ("param_dtype", "dtype"):
      if getattr(self, field) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{field}={getattr(self, field)!r}: expected float32, "
                         "bfloat16 or float16")

  def replace(self, **kwargs) -> ModelConfig:
    return dataclasses.replace(self, **kwargs)


@flax.struct.dataclass
class Cache:
  """Per-layer keys and values, and how many slots each row has filled."""

  # kv heads before slots: attention is then a plain batched matmul over (B, K),
  # which XLA runs much faster than with K between S and H.
  k_LxBxKxSxH: jax.Array
  v_LxBxKxSxH: jax.Array
  end_B: jax.Array  # int32

  @property
  def max_len(self) -> int:
    return self.k_LxBxKxSxH.shape[3]


# Logical axis names. A sharding rules table maps them to mesh axes; see
# `flax.linen.logical_to_mesh_sharding`.
def param_axes(cfg: ModelConfig) -> Params:
  """Logical axis names of every parameter, a pytree shaped like `init`'s."""
  layers = {
      "attn_norm": ("layers", "norm"),
      "q": ("layers", "embed", "heads", "head_dim"),
      "k": ("layers", "embed", "kv_heads", "head_dim"),
      "v": ("layers", "embed", "kv_heads", "head_dim"),
      "o": ("layers", "heads", "head_dim", "embed"),
      "mlp_norm": ("layers", "norm"),
      "gate": ("layers", "embed", "mlp"),
      "up": ("layers", "embed", "mlp"),
      "down": ("layers", "mlp", "embed"),
  }
  if cfg.qkv_bias:
    layers |= {
        "q_bias": ("layers", "heads", "head_dim"),
        "k_bias": ("layers", "kv_heads", "head_dim"),
        "v_bias": ("layers", "kv_heads", "head_dim"),
    }
  axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("norm",)}
  if not cfg.tie_embeddings:
    axes["lm_head"] = ("embed", "vocab")
  return axes


# Activations and the cache have names of their own, so a rules table can shard a
# parameter's `embed` over fsdp while keeping activations' embed whole.
ACT_EMBED = ("activation_batch", "activation_length", "activation_embed")
ACT_MLP = ("activation_batch", "activation_length", "activation_mlp")


def cache_axes() -> Cache:
  kv = ("layers", "cache_batch", "cache_kv_heads", "cache_sequence", "head_dim")
  return Cache(k_LxBxKxSxH=kv, v_LxBxKxSxH=kv, end_B=("cache_batch",))


def param_shapes(cfg: ModelConfig) -> Params:
  """Shape of every parameter, a pytree shaped like `init`'s."""
  sizes = {
      "layers": cfg.num_layers, "embed": cfg.embed_dim, "heads": cfg.num_heads,
      "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "mlp": cfg.mlp_dim,
      "vocab": cfg.vocab_size, "norm": cfg.embed_dim,
  }
  return jax.tree.map(lambda axes: tuple(sizes[a] for a in axes),
                      param_axes(cfg), is_leaf=_is_axes)


def _is_axes(x) -> bool:
  """A leaf of `param_axes` (names) or `param_shapes` (sizes)."""
  return isinstance(x, tuple) and all(isinstance(a, (str, int)) for a in x)


def init(cfg: ModelConfig, rng: jax.Array, stddev: float = 0.02) -> Params:
  """Random parameters: normal(stddev) matrices, unit norms, zero biases."""
  shapes = param_shapes(cfg)
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_axes)
  rngs = jax.random.split(rng, len(with_paths))
  dtype = jnp.dtype(cfg.param_dtype)

  def one(path, shape, key):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      return jnp.ones(shape, dtype)
    if "bias" in name:
      return jnp.zeros(shape, dtype)
    return (stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

  return jax.tree.unflatten(
      treedef, [one(p, s, k) for (p, s), k in zip(with_paths, rngs)])


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> Cache:
  shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
  return Cache(
      k_LxBxKxSxH=jnp.zeros(shape, cfg.dtype),
      v_LxBxKxSxH=jnp.zeros(shape, cfg.dtype),
      end_B=jnp.zeros((batch_size,), jnp.int32),
  )


# ----------------------------------------------------------------------------
# Building blocks.


def rms_norm(x_BxTxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  x = x_BxTxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (x * scale_D.astype(jnp.float32)).astype(x_BxTxD.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies of the rotary embedding, scaled as the config says."""
  dim = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, jnp.float32) / dim))
  scaling = cfg.rope_scaling
  if scaling is None:
    return inv_freq
  if scaling.rope_type == "linear":
    return inv_freq / scaling.factor
  if scaling.rope_type != "llama3":
    raise ValueError(f"rope_scaling.rope_type={scaling.rope_type!r} is not "
                     "supported (llama3, linear)")
  # Llama 3.1: keep high frequencies, divide low ones by `factor`, and blend
  # linearly in between.
  old_len = scaling.original_max_position_embeddings
  wavelen = 2 * math.pi / inv_freq
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = ((old_len / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(is_medium, blended, scaled)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array,
               inv_freq_H2: jax.Array) -> jax.Array:
  """Rotary embedding in the half-split layout of Hugging Face checkpoints."""
  angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_H2
  sin = jnp.sin(angles_BxTxH2)[:, :, None, :]
  cos = jnp.cos(angles_BxTxH2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def attention(q_BxTxNxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array,
              visible_BxTxS: jax.Array) -> jax.Array:
  """Grouped-query attention; softmax in float32."""
  b, t, n, h = q_BxTxNxH.shape
  k = k_BxKxSxH.shape[1]
  g = n // k
  # Queries of a kv group side by side: one (T*G x S) matmul per (row, kv head).
  q_BxKxQxH = (q_BxTxNxH.reshape(b, t, k, g, h).transpose(0, 2, 1, 3, 4)
               .reshape(b, k, t * g, h))
  logits_BxKxQxS = jnp.einsum("bkqh,bksh->bkqs", q_BxKxQxH, k_BxKxSxH,
                              preferred_element_type=jnp.float32) * h**-0.5
  visible_Bx1xQxS = jnp.repeat(visible_BxTxS, g, axis=1)[:, None]
  logits_BxKxQxS = jnp.where(visible_Bx1xQxS, logits_BxKxQxS, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BxKxQxS, axis=-1).astype(v_BxKxSxH.dtype)
  out_BxKxQxH = jnp.einsum("bkqs,bksh->bkqh", probs, v_BxKxSxH)
  return (out_BxKxQxH.reshape(b, k, t, g, h).transpose(0, 2, 1, 3, 4)
          .reshape(b, t, n, h))


def _visible(q_pos_BxT, k_pos_BxS, k_valid_BxS, q_idx_BxT, k_idx_S, window):
  """Which keys each query attends to: earlier-or-same slot, valid, in window."""
  visible = (k_idx_S[None, None, :] <= q_idx_BxT[:, :, None]) & k_valid_BxS[:, None, :]
  if window is not None:
    visible &= (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]) < window
  return visible


def _mlp(x_BxTxD, lp, dtype):
  gate_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, lp["gate"].astype(dtype))
  up_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, lp["up"].astype(dtype))
  h_BxTxF = nn.with_logical_constraint(jax.nn.silu(gate_BxTxF) * up_BxTxF,
                                       ACT_MLP)
  return jnp.einsum("btf,fd->btd", h_BxTxF, lp["down"].astype(dtype))


def _qkv(x_BxTxD, lp, cfg, positions_BxT, inv_freq):
  dtype = jnp.dtype(cfg.dtype)
  q = jnp.einsum("btd,dnh->btnh", x_BxTxD, lp["q"].astype(dtype))
  k = jnp.einsum("btd,dkh->btkh", x_BxTxD, lp["k"].astype(dtype))
  v = jnp.einsum("btd,dkh->btkh", x_BxTxD, lp["v"].astype(dtype))
  if cfg.qkv_bias:
    q, k, v = (q + lp["q_bias"].astype(dtype), k + lp["k_bias"].astype(dtype),
               v + lp["v_bias"].astype(dtype))
  return (apply_rope(q, positions_BxT, inv_freq),
          apply_rope(k, positions_BxT, inv_freq), v)


def _block(x_BxTxD, lp, cfg, positions_BxT, inv_freq, attend):
  """One pre-norm decoder layer. `attend(q, k, v) -> out` owns cache handling."""
  dtype = jnp.dtype(cfg.dtype)
  h = rms_norm(x_BxTxD, lp["attn_norm"], cfg.rms_norm_eps)
  q, k, v = _qkv(h, lp, cfg, positions_BxT, inv_freq)
  attn_BxTxNxH, extra = attend(q, k, v)
  x_BxTxD = x_BxTxD + jnp.einsum("btnh,nhd->btd", attn_BxTxNxH, lp["o"].astype(dtype))
  h = rms_norm(x_BxTxD, lp["mlp_norm"], cfg.rms_norm_eps)
  x_BxTxD = x_BxTxD + _mlp(h, lp, dtype)
  return nn.with_logical_constraint(x_BxTxD, ACT_EMBED), extra


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
  return jnp.take(params["embed"], tokens_BxT, axis=0).astype(cfg.dtype)


def unembed(params: Params, x_BxTxD: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Final norm and vocabulary projection; logits in float32."""
  x_BxTxD = rms_norm(x_BxTxD, params["final_norm"], cfg.rms_norm_eps)
  if cfg.tie_embeddings:
    w_DxV = params["embed"].astype(cfg.dtype).T
  else:
    w_DxV = params["lm_head"].astype(cfg.dtype)
  return jnp.einsum("btd,dv->btv", x_BxTxD, w_DxV,
                    preferred_element_type=jnp.float32)


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
  inv_freq = rope_inv_freq(cfg)
  x_BxTxD = nn.with_logical_constraint(embed(params, tokens_BxT, cfg),
                                       ACT_EMBED)
  if cache is None:
    x_BxTxD, new_cache = _apply_full(params, x_BxTxD, mask_BxT, positions_BxT, cfg,
                                     inv_freq), None
  else:
    if positions_BxT is not None:
      raise ValueError("positions_BxT cannot be set with a cache: a cached "
                       "token's position is its slot")
    x_BxTxD, new_cache = _apply_cached(params, x_BxTxD, mask_BxT, cfg, cache, inv_freq,
                                       attend_len)
  if return_hidden:
    return x_BxTxD, new_cache
  return unembed(params, x_BxTxD, cfg), new_cache


def _apply_full(params, x_BxTxD, mask_BxT, positions_BxT, cfg, inv_freq):
  """Every token attends to the earlier real tokens of its row; no cache."""
  b, t = mask_BxT.shape
  if positions_BxT is None:
    positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)
  idx_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
  visible = _visible(positions_BxT, positions_BxT, mask_BxT, idx_BxT,
                     jnp.arange(t), cfg.sliding_window)

  def layer(x, lp):
    return _block(x, lp, cfg, positions_BxT, inv_freq,
                  lambda q, k, v: (attention(q, k.transpose(0, 2, 1, 3),
                                             v.transpose(0, 2, 1, 3), visible), None))

  x_BxTxD, _ = jax.lax.scan(remat(layer, cfg.remat), x_BxTxD, params["layers"])
  return x_BxTxD


def _apply_cached(params, x_BxTxD, mask_BxT, cfg, cache, inv_freq, attend_len=None):
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
  if cfg.sliding_window is not None:
    old_BxTxS &= (slots_BxT[:, :, None] - idx_S[None, None, :]) < cfg.sliding_window
    new_BxTxT &= (jnp.arange(t)[:, None] - jnp.arange(t)[None, :]) < cfg.sliding_window
  visible_BxTxR = jnp.concatenate([old_BxTxS, new_BxTxT], axis=-1)

  def layer(x, inputs):
    lp, k_cache, v_cache = inputs

    def attend(q, k, v):
      k_BxKxTxH, v_BxKxTxH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
      out = _attention_two_blocks(q, (k_cache, k_BxKxTxH), (v_cache, v_BxKxTxH),
                                  visible_BxTxR)
      return out, (k_BxKxTxH, v_BxKxTxH)

    return _block(x, lp, cfg, slots_BxT, inv_freq, attend)

  read = lambda kv: kv if s == cache.max_len else kv[:, :, :, :s]
  x_BxTxD, (k_LxBxKxTxH, v_LxBxKxTxH) = jax.lax.scan(
      layer, x_BxTxD, (params["layers"], read(cache.k_LxBxKxSxH), read(cache.v_LxBxKxSxH)))
  rows_BxT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))

  def write(cache_LxBxKxSxH, new_LxBxKxTxH):
    # Indices split by slices put (B, T) first: the update block is (B, T, L, K, H).
    update = new_LxBxKxTxH.transpose(1, 3, 0, 2, 4).astype(cache_LxBxKxSxH.dtype)
    # Slots past the cache end are dropped; only padding can land there.
    out = cache_LxBxKxSxH.at[:, rows_BxT, :, slots_BxT].set(update, mode="drop")
    return nn.with_logical_constraint(out, cache_axes().k_LxBxKxSxH)

  new_cache = Cache(k_LxBxKxSxH=write(cache.k_LxBxKxSxH, k_LxBxKxTxH),
                    v_LxBxKxSxH=write(cache.v_LxBxKxSxH, v_LxBxKxTxH),
                    end_B=end_B + jnp.sum(mask_BxT, axis=1, dtype=jnp.int32))
  return x_BxTxD, new_cache


def _attention_two_blocks(q_BxTxNxH, ks, vs, visible_BxTxR):
  """`attention` over keys split in blocks along the sequence, without concatenating
  them (one softmax over all blocks)."""
  b, t, n, h = q_BxTxNxH.shape
  k = ks[0].shape[1]
  g = n // k
  q_BxKxQxH = (q_BxTxNxH.reshape(b, t, k, g, h).transpose(0, 2, 1, 3, 4)
               .reshape(b, k, t * g, h))
  logits = jnp.concatenate(
      [jnp.einsum("bkqh,bksh->bkqs", q_BxKxQxH, kb, preferred_element_type=jnp.float32)
       for kb in ks], axis=-1) * h**-0.5
  visible_Bx1xQxR = jnp.repeat(visible_BxTxR, g, axis=1)[:, None]
  logits = jnp.where(visible_Bx1xQxR, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(vs[0].dtype)
  sizes = [kb.shape[2] for kb in ks]
  parts = jnp.split(probs, np.cumsum(sizes)[:-1], axis=-1)
  out_BxKxQxH = sum(jnp.einsum("bkqs,bksh->bkqh", p, vb) for p, vb in zip(parts, vs))
  return (out_BxKxQxH.reshape(b, k, t, g, h).transpose(0, 2, 1, 3, 4)
          .reshape(b, t, n, h))
