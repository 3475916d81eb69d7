"""Orbax checkpoints of the train state plus a JSON record of where the run stands.

Saves are asynchronous and atomic: orbax writes into a temporary directory and renames
it when complete, so a crash or `kill -9` mid-save leaves the previous checkpoints as
they were, and a half-written one is never picked up on restore. The last `keep`
checkpoints are kept, plus the best one by a metric saved with each (the training
reward for RL, the evaluation loss for supervised runs).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxscore.infra import files


class Checkpointer:

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2,
               best_metric: str | None = "reward", best_mode: str = "max",
               async_save: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode={best_mode!r}: expected 'max' or 'min'")
    sign = 1.0 if best_mode == "max" else -1.0
    policies = [pp.LatestN(n=keep)]
    if best_metric:
      # Ascending sort by the signed metric: the best is the largest.
      policies.append(pp.BestN(get_metric_fn=lambda m: sign * m[best_metric], reverse=False,
                               n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=pp.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=True)
    self.best_metric, self.best_mode = best_metric, best_mode
    self.manager = ocp.CheckpointManager(
        files.path(directory), options=options, item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    """Starts an async save of `state` (a pytree) and `meta` (JSON) at `step`."""
    # The metrics also go into the JSON record (orbax keeps them only for its policy),
    # with how to rank them, so a reader that does not know the run finds the best.
    meta = dict(meta, metrics=metrics or {}, best_metric=self.best_metric,
                best_mode=self.best_mode)
    self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best metric, ranked as the run that saved it ranked it."""
    scored = []
    for step in self.manager.all_steps():
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = meta["meta"]
      name = meta.get("best_metric", self.best_metric)
      value = meta.get("metrics", {}).get(name) if name else None
      if value is not None:
        sign = 1.0 if meta.get("best_mode", self.best_mode) == "max" else -1.0
        scored.append((sign * value, step))
    return max(scored)[1] if scored else None

  def restore(self, abstract_state: Any, step: int | None = None):
    """(state, meta) at `step` (default: latest), restored into the abstract state's
    shapes, dtypes and shardings; None if there is no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def pick_step(ckpt: Checkpointer, which: str) -> int | None:
  """`latest`, `best` (the latest if no step has the metric) or a step number."""
  if which == "latest":
    return ckpt.latest_step()
  if which == "best":
    best = ckpt.best_step()
    return best if best is not None else ckpt.latest_step()
  if which.isdigit():
    if int(which) not in ckpt.manager.all_steps():
      raise ValueError(f"checkpoint step {which} is not in {ckpt.manager.directory} "
                       f"(kept: {sorted(ckpt.manager.all_steps())})")
    return int(which)
  raise ValueError(f"checkpoint={which!r}: expected latest, best or a step number")


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a live pytree, for restoring into."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
