"""Consistency checks between the fields of an experiment config, run when an entry point
loads it: before a model, a data file or a device is touched, so a config that cannot
work fails in one line that names the fields involved and a fix, not hours later.

  check_experiment(c)    configs/score.py (python -m jaxscore.main, jaxscore evaluate)
  check_self_explore(c)  configs/self_explore.py
  study.check(c)         configs/study.py (the study's fields and every arm)

What needs the devices or the data (a mesh that does not fit the devices, a batch that
does not split over the processes, a prompt longer than the model's context) is checked
where those are known, with errors of the same kind.
"""

from __future__ import annotations

from jaxscore import errors, experiment, objectives, tasks
from jaxscore.infra import sharding
from jaxscore.loops import online, train
from jaxscore.models import model as model_lib
from jaxscore.models import pretrained
from jaxscore.sampling import rollout, sampler
from jaxscore.self_explore import explore, steps


class ConfigError(errors.UsageError):
  """A config whose fields contradict each other (reported in one line)."""


def require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def built(what: str, build):
  """`build()`, with a ValueError from a field's own check reported as a ConfigError."""
  try:
    return build()
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config {what}: {e}") from None


def _stub_model():
  """A model config for building objectives: they read the model only when they run."""
  return model_lib.ModelConfig(vocab_size=8, num_layers=1, embed_dim=8, num_heads=1,
                               num_kv_heads=1, mlp_dim=8)


# ---------------------------------------------------------------------------
# Groups shared by every experiment.


def check_optim(g, where: str = "optim") -> None:
  oc = built(where, lambda: train.OptimConfig(**g))
  built(where, lambda: train.make_optimizer(oc))
  require(oc.learning_rate > 0, f"{where}.learning_rate={oc.learning_rate}: must be > 0")
  require(oc.grad_accum_steps >= 1,
          f"{where}.grad_accum_steps={oc.grad_accum_steps}: must be >= 1")
  require(oc.warmup_steps >= 0, f"{where}.warmup_steps={oc.warmup_steps}: must be >= 0")
  require(oc.micro_batches >= 1, f"{where}.micro_batches={oc.micro_batches}: must be >= 1")


def _check_micro_batches(micro: int, rows: int, rows_field: str, where: str = "optim") -> None:
  require(rows % micro == 0,
          f"{rows_field} = {rows} rows do not split into {where}.micro_batches={micro} "
          f"equal slices: make {rows_field} a multiple of {micro}")


