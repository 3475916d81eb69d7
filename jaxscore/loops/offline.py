"""The offline loop: dataset -> batch -> update -> checkpoint, for any offline objective
(SFT, DPO, ...), with evaluation between epochs.

Examples are visited in a seeded permutation per epoch; step s of epoch e takes the s-th
slice of permutation e, so the data order is a function of (seed, step) and a resumed
run continues exactly. Every batch is padded to one width: one compile per run. With
`optim.grad_accum_steps = k` each step is a micro-batch and the optimizer updates every
k steps.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import logging

from jaxscore import objectives as objectives_lib
from jaxscore.infra import files, sharding
from jaxscore.loops import common
from jaxscore.models import model as model_lib


@dataclasses.dataclass(frozen=True)
class OfflineConfig:
  batch_size: int = 32  # Examples per step (a micro-batch with grad accumulation).
  num_epochs: int = 3
  max_len: int = 0  # Tokens per example (longer ones are cut); 0: the longest, rounded up.


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  if num_examples < batch_size:
    raise ValueError(f"{num_examples} training examples are fewer than one batch "
                     f"(offline.batch_size={batch_size})")
  return num_examples // batch_size  # The remainder of each permutation is skipped.


def batch_indices(num_examples: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Indices of the examples of `step`."""
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, pos = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[pos * batch_size:(pos + 1) * batch_size]


def example_width(objective, examples: Sequence[dict], max_len: int) -> int:
  """The batch width: `max_len`, or the longest example rounded up to a multiple of 8."""
  longest = max(objective.length(e) for e in examples)
  if max_len > 0:
    if longest > max_len:
      logging.warning("examples of up to %d tokens are cut to offline.max_len=%d",
                      longest, max_len)
    return max_len
  return -(-longest // 8) * 8


def make_objective(c, model_cfg: model_lib.ModelConfig):
  ctx = objectives_lib.Context(model_cfg=model_cfg)
  return objectives_lib.make(c.objective, c[c.objective], ctx)


def train(c, model_cfg: model_lib.ModelConfig, objective, params, ref_params,
          examples: Sequence[dict], workdir: str | os.PathLike, *,
          eval_examples: Sequence[dict] = (),
          on_epoch_end: Callable[[object, int], dict] | None = None,
          stop_after: int | None = None):
  """Trains (or resumes) `objective` on `examples`; returns (state, info).

  Args:
    c: the experiment config (`offline`, `optim`, `mesh`, `checkpoint`, `log`, `seed`).
    examples: training examples, as `objective.examples` builds them.
    eval_examples: held-out examples; their mean loss is logged after every epoch as
      `eval/loss` and picks the best checkpoint.
    on_epoch_end: `(params, epoch) -> metrics`, e.g. a task evaluation, logged too.
    stop_after: stop (with a checkpoint) after this many steps of this call; for tests.
  """
  if not isinstance(objective, objectives_lib.OfflineObjective):
    raise ValueError(f"objective {objective.name!r} is {objective.kind}: use loops.online")
  oc = OfflineConfig(**c.offline)
  per_epoch = steps_per_epoch(len(examples), oc.batch_size)
  width = example_width(objective, list(examples) + list(eval_examples), oc.max_len)
  mesh, rules = common.mesh_from_config(c)
  with sharding.activate(mesh, rules):
    run = common.Run(c, model_cfg, objective, files.path(workdir), mesh, rules,
                     num_steps=per_epoch * oc.num_epochs,
                     best_metric="eval/loss" if eval_examples else "", best_mode="min")
    state, ref_params = run.initial_state(params, ref_params)
    examples = objective.prepare(list(examples), ref_params, width)
    eval_examples = objective.prepare(list(eval_examples), ref_params, width)
    eval_loss = jax.jit(lambda p, b, r: objective.loss_fn(p, b, None, r)[0])

    def evaluate(params) -> dict:
      n = min(oc.batch_size, len(eval_examples))
      losses = [float(eval_loss(params, sharding.shard_batch(
          objective.collate(eval_examples[i:i + n], width), mesh, rules), ref_params))
                for i in range(0, len(eval_examples) - n + 1, n)]
      return {"eval/loss": float(np.mean(losses))}

    def step_fn(state):
      step = int(state.step)
      idx = batch_indices(len(examples), step, oc.batch_size, c.seed)
      batch = objective.collate([examples[i] for i in idx], width)
      rng = jax.random.fold_in(jax.random.key(c.seed), step)
      state, m = run.train_step(state, sharding.shard_batch(batch, mesh, rules), rng,
                                ref_params)
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      epoch, pos = divmod(step + 1, per_epoch)
      m["epoch"] = epoch + pos / per_epoch
      if pos == 0:  # The end of an epoch.
        if eval_examples:
          m |= evaluate(run.policy(state, ref_params))
        if on_epoch_end is not None:
          m |= on_epoch_end(run.policy(state, ref_params), epoch)
      return state, m, None

    state, info = run.drive(state, step_fn, total=oc.num_epochs * per_epoch,
                            progress_keys=["loss", "eval/loss"], stop_after=stop_after)
    return state.replace(params=run.policy(state, ref_params)), info
