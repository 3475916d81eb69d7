"""Multi-turn policy gradient with per-token KL to a reference; single-turn RL is the
one-turn case. N counts turns (see the package legend).

Per turn t of each episode, from 0/1 rewards r_t:
  returns   G_t = sum_k gamma^k (r_{t+k} - coef_{t+k} * KL_{t+k} [kl_in_reward]) + bonus_t
  advantage over the G samples of the same prompt (RLOO or group-normalised), per turn
  loss      policy loss on each token of turn t with turn t's advantage, plus
            coef_t * KL per token (unless KL is in the reward), aggregated over tokens.
Subclasses change `shape` (rewards before discounting, a bonus added after it) and
`kl_coefficients`: SCoRe is one.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxscore.models import logprobs
from jaxscore.models import model as model_lib
from jaxscore.objectives import base, rl


@flax.struct.dataclass
class RLBatch:
  """One update's worth of episodes; every per-token array is B x T."""

  tokens_BxT: jax.Array
  mask_BxT: jax.Array  # Real tokens (not padding).
  turn_BxT: jax.Array  # t > 0: sampled in turn t.
  advantages_BxT: jax.Array
  kl_coef_BxT: jax.Array  # Per-turn KL coefficient on each token (0 if KL is in the reward).
  ref_logp_BxT: jax.Array
  old_logp_BxT: jax.Array  # Behaviour policy log-probs (for the clipped-ratio loss).


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  kl_estimator: str = "k3"  # k2 | k3 | exact in the loss; k1 | k2 | k3 in the reward.
  kl_in_reward: bool = False  # True: the loop folds KL into returns; no KL term here.
  policy_loss: str = "reinforce"  # reinforce | clipped
  clip_eps: float = 0.2
  aggregation: str = "token_mean"  # token_mean | sequence_mean | sum
  num_turns: int = 2  # Turns reported in per-turn metrics.


def policy_gradient_loss(params, batch: RLBatch, rng, ref_params, *,
                         cfg: model_lib.ModelConfig, loss_cfg: PolicyLossConfig):
  """Policy-gradient loss plus per-token, per-turn-weighted KL to the reference."""
  del rng
  x_BxTxD, _ = model_lib.apply(params, batch.tokens_BxT, cfg, mask_BxT=batch.mask_BxT,
                               return_hidden=True)
  ref_x_BxTxD = None
  if loss_cfg.kl_estimator == "exact" and not loss_cfg.kl_in_reward:
    if ref_params is None:
      raise ValueError("the exact KL needs ref_params")
    ref_x_BxTxD, _ = model_lib.apply(jax.lax.stop_gradient(ref_params), batch.tokens_BxT,
                                     cfg, mask_BxT=batch.mask_BxT, return_hidden=True)
  logp, entropy, exact_kl = logprobs.token_stats(params, x_BxTxD, batch.tokens_BxT, cfg,
                                           ref_params, ref_x_BxTxD)
  return token_objective(logp, batch, loss_cfg, exact_kl_BxT=exact_kl, entropy_BxT=entropy)


def batch_weight(batch: RLBatch, loss_cfg: PolicyLossConfig) -> jax.Array:
  """A slice's weight in the loss's aggregate: see `rl.aggregation_weight`."""
  response = (batch.turn_BxT > 0) & batch.mask_BxT.astype(bool)
  return rl.aggregation_weight(response, loss_cfg.aggregation)


