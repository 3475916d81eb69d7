"""The online loop: rollout -> rewards -> reference log-probs -> batch -> update ->
checkpoint, for any online objective (SCoRe, policy gradient, ...).

Everything a step does is a function of (config, step): problems come from a seeded
permutation of the train split, randomness from `fold_in(seed, step)`. A checkpoint
therefore needs only the train state to resume exactly. N counts turns.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxscore import evaluate, tasks
from jaxscore import objectives as objectives_lib
from jaxscore.infra import files, sharding
from jaxscore.loops import common
from jaxscore.loops import train as train_lib
from jaxscore.models import logprobs, lora
from jaxscore.sampling import rollout as rollout_lib
from jaxscore.sampling import sampler as sampler_lib


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  num_turns: int = 2  # Attempts per episode.
  group_size: int = 4  # Samples per prompt (k); RLOO needs >= 2.
  prompts_per_step: int = 128  # Prompts per update; batch = prompts_per_step * group_size.
  # Train-batch width: 0 pads every batch to the longest possible episode (one shape, one
  # compile for the whole run); N > 0 rounds the batch's longest episode up to a multiple
  # of N (less padding, one compile per distinct width).
  pad_multiple: int = 0
  # Between turns (jaxscore.sampling.rollout.Feedback): instruction (the task's, every
  # row takes every turn) | none | unary | template (rows stop at their first correct
  # answer; wrong rows get the message).
  feedback: str = "instruction"
  feedback_template: str = ""  # feedback=template: may contain {reason}.
  # Feedback that stops rows: > 1 cuts each batch into this many parts that take turns
  # on the device, so one part is scored while the others sample (slow scorers, e.g.
  # sandboxed code tests); 1 samples the batch whole (fastest when scoring is cheap).
  score_overlap_splits: int = 1
  # > 1: each step's rows sampled as this many consecutive batches, one after another,
  # so the devices hold one batch's KV cache at a time (the train step sees them all).
  sample_batches: int = 1
  # 1: step t + 1's rollouts are sampled by step t's parameters while step t's update
  # runs (sampling overlapped with training, one update stale; only objectives whose
  # loss corrects for it, e.g. grpo's ratio to the behaviour log-probs); 0: on-policy.
  off_policy_steps: int = 0

  @property
  def feedback_config(self) -> rollout_lib.Feedback:
    return rollout_lib.Feedback(self.feedback, self.feedback_template)


def seeded_problems(problems, start: int, count: int, seed: int):
  """Problems at positions start .. start + count - 1 of the seeded training order:
  per-epoch seeded permutations, one after another."""
  n = len(problems)
  out = []
  for i in range(start, start + count):
    epoch, pos = divmod(i, n)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    out.append(problems[order[pos]])
  return out


def self_correction_metrics(rewards_BxN: np.ndarray, ids: list[list[list[int]]],
                            max_rows: int = 64) -> dict[str, float]:
  """What SCoRe watches for collapse, on the training batch: Delta between the first and
  the last attempt, its two flips, and the edit-distance ratio between the attempts'
  tokens (near 0: the model repeats itself). The ratio is taken on at most `max_rows`
  evenly spaced rows, which keeps it to a second at paper sizes."""
  m = evaluate.metrics(rewards_BxN)
  n = rewards_BxN.shape[1]
  rows = np.unique(np.linspace(0, len(ids[0]) - 1, min(max_rows, len(ids[0]))).astype(int))
  ratios = [evaluate.edit_distance(ids[0][r], ids[-1][r]) /
            max(len(ids[0][r]) + len(ids[-1][r]), 1) for r in rows]
  return {"self_correction/delta": m[f"delta(t1,t{n})"],
          "self_correction/delta_i_to_c": m["delta_i->c"],
          "self_correction/delta_c_to_i": m["delta_c->i"],
          "self_correction/edit_distance_ratio": float(np.mean(ratios))}


def batch_problems(problems, step: int, prompts_per_step: int, seed: int):
  """The prompts of `step`: consecutive slices of the seeded training order."""
  return seeded_problems(problems, step * prompts_per_step, prompts_per_step, seed)


def batch_width(ep: sampler_lib.Episode, max_len: int, pad_multiple: int) -> int:
  """Token width of a training batch.

  pad_multiple == 0: `max_len`, the longest possible episode, so every step has one
  shape and the train step compiles once. pad_multiple > 0: the longest episode of this
  batch rounded up to a multiple, which trains on less padding but compiles once per
  distinct width (and syncs the lengths to the host to pick it).
  """
  if pad_multiple <= 0:
    return min(max_len, ep.tokens_BxT.shape[1])
  length = int(np.max(sharding.to_host(ep.length_B)))
  return min(-(-length // pad_multiple) * pad_multiple, max_len, ep.tokens_BxT.shape[1])


def trajectories(ro: rollout_lib.Rollouts, width: int, logp_fn=None, ref_params=None,
                 params=None) -> objectives_lib.Trajectories:
  """Rollouts cut (or padded) to `width` tokens, with reference log-probs if
  `ref_params` are given, and behaviour log-probs recomputed by teacher forcing under
  `params` if given (else the sampler's)."""
  ep = ro.episode
  tokens = ep.tokens_BxT[:, :width]
  mask = jnp.arange(width)[None] < ep.length_B[:, None]
  ref_logp = logp_fn(ref_params, tokens, mask) if ref_params is not None else None
  behaviour = (ep.logp_BxT[:, :width] if params is None else
               jnp.where(ep.turn_BxT[:, :width] > 0, logp_fn(params, tokens, mask), 0.0))
  return objectives_lib.Trajectories(
      tokens_BxT=tokens, mask_BxT=mask, turn_BxT=ep.turn_BxT[:, :width],
      behaviour_logp_BxT=behaviour, ref_logp_BxT=ref_logp,
      rewards_BxN=jnp.asarray(ro.rewards_BxN), turns_BxN=jnp.asarray(ro.turns_BxN))


def make_objective(c, setup: rollout_lib.Setup):
  ro = RolloutConfig(**c.rollout)
  ctx = objectives_lib.Context(model_cfg=setup.cfg, num_turns=ro.num_turns,
                               group_size=ro.group_size,
                               sampling=sampler_lib.SamplingConfig(**c.sampler),
                               stops_rows=ro.feedback_config.stops_when_correct)
  return objectives_lib.make(c.objective, c[c.objective], ctx)


def train(c, setup: rollout_lib.Setup, params, ref_params, workdir: str | os.PathLike, *,
          objective=None, stop_after: int | None = None, token_budget: int | None = None):
  """Trains (or resumes) config `c`'s online objective; returns (state, info).

  Args:
    c: the experiment config (e.g. configs/score.py).
    setup: model config, tokenizer, episode format, task.
    params: initial policy params (ignored when resuming from a checkpoint).
    ref_params: the frozen reference.
    workdir: checkpoints, metrics.jsonl, tensorboard/, transcripts.jsonl; a local path
      or gs://.
    objective: overrides `c.objective` (an already built objective).
    stop_after: stop (with a checkpoint) after this many steps of this call; for tests.
    token_budget: also stop after the step at which the run has sampled this many tokens
      (all turns; the objective's step count is then a cap). Equal-compute comparisons.
  """
  objective = objective or make_objective(c, setup)
  if objective.kind != "online":
    raise ValueError(f"objective {objective.name!r} is {objective.kind}: use loops.offline")
  mesh, rules = common.mesh_from_config(c)
  with sharding.activate(mesh, rules):
    loop = OnlineLoop(c, setup, objective, files.path(workdir), mesh, rules)
    off_policy = loop.rollout_cfg.off_policy_steps > 0
    state, ref_params = loop.run.initial_state(params, ref_params, off_policy=off_policy)
    num_turns = loop.rollout_cfg.num_turns
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # Scoring between turns.
      step_fn = lambda state: loop.step(state, ref_params, pool)
      try:
        state, info = loop.run.drive(
            state, step_fn, total=objective.num_steps,
            progress_keys=[f"reward/t{t}" for t in range(1, num_turns + 1)],
            stop_after=stop_after,
            budget=(("budget/tokens", token_budget) if token_budget else None))
      finally:
        # A rollout sampled ahead of a run that stops is dropped: a resumed run samples
        # it again, exactly, from the behaviour parameters in its checkpoint.
        loop.pending = None
    if off_policy:
      state = state.train_state()
    # The caller evaluates and samples with the policy (with LoRA: base and adapters).
    return state.replace(params=loop.run.policy(state, ref_params)), info


def finish_time(tree) -> concurrent.futures.Future:
  """The `time.perf_counter()` at which `tree`'s arrays are computed, from a thread that
  only waits for them: it dispatches nothing, so the caller's thread goes on dispatching
  (and the order of programs on the devices stays the caller's)."""
  future = concurrent.futures.Future()

  def wait():
    try:
      jax.block_until_ready(tree)
      future.set_result(time.perf_counter())
    except Exception as e:  # pylint: disable=broad-except
      future.set_exception(e)

  threading.Thread(target=wait, daemon=True).start()
  return future


class OnlineLoop:
  """The compiled sampler, reference and train step of one online run."""

  def __init__(self, c, setup: rollout_lib.Setup, objective, workdir, mesh, rules):
    self.c, self.setup, self.objective = c, setup, objective
    self.rollout_cfg = ro = RolloutConfig(**c.rollout)
    self.sampling = sampler_lib.SamplingConfig(**c.sampler)
    self.run = common.Run(c, setup.cfg, objective, workdir, mesh, rules,
                          num_steps=objective.num_steps, best_metric="reward", best_mode="max",
                          metric_before_update=True)

    def token_logprobs(params, tokens_BxT, mask_BxT):
      return logprobs.sliced_token_logprobs(params, tokens_BxT, mask_BxT, setup.cfg,
                                      c.optim.get("micro_batches", 1))

    # Teacher-forced log-probs of the reference (and of the policy, where the objective
    # recomputes behaviour log-probs): one compiled function.
    self.logp_fn = jax.jit(token_logprobs)
    self.feedback = ro.feedback_config
    self.problems = tasks.train_problems(setup.task, c.task)
    lens = rollout_lib.prompt_lens(setup, self.problems)
    message_len = rollout_lib.instruction_len(setup, self.feedback)
    self.max_episode_len = rollout_lib.episode_len_bound(
        lens, ro.num_turns, self.sampling.max_new_tokens, message_len)
    batch_axes = sharding.PartitionSpec(dict(rules)["batch"])
    self.batch_sharding = sharding.NamedSharding(mesh, batch_axes)
    # Disaggregated: the sampler has devices of its own (mesh.sampler_devices).
    self.sampler_mesh = common.sampler_mesh_from_config(c)
    self.sampler_mesh_rules = (self.sampler_mesh or mesh), rules
    if self.sampler_mesh is not None:
      self.sampler_param_shardings = sharding.param_shardings(setup.cfg, self.sampler_mesh,
                                                              rules)
    with self.sampler_placement():
      self.sampler = rollout_lib.make_sampler(
          setup, lens, ro.num_turns, self.sampling.max_new_tokens, message_len=message_len,
          batch_sharding=sharding.NamedSharding(self.sampler_mesh_rules[0], batch_axes),
          rules=rules)
    self.pending = None  # (step, rollouts): sampled ahead (off-policy).
    self.sampler_base = None  # With LoRA: (source leaves, the base on the sampler's mesh).

  def to_sampler(self, policy):
    """`policy` copied onto the sampler's mesh. With LoRA the frozen base is copied once
    and kept; each step copies only the adapters."""
    shardings = self.sampler_param_shardings
    if not self.run.lora:
      return jax.device_put(policy, shardings)
    (base, adapters), (base_shardings, adapter_shardings) = (lora.split(policy),
                                                             lora.split(shardings))
    leaves = jax.tree.leaves(base)
    cached = self.sampler_base
    if cached is None or len(cached[0]) != len(leaves) or any(
        a is not b for a, b in zip(cached[0], leaves)):
      # The source leaves are held, so a new base can never pass for this one.
      self.sampler_base = cached = leaves, jax.device_put(base, base_shardings)
    return lora.combine(cached[1], jax.device_put(adapters, adapter_shardings))

  def sampler_placement(self):
    """The sampler's mesh, in this thread: its own devices, or the training mesh."""
    return sharding.activate(*self.sampler_mesh_rules)

  def rows(self, step: int):
    ro_cfg = self.rollout_cfg
    return [p for p in batch_problems(self.problems, step, ro_cfg.prompts_per_step,
                                      self.c.seed) for _ in range(ro_cfg.group_size)]

  def rollout(self, policy, step: int, pool) -> rollout_lib.Rollouts:
    """Step `step`'s rollouts sampled by `policy`: a function of (config, step, policy)."""
    ro_cfg = self.rollout_cfg
    rng = jax.random.fold_in(jax.random.key(self.c.seed), step)
    if self.sampler_mesh is not None:  # Device to device, never through the host.
      policy = self.to_sampler(policy)
      rng = jax.device_put(rng, sharding.NamedSharding(self.sampler_mesh,
                                                       sharding.PartitionSpec()))
    with self.sampler_placement():
      ro = rollout_lib.rollout(policy, self.sampler, self.setup, self.rows(step),
                               ro_cfg.num_turns, self.sampling, rng, score_pool=pool,
                               feedback=self.feedback,
                               score_overlap_splits=ro_cfg.score_overlap_splits,
                               sample_batches=ro_cfg.sample_batches,
                               group_size=ro_cfg.group_size)
    if self.sampler_mesh is not None:  # The episodes go to the training devices.
      ro = dataclasses.replace(ro, episode=jax.device_put(ro.episode, self.batch_sharding))
    return ro

  def sample(self, state, ref_params, step: int, pool):
    """(rollouts of `step`, the policy that sampled them, the parameters that will sample
    the next step). On-policy: the state's policy samples now. Off-policy: the state's
    behaviour parameters sampled them during the previous update (or now, at the first
    step of a run or of a resume), and the next step will be sampled by a copy of the
    state's parameters, taken before the update donates them."""
    run = self.run
    if not self.rollout_cfg.off_policy_steps:
      policy = run.policy(state, ref_params)
      return self.rollout(policy, step, pool), policy, None
    behaviour = run.policy_of(state.behaviour_params, ref_params)
    pending, self.pending = self.pending, None
    ro = (pending[1] if pending is not None and pending[0] == step
          else self.rollout(behaviour, step, pool))
    return ro, behaviour, jax.tree.map(jnp.copy, state.params)

  def update(self, state, batch, ref_params, following, pool, t0: float):
    """(state, metrics) after the step's update; off-policy, with the next step's rollout
    sampled while it runs. Times the update from dispatch to its results and the sampling
    ahead, both from the step's start `t0`."""
    run, step = self.run, int(state.step)
    rng = jax.random.fold_in(jax.random.key(self.c.seed), step)
    t_update, timing, update_done = time.perf_counter(), {}, None
    if following is None:
      state, m = run.train_step(state, batch, rng, ref_params)
    else:
      new, m = run.train_step(state.train_state(), batch, rng, ref_params)
      # Disaggregated, a thread notes when the trainer's own devices finish. Colocated,
      # the devices run the update and the sampling ahead together, and the update is
      # timed to its results, read after the sampling.
      update_done = finish_time(m) if self.sampler_mesh is not None else None
      state = train_lib.OffPolicyState(step=new.step, params=new.params,
                                       opt_state=new.opt_state, behaviour_params=following)
      if step + 1 < self.objective.num_steps:
        t1 = time.perf_counter()
        self.pending = (step + 1, self.rollout(run.policy_of(following, ref_params), step + 1,
                                               pool))
        timing = {"time/sample_ahead_s": time.perf_counter() - t1,
                  "time/sample_ahead_start_s": t1 - t0}
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    done = time.perf_counter() if update_done is None else update_done.result()
    m |= timing | {"time/update_s": done - t_update, "time/update_start_s": t_update - t0}
    if following is not None:  # Updates between the sampling parameters and these.
      m["off_policy/staleness"] = float(step > 0)
    return state, m

  def step(self, state, ref_params, pool):
    """rollout -> rewards -> reference log-probs -> batch -> update. Off-policy, the next
    step's rollout is sampled after the update is dispatched and before its results are
    read: the host drives the sampler while the devices run the update (colocated, in
    the order they were dispatched, from this one thread), or the sampler's own devices
    run beside the trainer's (disaggregated)."""
    ro_cfg, run = self.rollout_cfg, self.run
    step = int(state.step)
    t0 = time.perf_counter()
    ro, behaviour, following = self.sample(state, ref_params, step, pool)
    rows = self.rows(step)
    t_rollout = time.perf_counter() - t0
    width = batch_width(ro.episode, self.max_episode_len, ro_cfg.pad_multiple)
    objective = self.objective
    traj = trajectories(ro, width, self.logp_fn,
                        ref_params if objective.uses_reference else None,
                        behaviour if objective.recompute_behaviour_logp else None)
    batch, batch_metrics = self.objective.make_batch(traj, step)
    reward = float(ro.rewards_BxN.sum(1).mean())
    # The reward belongs to the parameters that sampled it: a due checkpoint is saved
    # now, before the update replaces (and donates) them. Off-policy, they are the
    # previous step's, which the checkpoint keeps only to sample again: no label.
    run.save_before_update(state, {"reward": reward} if following is None else {},
                           self.objective.phase(step))
    batch = sharding.shard_batch(batch, run.mesh, run.rules)
    state, m = self.update(state, batch, ref_params, following, pool, t0)
    rewards, taken = ro.rewards_BxN, ro.turns_BxN
    # Accuracy of the turns taken; a row that stopped correct counts as correct after.
    m |= {f"reward/t{t + 1}": float(rewards[:, :t + 1].max(1).mean())
          if self.feedback.stops_when_correct else float(rewards[:, t].mean())
          for t in range(rewards.shape[1])}
    m |= {"turns/mean": float(taken.sum(1).mean())} if self.feedback.stops_when_correct else {}
    if rewards.shape[1] >= 2 and not self.feedback.stops_when_correct:
      m |= self_correction_metrics(rewards, ro.ids)
    # The sample budget: episodes and tokens sampled (all turns) this step.
    m |= {"budget/episodes": len(rows),
          "budget/tokens": sum(len(r) for turn_ids in ro.ids for r in turn_ids)}
    m |= {"reward": reward, **batch_metrics,
          "time/rollout_s": t_rollout, "time/step_s": time.perf_counter() - t0}
    phase = self.objective.phase(step)
    if phase is not None:
      m["phase"] = phase
    return state, m, ro.transcripts(len(rows))
