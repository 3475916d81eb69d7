"""Train state, optimizers, and `train_step` factories: `(state, batch, rng) -> (state, metrics)`.

An objective supplies `loss_fn(params, batch, rng, ref_params) -> (loss, metrics)`;
`make_train_step` turns any of them into a train step, which never knows which method
it runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


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
class OffPolicyState(TrainState):
  """A train state and the parameters that sample the batch of its step (one update
  older, off-policy), so that a resumed run samples that batch again exactly."""

  behaviour_params: Any = None

  def train_state(self) -> TrainState:
    return TrainState(step=self.step, params=self.params, opt_state=self.opt_state)


def state_shardings(optimizer: optax.GradientTransformation, params_abstract: Any,
                    params_shardings: Any, mesh: Mesh) -> TrainState:
  """Shardings of a TrainState: optimizer moments follow their parameters; counters
  and other scalars are replicated."""
  state = jax.eval_shape(lambda p: TrainState.create(p, optimizer), params_abstract)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt = optax.tree_map_params(optimizer, lambda _, sh: sh, state.opt_state, params_shardings,
                              transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=params_shardings, opt_state=opt)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  optimizer: str = "adam"  # adam | adamw | rmsprop
  learning_rate: float = 1e-5
  warmup_steps: int = 0  # Linear warmup from 0.
  schedule: str = "constant"  # constant | cosine | linear (to 0 at total_steps)
  # Optimizer updates the cosine and linear schedules span; 0: the run's (every loop
  # fills it in: steps x updates per step / grad_accum_steps).
  total_steps: int = 0
  b1: float = 0.9
  b2: float = 0.999  # Adam's second-moment decay; RMSprop's decay (PyTorch's alpha).
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0  # 0 disables clipping.
  grad_accum_steps: int = 1  # Optimizer updates every k train steps (optax.MultiSteps).
  # Each train step's batch (each PPO minibatch) split into this many equal slices
  # whose gradients are accumulated before its one update: the same update, with the
  # activations of one slice at a time.
  micro_batches: int = 1


def with_run_length(c: OptimConfig, train_steps: int, updates_per_step: int = 1
                    ) -> OptimConfig:
  """`c` with total_steps=0 replaced by the optimizer updates of a run of `train_steps`
  train steps making `updates_per_step` updates each (GRPO's epochs x minibatches)."""
  if c.total_steps:
    return c
  updates = train_steps * updates_per_step // c.grad_accum_steps
  return dataclasses.replace(c, total_steps=max(updates, 1))


def learning_rate_schedule(c: OptimConfig) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, c.learning_rate, max(c.warmup_steps, 1))
  decay_steps = max(c.total_steps - c.warmup_steps, 1)
  if c.schedule == "constant":
    after = optax.constant_schedule(c.learning_rate)
  elif c.schedule == "cosine":
    after = optax.cosine_decay_schedule(c.learning_rate, decay_steps)
  elif c.schedule == "linear":
    after = optax.linear_schedule(c.learning_rate, 0.0, decay_steps)
  else:
    raise ValueError(f"optim.schedule={c.schedule!r}: expected constant, cosine or linear")
  if not c.warmup_steps:
    return after
  return optax.join_schedules([warmup, after], [c.warmup_steps])


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
  lr = learning_rate_schedule(c)
  if c.optimizer == "adam":
    opt = optax.adam(lr, b1=c.b1, b2=c.b2)
  elif c.optimizer == "adamw":
    opt = optax.adamw(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay)
  elif c.optimizer == "rmsprop":
    # Self-Explore's optimizer, as PyTorch's RMSprop computes it (the reference code's,
    # through transformers' optim="rmsprop"): eps added outside the square root.
    opt = optax.rmsprop(lr, decay=c.b2, eps=1e-8, eps_in_sqrt=False)
  else:
    raise ValueError(f"optim.optimizer={c.optimizer!r}: expected adam, adamw or rmsprop")
  if c.max_grad_norm:
    opt = optax.chain(optax.clip_by_global_norm(c.max_grad_norm), opt)
  if c.grad_accum_steps > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=c.grad_accum_steps)
  return opt


def strided_slices(x: jax.Array, num: int) -> jax.Array:
  """x's rows as `num` slices, slice m holding rows m, m + num, m + 2 num, ...: where the
  rows are split over devices in contiguous blocks, every slice keeps rows on every
  device (a contiguous slice would leave most devices idle)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)


def rows_weight(batch) -> jax.Array:
  """A batch's weight in a mean over rows: its number of rows."""
  return jnp.float32(jax.tree.leaves(batch)[0].shape[0])


