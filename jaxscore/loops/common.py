"""What every training loop shares: the sharded train state and its compiled step,
checkpoints and exact resume, metrics and transcripts, the progress bar, and SIGTERM.

A loop supplies `step_fn(state) -> (state, metrics, transcripts)`; `Run.drive` calls it
until the objective's last step and does the rest. Everything a step does must be a
function of (config, step), so a checkpoint of the train state is all a resume needs.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxscore.infra import checkpoint as checkpoint_lib
from jaxscore.infra import files, metric_writers, sharding, wandb_log
from jaxscore.loops import train as train_lib
from jaxscore.models import lora, weights
from jaxscore.models import model as model_lib


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 50  # Also saved at the end and on SIGTERM.
  keep: int = 2  # The last `keep`, plus the best by the loop's best metric.
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LogConfig:
  transcripts_every: int = 25  # Steps between transcript samples (0 = never).
  num_transcripts: int = 4
  # Weights & Biases (pip install 'jaxscore[wandb]'): a project logs every scalar, the
  # config and the evaluation tables to one run per workdir; "" logs nothing there.
  wandb_project: str = ""
  wandb_entity: str = ""


class Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def mesh_from_config(c):
  """(training mesh, rules): every device, or those `mesh.sampler_devices` leaves."""
  return sharding.training_mesh(sharding.MeshConfig(**c.mesh))


def sampler_mesh_from_config(c):
  """The mesh of the last `mesh.sampler_devices` devices (data-parallel), or None."""
  n = c.mesh.get("sampler_devices", 0)
  return sharding.make_mesh(-1, 1, 1, 1, devices=jax.devices()[-n:]) if n else None


class Run:
  """The train state's shardings, the compiled train step and the checkpointer of one
  run of `objective`, on `mesh`.

  Which parameters the best metric belongs to: with `metric_before_update` (RL, whose
  training reward is earned by the rollout of the parameters *before* the step's
  update) a due checkpoint is saved by the loop between its rollout and its update,
  through `save_before_update`, labelled with that rollout's reward; otherwise (an
  evaluation loss measured after the update) the state after the step is saved with
  the step's metric. Saves at the end and on SIGTERM hold the state after the last
  update, which no rollout has measured: they carry no metric.
  """

  def __init__(self, c, model_cfg: model_lib.ModelConfig, objective, workdir, mesh, rules,
               num_steps: int, best_metric: str = "reward", best_mode: str = "max",
               metric_before_update: bool = False):
    self.c, self.objective, self.mesh, self.rules = c, objective, mesh, rules
    self.metric_before_update = metric_before_update
    self._writer = None
    self.spent = 0.0  # The budget metric summed over the steps taken (see `drive`).
    self.workdir = files.path(workdir)
    self.model_cfg = model_cfg
    epochs, minibatches = objective.updates_per_batch
    self.optim_cfg = train_lib.with_run_length(train_lib.OptimConfig(**c.optim), num_steps,
                                               epochs * minibatches)
    self.optimizer = train_lib.make_optimizer(self.optim_cfg)
    # With LoRA (model_cfg.lora) the state holds the adapters alone: the frozen base is
    # the reference the loops pass to every step, one copy serving both.
    self.lora = model_cfg.lora_scale is not None
    self.param_shardings = sharding.param_shardings(model_cfg, mesh, rules)
    abstract = jax.eval_shape(lambda: model_lib.init(model_cfg, jax.random.key(0)))
    if self.lora:
      (self.base_shardings, self.trainable_shardings) = lora.split(self.param_shardings)
      abstract = lora.split(abstract)[1]
      loss_fn = lambda adapters, batch, rng, base: objective.loss_fn(
          lora.combine(base, adapters), batch, rng, base)
    else:
      self.base_shardings = self.trainable_shardings = self.param_shardings
      loss_fn = objective.loss_fn
    self.state_shardings = train_lib.state_shardings(self.optimizer, abstract,
                                                     self.trainable_shardings, mesh)
    # Adapters belong to one base: saved with them, checked when they are restored.
    self.meta = ({"base_model": c.model.name, "lora": dataclasses.asdict(model_cfg.lora)}
                 if self.lora else {})
    self.replicated = sharding.NamedSharding(mesh, sharding.PartitionSpec())
    # The new state keeps the old one's shardings (the compiler would otherwise pick its
    # own), so the next step and the sampler see the same input shardings: no recompiles.
    self.train_step = jax.jit(
        train_lib.make_train_step(loss_fn, self.optimizer, *objective.updates_per_batch,
                                  micro_batches=c.optim.get("micro_batches", 1),
                                  batch_weight=objective.batch_weight),
        donate_argnums=(0,), out_shardings=(self.state_shardings, self.replicated))
    self.ckpt_cfg = CheckpointConfig(**c.checkpoint)
    self.log_cfg = LogConfig(**c.log)
    self.best_metric = best_metric
    self.ckpt = checkpoint_lib.Checkpointer(
        self.workdir / "checkpoints", keep=self.ckpt_cfg.keep,
        async_save=self.ckpt_cfg.async_save, best_metric=best_metric, best_mode=best_mode)

  def initial_state(self, params, ref_params, off_policy: bool = False):
    """(state, reference params) in their shardings; the state restored if a checkpoint
    exists. The state owns fresh buffers: train_step donates them, and `params` may be
    the very arrays the reference uses. With LoRA, `params` is the frozen base and the
    reference too (`ref_params` is not read: the base with adapters off is the
    reference), and the state holds fresh adapters. With `off_policy`, the state is an
    `OffPolicyState` whose behaviour parameters start as a copy of the parameters."""
    if self.lora:
      ref_params = sharding.frozen_base(lora.split(params)[0], self.model_cfg, self.mesh,
                                        self.rules)
      params = model_lib.init_lora(self.model_cfg, jax.random.key(self.c.seed))
    else:
      ref_params = jax.device_put(ref_params, self.param_shardings)
    create = lambda p: train_lib.TrainState.create(jax.tree.map(jnp.copy, p), self.optimizer)
    state = jax.jit(create, out_shardings=self.state_shardings)(
        jax.device_put(params, self.trainable_shardings))
    if off_policy:
      state = train_lib.OffPolicyState(step=state.step, params=state.params,
                                       opt_state=state.opt_state,
                                       behaviour_params=jax.tree.map(jnp.copy, state.params))
    # Adapters belong to one base and one shape: checked before any array is read.
    for step, meta in (self.ckpt.metas() if self.meta else {}).items():
      for key, value in self.meta.items():
        if meta.get(key, value) != value:
          raise weights.CheckpointError(
              f"{self.workdir / 'checkpoints'}: step {step}'s adapters were trained with "
              f"{key}={meta[key]!r}, this run has {key}={value!r}: use another workdir")
    restored = self.ckpt.restore(checkpoint_lib.abstract_like(state))
    if restored is not None:
      state, meta = restored
      self.spent = float(meta.get("spent", 0.0))
      print(f"resumed from step {meta['step']} ({self.workdir / 'checkpoints'})")
    return state, ref_params

  def drive(self, state, step_fn: Callable, *, total: int,
            progress_keys: Sequence[str] = (), stop_after: int | None = None,
            budget: tuple[str, float] | None = None):
    """Runs `step_fn` from the state's step to `total`; returns (state, info).

    `step_fn(state) -> (state, metrics, transcripts)`: metrics a flat dict with at least
    `loss` (and the best metric where a step has one), transcripts JSON records or None.
    `budget=(key, limit)` also ends the run after the step at which the sum of metric
    `key` reaches `limit` (e.g. sampled tokens), checkpointed: a resume stops there too.
    """
    step = first = int(state.step)
    writer = self._writer = self._metrics_writer(step)
    running: dict[str, float] = {}
    # No bar in logs and pipes; a notebook's output is no TTY either, but shows it live.
    bar = tqdm(total=total, initial=step, desc=self.objective.title, dynamic_ncols=True,
               disable=False if "ipykernel" in sys.modules else None)
    phase = None
    spent_out = lambda: budget is not None and self.spent >= budget[1]
    with Preemption() as preempt:
      while step < total and not spent_out():
        state, m, transcripts = step_fn(state)
        if budget is not None:
          self.spent += float(m[budget[0]])
        step = int(state.step)
        if not np.isfinite(m["loss"]):
          self.ckpt.close()
          raise FloatingPointError(
              f"step {step}: loss is {m['loss']}; the last good checkpoint is step "
              f"{self.ckpt.latest_step()} in {self.workdir / 'checkpoints'}")
        phase = m.get("phase", phase)
        for k in progress_keys:
          if k in m:
            running[k] = m[k] if k not in running else 0.9 * running[k] + 0.1 * m[k]
        writer.write(step, m)
        bar.update(1)
        bar.set_postfix(**({"phase": phase} if phase else {}),
                        **{k.rpartition("/")[2]: f"{v:.2f}" for k, v in running.items()})
        every = self.log_cfg.transcripts_every
        if transcripts and every and step % every == 0:
          writer.write_transcripts(step, transcripts[:self.log_cfg.num_transcripts])
        done = step >= total or spent_out() or preempt.requested or (
            stop_after is not None and step - first >= stop_after)
        if done or (step % self.ckpt_cfg.every_steps == 0 and not self.metric_before_update):
          writer.flush()
          best = ({self.best_metric: m[self.best_metric]}
                  if self.best_metric in m and not self.metric_before_update else None)
          self.ckpt.save(step, state, {"step": step, "phase": phase, "spent": self.spent,
                                       **self.meta}, metrics=best)
        if done:
          break
    bar.close()
    writer.close()
    self.ckpt.wait()
    info = {"step": step, "best_step": self.ckpt.best_step(), "preempted": preempt.requested,
            "spent": self.spent}
    self.ckpt.close()
    if preempt.requested:
      print(f"SIGTERM: saved step {step}; rerun the same command to resume")
    return state, info

  def _metrics_writer(self, step: int) -> metric_writers.MetricsWriter:
    """Files, TensorBoard and (with `log.wandb_project`) the workdir's W&B run, from
    `step` on."""
    run = wandb_log.start(self.workdir, self.log_cfg.wandb_project, self.log_cfg.wandb_entity,
                          self.c.to_dict())
    return metric_writers.MetricsWriter(self.workdir, start_step=step, wandb_run=run)

  def policy(self, state, ref_params):
    """The params the policy samples and is evaluated with: the state's own, or with
    LoRA the frozen base and the state's adapters side by side."""
    return self.policy_of(state.params, ref_params)

  def policy_of(self, params, ref_params):
    """`params` (the state's own, or adapters on the frozen base) as a policy."""
    return lora.combine(ref_params, params) if self.lora else params

  def save_before_update(self, state, metrics: dict, phase: str | None = None) -> None:
    """Saves `state` if its step is due, labelled with `metrics[best_metric]`: called
    after the step's rollout and before its update, so the label is what these very
    parameters earned. Step 0 (the initial model) and a step already on disk (the one
    a run resumed from) are not saved again."""
    step = int(state.step)
    if step == 0 or step % self.ckpt_cfg.every_steps or step in self.ckpt.manager.all_steps():
      return
    if self._writer is not None:
      self._writer.flush()
    best = {self.best_metric: metrics[self.best_metric]} if self.best_metric in metrics else None
    # `spent` is still the sum over the steps before this one, which is what the saved
    # (pre-update) state has taken.
    self.ckpt.save(step, state, {"step": step, "phase": phase, "spent": self.spent,
                                 **self.meta}, metrics=best)


