"""Per-token log-probabilities, entropies and exact KLs of a model on given sequences,
teacher-forced: what RL, SFT and DPO losses and the loops' reference passes are built on.
Position t holds log p(tokens[:, t] | tokens[:, :t]) (0 at t = 0)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxscore.models import model as model_lib


def shifted_log_softmax(logits_BxTxV: jax.Array) -> jax.Array:
  """log p(. | tokens[:, :t]) for positions t = 1..T-1, in float32: B x (T-1) x V."""
  return jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)


def taken_logprobs(logp_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
  """log p(tokens[:, t] | tokens[:, :t]) at position t (0 at t = 0), from
  `shifted_log_softmax`."""
  taken = jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(taken, ((0, 0), (1, 0)))


def shifted_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
  """log p(tokens[:, t] | tokens[:, :t]) at position t (0 at t = 0), in float32."""
  return taken_logprobs(shifted_log_softmax(logits_BxTxV), tokens_BxT)


def token_stats(params, x_BxTxD, tokens_BxT, cfg: model_lib.ModelConfig,
                ref_params=None, ref_x_BxTxD=None):
  """Per-token (log p(token), entropy, exact KL to the reference or None), each B x T
  with 0 at t = 0, from final hidden states (`apply(..., return_hidden=True)`). The
  entropy carries no gradient.

  Logits are formed `cfg.logits_chunk` positions at a time under `jax.checkpoint`, so
  neither the forward nor the backward pass holds B x T x V float32 logits: the
  backward recomputes one chunk's logits at a time. 0: all positions at once.
  """
  b, t, d = x_BxTxD.shape
  with_ref = ref_x_BxTxD is not None

  def stats(x_BxCxD, targets_BxC, ref_x_BxCxD):
    logits_BxCxV = model_lib.unembed(params, x_BxCxD, cfg)
    # log p(token) = logit - logsumexp: its gradient is one pass over the vocabulary
    # (onehot - softmax), where a materialized log-softmax's takes several.
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    taken = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0] - lse_BxC
    logp_BxCxV = logits_BxCxV - lse_BxC[..., None]
    # The entropy is reported, never differentiated: without a gradient the backward
    # pass neither recomputes nor differentiates its pass over the vocabulary.
    sg_logp_BxCxV = jax.lax.stop_gradient(logp_BxCxV)
    entropy = -jnp.sum(jnp.exp(sg_logp_BxCxV) * sg_logp_BxCxV, axis=-1)
    kl = None
    if with_ref:
      p_BxCxV = jnp.exp(logp_BxCxV)
      ref_logp_BxCxV = jax.nn.log_softmax(
          model_lib.unembed(jax.lax.stop_gradient(ref_params), ref_x_BxCxD, cfg), axis=-1)
      kl = jnp.sum(p_BxCxV * (logp_BxCxV - ref_logp_BxCxV), axis=-1)
    return taken, entropy, kl

  # Position i predicts token i + 1.
  x, targets = x_BxTxD[:, :-1], tokens_BxT[:, 1:]
  ref_x = ref_x_BxTxD[:, :-1] if with_ref else None
  n = t - 1
  chunk = min(cfg.logits_chunk, n) if cfg.logits_chunk else n
  if chunk == n:
    out = stats(x, targets, ref_x)
  else:
    k = -(-n // chunk)
    to_chunks = lambda a: jnp.moveaxis(
        jnp.pad(a, [(0, 0), (0, k * chunk - n)] + [(0, 0)] * (a.ndim - 2))
        .reshape(b, k, chunk, *a.shape[2:]), 1, 0)
    per_chunk = jax.lax.map(jax.checkpoint(lambda args: stats(*args), prevent_cse=False),
                            (to_chunks(x), to_chunks(targets),
                             to_chunks(ref_x) if with_ref else None))
    out = jax.tree.map(lambda a_KxBxC: jnp.moveaxis(a_KxBxC, 0, 1).reshape(b, -1)[:, :n],
                       per_chunk)
  return jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (1, 0))), out)


def token_logprobs(params, tokens_BxT, mask_BxT, cfg: model_lib.ModelConfig):
  """(logp_BxT, entropy_BxT) of a model on its own sequences, teacher-forced; logits in
  chunks as `cfg.logits_chunk` says."""
  x_BxTxD, _ = model_lib.apply(params, tokens_BxT, cfg, mask_BxT=mask_BxT, return_hidden=True)
  logp, entropy, _ = token_stats(params, x_BxTxD, tokens_BxT, cfg)
  return logp, entropy


def sliced_token_logprobs(params, tokens_BxT, mask_BxT, cfg: model_lib.ModelConfig,
                          slices: int = 1) -> jax.Array:
  """`token_logprobs(...)[0]` computed over `slices` strided slices of the rows one
  after another (`lax.map`), holding one slice's activations at a time."""
  if slices == 1:
    return token_logprobs(params, tokens_BxT, mask_BxT, cfg)[0]
  b = tokens_BxT.shape[0]
  if b % slices:
    raise ValueError(f"a batch of {b} rows does not split into optim.micro_batches={slices} "
                     "equal slices")
  split = lambda x: jnp.swapaxes(x.reshape(b // slices, slices, *x.shape[1:]), 0, 1)
  logp_MxRxT = jax.lax.map(lambda tm: token_logprobs(params, tm[0], tm[1], cfg)[0],
                           (split(tokens_BxT), split(mask_BxT)))
  return jnp.swapaxes(logp_MxRxT, 0, 1).reshape(b, -1)
