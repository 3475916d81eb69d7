"""GRPO as arXiv 2510.21339 trains it, single- or multi-turn.

On each rollout batch of G episodes per prompt:
  returns     per turn, from the 0/1 rewards of the turns each episode took, by the
              `reward` assignment: `per_turn` (each turn its own correctness),
              `outcome` (the episode's final outcome on every turn) or `decayed`
              (success at turn t earns gamma^(t-1), on every turn);
  advantages  group-normalised, (R - mean) / (std + eps) over the group's episodes
              (one return per episode) or over the turns they took (per_turn);
  loss        the clipped ratio objective per token, ratio = pi / pi_old with pi_old
              the policy that sampled (recomputed by teacher forcing, so the first
              update starts at ratio 1), plus beta * KL to the reference per token;
  updates     `epochs` passes over the batch in `minibatches` minibatches each, so
              later updates see ratios away from 1 and clipping binds.
With one turn (`rollout.num_turns=1`) this is plain single-turn GRPO; with feedback
rollouts (`rollout.feedback=unary`) an episode stops at its first correct answer.
N counts turns.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxscore.objectives import base, rl
from jaxscore.objectives import policy_gradient as pg


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  num_steps: int = 100  # Rollout batches; each gives epochs x minibatches updates.
  reward: str = "per_turn"  # per_turn | outcome | decayed
  gamma: float = 0.5  # decayed: success at turn t earns gamma^(t-1).
  beta: float = 0.04  # KL coefficient per token.
  kl_estimator: str = "k3"  # k2 | k3 | exact
  clip_eps: float = 0.2
  epochs: int = 2  # Passes over each rollout batch.
  minibatches: int = 2  # Updates per pass; rows per update = batch / minibatches.
  aggregation: str = "token_mean"  # token_mean | sequence_mean | sum


@base.register("grpo")
class GRPO(base.OnlineObjective):
  title = "GRPO"
  Config = GRPOConfig
  recompute_behaviour_logp = True
  corrects_off_policy = True  # Its clipped ratio is against the behaviour log-probs.

  def __init__(self, config: GRPOConfig, ctx: base.Context):
    super().__init__(config, ctx)
    self.returns_fn, self.per_episode = rl.pick(rl.REWARD_ASSIGNMENTS, config.reward,
                                                "grpo.reward")
    rl.check_kl_estimator(config.kl_estimator, in_reward=False)
    pg.check_on_policy(ctx.sampling, self.name)
    if config.epochs < 1 or config.minibatches < 1:
      raise ValueError(f"grpo.epochs={config.epochs}, grpo.minibatches={config.minibatches}: "
                       "both must be >= 1")
    if config.reward == "decayed" and not 0.0 < config.gamma <= 1.0:
      raise ValueError(f"grpo.gamma={config.gamma}: the decay must be in (0, 1]")
    self.loss_cfg = pg.PolicyLossConfig(
        kl_estimator=config.kl_estimator, policy_loss="clipped", clip_eps=config.clip_eps,
        aggregation=config.aggregation, num_turns=ctx.num_turns)

  @property
  def updates_per_batch(self) -> tuple[int, int]:
    return self.config.epochs, self.config.minibatches

  def batch_weight(self, batch) -> jax.Array:
    return pg.batch_weight(batch, self.loss_cfg)

  def advantages(self, rewards_BxN, turns_BxN):
    """(returns_BxN, advantages_BxN); both 0 on turns not taken."""
    turns_BxN = jnp.asarray(turns_BxN, bool)
    returns_BxN = self.returns_fn(jnp.asarray(rewards_BxN, jnp.float32), turns_BxN,
                                  self.config.gamma)
    adv_BxN = rl.masked_group_advantages(returns_BxN, turns_BxN, self.ctx.group_size,
                                         self.per_episode)
    return returns_BxN, adv_BxN

  def make_batch(self, traj: base.Trajectories, step: int):
    del step
    returns_BxN, adv_BxN = self.advantages(traj.rewards_BxN, traj.turns_BxN)
    coef_N = jnp.full((self.ctx.num_turns,), self.config.beta, jnp.float32)
    batch = pg.RLBatch(
        tokens_BxT=traj.tokens_BxT, mask_BxT=traj.mask_BxT, turn_BxT=traj.turn_BxT,
        advantages_BxT=rl.turn_values(traj.turn_BxT, adv_BxN),
        kl_coef_BxT=rl.turn_weights(traj.turn_BxT, coef_N),
        ref_logp_BxT=traj.ref_logp_BxT, old_logp_BxT=traj.behaviour_logp_BxT)
    r = np.asarray(returns_BxN)
    return batch, {"reward/return": float(rl.last_taken(r, np.asarray(traj.turns_BxN)).mean())}

  def loss_fn(self, params, batch, rng, ref_params):
    return pg.policy_gradient_loss(params, batch, rng, ref_params, cfg=self.ctx.model_cfg,
                                   loss_cfg=self.loss_cfg)
