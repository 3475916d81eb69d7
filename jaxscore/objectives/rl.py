"""RL building blocks as small pure functions, each selected by config name.

Shapes follow the package legend (`jaxscore/__init__.py`); N counts turns. Sequences
are `tokens_BxT` with `turn_BxT` (t > 0: the token was sampled in turn t; 0: prompt or
instruction). Rewards and returns are per turn, `x_BxN`; a turn is a mask,
so per-turn KL coefficients and advantages reach tokens as masks times scalars.
Batches hold G samples per prompt contiguously: rows [p*G, (p+1)*G) share prompt p.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------
# KL(pi || pi_ref) per token, estimated on tokens sampled from pi.
#
# Every estimator has the signature (logp_BxT, ref_logp_BxT, logp_BxTxV, ref_logp_BxTxV);
# the last two are the full shifted log-softmaxes, used by `exact` alone. What their
# gradients do when put in the loss, with r = log pi_ref - log pi on sampled tokens:
#   k1 = -r: E_pi[grad k1] = E_pi[grad log pi] = 0. No gradient in expectation, so k1 is
#     refused in the loss; it belongs in the reward (`kl_in_reward`), where REINFORCE
#     turns it into the gradient of the sequence KL(pi || pi_ref).
#   k2 = r^2 / 2: E_pi[grad k2] = E_pi[-r grad log pi] = grad KL(pi || pi_ref), the
#     forward KL's gradient (prefixes held fixed).
#   k3 = exp(r) - r - 1: E_pi[grad k3] = E_pi[(1 - pi_ref / pi) grad log pi]
#     = -sum_v pi_ref grad log pi = grad KL(pi_ref || pi): the reverse KL's gradient,
#     although its value estimates KL(pi || pi_ref) without bias.
#   exact = sum_v pi (log pi - log pi_ref) at each sampled prefix: grad KL(pi || pi_ref)
#     at those prefixes, with no sampling noise over the vocabulary.


def kl_k1(logp_BxT, ref_logp_BxT, logp_BxTxV=None, ref_logp_BxTxV=None):
  """log pi - log pi_ref: unbiased, can be negative."""
  del logp_BxTxV, ref_logp_BxTxV
  return logp_BxT - ref_logp_BxT


def kl_k2(logp_BxT, ref_logp_BxT, logp_BxTxV=None, ref_logp_BxTxV=None):
  """(log pi - log pi_ref)^2 / 2: biased, >= 0, its gradient is the forward KL's."""
  del logp_BxTxV, ref_logp_BxTxV
  return 0.5 * jnp.square(logp_BxT - ref_logp_BxT)


def kl_k3(logp_BxT, ref_logp_BxT, logp_BxTxV=None, ref_logp_BxTxV=None):
  """exp(r) - r - 1 with r = log pi_ref - log pi: unbiased and >= 0 (Schulman)."""
  del logp_BxTxV, ref_logp_BxTxV
  r = ref_logp_BxT - logp_BxT
  return jnp.exp(r) - r - 1.0


def kl_exact(logp_BxT, ref_logp_BxT, logp_BxTxV, ref_logp_BxTxV):
  """sum_v pi(v) (log pi(v) - log pi_ref(v)) over the whole vocabulary."""
  del logp_BxT, ref_logp_BxT
  kl = jnp.sum(jnp.exp(logp_BxTxV) * (logp_BxTxV - ref_logp_BxTxV), axis=-1)
  return jnp.pad(kl, ((0, 0), (1, 0)))


KL_ESTIMATORS: dict[str, Callable] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3,
                                      "exact": kl_exact}
# Sample-based estimators that may be folded into the reward (exact needs the behaviour
# policy's full distribution, which sampling does not keep).
REWARD_KL_ESTIMATORS = ("k1", "k2", "k3")


def check_kl_estimator(name: str, in_reward: bool) -> None:
  """Raises a ValueError for a KL estimator that cannot work where it is used."""
  pick(KL_ESTIMATORS, name, "kl_estimator")
  if in_reward and name not in REWARD_KL_ESTIMATORS:
    raise ValueError(f"kl_estimator={name!r} cannot be folded into the reward "
                     f"(kl_in_reward=True): use one of {', '.join(REWARD_KL_ESTIMATORS)}")
  if not in_reward and name == "k1":
    raise ValueError("kl_estimator='k1' in the loss has zero expected gradient "
                     "(E[grad log pi] = 0): set kl_in_reward=True to fold k1 into the "
                     "reward, or use k2 (forward KL gradient), k3 or exact in the loss")


def turn_weights(turn_BxT: jax.Array, per_turn_N: jax.Array) -> jax.Array:
  """Per-token weight: per_turn[t - 1] on tokens of turn t, 0 elsewhere."""
  padded = jnp.concatenate([jnp.zeros((1,), per_turn_N.dtype), per_turn_N])
  return padded[jnp.clip(turn_BxT, 0, per_turn_N.shape[0])]


