"""The multi-turn RL loop: rollout -> rewards -> reference log-probs -> advantages ->
update -> checkpoint, each a named function. SCoRe's stages are a schedule over it.

Everything a step does is a function of (config, step): problems come from a seeded
permutation of the train split, randomness from `fold_in(seed, step)`. A checkpoint
therefore needs only the train state and the step to resume exactly.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from jaxscore import checkpoint as checkpoint_lib
from jaxscore import evaluate as evaluate_lib
from jaxscore import files
from jaxscore import model as model_lib
from jaxscore import objectives, rl
from jaxscore import sampler as sampler_lib
from jaxscore import sharding
from jaxscore import train as train_lib


def parse_stages(spec: str) -> list[tuple[str, int]]:
  """`"I:10,II:20"` -> [("I", 10), ("II", 20)]; stages may repeat (I, II, I, II)."""
  stages = []
  for part in spec.split(","):
    name, _, steps = part.strip().partition(":")
    if name not in ("I", "II") or not steps.isdigit():
      raise ValueError(f"stages={spec!r}: expected e.g. 'I:10,II:20'")
    stages.append((name, int(steps)))
  return stages


def stage_at(stages: list[tuple[str, int]], step: int) -> str:
  for name, steps in stages:
    if step < steps:
      return name
    step -= steps
  return stages[-1][0]


@dataclasses.dataclass
class RLSetup:
  """What the loop needs besides the config: model pieces and the task."""

  cfg: model_lib.ModelConfig
  tokenizer: Any
  fmt: Any
  task: Any
  ref_params: Any


def batch_problems(problems, step: int, prompts_per_step: int, seed: int):
  """The prompts of `step`: consecutive slices of per-epoch seeded permutations."""
  n = len(problems)
  start = step * prompts_per_step
  out = []
  for i in range(start, start + prompts_per_step):
    epoch, pos = divmod(i, n)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    out.append(problems[order[pos]])
  return out


def batch_width(ep: sampler_lib.Episode, max_len: int, pad_multiple: int) -> int:
  """Token width of a training batch.

  pad_multiple == 0: `max_len`, the longest possible episode, so every step has one
  shape and the train step compiles once. pad_multiple > 0: the longest episode of this
  batch rounded up to a multiple, which trains on less padding but compiles once per
  distinct width (and syncs the lengths to the host to pick it).
  """
  if pad_multiple <= 0:
    return min(max_len, ep.tokens_BxL.shape[1])
  length = int(np.max(sharding.to_host(ep.length_B)))
  return min(-(-length // pad_multiple) * pad_multiple, max_len, ep.tokens_BxL.shape[1])


def to_batch(ro: evaluate_lib.Rollouts, ref_logp_fn, ref_params, stage: str,
             score_cfg: objectives.ScoreConfig, group_size: int, kl_estimator: str,
             width: int):
  """Rollouts -> (RLBatch, returns_BxN): reference log-probs and advantages, with the
  episodes cut (or padded) to `width` tokens (see `batch_width`)."""
  ep = ro.episode
  tokens = ep.tokens_BxL[:, :width]
  turn = ep.turn_BxL[:, :width]
  mask = jnp.arange(width)[None] < ep.length_B[:, None]
  old_logp = ep.logp_BxL[:, :width]
  ref_logp = ref_logp_fn(ref_params, tokens, mask)
  kl_BxL = None
  if score_cfg.kl_in_reward:
    # Sequence KL of the samples themselves: log pi_old - log pi_ref per token.
    kl_fn = rl.pick(rl.KL_ESTIMATORS, kl_estimator if kl_estimator != "exact" else "k1",
                    "kl_estimator")
    kl_BxL = jnp.where(turn > 0, kl_fn(old_logp, ref_logp), 0.0)
  adv_BxN, returns_BxN, coef_N = objectives.advantages(
      jnp.asarray(ro.rewards_BxN()), stage, score_cfg, group_size, turn, kl_BxL)
  batch = train_lib.RLBatch(
      tokens_BxL=tokens, mask_BxL=mask, turn_BxL=turn,
      advantages_BxL=rl.turn_values(turn, adv_BxN),
      kl_coef_BxL=rl.turn_weights(turn, coef_N),
      ref_logp_BxL=ref_logp, old_logp_BxL=old_logp)
  return batch, returns_BxN


class _Preemption:
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


class MetricsWriter:
  """JSONL metrics and TensorBoard scalars, written by process 0 only.

  Local files get each line at once; on an object store (gs://) lines are held until
  `flush` (called with every checkpoint), since each flush rewrites the file.
  """

  def __init__(self, workdir: epath.Path, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    self.path = workdir / "metrics.jsonl"
    for name in ("metrics.jsonl", "transcripts.jsonl"):
      files.drop_steps_after(workdir / name, start_step)
    self.buffered = files.is_remote(workdir)
    self.pending: list[str] = []
    self.tb = _tensorboard(workdir / "tensorboard")

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self.pending.append(json.dumps({"step": step, **metrics}) + "\n")
    if not self.buffered:
      self.flush()
    if self.tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, step)

  def flush(self) -> None:
    if self.enabled:
      files.append_text(self.path, "".join(self.pending))
      self.pending = []
      if self.tb is not None:
        self.tb.flush()

  def close(self):
    if self.enabled:
      self.flush()
      if self.tb is not None:
        self.tb.close()


def _tensorboard(logdir: epath.Path):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return None
  if files.is_remote(logdir):
    try:
      from google.cloud import storage  # noqa: F401  (tensorboardX writes gs:// with it)
    except ImportError:
      logging.warning("no TensorBoard events in %s: gs:// needs google-cloud-storage "
                      "(pip install 'jaxscore[gcs]')", logdir)
      return None
  return SummaryWriter(os.fspath(logdir))


def train(c, setup: RLSetup, params, workdir: str | os.PathLike, *, stop_after: int | None = None):
  """Runs (or resumes) the SCoRe stage schedule of config `c`; returns (state, info).

  Args:
    c: the experiment config (see configs/score.py).
    setup: model config, tokenizer, episode format, task, reference params.
    params: initial policy params (ignored when resuming from a checkpoint).
    workdir: checkpoints, metrics.jsonl, tensorboard/, transcripts.jsonl; a local path
      or gs://.
    stop_after: stop (with a checkpoint) after this many steps of this call; for tests.
  """
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  rules = sharding.RULES[c.mesh.rules]
  with sharding.activate(mesh, rules):
    run = Run(c, setup, files.path(workdir), mesh, rules)
    state, ref_params = run.initial_state(params)
    return run.loop(state, ref_params, stop_after)


class Run:
  """The compiled functions and fixed inputs of one training run."""

  def __init__(self, c, setup: RLSetup, workdir: epath.Path, mesh, rules):
    self.c, self.setup, self.workdir, self.mesh, self.rules = c, setup, workdir, mesh, rules
    self.stages = parse_stages(c.rl.stages)
    self.total = sum(s for _, s in self.stages)
    self.score_cfg = objectives.ScoreConfig(
        alpha=c.rl.alpha, beta1=c.rl.beta1, beta2=c.rl.beta2, gamma=c.rl.gamma,
        advantage=c.rl.advantage, kl_in_reward=c.rl.kl_in_reward)
    loss_cfg = train_lib.PolicyLossConfig(
        kl_estimator=c.rl.kl_estimator, kl_in_reward=c.rl.kl_in_reward,
        policy_loss=c.rl.policy_loss, clip_eps=c.rl.clip_eps, aggregation=c.rl.aggregation,
        num_turns=c.sampler.num_turns)
    self.optimizer = train_lib.make_optimizer(train_lib.OptimConfig(**c.optim))
    loss_fn = lambda *a: train_lib.policy_gradient_loss(*a, cfg=setup.cfg, loss_cfg=loss_cfg)
    self.param_shardings = sharding.param_shardings(setup.cfg, mesh, rules)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), setup.ref_params)
    self.state_shardings = sharding.state_shardings(self.optimizer, abstract,
                                                    self.param_shardings, mesh)
    # The new state keeps the old one's shardings (the compiler would otherwise pick its
    # own), so the next step and the sampler see the same input shardings: no recompiles.
    replicated = sharding.NamedSharding(mesh, sharding.PartitionSpec())
    self.train_step = jax.jit(
        train_lib.make_train_step(loss_fn, self.optimizer), donate_argnums=(0,),
        out_shardings=(self.state_shardings, replicated))

    def reference_logprobs(ref_params, tokens_BxL, mask_BxL):
      return rl.token_logprobs(ref_params, tokens_BxL, mask_BxL, setup.cfg)[0]

    self.ref_logp_fn = jax.jit(reference_logprobs)
    self.problems = setup.task.problems(c.task.train_split)
    sizes = ([len(setup.fmt.prompt_ids(p.prompt)) for p in self.problems],
             c.sampler.num_turns, c.sampler.max_new_tokens,
             len(setup.fmt.instruction_ids(setup.task.instruction)))
    self.max_episode_len = evaluate_lib.max_episode_len(*sizes)
    self.sampler = evaluate_lib.make_sampler(
        setup.cfg, setup.fmt, setup.tokenizer, *sizes,
        batch_sharding=sharding.NamedSharding(
            mesh, sharding.PartitionSpec(dict(rules)["batch"])), rules=rules)
    self.sampling = sampler_lib.SamplingConfig(
        temperature=c.sampler.temperature, top_k=c.sampler.top_k, top_p=c.sampler.top_p,
        max_new_tokens=c.sampler.max_new_tokens)
    self.ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=c.checkpoint.keep,
                                            async_save=c.checkpoint.async_save)

  def initial_state(self, params):
    """(state, reference params) in their shardings; the state restored if a checkpoint
    exists. The state owns fresh buffers: train_step donates them, and `params` may be
    the very arrays the reference uses."""
    param_sh = self.param_shardings
    ref_params = jax.device_put(self.setup.ref_params, param_sh)
    create = lambda p: train_lib.TrainState.create(jax.tree.map(jnp.copy, p), self.optimizer)
    state = jax.jit(create, out_shardings=self.state_shardings)(jax.device_put(params, param_sh))
    restored = self.ckpt.restore(checkpoint_lib.abstract_like(state))
    if restored is not None:
      state, meta = restored
      print(f"resumed from step {meta['step']} ({self.workdir / 'checkpoints'})")
    return state, ref_params

  def rl_step(self, state, ref_params, pool):
    """rollout -> rewards -> reference log-probs -> advantages -> update."""
    c, setup = self.c, self.setup
    step = int(state.step)
    stage = stage_at(self.stages, step)
    t0 = time.perf_counter()
    rows = [p for p in batch_problems(self.problems, step, c.rl.prompts_per_step, c.seed)
            for _ in range(c.rl.group_size)]
    rng = jax.random.fold_in(jax.random.key(c.seed), step)
    ro = evaluate_lib.rollout(state.params, self.sampler, setup.fmt, setup.tokenizer,
                              setup.task, rows, c.sampler.num_turns, self.sampling, rng,
                              score_pool=pool)
    t_rollout = time.perf_counter() - t0
    width = batch_width(ro.episode, self.max_episode_len, c.rl.pad_multiple)
    batch, returns = to_batch(ro, self.ref_logp_fn, ref_params, stage, self.score_cfg,
                              c.rl.group_size, c.rl.kl_estimator, width)
    state, m = self.train_step(state, sharding.shard_batch(batch, self.mesh, self.rules), rng,
                               ref_params)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    rewards = ro.rewards_BxN()
    m |= {f"reward/t{t + 1}": float(rewards[:, t].mean()) for t in range(rewards.shape[1])}
    m |= {"reward": float(rewards.sum(1).mean()), "stage": stage,
          "reward/return": float(np.asarray(returns).sum(1).mean()),
          "time/rollout_s": t_rollout, "time/step_s": time.perf_counter() - t0}
    if not np.isfinite(m["loss"]):
      self.ckpt.close()
      raise FloatingPointError(
          f"step {step + 1}: loss is {m['loss']}; the last good checkpoint is step "
          f"{self.ckpt.latest_step()} in {self.workdir / 'checkpoints'}")
    return state, m, ro

  def loop(self, state, ref_params, stop_after):
    from tqdm import tqdm

    c = self.c
    step = first = int(state.step)
    writer = MetricsWriter(self.workdir, start_step=step)
    running: dict[str, float] = {}
    bar = tqdm(total=self.total, initial=step, desc="SCoRe", dynamic_ncols=True, disable=None)
    with _Preemption() as preempt, concurrent.futures.ThreadPoolExecutor(2) as pool:
      while step < self.total:
        state, m, ro = self.rl_step(state, ref_params, pool)
        step = int(state.step)
        for k in ("reward/t1", "reward/t2"):
          if k in m:
            running[k] = m[k] if k not in running else 0.9 * running[k] + 0.1 * m[k]
        writer.write(step, m)
        bar.update(1)
        bar.set_postfix(stage=m["stage"], reward=f"{m['reward']:.2f}",
                        **{f"acc{k[-2:]}": f"{v:.2f}" for k, v in running.items()})
        if c.log.transcripts_every and step % c.log.transcripts_every == 0:
          _write_transcripts(self.workdir, step, ro, c.log.num_transcripts)
        done = step >= self.total or preempt.requested or (
            stop_after is not None and step - first >= stop_after)
        if step % c.checkpoint.every_steps == 0 or done:
          writer.flush()
          self.ckpt.save(step, state, {"step": step, "stage": m["stage"]},
                         metrics={"reward": m["reward"]})
        if done:
          break
    bar.close()
    writer.close()
    self.ckpt.wait()
    info = {"step": step, "best_step": self.ckpt.best_step(), "preempted": preempt.requested}
    self.ckpt.close()
    if preempt.requested:
      print(f"SIGTERM: saved step {step}; rerun the same command to resume")
    return state, info


def _write_transcripts(workdir: epath.Path, step: int, ro, n: int) -> None:
  if jax.process_index() != 0:
    return
  files.append_text(workdir / "transcripts.jsonl", "".join(
      json.dumps({"step": step, "id": ro.problems[i].id, "prompt": ro.problems[i].prompt,
                  "answer": ro.problems[i].answer,
                  "attempts": [ro.texts[t][i] for t in range(len(ro.texts))],
                  "rewards": ro.rewards[i].tolist()}) + "\n"
      for i in range(min(n, len(ro.problems)))))