def check_mesh(m, rows: int | None = None, rows_field: str = "") -> None:
  require(m.rules in sharding.RULES,
          f"mesh.rules={m.rules!r}: expected one of {', '.join(sharding.RULES)}")
  require(m.dcn >= 1, f"mesh.dcn={m.dcn}: expected the number of slices, >= 1")
  sizes = {"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}
  for axis, n in sizes.items():
    require(n == -1 or n >= 1, f"mesh.{axis}={n}: expected -1 (the rest) or >= 1")
  require(list(sizes.values()).count(-1) <= 1,
          "mesh.data, mesh.fsdp, mesh.tensor: at most one may be -1 (the rest)")
  batch_ways = m.dcn * m.data * m.fsdp
  if rows is not None and m.data != -1 and m.fsdp != -1:
    require(rows % batch_ways == 0,
            f"{rows_field} = {rows} rows do not split over mesh.dcn x mesh.data x "
            f"mesh.fsdp = {batch_ways} batch shards: make the rows a multiple of "
            f"{batch_ways}")


def check_checkpoint(ck) -> None:
  require(ck.every_steps >= 1, f"checkpoint.every_steps={ck.every_steps}: must be >= 1")
  require(ck.keep >= 1, f"checkpoint.keep={ck.keep}: must be >= 1")


def _check_task(t, format_kind: str) -> None:
  for name_field in ("name", "eval_name"):
    name = t.get(name_field, "")
    if name_field == "name" or name:
      require(name in tasks.TASKS, f"task.{name_field}={name!r}: expected one of "
              f"{', '.join(tasks.TASKS)}")
  require(format_kind in ("chat", "plain"), f"format={format_kind!r}: expected chat or plain")


def _check_checkpoint_name(value: str, where: str) -> None:
  require(value in ("latest", "best") or value.isdigit(),
          f"{where}={value!r}: expected latest, best or a step number")


# ---------------------------------------------------------------------------
# configs/score.py: one objective, online or offline, and its evaluation.


def rollout_rows(c) -> int:
  return c.rollout.prompts_per_step * c.rollout.group_size


def check_rollout(c) -> None:
  ro = built("rollout", lambda: online.RolloutConfig(**c.rollout))
  feedback = built("rollout.feedback", lambda: ro.feedback_config)
  sampling = built("sampler", lambda: sampler.SamplingConfig(**c.sampler))
  require(sampling.max_new_tokens >= 1,
          f"sampler.max_new_tokens={sampling.max_new_tokens}: must be >= 1")
  for field in ("num_turns", "group_size", "prompts_per_step", "score_overlap_splits",
                "sample_batches"):
    require(getattr(ro, field) >= 1, f"rollout.{field}={getattr(ro, field)}: must be >= 1")
  require(ro.pad_multiple >= 0, f"rollout.pad_multiple={ro.pad_multiple}: must be >= 0")
  require(ro.off_policy_steps in (0, 1), f"rollout.off_policy_steps={ro.off_policy_steps}: "
          "expected 0 (on-policy) or 1 (the next step sampled during this step's update)")
  sampler_devices = c.mesh.get("sampler_devices", 0)
  require(sampler_devices >= 0, f"mesh.sampler_devices={sampler_devices}: must be >= 0")
  require(not sampler_devices or ro.off_policy_steps == 1,
          f"mesh.sampler_devices={sampler_devices} samples on devices of its own while the "
          f"others train, which needs rollout.off_policy_steps=1 (got "
          f"{ro.off_policy_steps})")
  splits = ro.score_overlap_splits
  if splits > 1:
    require(feedback.stops_when_correct,
            f"rollout.score_overlap_splits={splits} splits only feedback rollouts that "
            f"stop rows, not rollout.feedback={ro.feedback!r} (whose turns are scored "
            "while the next one samples anyway): set it to 1")
  batches = ro.sample_batches
  require(ro.prompts_per_step % (batches * splits) == 0,
          f"rollout.prompts_per_step={ro.prompts_per_step} does not split into "
          f"rollout.sample_batches={batches} x rollout.score_overlap_splits={splits} "
          f"parts of whole groups: make it a multiple of {batches * splits}")


def make_objective(c):
  """The config's objective, built as the loops build it, from config fields alone."""
  require(c.objective in objectives.names(),
          f"objective={c.objective!r}: expected one of {', '.join(objectives.names())}, "
          f"or {experiment.NO_TRAINING} (no training)")
  require(c.objective in c, f"objective={c.objective!r} has no config group "
          f"c.{c.objective} (its Config's fields)")
  kind = objectives.get(c.objective).kind
  ctx = objectives.Context(_stub_model())
  if kind == "online":
    ro = online.RolloutConfig(**c.rollout)
    ctx = objectives.Context(_stub_model(), num_turns=ro.num_turns, group_size=ro.group_size,
                             sampling=sampler.SamplingConfig(**c.sampler),
                             stops_rows=ro.feedback_config.stops_when_correct)
  return built(c.objective, lambda: objectives.make(c.objective, c[c.objective], ctx))


def check_objective(c) -> None:
  if c.objective == experiment.NO_TRAINING:
    return
  obj = make_objective(c)
  if obj.kind == "self_training":
    for field in ("group_size", "temperature"):
      require(getattr(obj.config, field) > 0,
              f"{c.objective}.{field}={getattr(obj.config, field)}: must be > 0")
    require(obj.rounds >= 1, f"{c.objective}: {obj.rounds} rounds")
    require(obj.config.problems_per_round >= 0,
            f"{c.objective}.problems_per_round={obj.config.problems_per_round}: must be >= 0")
  if obj.kind != "online":
    require(c.offline.batch_size >= 1,
            f"offline.batch_size={c.offline.batch_size}: must be >= 1")
    _check_micro_batches(c.optim.get("micro_batches", 1), c.offline.batch_size,
                         "offline.batch_size")
    return
  off_policy = c.rollout.get("off_policy_steps", 0)
  require(not off_policy or obj.corrects_off_policy,
          f"rollout.off_policy_steps={off_policy}: {c.objective}'s loss does not correct "
          "for samples of older parameters (no ratio to the behaviour log-probs); use "
          "grpo, or rollout.off_policy_steps=0")
  group, rows = c.rollout.group_size, rollout_rows(c)
  if getattr(obj.config, "advantage", None) == "rloo":
    require(group >= 2, f"{c.objective}.advantage='rloo' needs rollout.group_size >= 2 "
            f"(a leave-one-out baseline), got {group}: raise it or use advantage=grpo")
  epochs, minibatches = obj.updates_per_batch
  require(rows % minibatches == 0,
          f"rollout.prompts_per_step x rollout.group_size = {rows} rows do not split into "
          f"{c.objective}.minibatches={minibatches} equal minibatches: make the rows a "
          f"multiple of {minibatches}")
  require(obj.num_steps >= 1, f"{c.objective}: {obj.num_steps} training steps")
  _check_micro_batches(c.optim.get("micro_batches", 1), rows // minibatches,
                       "rollout.prompts_per_step x rollout.group_size"
                       + (f" / {c.objective}.minibatches" if minibatches > 1 else ""))


def check_evaluate(c) -> None:
  e = c.evaluate
  _check_checkpoint_name(e.checkpoint, "evaluate.checkpoint")
  for field in ("num_problems", "num_turns", "pass_k_samples"):
    require(e[field] >= 0, f"evaluate.{field}={e[field]}: must be >= 0")
  require(e.batch_size >= 1, f"evaluate.batch_size={e.batch_size}: must be >= 1")
  if e.feedback:
    built("evaluate.feedback",
          lambda: rollout.Feedback(e.feedback, c.rollout.feedback_template))


def check_lora(model) -> None:
  built("model.lora", lambda: pretrained.lora_config(model))


def check_experiment(c) -> None:
  """configs/score.py and any config of its shape."""
  _check_task(c.task, c.format)
  check_lora(c.model)
  check_rollout(c)
  check_objective(c)
  check_evaluate(c)
  check_optim(c.optim)
  check_checkpoint(c.checkpoint)

  if experiment.kind(c) == "online":
    check_mesh(c.mesh, rollout_rows(c), "rollout.prompts_per_step x rollout.group_size")
    if c.rollout.get("sample_batches", 1) > 1:  # Each sampling batch splits too.
      check_mesh(c.mesh, rollout_rows(c) // c.rollout.sample_batches,
                 "rollout.prompts_per_step x rollout.group_size / rollout.sample_batches")
  else:
    check_mesh(c.mesh, c.offline.batch_size, "offline.batch_size")


# ---------------------------------------------------------------------------
# configs/self_explore.py.


def _multiple(batch_field: str, batch: int, group_field: str, group: int, why: str) -> None:
  require(group >= 1, f"{group_field}={group}: must be >= 1")
  require(batch >= group and batch % group == 0,
          f"{batch_field}={batch} is not a multiple of {group_field}={group} ({why}): "
          f"set {batch_field} to a multiple of {group}, e.g. {max(group, batch // group * group)}")


def check_self_explore(c) -> None:
  _check_task(c.task, c.format)
  require(not c.task.get("eval_name"),
          f"task.eval_name={c.task.get('eval_name')!r}: Self-Explore evaluates on the "
          "training task's eval split (task.eval_split); set task.eval_name=\"\"")
  check_lora(c.model)
  _multiple("rationales.batch_size", c.rationales.batch_size, "rationales.group_size",
            c.rationales.group_size, "a problem's N samples share one prefill in one call")
  _multiple("explore.batch_size", c.explore.batch_size, "explore.group_size",
            c.explore.group_size,
            "a prefix's k continuations share one prefill in one call")

  require(c.rationales.rules in explore.RULES,
          f"rationales.rules={c.rationales.rules!r}: expected one of {', '.join(explore.RULES)}")
  require(c.rationales.max_rft_per_problem >= 1,
          f"rationales.max_rft_per_problem={c.rationales.max_rft_per_problem}: must be >= 1")
  built("explore.style", lambda: steps.split_steps("a", c.explore.style, c.explore.max_steps))
  require(c.explore.max_steps >= 1, f"explore.max_steps={c.explore.max_steps}: must be >= 1")
  for field in ("rationales.temperature", "explore.temperature"):
    group, name = field.split(".")
    require(c[group][name] > 0, f"{field}={c[group][name]}: exploration samples (> 0)")
  ctx = objectives.Context(_stub_model())
  built("sft", lambda: objectives.make("sft", c.sft, ctx))
  dpo = built("dpo", lambda: objectives.make("dpo", c.dpo, ctx))
  require(dpo.config.beta > 0, f"dpo.beta={dpo.config.beta}: must be > 0")
  for stage in ("train_sft", "train_rft", "train_dpo"):
    g = c[stage]
    require(g.offline.batch_size >= 1,
            f"{stage}.offline.batch_size={g.offline.batch_size}: must be >= 1")
    require(g.offline.num_epochs >= 1,
            f"{stage}.offline.num_epochs={g.offline.num_epochs}: must be >= 1")
    require(0.0 <= g.warmup_fraction < 1.0,
            f"{stage}.warmup_fraction={g.warmup_fraction}: must be in [0, 1)")
    check_optim(g.optim, f"{stage}.optim")
    _check_micro_batches(g.optim.get("micro_batches", 1), g.offline.batch_size,
                         f"{stage}.offline.batch_size", f"{stage}.optim")
    check_mesh(c.mesh, g.offline.batch_size, f"{stage}.offline.batch_size")
  require(c.evaluate.batch_size >= 1,
          f"evaluate.batch_size={c.evaluate.batch_size}: must be >= 1")
  check_checkpoint(c.checkpoint)
