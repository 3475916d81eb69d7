"""Orbax checkpoints of the train state plus a JSON record of where the run stands.

Saves are asynchronous and atomic: orbax writes into a temporary directory and renames
it when complete, so a crash or `kill -9` mid-save leaves the previous checkpoints as
they were, and a half-written one is never picked up on restore. The last `keep`
checkpoints are kept, plus the best one by a metric saved with each (the training
reward for RL, the evaluation loss for supervised runs).

Every checkpoint also records a checksum of each array, and a restore checks them: a
checkpoint whose data was corrupted on disk is reported and the newest one that checks
out is restored instead. The step a run last restored from is never deleted by
retention, and parameters that are not finite are never saved.

A reader that needs only the parameters (evaluation, export, the next stage of a
pipeline) restores them alone (`restore(..., partial=True)`), and a finished stage that
nothing resumes keeps its parameters alone (`keep_params_only`): with Adam the optimizer
state is twice the parameters' size.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxscore.infra import files


class CorruptCheckpoint(RuntimeError):
  """A checkpoint whose arrays do not match the checksums saved with them."""


def _checksum(x: jax.Array) -> jax.Array:
  """A position-weighted sum of the array's bits mod 2^32 (uint32 arithmetic wraps).

  Integer sums are exact in any order, so the value is the same however the array is
  sharded, and it is computed where the array lives. The weights are odd, so flipping
  any single bit changes it; other corruptions go unseen with probability 2^-32.
  """
  if x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  else:
    bits = x.astype(jnp.uint32)
  bits = bits.reshape(-1)
  weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) * 2 + 1
  return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def checksums(tree: Any) -> Any:
  return jax.tree.map(_checksum, tree)


def flat_checksums(tree: Any) -> dict[str, int]:
  """`checksums` as {key path: int}: what a checkpoint's metadata records."""
  sums = jax.device_get(checksums(tree))
  return {jax.tree_util.keystr(path): int(v)
          for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@dataclasses.dataclass
class _Protected(pp.PreservationPolicy):
  """Keeps the steps in `steps` (the last verified restore), whatever else says."""

  steps: set[int] = dataclasses.field(default_factory=set)

  def should_preserve(self, checkpoints: Sequence[pp.PolicyCheckpointInfo], *, context):
    del context
    return [c.step in self.steps for c in checkpoints]


class Checkpointer:

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2,
               best_metric: str | None = "reward", best_mode: str = "max",
               async_save: bool = True, read_only: bool = False):
    """`read_only`: a reader, which neither creates the directory nor cleans up its
    temporary directories (they may be a running writer's saves in progress)."""
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode={best_mode!r}: expected 'max' or 'min'")
    sign = 1.0 if best_mode == "max" else -1.0
    self.protected = _Protected()
    policies = [pp.LatestN(n=keep), self.protected]
    if best_metric:
      # Ascending sort by the signed metric: the best is the largest.
      policies.append(pp.BestN(get_metric_fn=lambda m: sign * m[best_metric], reverse=False,
                               n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=pp.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=not read_only, create=not read_only)
    self.best_metric, self.best_mode = best_metric, best_mode
    self.manager = ocp.CheckpointManager(
        files.path(directory), options=options, item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    """Starts an async save of `state` (a pytree) and `meta` (JSON) at `step`.

    Raises FloatingPointError, saving nothing, if any array of `state` is not finite.
    """
    if not bool(_all_finite(state)):
      raise FloatingPointError(
          f"step {step}: the state has non-finite values; not saved (the last checkpoint "
          f"is step {self.latest_step()} in {self.manager.directory})")
    # The metrics also go into the JSON record (orbax keeps them only for its policy),
    # with how to rank them, so a reader that does not know the run finds the best.
    meta = dict(meta, metrics=metrics or {}, best_metric=self.best_metric,
                best_mode=self.best_mode, checksums=flat_checksums(state))
    self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def metas(self) -> dict[int, dict]:
    """Each kept step's metadata (JSON), without reading its arrays; unreadable ones
    are left out (`restore` reports them)."""
    out = {}
    for step in self.manager.all_steps():
      try:
        out[step] = self.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception:  # A damaged step: restore() names it and falls back.
        continue
    return out

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

  def restore(self, abstract_state: Any, step: int | None = None, partial: bool = False):
    """(state, meta) restored into the abstract state's shapes, dtypes and shardings,
    and verified against its checksums; None if there is no checkpoint.

    With `partial`, `abstract_state` is a dict of some of the saved state's top-level
    fields (e.g. `{"params": ...}`) and only those are read.

    With `step` None, the newest checkpoint that restores and verifies: a corrupt one is
    reported (logged and printed) and the next older one tried. With a `step`, a corrupt
    checkpoint raises CorruptCheckpoint.
    """
    steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
    for candidate in steps:
      try:
        state, meta = self._restore_verified(abstract_state, candidate, partial)
      except CorruptCheckpoint as e:
        if step is not None:
          raise
        moved = self._quarantine(candidate)
        message = f"{e}; moved to {moved.name}, trying an older checkpoint"
        logging.error(message)
        print(message)
        continue
      self.protected.steps = {candidate}
      return state, meta
    if steps:
      raise CorruptCheckpoint(f"no checkpoint in {self.manager.directory} restores intact "
                              f"(tried steps {steps})")
    return None

  def _quarantine(self, step: int):
    """Moves a corrupt step aside (kept for inspection, invisible to orbax) so that the
    resumed run can save that step again."""
    directory = files.path(self.manager.directory)
    target = directory / f"{step}.corrupt"
    n = 1
    while target.exists():
      target, n = directory / f"{step}.corrupt{n}", n + 1
    if jax.process_index() == 0:
      (directory / str(step)).rename(target)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
    self.manager.reload()
    return target

  def _restore_verified(self, abstract_state: Any, step: int, partial: bool = False):
    where = f"checkpoint step {step} in {self.manager.directory}"
    if partial:
      state_args = ocp.args.PyTreeRestore(
          item=abstract_state, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
    else:
      state_args = ocp.args.StandardRestore(abstract_state)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (any unreadable data)
      raise CorruptCheckpoint(f"{where} cannot be read: {type(e).__name__}: {e}") from e
    state, meta = restored["state"], restored["meta"]
    expected = meta.get("checksums")
    if expected is None:
      return state, meta  # Saved before checksums were recorded.
    actual = flat_checksums(state)
    if partial:
      actual = {_saved_key(k, expected): v for k, v in actual.items()}
      expected = {k: v for k, v in expected.items() if k in actual}
    bad = [k for k in expected if actual.get(k) != expected[k]]
    if bad or set(actual) != set(expected):
      raise CorruptCheckpoint(f"{where} is corrupt: {len(bad)} array(s) do not match their "
                              f"checksums, first {bad[0] if bad else 'a missing array'}")
    return state, meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    # Orbax cleans up temporary directories in a background thread that close() does not
    # join; one still running at interpreter exit prints a traceback.
    getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    self.manager.close()


def _saved_key(key: str, expected: dict) -> str:
  """The checksum key a partially restored array was saved under: a dataclass state
  (TrainState) records its fields as attributes, `.params[...]`, where the partial
  tree, a dict, has `['params'][...]`."""
  if key in expected:
    return key
  return re.sub(r"^\['([^']*)'\]", r".\1", key)


def keep_params_only(source, target, abstract_params: Any) -> list[int]:
  """Replaces the checkpoints in `source` (of a finished run) by its parameters alone,
  written to `target`; returns the steps kept (the latest and the best).

  Nothing resumes a finished stage of a pipeline, so its optimizer state is dead weight
  that a study of several arms would otherwise keep for each. The parameters are
  written completely (orbax's atomic saves) before `source` is deleted, so a crash in
  between loses nothing: a reader prefers `target` once it has a step.
  """
  source, target = files.path(source), files.path(target)
  if not source.exists():
    return []
  full = Checkpointer(source, keep=1 << 30, async_save=False, read_only=True)
  kept = sorted({s for s in (full.latest_step(), full.best_step()) if s is not None})
  out = None
  for step in kept:
    state, meta = full.restore({"params": abstract_params}, step=step, partial=True)
    if out is None:
      out = Checkpointer(target, keep=1 << 30, async_save=False,
                         best_metric=meta.get("best_metric"),
                         best_mode=meta.get("best_mode") or "max")
    record = {k: v for k, v in meta.items()
              if k not in ("checksums", "metrics", "best_metric", "best_mode")}
    out.save(step, state, dict(record, params_only=True), metrics=meta.get("metrics") or None)
  full.close()
  if out is not None:
    out.close()
  from jax.experimental import multihost_utils

  multihost_utils.sync_global_devices(f"params of {source} written")
  if jax.process_index() == 0:
    source.rmtree()
  multihost_utils.sync_global_devices(f"{source} deleted")
  return kept


def params_directory(workdir) -> Any:
  """Where a run's parameters are read from: `params/` once a finished run kept only
  its parameters there, else `checkpoints/`."""
  workdir = files.path(workdir)
  params = workdir / "params"
  if params.exists() and any(p.name.isdigit() for p in params.iterdir()):
    return params
  return workdir / "checkpoints"


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