def _abstract_params(c, model_cfg: model_lib.ModelConfig, params, mesh, rules):
  """What a checkpoint's `params` hold: the model's params, or with LoRA its adapters."""
  if mesh is None:
    mesh, rules = mesh_from_config(c)
  param_sh = sharding.param_shardings(model_cfg, mesh, rules)
  if model_cfg.lora_scale is not None:
    params = lora.split(jax.eval_shape(lambda: model_lib.init(model_cfg, jax.random.key(0))))[1]
    param_sh = lora.split(param_sh)[1]
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      params, param_sh)


def _with_base(model_cfg: model_lib.ModelConfig, restored, base):
  """Restored checkpoint params as the policy: with LoRA, `base` and the adapters."""
  if model_cfg.lora_scale is None:
    return restored
  base = lora.split(base)[0]
  if model_cfg.quantize != "none":  # The base the adapters were trained on.
    base = jax.jit(functools.partial(lora.quantize_base, cfg=model_cfg))(base)
  return lora.combine(base, restored)


def restore_params(c, workdir, model_cfg: model_lib.ModelConfig, params, which: str = "latest",
                   mesh=None, rules=None) -> tuple[Any, int | None]:
  """(params, step) of the workdir's `latest` or `best` checkpoint (or a step number as
  text), in their shardings; `(params, None)` unchanged when the workdir has none.

  Only the parameters are read, so the optimizer (and its config) does not matter, and
  a finished run that kept its parameters alone reads the same way."""
  abstract = {"params": _abstract_params(c, model_cfg, params, mesh, rules)}
  ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.params_directory(workdir), keep=1 << 30,
                                     read_only=True)
  try:
    if which == "latest":  # The newest intact one: a corrupt latest is reported.
      restored = ckpt.restore(abstract, partial=True)
      if restored is None:
        return params, None
      return _with_base(model_cfg, restored[0]["params"], params), int(restored[1]["step"])
    step = checkpoint_lib.pick_step(ckpt, which)
    if step is None:
      return params, None
    state, _ = ckpt.restore(abstract, step=step, partial=True)
    return _with_base(model_cfg, state["params"], params), step
  finally:
    ckpt.close()


def keep_params_only(c, workdir, model_cfg: model_lib.ModelConfig, params, mesh=None,
                     rules=None) -> list[int]:
  """A finished run keeps its latest and best parameters (in `<workdir>/params`) and
  drops its optimizer state; `restore_params` reads them as before."""
  workdir = files.path(workdir)
  return checkpoint_lib.keep_params_only(
      workdir / "checkpoints", workdir / "params",
      _abstract_params(c, model_cfg, params, mesh, rules))