def accumulated_grad(loss_fn, micro_batches: int, batch_weight=rows_weight):
  """`value_and_grad(loss_fn, has_aux=True)` of the whole batch, taken one of
  `micro_batches` slices at a time (`lax.scan`; `strided_slices`).

  `batch_weight(slice)` is what a slice counts in the mean the loss takes (its rows
  for a mean over rows, its loss tokens for a mean over tokens), so the weighted mean
  of the slices' losses and gradients is the whole batch's. Metrics are the same
  weighted means (exact for means of the loss's own kind; a per-token mean metric
  under a per-row loss is approximate), except `tokens/*` counts (summed) and `*max*`
  (the maximum).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro_batches == 1:
    return grad_fn

  def combined(params, batch, rng, ref_params):
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % micro_batches:
      raise ValueError(f"a batch of {rows} rows does not split into optim.micro_batches="
                       f"{micro_batches} equal slices")
    slices = jax.tree.map(functools.partial(strided_slices, num=micro_batches), batch)

    def body(acc, xs):
      mb, i = xs
      (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), ref_params)
      w = batch_weight(mb)
      acc_w, acc_loss, acc_grads, acc_sums, acc_max = acc
      return (acc_w + w, acc_loss + w * loss,
              jax.tree.map(lambda a, g: a + w * g.astype(a.dtype), acc_grads, grads),
              {k: acc_sums[k] + (v if k.startswith("tokens/") else w * v)
               for k, v in metrics.items()},
              {k: jnp.maximum(acc_max[k], v) for k, v in metrics.items()}), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], slices), rng,
                            ref_params)
    (_, metric_shapes), grad_shapes = shapes
    zeros = lambda tree, dtype=None: jax.tree.map(
        lambda x: jnp.zeros(x.shape, dtype or x.dtype), tree)
    init = (jnp.float32(0), jnp.float32(0), zeros(grad_shapes, jnp.float32),
            zeros(metric_shapes, jnp.float32),
            jax.tree.map(lambda x: jnp.full(x.shape, -jnp.inf, jnp.float32), metric_shapes))
    (total, loss, grads, sums, maxes), _ = jax.lax.scan(
        body, init, (slices, jnp.arange(micro_batches)))
    total = jnp.maximum(total, 1.0)
    grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grads, grad_shapes)
    metrics = {k: maxes[k] if "max" in k else v if k.startswith("tokens/") else v / total
               for k, v in sums.items()}
    return (loss / total, metrics), grads

  return combined


def make_train_step(loss_fn, optimizer: optax.GradientTransformation, epochs: int = 1,
                    minibatches: int = 1, micro_batches: int = 1,
                    batch_weight=rows_weight):
  """`train_step(state, batch, rng, ref_params=None) -> (state, metrics)`.

  `ref_params` is read-only: it gets no gradient and is not part of the state.

  With `micro_batches > 1` each update's gradient is accumulated over that many
  slices of its batch (`accumulated_grad`, weighted by `batch_weight`).

  With `epochs * minibatches > 1` (PPO/GRPO), one call makes that many optimizer updates
  on one batch: each epoch visits the rows in a new seeded order, split into
  `minibatches` equal minibatches, all inside one compiled `lax.scan`. `state.step`
  still counts calls (batches); optimizer schedules count updates. Metrics are means
  over the updates, plus the first update's `policy/*` metrics as `first/policy/*`
  (where the clipped ratio is still 1).
  """

  grad_fn = accumulated_grad(loss_fn, micro_batches, batch_weight)

  def update(params, opt_state, batch, rng, ref_params):
    (loss, metrics), grads = grad_fn(params, batch, rng, ref_params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))

  def train_step(state: TrainState, batch, rng, ref_params=None):
    rng = jax.random.fold_in(rng, state.step)
    if epochs * minibatches == 1:
      params, opt_state, metrics = update(state.params, state.opt_state, batch, rng,
                                          ref_params)
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % minibatches:
      raise ValueError(f"batch of {rows} rows does not split into {minibatches} minibatches")
    order_rng, rng = jax.random.split(rng)
    orders = [jax.random.permutation(jax.random.fold_in(order_rng, e), rows)
              for e in range(epochs)]
    idx_UxR = jnp.stack(orders).reshape(epochs * minibatches, rows // minibatches)

    def body(carry, xs):
      params, opt_state = carry
      idx_R, i = xs
      mb = jax.tree.map(lambda x: jnp.take(x, idx_R, axis=0), batch)
      params, opt_state, m = update(params, opt_state, mb, jax.random.fold_in(rng, i),
                                    ref_params)
      return (params, opt_state), m

    (params, opt_state), m_U = jax.lax.scan(
        body, (state.params, state.opt_state), (idx_UxR, jnp.arange(idx_UxR.shape[0])))
    metrics = {k: jnp.mean(v) for k, v in m_U.items()}
    metrics |= {f"first/{k}": v[0] for k, v in m_U.items() if k.startswith("policy/")}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step
