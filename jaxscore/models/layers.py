"""Building blocks every family's layer is made of: RMSNorm, RoPE, grouped-query
attention (optionally soft-capped), gated MLPs, query/key/value projections.

Shapes follow the package legend (`jaxscore/__init__.py`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxscore.models import lora
from jaxscore.models.config import ModelConfig, RopeScaling

# Activations and the cache have names of their own, so a rules table can shard a
# parameter's `embed` over fsdp while keeping activations' embed whole.
ACT_EMBED = ("activation_batch", "activation_length", "activation_embed")
ACT_MLP = ("activation_batch", "activation_length", "activation_mlp")


def rms_norm(x_BxTxD: jax.Array, scale_D: jax.Array, eps: float,
             offset: float = 0.0) -> jax.Array:
  """x / rms(x) * (offset + scale), in float32."""
  x = x_BxTxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (x * (offset + scale_D.astype(jnp.float32))).astype(x_BxTxD.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
  """Inverse frequencies of the rotary embedding, scaled as `scaling` says."""
  dim = head_dim
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, jnp.float32) / dim))
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


def global_inv_freq(cfg: ModelConfig) -> jax.Array:
  return rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


def local_inv_freq(cfg: ModelConfig) -> jax.Array:
  """The sliding-window layers' frequencies (their own base where the family has one)."""
  if cfg.local_rope_theta is None:
    return global_inv_freq(cfg)
  return rope_inv_freq(cfg.head_dim, cfg.local_rope_theta, None)


def apply_rope(x_BxTxAxH: jax.Array, positions_BxT: jax.Array,
               inv_freq_H2: jax.Array) -> jax.Array:
  """Rotary embedding in the half-split layout of Hugging Face checkpoints; A heads of
  either kind (query or kv)."""
  angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_H2
  sin = jnp.sin(angles_BxTxH2)[:, :, None, :]
  cos = jnp.cos(angles_BxTxH2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxAxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxAxH.dtype)