def turn_values(turn_BxT: jax.Array, x_BxN: jax.Array) -> jax.Array:
  """Per-token value: x[b, t - 1] on row b's tokens of turn t, 0 elsewhere."""
  padded_Bx1N = jnp.pad(x_BxN, ((0, 0), (1, 0)))
  idx = jnp.clip(turn_BxT, 0, x_BxN.shape[1])
  return jnp.take_along_axis(padded_Bx1N, idx, axis=1)


def turn_sums(x_BxT: jax.Array, turn_BxT: jax.Array, num_turns: int) -> jax.Array:
  """sum of x over the tokens of each turn: x_BxN."""
  masks_NxBxT = turn_BxT[None] == jnp.arange(1, num_turns + 1)[:, None, None]
  return jnp.sum(jnp.where(masks_NxBxT, x_BxT[None], 0.0), axis=-1).T


# ----------------------------------------------------------------------------
# Rewards and returns.


def progress_bonus(rewards_BxN: jax.Array, alpha: float) -> jax.Array:
  """SCoRe's bonus alpha * (r_last - r_previous), on the last turn only: B x N."""
  bonus_B = alpha * (rewards_BxN[:, -1] - rewards_BxN[:, -2])
  return jnp.zeros_like(rewards_BxN).at[:, -1].set(bonus_B)


def discounted_returns(rewards_BxN: jax.Array, gamma: float) -> jax.Array:
  """G_t = R_t + gamma * G_{t+1}: each turn's tokens are credited with G_t."""
  def step(carry, r_B):
    g = r_B + gamma * carry
    return g, g
  _, g_NxB = jax.lax.scan(step, jnp.zeros_like(rewards_BxN[:, 0]), rewards_BxN.T, reverse=True)
  return g_NxB.T


# Reward assignment for episodes that stop at their first correct answer (feedback
# rollouts). `turns_BxN` marks the turns a row took; a turn it did not take is masked
# (returns 0 there, and advantages never count it), never a zero reward by accident.


def last_taken(x_BxN: jax.Array, turns_BxN: jax.Array) -> jax.Array:
  """x at each row's last taken turn: B."""
  last_B = jnp.maximum(jnp.sum(turns_BxN, axis=1) - 1, 0)
  return jnp.take_along_axis(x_BxN, last_B[:, None], axis=1)[:, 0]


def per_turn_returns(rewards_BxN, turns_BxN, gamma=None):
  """Each turn rewarded by its own correctness."""
  del gamma
  return jnp.where(turns_BxN, rewards_BxN, 0.0)


def outcome_returns(rewards_BxN, turns_BxN, gamma=None):
  """The episode's final outcome (its last taken turn's reward) on every turn."""
  del gamma
  return jnp.where(turns_BxN, last_taken(rewards_BxN, turns_BxN)[:, None], 0.0)


def decayed_returns(rewards_BxN, turns_BxN, gamma):
  """Success at turn t earns gamma^(t-1), given to every turn of the episode."""
  t_N = jnp.arange(rewards_BxN.shape[1], dtype=jnp.float32)
  earned_B = jnp.max(jnp.where(turns_BxN, rewards_BxN * gamma ** t_N, 0.0), axis=1)
  return jnp.where(turns_BxN, earned_B[:, None], 0.0)


# name -> (returns_fn, one value per episode: advantages are normalised over episodes).
REWARD_ASSIGNMENTS: dict[str, tuple[Callable, bool]] = {
    "per_turn": (per_turn_returns, False), "outcome": (outcome_returns, True),
    "decayed": (decayed_returns, True)}


def masked_group_advantages(returns_BxN: jax.Array, turns_BxN: jax.Array, group_size: int,
                            per_episode: bool, eps: float = 1e-6) -> jax.Array:
  """GRPO advantages when rows took different numbers of turns.

  per_episode (one return per episode): (R - mean) / (std + eps) over the G episodes of
  a prompt, on every turn each took. Otherwise over all the turns the G episodes took,
  pooled, so a group is normalised once whatever its rows' lengths. Untaken turns: 0.
  """
  valid = turns_BxN.astype(jnp.float32)
  if per_episode:
    r_Bx1 = last_taken(returns_BxN, turns_BxN)[:, None]
    return jnp.where(turns_BxN, group_advantages(r_Bx1, group_size, eps), 0.0)
  g, w = _groups(returns_BxN, group_size), _groups(valid, group_size)
  count = jnp.maximum(w.sum(axis=(1, 2), keepdims=True), 1.0)
  mean = (g * w).sum(axis=(1, 2), keepdims=True) / count
  std = jnp.sqrt((jnp.square(g - mean) * w).sum(axis=(1, 2), keepdims=True) / count)
  return (w * (g - mean) / (std + eps)).reshape(returns_BxN.shape)


# ----------------------------------------------------------------------------
# Advantages over the G samples of each prompt, per turn.