def token_objective(logp_BxT, batch: RLBatch, loss_cfg: PolicyLossConfig,
                    exact_kl_BxT=None, entropy_BxT=None):
  """The loss as a function of the policy's per-token log-probs (and, for the exact
  KL, its per-token value from `logprobs.token_stats`). Only sampled tokens of real turns
  enter it."""
  response = (batch.turn_BxT > 0) & batch.mask_BxT.astype(bool)
  pg = rl.pick(rl.POLICY_LOSSES, loss_cfg.policy_loss, "policy_loss")(
      logp_BxT, batch.advantages_BxT, batch.old_logp_BxT, loss_cfg.clip_eps)
  if loss_cfg.kl_estimator == "exact":
    if exact_kl_BxT is None:
      raise ValueError("kl_estimator='exact' needs the per-token exact KL (logprobs.token_stats)")
    kl = exact_kl_BxT
  else:
    kl = rl.pick(rl.KL_ESTIMATORS, loss_cfg.kl_estimator, "kl_estimator")(
        logp_BxT, batch.ref_logp_BxT)
  weighted_kl = jnp.zeros_like(pg) if loss_cfg.kl_in_reward else batch.kl_coef_BxT * kl
  loss = rl.aggregate(pg + weighted_kl, response, loss_cfg.aggregation)
  mean = functools.partial(rl.aggregate, how="token_mean")
  metrics = {"loss/pg": mean(pg, response), "loss/kl_term": mean(weighted_kl, response),
             "kl/mean": mean(kl, response), "tokens/response": jnp.sum(response)}
  if entropy_BxT is not None:
    metrics["policy/entropy"] = mean(jax.lax.stop_gradient(entropy_BxT), response)
  for t in range(1, loss_cfg.num_turns + 1):
    metrics[f"kl/t{t}"] = mean(kl, response & (batch.turn_BxT == t))
  if loss_cfg.policy_loss == "clipped":
    old = batch.old_logp_BxT
    ratio = jnp.exp(jax.lax.stop_gradient(logp_BxT) - old)
    binds = rl.clip_binds(jax.lax.stop_gradient(logp_BxT), batch.advantages_BxT, old,
                          loss_cfg.clip_eps)
    metrics |= {"policy/ratio": mean(ratio, response),
                "policy/ratio_max_dev": jnp.max(jnp.where(response, jnp.abs(ratio - 1), 0.0)),
                "policy/clip_frac": mean(binds.astype(jnp.float32), response)}
  return loss, metrics


def check_on_policy(sampling, objective: str) -> None:
  """Training rollouts must be drawn from the policy itself (temperature 1, no top-k or
  top-p filter): the policy-gradient estimators, the clipped ratio's pi_old and KL
  estimated on sampled tokens all assume it, and a tempered or truncated sampler would
  make every update silently off-policy."""
  if sampling is None:
    return
  if sampling.temperature != 1.0 or sampling.top_k or sampling.top_p < 1.0:
    raise ValueError(
        f"objective={objective!r} trains on samples from the policy, but sampler "
        f"(temperature={sampling.temperature}, top_k={sampling.top_k}, "
        f"top_p={sampling.top_p}) draws them from another distribution: set "
        "sampler.temperature=1.0, sampler.top_k=0 and sampler.top_p=1.0 (evaluation "
        "samples with its own settings)")


@dataclasses.dataclass(frozen=True)
class PGConfig:
  num_steps: int = 100  # Updates.
  beta: float = 0.01  # KL coefficient on every turn.
  gamma: float = 0.0  # Discount across turns; 0: each turn gets its own reward.
  advantage: str = "grpo"  # rloo | grpo
  kl_estimator: str = "k2"  # k2 | k3 | exact in the loss; k1 | k2 | k3 in the reward.
  kl_in_reward: bool = False  # Fold sequence KL into returns instead of the loss.
  aggregation: str = "token_mean"  # token_mean | sequence_mean | sum


