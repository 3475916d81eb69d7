"""Objectives as reward shaping and per-turn KL coefficients over the shared RL pieces.

SCoRe (SPEC.md section 1), for T attempts (T = 2 in the paper):
  Stage I:  returns (0, ..., 0, r_T); KL coefficient beta1 + beta2 on attempt 1 and
            beta1 on the others: attempt 1 is held at the base model.
  Stage II: returns (r_1, ..., r_{T-1}, r_T + alpha (r_T - r_{T-1})); beta1 everywhere.
Single-turn RL is the one-turn case of stage II with alpha = 0.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxscore import rl


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
  alpha: float = 10.0  # Progress bonus on the last attempt (stage II).
  beta1: float = 0.01  # KL on every attempt.
  beta2: float = 0.1  # Extra KL on attempt 1 in stage I.
  gamma: float = 0.0  # Discount across turns: each turn gets its own return.
  advantage: str = "rloo"  # rloo | grpo
  kl_in_reward: bool = False  # Fold sequence KL into returns instead of the loss.


def shaped_returns(rewards_BxN: jnp.ndarray, stage: str, c: ScoreConfig) -> jnp.ndarray:
  """Per-turn returns of a SCoRe stage from 0/1 rewards, before KL and discounting."""
  if stage == "I":
    return jnp.zeros_like(rewards_BxN).at[:, -1].set(rewards_BxN[:, -1])
  if stage == "II":
    if rewards_BxN.shape[1] < 2:
      return rewards_BxN
    return rl.progress_bonus(rewards_BxN, c.alpha)
  raise ValueError(f"stage={stage!r}: expected 'I' or 'II'")


def kl_coefficients(stage: str, num_turns: int, c: ScoreConfig) -> jnp.ndarray:
  coef = np.full((num_turns,), c.beta1, np.float32)
  if stage == "I":
    coef[0] += c.beta2
  elif stage != "II":
    raise ValueError(f"stage={stage!r}: expected 'I' or 'II'")
  return jnp.asarray(coef)


def advantages(rewards_BxN, stage: str, c: ScoreConfig, group_size: int,
               turn_BxL=None, kl_BxL=None):
  """Per-turn advantages and per-token KL coefficients for one batch.

  With `kl_in_reward`, each turn's return loses coef_t * (sum of its tokens' KL
  estimates, `kl_BxL`) and the loss gets no KL term.

  Returns: (advantages_BxN, returns_BxN, kl_coef_N).
  """
  num_turns = rewards_BxN.shape[1]
  coef_N = kl_coefficients(stage, num_turns, c)
  returns_BxN = shaped_returns(rewards_BxN, stage, c)
  if c.kl_in_reward:
    returns_BxN = returns_BxN - coef_N[None] * rl.turn_sums(kl_BxL, turn_BxL, num_turns)
  returns_BxN = rl.discounted_returns(returns_BxN, c.gamma)
  adv_BxN = rl.pick(rl.ADVANTAGE_ESTIMATORS, c.advantage, "advantage")(returns_BxN, group_size)
  return adv_BxN, returns_BxN, coef_N