def _groups(x_BxN: jax.Array, group_size: int) -> jax.Array:
  b, n = x_BxN.shape
  if b % group_size:
    raise ValueError(f"batch {b} is not a multiple of group_size={group_size}")
  return x_BxN.reshape(b // group_size, group_size, n)


def rloo_advantages(returns_BxN: jax.Array, group_size: int,
                    valid_BxN: jax.Array | None = None) -> jax.Array:
  """Return minus the mean return of the other samples of the same prompt, per turn.

  With `valid_BxN` (the turns each row took), only the samples that took a turn are
  each other's baseline there; an untaken turn, or one no other sample took, gets 0.
  """
  if group_size < 2:
    raise ValueError("RLOO needs group_size >= 2")
  g = _groups(returns_BxN, group_size)
  w = jnp.ones_like(g) if valid_BxN is None else _groups(valid_BxN, group_size).astype(g.dtype)
  others_n = w.sum(axis=1, keepdims=True) - w
  others = ((g * w).sum(axis=1, keepdims=True) - g * w) / jnp.maximum(others_n, 1.0)
  return (w * jnp.where(others_n > 0, g - others, 0.0)).reshape(returns_BxN.shape)


def group_advantages(returns_BxN: jax.Array, group_size: int, eps: float = 1e-6,
                     valid_BxN: jax.Array | None = None) -> jax.Array:
  """GRPO: (return - group mean) / (group std + eps), per turn; with `valid_BxN`, over
  the samples that took the turn (0 on untaken turns)."""
  g = _groups(returns_BxN, group_size)
  w = jnp.ones_like(g) if valid_BxN is None else _groups(valid_BxN, group_size).astype(g.dtype)
  count = jnp.maximum(w.sum(axis=1, keepdims=True), 1.0)
  mean = (g * w).sum(axis=1, keepdims=True) / count
  std = jnp.sqrt((jnp.square(g - mean) * w).sum(axis=1, keepdims=True) / count)
  return (w * (g - mean) / (std + eps)).reshape(returns_BxN.shape)


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {"rloo": rloo_advantages, "grpo": group_advantages}


# ----------------------------------------------------------------------------
# Losses and their aggregation over tokens.


def aggregate(x_BxT: jax.Array, mask_BxT: jax.Array, how: str) -> jax.Array:
  """token_mean: mean over all masked tokens of the batch; sequence_mean: mean over
  rows of each row's token mean; sum: sum over masked tokens divided by rows."""
  mask = mask_BxT.astype(jnp.float32)
  if how == "token_mean":
    return jnp.sum(x_BxT * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  if how == "sequence_mean":
    per_row = jnp.sum(x_BxT * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return jnp.mean(per_row)
  if how == "sum":
    return jnp.sum(x_BxT * mask) / x_BxT.shape[0]
  raise ValueError(f"aggregation={how!r}: expected token_mean, sequence_mean or sum")


def aggregation_weight(mask_BxT: jax.Array, how: str) -> jax.Array:
  """What a slice of a batch counts in `aggregate(..., how)` over the whole batch: its
  masked tokens for token_mean, its rows otherwise (micro-batch accumulation)."""
  if how == "token_mean":
    return jnp.sum(mask_BxT.astype(jnp.float32))
  return jnp.float32(mask_BxT.shape[0])


def reinforce_loss(logp_BxT, advantages_BxT, old_logp_BxT=None, clip_eps=None):
  """-A * log pi: on-policy REINFORCE (no ratio, no clipping)."""
  del old_logp_BxT, clip_eps
  return -jax.lax.stop_gradient(advantages_BxT) * logp_BxT


def clipped_ratio_loss(logp_BxT, advantages_BxT, old_logp_BxT, clip_eps=0.2):
  """PPO/GRPO: -min(ratio * A, clip(ratio, 1 +- eps) * A), ratio = pi / pi_old."""
  adv = jax.lax.stop_gradient(advantages_BxT)
  ratio = jnp.exp(logp_BxT - jax.lax.stop_gradient(old_logp_BxT))
  return -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)


def clip_binds(logp_BxT, advantages_BxT, old_logp_BxT, clip_eps=0.2) -> jax.Array:
  """Where the clipped term wins the min, so the token gets no gradient: ratio above
  1 + eps with A > 0, or below 1 - eps with A < 0."""
  ratio = jnp.exp(logp_BxT - old_logp_BxT)
  return ((advantages_BxT > 0) & (ratio > 1 + clip_eps)) | (
      (advantages_BxT < 0) & (ratio < 1 - clip_eps))


POLICY_LOSSES: dict[str, Callable] = {"reinforce": reinforce_loss, "clipped": clipped_ratio_loss}


def pick(table: dict[str, Callable], name: str, what: str) -> Callable:
  if name not in table:
    raise ValueError(f"{what}={name!r}: expected one of {', '.join(table)}")
  return table[name]