def attention_scale(cfg: ModelConfig) -> float:
  return (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5


def attention(q_BxTxQxH: jax.Array, ks: Sequence[jax.Array], vs: Sequence[jax.Array],
              visible_BxTxR: jax.Array, scale: float,
              softcap: float | None = None) -> jax.Array:
  """Grouped-query attention over keys given in blocks along the sequence (`ks`, `vs`:
  B x S_i x K x H each, e.g. the cache and the new chunk), without concatenating them:
  one softmax, in float32, over all blocks; `visible_BxTxR` covers R = sum S_i."""
  b, t, n, h = q_BxTxQxH.shape
  k = ks[0].shape[2]
  g = n // k
  # Queries of a kv group side by side: one (T*G x S) matmul per (row, kv head).
  q_BxKxQxH = (q_BxTxQxH.reshape(b, t, k, g, h).transpose(0, 2, 1, 3, 4)
               .reshape(b, k, t * g, h))
  logits = jnp.concatenate(
      [jnp.einsum("bkqh,bskh->bkqs", q_BxKxQxH, kb, preferred_element_type=jnp.float32)
       for kb in ks], axis=-1) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  visible_Bx1xQxR = jnp.repeat(visible_BxTxR, g, axis=1)[:, None]
  logits = jnp.where(visible_Bx1xQxR, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(vs[0].dtype)
  sizes = [kb.shape[1] for kb in ks]
  parts = jnp.split(probs, np.cumsum(sizes)[:-1], axis=-1) if len(ks) > 1 else [probs]
  out_BxKxQxH = sum(jnp.einsum("bkqs,bskh->bkqh", p, vb) for p, vb in zip(parts, vs))
  return (out_BxKxQxH.reshape(b, k, t, g, h).transpose(0, 2, 1, 3, 4)
          .reshape(b, t, n, h))


_ACTIVATIONS = {"silu": jax.nn.silu,
                "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


# From this many tokens in one call (training, teacher-forced log-probs, long prefills)
# gate and up run as one matmul over the two weights stacked (embed x 2 x mlp, the
# `mlp` axis and its sharding kept): one wider matmul forward and one in each half of
# the backward pass instead of two, for a per-call copy of the two weights. Below it
# (decode steps), reading the weights is the cost and that copy would add to it.
STACK_GATE_UP_MIN_TOKENS = 1024


def gate_up(x_BxTxD, lp, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(gate(x), up(x)), each B x T x F, with their adapters where `lp` has them."""
  b, t, _ = x_BxTxD.shape
  if (b * t < STACK_GATE_UP_MIN_TOKENS or lora.is_quantized(lp["gate"])
      or lora.is_quantized(lp["up"])):
    return (dense("btd,df->btf", x_BxTxD, lp, "gate", cfg),
            dense("btd,df->btf", x_BxTxD, lp, "up", cfg))
  dtype = jnp.dtype(cfg.dtype)
  w_Dx2xF = jnp.stack([lp["gate"].astype(dtype), lp["up"].astype(dtype)], axis=1)
  gu_BxTx2xF = jnp.einsum("btd,dcf->btcf", x_BxTxD, w_Dx2xF)
  return (with_adapter(gu_BxTx2xF[:, :, 0], x_BxTxD, lp, "gate", cfg),
          with_adapter(gu_BxTx2xF[:, :, 1], x_BxTxD, lp, "up", cfg))


def gated_mlp(x_BxTxD, lp, cfg: ModelConfig):
  """down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (gelu_tanh)."""
  gate_BxTxF, up_BxTxF = gate_up(x_BxTxD, lp, cfg)
  h_BxTxF = nn.with_logical_constraint(
      _ACTIVATIONS[cfg.mlp_activation](gate_BxTxF) * up_BxTxF, ACT_MLP)
  return dense("btf,fd->btd", h_BxTxF, lp, "down", cfg)


@functools.partial(jax.checkpoint, static_argnums=(0, 3))
def _dequantized_einsum(equation: str, x, w, dtype):
  """x times a quantized (QLoRA) weight, dequantized next to its one use. Under
  `jax.checkpoint` the backward pass keeps the quantized weight (already resident) and
  dequantizes it again, instead of saving every layer's full-precision copy."""
  return jnp.einsum(equation, x, lora.dequantize(w).astype(dtype))


def dense(equation: str, x, lp, name: str, cfg: ModelConfig):
  """x times weight `name` of the layer, plus its low-rank adapter where `lp` has one
  (jaxscore.models.lora: the merged matrix is never formed)."""
  w, dtype = lp[name], jnp.dtype(cfg.dtype)
  if lora.is_quantized(w):
    y = _dequantized_einsum(equation, x, w, dtype)
  else:
    y = jnp.einsum(equation, x, w.astype(dtype))
  return with_adapter(y, x, lp, name, cfg)


def with_adapter(y, x, lp, name: str, cfg: ModelConfig):
  """`y` (x times weight `name`) plus the weight's low-rank adapter where `lp` has one."""
  if cfg.lora_scale is not None and name + lora.SUFFIX_A in lp:
    y = y + lora.delta(x, lp, name, cfg.lora_scale)
  return y


def qkv(x_BxTxD, lp, cfg: ModelConfig, positions_BxT, inv_freq_H2):
  """Projected queries, keys and values; biases (Qwen2) and per-head norms (Qwen3,
  Gemma 3) where the config has them, then RoPE on queries and keys."""
  dtype = jnp.dtype(cfg.dtype)
  q = dense("btd,dnh->btnh", x_BxTxD, lp, "q", cfg)
  k = dense("btd,dkh->btkh", x_BxTxD, lp, "k", cfg)
  v = dense("btd,dkh->btkh", x_BxTxD, lp, "v", cfg)
  if cfg.qkv_bias:
    q, k, v = (q + lp["q_bias"].astype(dtype), k + lp["k_bias"].astype(dtype),
               v + lp["v_bias"].astype(dtype))
  if cfg.qk_norm:
    q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  return (apply_rope(q, positions_BxT, inv_freq_H2),
          apply_rope(k, positions_BxT, inv_freq_H2), v)


def out_proj(attn_BxTxQxH, lp, cfg: ModelConfig):
  return dense("btnh,nhd->btd", attn_BxTxQxH, lp, "o", cfg)


def attention_axes(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
  """Logical axes of the attention parameters every family shares."""
  axes = {
      "q": ("layers", "embed", "heads", "head_dim"),
      "k": ("layers", "embed", "kv_heads", "head_dim"),
      "v": ("layers", "embed", "kv_heads", "head_dim"),
      "o": ("layers", "heads", "head_dim", "embed"),
  }
  if cfg.qkv_bias:
    axes |= {"q_bias": ("layers", "heads", "head_dim"),
             "k_bias": ("layers", "kv_heads", "head_dim"),
             "v_bias": ("layers", "kv_heads", "head_dim")}
  if cfg.qk_norm:
    axes |= {"q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim")}
  return axes


MLP_AXES = {"gate": ("layers", "embed", "mlp"), "up": ("layers", "embed", "mlp"),
            "down": ("layers", "mlp", "embed")}
