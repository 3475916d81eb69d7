"""RL building blocks as small pure functions, each selected by config name.

Sequences are `tokens_BxL` with `turn_BxL` (t > 0: the token was sampled in turn t;
0: prompt or instruction). Rewards and returns are per turn, `x_BxN`; a turn is a mask,
so per-turn KL coefficients and advantages reach tokens as masks times scalars.
Batches hold G samples per prompt contiguously: rows [p*G, (p+1)*G) share prompt p.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxscore import model as model_lib

# ----------------------------------------------------------------------------
# Log-probabilities.


def shifted_logprobs(logits_BxLxV: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
  """log p(tokens[:, t] | tokens[:, :t]) at position t (0 at t = 0), in float32."""
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  taken = jnp.take_along_axis(logp_BxLxV, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(taken, ((0, 0), (1, 0)))


def token_logprobs(params, tokens_BxL, mask_BxL, cfg: model_lib.ModelConfig):
  """(logp_BxL, logits_BxLxV) of a model on its own sequences, teacher-forced."""
  logits, _ = model_lib.apply(params, tokens_BxL, cfg, mask_BxT=mask_BxL)
  return shifted_logprobs(logits, tokens_BxL), logits


# ----------------------------------------------------------------------------
# KL(pi || pi_ref) per token.


def kl_k1(logp_BxL, ref_logp_BxL, logits=None, ref_logits=None):
  """log pi - log pi_ref: unbiased, can be negative."""
  del logits, ref_logits
  return logp_BxL - ref_logp_BxL


def kl_k3(logp_BxL, ref_logp_BxL, logits=None, ref_logits=None):
  """exp(r) - r - 1 with r = log pi_ref - log pi: unbiased and >= 0 (Schulman)."""
  del logits, ref_logits
  r = ref_logp_BxL - logp_BxL
  return jnp.exp(r) - r - 1.0


def kl_exact(logp_BxL, ref_logp_BxL, logits, ref_logits):
  """sum_v pi(v) (log pi(v) - log pi_ref(v)) over the whole vocabulary."""
  del logp_BxL, ref_logp_BxL
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  ref = jax.nn.log_softmax(ref_logits[:, :-1].astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(logp) * (logp - ref), axis=-1)
  return jnp.pad(kl, ((0, 0), (1, 0)))


KL_ESTIMATORS: dict[str, Callable] = {"k1": kl_k1, "k3": kl_k3, "exact": kl_exact}


def turn_weights(turn_BxL: jax.Array, per_turn_N: jax.Array) -> jax.Array:
  """Per-token weight: per_turn[t - 1] on tokens of turn t, 0 elsewhere."""
  padded = jnp.concatenate([jnp.zeros((1,), per_turn_N.dtype), per_turn_N])
  return padded[jnp.clip(turn_BxL, 0, per_turn_N.shape[0])]


def turn_values(turn_BxL: jax.Array, x_BxN: jax.Array) -> jax.Array:
  """Per-token value: x[b, t - 1] on row b's tokens of turn t, 0 elsewhere."""
  padded_Bx1N = jnp.pad(x_BxN, ((0, 0), (1, 0)))
  idx = jnp.clip(turn_BxL, 0, x_BxN.shape[1])
  return jnp.take_along_axis(padded_Bx1N, idx, axis=1)


def turn_sums(x_BxL: jax.Array, turn_BxL: jax.Array, num_turns: int) -> jax.Array:
  """sum of x over the tokens of each turn: x_BxN."""
  masks_NxBxL = turn_BxL[None] == jnp.arange(1, num_turns + 1)[:, None, None]
  return jnp.sum(jnp.where(masks_NxBxL, x_BxL[None], 0.0), axis=-1).T


# ----------------------------------------------------------------------------
# Rewards and returns.


