"""SCoRe (Kumar et al., arXiv 2409.12917): two-stage multi-turn RL for intrinsic self-correction.

For T attempts (T = 2 in the paper), from 0/1 rewards r_t:
  Stage I:  rewards (0, ..., 0, r_T); KL coefficient beta1 + beta2 on attempt 1 and
            beta1 on the others: attempt 1 is held at the base model.
  Stage II: rewards (r_1, ..., r_T), discounted by gamma, and the progress bonus
            alpha * (r_T - r_{T-1}) added to the last attempt's own return after
            discounting, so no earlier attempt is credited with it; beta1 everywhere.
With gamma = 0 (the paper) each attempt gets its own return: i->c 1 + alpha, c->i
-alpha, c->c 1, i->i 0 on the last attempt. The stages are a schedule over steps
("I:300,II:2700", or alternating "I:5,II:5,I:5,II:5") that only this objective knows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxscore.objectives import base, rl
from jaxscore.objectives import policy_gradient as pg

STAGES = ("I", "II")


def parse_stages(spec: str) -> list[tuple[str, int]]:
  """`"I:10,II:20"` -> [("I", 10), ("II", 20)]; stages may repeat (I, II, I, II)."""
  stages = []
  for part in spec.split(","):
    name, _, steps = part.strip().partition(":")
    if name not in STAGES or not steps.isdigit():
      raise ValueError(f"score.stages={spec!r}: expected e.g. 'I:10,II:20'")
    stages.append((name, int(steps)))
  return stages


def stage_at(stages: list[tuple[str, int]], step: int) -> str:
  for name, steps in stages:
    if step < steps:
      return name
    step -= steps
  return stages[-1][0]


def shaped_rewards(rewards_BxN: jax.Array, stage: str, alpha: float):
  """(rewards to discount, bonus added after discounting) of a stage."""
  if stage == "I":
    return jnp.zeros_like(rewards_BxN).at[:, -1].set(rewards_BxN[:, -1]), \
        jnp.zeros_like(rewards_BxN)
  if rewards_BxN.shape[1] < 2:
    return rewards_BxN, jnp.zeros_like(rewards_BxN)
  return rewards_BxN, rl.progress_bonus(rewards_BxN, alpha)


def kl_coefficients(stage: str, num_turns: int, beta1: float, beta2: float) -> jax.Array:
  coef = np.full((num_turns,), beta1, np.float32)
  if stage == "I":
    coef[0] += beta2
  return jnp.asarray(coef)


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
  stages: str = "I:300,II:2700"  # Stage schedule, e.g. "I:10,II:10" or "I:5,II:5,I:5,II:5".
  alpha: float = 10.0  # Progress bonus alpha * (r_T - r_{T-1}) on the last attempt (II).
  beta1: float = 0.01  # KL to the reference on every attempt.
  beta2: float = 0.1  # Extra KL on attempt 1 in stage I.
  gamma: float = 0.0  # Discount across turns; 0: each attempt gets its own return.
  advantage: str = "rloo"  # rloo (leave-one-out, the paper) | grpo (group-normalised)
  # KL(pi || pi_ref) as the paper states it: k2 in the loss has that KL's gradient (k3's
  # is the reverse KL's); exact sums it over the vocabulary; k1 | k2 | k3 in the reward.
  kl_estimator: str = "k2"
  kl_in_reward: bool = False  # Fold sequence KL into returns instead of the loss.
  aggregation: str = "token_mean"  # token_mean | sequence_mean | sum


@base.register("score")
class Score(pg.PolicyGradient):
  title = "SCoRe"
  Config = ScoreConfig

  def __init__(self, config: ScoreConfig, ctx: base.Context):
    self.stages = parse_stages(config.stages)
    if ctx.stops_rows:
      raise ValueError(
          "objective='score' needs every episode to take every attempt (stage I rewards "
          "the last one, the progress bonus compares the last two), but the rollout's "
          "feedback stops a row at its first correct answer: set "
          "rollout.feedback=instruction, or train objective=pg or grpo with it")
    super().__init__(config, ctx)

  @property
  def num_steps(self) -> int:
    return sum(steps for _, steps in self.stages)

  def phase(self, step: int) -> str:
    return stage_at(self.stages, step)

  def shape(self, rewards_BxN, step: int):
    return shaped_rewards(rewards_BxN, self.phase(step), self.config.alpha)

  def kl_coefficients(self, step: int):
    return kl_coefficients(self.phase(step), self.ctx.num_turns, self.config.beta1,
                           self.config.beta2)
