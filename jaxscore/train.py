"""Train state, optimizers, and `train_step` factories: `(state, batch, rng) -> (state, metrics)`.

An objective is a loss function `loss_fn(params, batch, rng, ref_params) -> (loss,
metrics)`; `make_train_step` turns any of them into a train step. The policy-gradient
loss composes the pieces of `rl` chosen by name, so SCoRe, single-turn GRPO and
multi-turn variants differ only in how the loop fills the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxscore import model as model_lib
from jaxscore import rl


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation) -> TrainState:
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               opt_state=optimizer.init(params))


@flax.struct.dataclass
class RLBatch:
  """One update's worth of episodes; every per-token array is B x L."""

  tokens_BxL: jax.Array
  mask_BxL: jax.Array  # Real tokens (not padding).
  turn_BxL: jax.Array  # t > 0: sampled in turn t.
  advantages_BxL: jax.Array
  kl_coef_BxL: jax.Array  # Per-turn KL coefficient on each token (0 if KL is in the reward).
  ref_logp_BxL: jax.Array
  old_logp_BxL: jax.Array  # Behaviour policy log-probs (for the clipped-ratio loss).


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  optimizer: str = "adam"  # adam | adamw
  learning_rate: float = 1e-5
  warmup_steps: int = 0
  schedule: str = "constant"  # constant | cosine
  total_steps: int = 1000  # For the cosine schedule.
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0  # 0 disables clipping.
  grad_accum_steps: int = 1


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
  if c.schedule == "constant":
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, c.learning_rate, max(c.warmup_steps, 1)),
         optax.constant_schedule(c.learning_rate)], [c.warmup_steps]) \
        if c.warmup_steps else c.learning_rate
  elif c.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, c.warmup_steps,
                                            max(c.total_steps, c.warmup_steps + 1))
  else:
    raise ValueError(f"optim.schedule={c.schedule!r}: expected constant or cosine")
  if c.optimizer == "adam":
    opt = optax.adam(lr, b1=c.b1, b2=c.b2)
  elif c.optimizer == "adamw":
    opt = optax.adamw(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay)
  else:
    raise ValueError(f"optim.optimizer={c.optimizer!r}: expected adam or adamw")
  if c.max_grad_norm:
    opt = optax.chain(optax.clip_by_global_norm(c.max_grad_norm), opt)
  if c.grad_accum_steps > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=c.grad_accum_steps)
  return opt


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  kl_estimator: str = "k3"  # k1 | k3 | exact
  kl_in_reward: bool = False  # True: the loop folds KL into returns; no KL term here.
  policy_loss: str = "reinforce"  # reinforce | clipped
  clip_eps: float = 0.2
  aggregation: str = "token_mean"  # token_mean | sequence_mean | sum
  num_turns: int = 2  # Turns reported in per-turn metrics.


def policy_gradient_loss(params, batch: RLBatch, rng, ref_params, *,
                         cfg: model_lib.ModelConfig, loss_cfg: PolicyLossConfig):
  """Policy-gradient loss plus per-token, per-turn-weighted KL to the reference."""
  del rng
  logp, logits = rl.token_logprobs(params, batch.tokens_BxL, batch.mask_BxL, cfg)
  ref_logits = None
  if loss_cfg.kl_estimator == "exact" and not loss_cfg.kl_in_reward:
    if ref_params is None:
      raise ValueError("the exact KL needs ref_params")
    ref_logits, _ = model_lib.apply(jax.lax.stop_gradient(ref_params), batch.tokens_BxL,
                                    cfg, mask_BxT=batch.mask_BxL)
  return token_objective(logp, batch, loss_cfg, logits, ref_logits)


def token_objective(logp_BxL, batch: RLBatch, loss_cfg: PolicyLossConfig,
                    logits=None, ref_logits=None):
  """The loss as a function of the policy's per-token log-probs (and logits for the
  exact KL). Only sampled tokens of real turns enter it."""
  response = (batch.turn_BxL > 0) & batch.mask_BxL.astype(bool)
  pg = rl.pick(rl.POLICY_LOSSES, loss_cfg.policy_loss, "policy_loss")(
      logp_BxL, batch.advantages_BxL, batch.old_logp_BxL, loss_cfg.clip_eps)
  kl = rl.pick(rl.KL_ESTIMATORS, loss_cfg.kl_estimator, "kl_estimator")(
      logp_BxL, batch.ref_logp_BxL, logits, ref_logits)
  weighted_kl = jnp.zeros_like(pg) if loss_cfg.kl_in_reward else batch.kl_coef_BxL * kl
  loss = rl.aggregate(pg + weighted_kl, response, loss_cfg.aggregation)
  mean = functools.partial(rl.aggregate, how="token_mean")
  metrics = {"loss/pg": mean(pg, response), "loss/kl_term": mean(weighted_kl, response),
             "kl/mean": mean(kl, response), "tokens/response": jnp.sum(response)}
  for t in range(1, loss_cfg.num_turns + 1):
    metrics[f"kl/t{t}"] = mean(kl, response & (batch.turn_BxL == t))
  return loss, metrics


def make_train_step(loss_fn, optimizer: optax.GradientTransformation):
  """`train_step(state, batch, rng, ref_params=None) -> (state, metrics)`.

  `ref_params` is read-only: it gets no gradient and is not part of the state.
  """

  def train_step(state: TrainState, batch, rng, ref_params=None):
    rng = jax.random.fold_in(rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng, ref_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step