@base.register("pg")
class PolicyGradient(base.OnlineObjective):
  """Each turn rewarded by its own correctness (discounted by gamma), KL weight beta.

  On-policy REINFORCE, one update per rollout batch: a clipped ratio would be exactly 1
  there and never bind (objective=grpo makes several updates per batch). With feedback
  that stops rows (rollout.feedback=none|unary|template), a turn a row did not take has
  no return and no advantage, and is no baseline for the rows that took it.
  """

  title = "policy gradient"
  Config = PGConfig

  def __init__(self, config, ctx: base.Context):
    super().__init__(config, ctx)
    rl.check_kl_estimator(config.kl_estimator, config.kl_in_reward)
    rl.pick(rl.ADVANTAGE_ESTIMATORS, config.advantage, "advantage")
    check_on_policy(ctx.sampling, self.name)
    self.loss_cfg = PolicyLossConfig(
        kl_estimator=config.kl_estimator, kl_in_reward=config.kl_in_reward,
        aggregation=config.aggregation, num_turns=ctx.num_turns)

  def batch_weight(self, batch: RLBatch) -> jax.Array:
    return batch_weight(batch, self.loss_cfg)

  # -- What subclasses change. ------------------------------------------------

  def shape(self, rewards_BxN: jax.Array, step: int) -> tuple[jax.Array, jax.Array]:
    """(rewards to discount, bonus added to each turn's return after discounting)."""
    del step
    return rewards_BxN, jnp.zeros_like(rewards_BxN)

  def kl_coefficients(self, step: int) -> jax.Array:
    """KL coefficient of each turn: N."""
    del step
    return jnp.full((self.ctx.num_turns,), self.config.beta, jnp.float32)

  # -- The objective. -------------------------------------------------------------

  def returns(self, rewards_BxN, step: int, turn_BxT=None, kl_BxT=None):
    """(returns_BxN, kl_coef_N): shaped, KL-penalised if in the reward, discounted,
    plus the bonus."""
    coef_N = self.kl_coefficients(step)
    shaped_BxN, bonus_BxN = self.shape(rewards_BxN, step)
    if self.config.kl_in_reward:
      num_turns = rewards_BxN.shape[1]
      shaped_BxN = shaped_BxN - coef_N[None] * rl.turn_sums(kl_BxT, turn_BxT, num_turns)
    return rl.discounted_returns(shaped_BxN, self.config.gamma) + bonus_BxN, coef_N

  def advantages(self, returns_BxN, turns_BxN=None):
    """Per-turn advantages over the group; only turns taken count (`turns_BxN`)."""
    estimator = rl.pick(rl.ADVANTAGE_ESTIMATORS, self.config.advantage, "advantage")
    return estimator(returns_BxN, self.ctx.group_size, valid_BxN=turns_BxN)

  def make_batch(self, traj: base.Trajectories, step: int):
    kl_BxT = None
    if self.config.kl_in_reward:
      kl_fn = rl.pick(rl.KL_ESTIMATORS, self.config.kl_estimator, "kl_estimator")
      kl_BxT = jnp.where(traj.turn_BxT > 0,
                         kl_fn(traj.behaviour_logp_BxT, traj.ref_logp_BxT), 0.0)
    turns_BxN = jnp.asarray(traj.turns_BxN, bool)
    returns_BxN, coef_N = self.returns(jnp.asarray(traj.rewards_BxN), step, traj.turn_BxT,
                                       kl_BxT)
    returns_BxN = jnp.where(turns_BxN, returns_BxN, 0.0)
    adv_BxN = self.advantages(returns_BxN, turns_BxN)
    batch = RLBatch(
        tokens_BxT=traj.tokens_BxT, mask_BxT=traj.mask_BxT, turn_BxT=traj.turn_BxT,
        advantages_BxT=rl.turn_values(traj.turn_BxT, adv_BxN),
        kl_coef_BxT=rl.turn_weights(traj.turn_BxT, coef_N),
        ref_logp_BxT=traj.ref_logp_BxT, old_logp_BxT=traj.behaviour_logp_BxT)
    return batch, {"reward/return": float(np.asarray(returns_BxN).sum(1).mean())}

  def loss_fn(self, params, batch, rng, ref_params):
    return policy_gradient_loss(params, batch, rng, ref_params, cfg=self.ctx.model_cfg,
                                loss_cfg=self.loss_cfg)
