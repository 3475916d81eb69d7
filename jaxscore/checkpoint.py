"""Orbax checkpoints of the train state plus a JSON record of where the run stands.

Saves are asynchronous and atomic: orbax writes into a temporary directory and renames
it when complete, so a crash or `kill -9` mid-save leaves the previous checkpoints as
they were, and a half-written one is never picked up on restore. The last `keep`
checkpoints are kept, plus the one with the best training reward.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxscore import files


class Checkpointer:

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2,
               best_metric: str | None = "reward", async_save: bool = True):
    policies = [pp.LatestN(n=keep)]
    if best_metric:
      # Ascending sort by the metric: the best is the largest.
      policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=False, n=1,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=pp.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=True)
    self.best_metric = best_metric
    self.manager = ocp.CheckpointManager(
        files.path(directory), options=options, item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    """Starts an async save of `state` (a pytree) and `meta` (JSON) at `step`."""
    # The metrics also go into the JSON record: orbax keeps them only for `best_fn`.
    meta = dict(meta, metrics=metrics or {})
    self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the highest `best_metric`."""
    if not self.best_metric:
      return None
    scored = []
    for step in self.manager.all_steps():
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      value = meta["meta"].get("metrics", {}).get(self.best_metric)
      if value is not None:
        scored.append((value, step))
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


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a live pytree, for restoring into."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