def progress_bonus(rewards_BxN: jax.Array, alpha: float) -> jax.Array:
  """SCoRe: the last turn gains alpha * (r_last - r_previous); other turns unchanged."""
  last = rewards_BxN[:, -1] + alpha * (rewards_BxN[:, -1] - rewards_BxN[:, -2])
  return rewards_BxN.at[:, -1].set(last)


def discounted_returns(rewards_BxN: jax.Array, gamma: float) -> jax.Array:
  """G_t = R_t + gamma * G_{t+1}: each turn's tokens are credited with G_t."""
  def step(carry, r_B):
    g = r_B + gamma * carry
    return g, g
  _, g_NxB = jax.lax.scan(step, jnp.zeros_like(rewards_BxN[:, 0]), rewards_BxN.T, reverse=True)
  return g_NxB.T


# ----------------------------------------------------------------------------
# Advantages over the G samples of each prompt, per turn.


def _groups(x_BxN: jax.Array, group_size: int) -> jax.Array:
  b, n = x_BxN.shape
  if b % group_size:
    raise ValueError(f"batch {b} is not a multiple of group_size={group_size}")
  return x_BxN.reshape(b // group_size, group_size, n)


def rloo_advantages(returns_BxN: jax.Array, group_size: int) -> jax.Array:
  """Return minus the mean return of the other G - 1 samples of the same prompt."""
  if group_size < 2:
    raise ValueError("RLOO needs group_size >= 2")
  g = _groups(returns_BxN, group_size)
  others = (g.sum(axis=1, keepdims=True) - g) / (group_size - 1)
  return (g - others).reshape(returns_BxN.shape)


def group_advantages(returns_BxN: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
  """GRPO: (return - group mean) / (group std + eps)."""
  g = _groups(returns_BxN, group_size)
  mean = g.mean(axis=1, keepdims=True)
  std = g.std(axis=1, keepdims=True)
  return ((g - mean) / (std + eps)).reshape(returns_BxN.shape)


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {"rloo": rloo_advantages, "grpo": group_advantages}


# ----------------------------------------------------------------------------
# Losses and their aggregation over tokens.


def aggregate(x_BxL: jax.Array, mask_BxL: jax.Array, how: str) -> jax.Array:
  """token_mean: mean over all masked tokens of the batch; sequence_mean: mean over
  rows of each row's token mean; sum: sum over masked tokens divided by rows."""
  mask = mask_BxL.astype(jnp.float32)
  if how == "token_mean":
    return jnp.sum(x_BxL * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  if how == "sequence_mean":
    per_row = jnp.sum(x_BxL * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return jnp.mean(per_row)
  if how == "sum":
    return jnp.sum(x_BxL * mask) / x_BxL.shape[0]
  raise ValueError(f"aggregation={how!r}: expected token_mean, sequence_mean or sum")


def reinforce_loss(logp_BxL, advantages_BxL, old_logp_BxL=None, clip_eps=None):
  """-A * log pi: on-policy REINFORCE (no ratio, no clipping)."""
  del old_logp_BxL, clip_eps
  return -jax.lax.stop_gradient(advantages_BxL) * logp_BxL


def clipped_ratio_loss(logp_BxL, advantages_BxL, old_logp_BxL, clip_eps=0.2):
  """PPO/GRPO: -min(ratio * A, clip(ratio, 1 +- eps) * A), ratio = pi / pi_old."""
  adv = jax.lax.stop_gradient(advantages_BxL)
  ratio = jnp.exp(logp_BxL - jax.lax.stop_gradient(old_logp_BxL))
  return -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)


POLICY_LOSSES: dict[str, Callable] = {"reinforce": reinforce_loss, "clipped": clipped_ratio_loss}


def dpo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta):
  """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) on sequence log-probs."""
  margin = (policy_chosen_B - ref_chosen_B) - (policy_rejected_B - ref_rejected_B)
  return -jax.nn.log_sigmoid(beta * margin)


def pick(table: dict[str, Callable], name: str, what: str) -> Callable:
  if name not in table:
    raise ValueError(f"{what}={name!r}: expected one of {', '.join(table)}")
  return table[name]
