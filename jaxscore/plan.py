"""`jaxscore plan`: whether a config is consistent and fits, before a run launches.

  jaxscore plan --config=configs/score.py:math --devices=8 --hbm_gib=16
  jaxscore plan --config=configs/study.py:gsm8k --topology=v5e:2x4 --model=gemma3-4b \
      --config.model.remat=full

It builds what the run builds at the config's real sizes without loading weights (the
model's shapes come from its config.json, a GGUF header or a named shape), checks every
constraint between config fields, compiles ahead of time each program the run compiles
(the train step, the teacher-forced reference log-probs, the sampler's prefill and
decode) for the target's devices (a TPU topology through libtpu, or N fake CPU devices),
and reports per-device memory from XLA's memory analysis. Exit status: 0 fits, 1 does
not fit, 2 a user error (a config field, a missing file).

A program's peak is what is resident then: the train step holds the train state (params
and optimizer moments), the frozen reference, the batch and its temporaries; sampling
holds the params, the KV cache and its temporaries while the optimizer state and the
reference wait.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxscore import config_checks, experiment, objectives, study, tasks
from jaxscore import evaluate as evaluate_lib
from jaxscore.infra import entry, sharding
from jaxscore.loops import offline, online
from jaxscore.loops import train as train_lib
from jaxscore.models import gguf_checkpoint, logprobs, lora, pretrained, shapes, weights
from jaxscore.models import model as model_lib
from jaxscore.models import tokenizer as tokenizer_lib
from jaxscore.sampling import formats, rollout
from jaxscore.sampling import sampler as sampler_lib

# Memory per chip of the TPU generations a topology names (device_kind -> GiB of HBM);
# a chip whose cores are separate devices shares it between them.
HBM_GIB = {"TPU v4": 32.0, "TPU v5 lite": 16.0, "TPU v5e": 16.0, "TPU v5": 95.0,
           "TPU v5p": 95.0, "TPU v6 lite": 32.0, "TPU v6e": 32.0}
DEFAULT_PROMPT_LEN = 512
GIB = 2**30


class PlanError(entry.UsageError):
  """A plan that cannot be made: a bad target, model, config file or override."""


@dataclasses.dataclass
class Phase:
  """One compiled program's per-device memory, in bytes."""
  name: str
  total: float  # Arguments + outputs + temporaries - donated (XLA's memory analysis).
  temp: float
  waiting: float = 0.0  # Resident but not an argument (optimizer state while sampling).

  @property
  def peak(self) -> float:
    return self.total + self.waiting


@dataclasses.dataclass
class Program:
  """What one training run of the config compiles (a study arm, a Self-Explore stage)."""
  name: str
  shape: str  # e.g. "512 x 1184 tokens"
  phases: list[Phase]
  resident: dict[str, float]  # weights, reference, optimizer, KV cache: per device.

  @property
  def peak(self) -> Phase:
    return max(self.phases, key=lambda p: p.peak)


# ---------------------------------------------------------------------------
# Inputs: the config, the target's devices, the model's shapes.


def load_config(spec: str, overrides: Sequence[str] = ()):
  """`FILE:VARIANT` (as --config takes it) with `key=value` overrides applied."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.exists():
    raise FileNotFoundError(f"--config: no config file {path}")
  module_spec = importlib.util.spec_from_file_location(f"plan_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    c = module.get_config(arg) if arg else module.get_config()
    return study.apply_overrides(c, overrides, "--config") if overrides else c
  except ValueError as e:  # An unknown variant, key or value.
    raise PlanError(str(e)) from None


def target_devices(topology: str | None, devices: int | None, slices: int = 1):
  """(devices, description, GiB per device or None) of `slices` TPU slices of `topology`,
  or of this host."""
  if slices < 1:
    raise PlanError(f"--slices={slices}: expected >= 1")
  if slices > 1 and not topology:
    raise PlanError(f"--slices={slices} needs --topology (the slices' TPU topology)")
  if topology:
    try:
      from jax.experimental import topologies

      topo = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                          num_slices=slices)
    except Exception as e:  # No libtpu, or a topology it does not know.
      raise PlanError(f"--topology={topology}: cannot describe it ({type(e).__name__}: "
                      f"{e}); `pip install libtpu` compiles for TPUs without one, or use "
                      "--devices=N") from None
    kind = topo.devices[0].device_kind
    # A chip whose cores are separate devices (v4 without megacore) splits its HBM.
    chips = {(getattr(d, "slice_index", 0), *getattr(d, "coords", (i,)))
             for i, d in enumerate(topo.devices)}
    per_chip = len(topo.devices) // max(len(chips), 1)
    hbm = HBM_GIB.get(kind)
    name = topology if slices == 1 else f"{slices} x {topology}"
    return (list(topo.devices), f"{name} ({kind}, {len(topo.devices)} devices)",
            None if hbm is None else hbm / per_chip)
  have = jax.devices()
  if devices and devices != len(have):
    raise PlanError(f"--devices={devices}, but this process has {len(have)} devices: set "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before JAX "
                    "starts (the `jaxscore plan` command does)")
  return have, f"{len(have)} {have[0].platform.upper()} devices", None


def model_config(c, name: str | None = None):
  """The ModelConfig of `name` (default `c.model.name`): a named shape, an embedded model,
  a GGUF file or a Hugging Face directory, read without its weights; dtypes and memory
  options from `c.model`."""
  name = name or c.model.name
  options = dict(param_dtype=c.model.param_dtype, dtype=c.model.dtype,
                 remat=c.model.get("remat", "none"),
                 logits_chunk=c.model.get("logits_chunk", 0),
                 lora=pretrained.lora_config(c.model))
  if name in shapes.NAMED:
    return shapes.config(name, **options)
  path = pretrained.resolve(name, weights=False)  # Shapes only.
  if path.suffix == ".gguf":
    return gguf_checkpoint.config_from_gguf(gguf_checkpoint.gguf_reader(path), **options)
  config_path = path / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{path}: no config.json")
  return weights.config_from_hf(json.loads(config_path.read_text()), str(config_path),
                                **options)


@dataclasses.dataclass(frozen=True)
class Prompts:
  """Token lengths that size the sampler's buffer and the train batch."""
  prompt: int  # The longest first prompt.
  message: int  # The longest message between turns (instruction or feedback).
  source: str
  eval_prompt: int = 0  # The longest evaluation prompt (0: as `prompt`).

  @property
  def evaluation(self) -> int:
    return self.eval_prompt or self.prompt


def prompt_lengths(c, model: str | None, default: int) -> Prompts:
  """The longest training prompt and message between turns as the run's format encodes
  them (the tokenizer of `model`, else of the config's model), or `default` tokens where
  the data or a tokenizer cannot be read here (hub sources offline)."""
  task = tasks.make_task(c.task.name, **c.task.kwargs.to_dict())  # A missing file: exit 2.
  eval_task = (tasks.make_task(c.task.eval_name, **c.task.eval_kwargs.to_dict())
               if c.task.get("eval_name") else task)
  try:
    problems = tasks.train_problems(task, c.task)
  except Exception as e:  # Hub data offline.
    return Prompts(default, default // 4, f"--prompt_len={default}, messages "
                   f"{default // 4} (data not read here: {type(e).__name__})")
  try:
    evals = tasks.eval_problems(eval_task, c.task, c.evaluate.get("num_problems", 0))
  except Exception as e:  # Hub data offline.
    evals, read = None, (f" prompts (evaluation prompts not read here, {type(e).__name__}: "
                         f"{default} tokens)")
  setup, errors = None, []
  for name in dict.fromkeys(n for n in (model, c.model.name) if n):
    try:
      tok = tokenizer_lib.load_tokenizer(pretrained.resolve(name, weights=False))
      setup = rollout.Setup(None, tok, formats.make_format(tok, c.format), task)
      break
    except Exception as e:  # A named shape has no tokenizer; a directory may lack one.
      errors.append(f"{name}: {type(e).__name__}")
  if setup is None:
    return Prompts(default, default // 4, f"--prompt_len={default} (no tokenizer: "
                   f"{'; '.join(errors)})")
  feedbacks = [rollout.Feedback("instruction"), rollout.Feedback("unary")]
  if "rollout" in c:
    feedbacks.append(rollout.Feedback(c.rollout.feedback, c.rollout.feedback_template))
  if evals is not None:
    read = f" and {len(evals)} evaluation prompts"
  eval_setup = dataclasses.replace(setup, task=eval_task)
  return Prompts(max(rollout.prompt_lens(setup, problems)),
                 max(rollout.instruction_len(setup, f) for f in feedbacks),
                 f"the longest of {len(problems)} training{read}, {name}'s tokenizer",
                 max(rollout.prompt_lens(eval_setup, evals)) if evals else default)


# ---------------------------------------------------------------------------
# Compiling abstractly.


def _bytes_per_device(tree) -> float:
  """Bytes one device holds of abstract arrays with shardings."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * jax.dtypes.itemsize_bits(x.dtype) / 8  # nf4: half a byte.
  return float(total)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _batch_axes(rules) -> tuple[str, ...]:
  axes = dict(rules)["batch"]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _row_shards(b: Builder) -> int:
  """How many pieces the mesh's batch axes split a sampler's rows into."""
  return math.prod(b.mesh.shape[a] for a in _batch_axes(b.rules))


_COMPILED: dict[str, tuple[float, float]] = {}


def _lower(builder, fn, *args, **kwargs):
  """`fn.lower(...)` under the builder's mesh and rules (the model's activation
  constraints read them while tracing); eager work stays outside, on the host."""
  with sharding.activate(builder.mesh, builder.rules):
    return fn.lower(*args, **kwargs)


def _memory(lowered) -> tuple[float, float]:
  """(total, temporaries) per device of a lowered program, compiled once per distinct
  program (study arms that differ only in host-side reward shaping share their steps)."""
  key = hashlib.sha256(lowered.as_text().encode()).hexdigest()
  if key not in _COMPILED:
    try:
      _COMPILED[key] = _analyse(lowered.compile())
    except Exception as e:  # The TPU compiler refuses a program over its HBM.
      needed = _refused_bytes(str(e))
      if needed is None:
        raise
      _COMPILED[key] = (needed, needed)
  return _COMPILED[key]


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _refused_bytes(message: str) -> float | None:
  """The temporaries a compiler's out-of-memory error says a program needs, e.g.
  "RESOURCE_EXHAUSTED: ... HLO temporaries (2.55T) exceeds available HBM (15.75G)"."""
  found = re.search(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT]?)\)", message, re.S)
  return None if found is None else float(found[1]) * _UNITS[found[2]]


def _analyse(compiled) -> tuple[float, float]:
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return float(total), float(m.temp_size_in_bytes)


class Builder:
  """Abstract params, train state and batches of one model on one mesh."""

  def __init__(self, cfg, mesh, rules):
    self.cfg, self.mesh, self.rules = cfg, mesh, rules
    self.param_sh = sharding.param_shardings(cfg, mesh, rules)
    self.params = _abstract(jax.eval_shape(lambda: model_lib.init(cfg, jax.random.key(0))),
                            self.param_sh)
    self.replicated = sharding.NamedSharding(mesh, sharding.PartitionSpec())
    self.rows = sharding.NamedSharding(mesh, sharding.PartitionSpec(dict(rules)["batch"]))

  @functools.cached_property
  def merged(self):
    """Plain params (no adapters, nothing quantized): a LoRA model with its adapters
    merged into the weights, as Self-Explore passes each stage's model on."""
    if self.cfg.lora_scale is None:
      return self.params
    plain = self.cfg.replace(lora=None)
    return _abstract(jax.eval_shape(lambda: model_lib.init(plain, jax.random.key(0))),
                     sharding.param_shardings(plain, self.mesh, self.rules))

  @property
  def base(self):
    """The params without adapters (the frozen base, with LoRA)."""
    return lora.split(self.params)[0] if self.cfg.lora_scale is not None else self.params

  def batch(self, concrete):
    """A host batch (numpy or jax arrays) as sharded abstract arrays."""
    specs = jax.tree.map(lambda x: sharding.NamedSharding(
        self.mesh, sharding.PartitionSpec(dict(self.rules)["batch"],
                                          *([None] * (x.ndim - 1)))) if x.ndim else
        self.replicated, concrete)
    return _abstract(concrete, specs)

  def train_phases(self, c, objective, batch, uses_reference: bool) -> tuple[list, dict]:
    """The train step (and, for RL, the reference log-probs) compiled: (phases,
    resident memory)."""
    opt = train_lib.make_optimizer(train_lib.OptimConfig(**c.optim))
    loss_fn, trainable, trainable_sh, base = objective.loss_fn, self.params, self.param_sh, None
    if self.cfg.lora_scale is not None:  # The state is the adapters; the base is frozen.
      base, trainable = lora.split(self.params)
      trainable_sh = lora.split(self.param_sh)[1]
      loss_fn = lambda a, batch, rng, base: objective.loss_fn(lora.combine(base, a), batch,
                                                              rng, base)
    state_sh = train_lib.state_shardings(opt, trainable, trainable_sh, self.mesh)
    state = _abstract(jax.eval_shape(lambda p: train_lib.TrainState.create(p, opt),
                                     trainable), state_sh)
    key = jax.random.key(0)
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=self.replicated)
    step = jax.jit(train_lib.make_train_step(loss_fn, opt, *objective.updates_per_batch,
                                             micro_batches=c.optim.get("micro_batches", 1),
                                             batch_weight=objective.batch_weight),
                   donate_argnums=(0,), out_shardings=(state_sh, self.replicated))
    # With LoRA the frozen base is the reference: one copy, passed to every step.
    ref = base if base is not None else (self.params if uses_reference else None)
    total, temp = _memory(_lower(self, step, state, batch, rng, ref))
    weight_bytes = _bytes_per_device(base if base is not None else self.params)
    resident = {"weights": weight_bytes, "optimizer": _bytes_per_device(state.opt_state),
                "reference": weight_bytes if uses_reference and base is None else 0.0}
    if base is not None:
      resident["adapters"] = _bytes_per_device(trainable)
    phases = [Phase("train step", total, temp)]
    if uses_reference:
      cfg = self.cfg
      slices = c.optim.get("micro_batches", 1)
      logp = jax.jit(lambda p, t, m: logprobs.sliced_token_logprobs(p, t, m, cfg, slices))
      tokens = batch.tokens_BxT
      mask = jax.ShapeDtypeStruct(tokens.shape, jnp.bool_, sharding=tokens.sharding)
      total, temp = _memory(_lower(self, logp, ref, tokens, mask))
      # Waiting meanwhile: the state (the policy's weights or adapters, and moments).
      phases.append(Phase("reference log-probs", total, temp,
                          waiting=resident["optimizer"] + _bytes_per_device(trainable)))
    return phases, resident

  def sampler_phases(self, rows: int, max_len: int, prompt_len: int, waiting: float,
                     params=None) -> tuple[list, float]:
    """The sampler's prefill and widest decode compiled: (phases, KV cache bytes). Rows
    split over the batch axes, as every sampler of a run splits them. `params`: the
    sampled model (default: the run's)."""
    params = self.params if params is None else params
    if rows % _row_shards(self):
      raise PlanError(f"{rows} sampler rows do not split over the mesh's batch axes "
                      f"({dict(self.mesh.shape)}): make the rows a multiple of them")
    smp = sampler_lib.Sampler(self.cfg, max_len=max_len, stop_ids=[0],
                              batch_sharding=self.rows, rules=self.rules,
                              max_prompt_len=prompt_len, min_compact_rows=None)
    sh = smp.state_shardings
    tokens = jax.ShapeDtypeStruct((rows, max_len), jnp.int32, sharding=sh.tokens_BxT)
    length = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sh.length_B)
    key = jax.random.key(0)
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=self.replicated)
    state = _abstract(jax.eval_shape(smp._init_impl, tokens, length, rng), sh)
    sampling = sampler_lib.SamplingConfig(temperature=1.0, max_new_tokens=0)
    prefill = _lower(self, smp._prefill, params, state,
                     chunk=sampler_lib.bucket(prompt_len), window=max_len)
    logits = jax.ShapeDtypeStruct((rows, self.cfg.vocab_size), jnp.float32,
                                  sharding=sh.tokens_BxT)
    scalar = lambda: jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
    decode = _lower(self, smp._decode, params, state, logits, scalar(), scalar(),
                    scalar(), sampling=dataclasses.replace(sampling), window=max_len)
    phases = []
    for name, lowered in (("sampler prefill", prefill), ("sampler decode", decode)):
      total, temp = _memory(lowered)
      phases.append(Phase(name, total, temp, waiting=waiting))
    return phases, _bytes_per_device(state.cache)


# ---------------------------------------------------------------------------
# The programs of each kind of config file.


def _online_program(name, c, cfg, b: Builder, prompts: Prompts) -> Program:
  ro = online.RolloutConfig(**c.rollout)
  sampling = sampler_lib.SamplingConfig(**c.sampler)
  objective = objectives.make(c.objective, c[c.objective], objectives.Context(
      cfg, num_turns=ro.num_turns, group_size=ro.group_size, sampling=sampling,
      stops_rows=ro.feedback_config.stops_when_correct))
  rows = ro.prompts_per_step * ro.group_size
  width = rollout.episode_len_bound([prompts.prompt], ro.num_turns, sampling.max_new_tokens,
                                    prompts.message)
  max_len = sampler_lib.bucket(width, minimum=64)
  zeros = lambda *shape, dtype=np.int32: jnp.zeros(shape, dtype)
  traj = objectives.Trajectories(
      tokens_BxT=zeros(rows, width), mask_BxT=zeros(rows, width, dtype=bool),
      turn_BxT=zeros(rows, width), behaviour_logp_BxT=zeros(rows, width, dtype=np.float32),
      ref_logp_BxT=(zeros(rows, width, dtype=np.float32) if objective.uses_reference
                    else None),
      rewards_BxN=zeros(rows, ro.num_turns, dtype=np.float32),
      turns_BxN=jnp.ones((rows, ro.num_turns), bool))
  batch, _ = objective.make_batch(traj, 0)
  phases, resident = b.train_phases(c, objective, b.batch(batch), objective.uses_reference)
  # The sampler holds one of `sample_batches` batches at a time.
  sample, cache = b.sampler_phases(rows // ro.sample_batches, max_len, prompts.prompt,
                                   waiting=resident["optimizer"] + resident["reference"])
  resident["KV cache"] = cache
  if ro.off_policy_steps:  # The next step samples, from a copy, while this one updates.
    copies = 2 * resident.get("adapters", resident["weights"])  # Behaviour, next.
    resident["behaviour params"] = copies
    train, sampler_temp = phases[0], max(p.temp for p in sample)
    phases.append(Phase("train step + sampling ahead", train.total + sampler_temp,
                        train.temp + sampler_temp, waiting=train.waiting + cache + copies))
  return Program(name, f"{c.objective}: {rows} x {width} tokens, {ro.num_turns} turn(s)",
                 phases + sample, resident)


def _offline_program(name, c, cfg, b: Builder, objective_name: str, width: int,
                     sampler_rows: int = 0, sampler_len: int = 0, prompt_len: int = 0,
                     held: dict[str, float] | None = None) -> Program:
  """An offline objective's train step and, with `sampler_rows`, the sampler that makes
  its data. `held`: weight copies the driver keeps meanwhile (default: the model it
  started from, which is DPO's reference and what STaR restarts each round from; with
  LoRA that is the frozen base the weights already count)."""
  objective = objectives.make(objective_name, c[objective_name], objectives.Context(cfg))
  oc = offline.OfflineConfig(**c.offline)
  width = oc.max_len or width
  half = [1] * (width // 2)
  example = {"prompt": half, "completion": half, "chosen": half, "rejected": half,
             "ref_chosen": 0.0, "ref_rejected": 0.0}
  batch = objective.collate([example] * oc.batch_size, width)
  # DPO's reference log-probs are computed once, before training: no reference program.
  phases, resident = b.train_phases(c, objective, b.batch(batch), uses_reference=False)
  if held is None:
    initial = "reference" if objective_name == "dpo" else "initial weights"
    held = {} if cfg.lora_scale is not None else {initial: resident["weights"]}
  resident |= held
  phases = [dataclasses.replace(p, waiting=p.waiting + sum(held.values())) for p in phases]
  if sampler_rows:  # Sampling runs between trainings: no optimizer state then.
    sample, cache = b.sampler_phases(sampler_rows, sampler_len, prompt_len,
                                     waiting=sum(held.values()))
    resident["KV cache"] = cache
    phases += sample
  return Program(name, f"{objective_name}: {oc.batch_size} x {width} tokens", phases,
                 resident)


def _rounded(tokens: int) -> int:
  return -(-tokens // 8) * 8


def sampler_program(name: str, b: Builder, rows: int, width: int, prompt_len: int,
                    held: dict[str, float] | None = None, params=None) -> Program:
  """A sampler of `rows` rows and episodes up to `width` tokens run on its own, outside
  training: the sampled model (`params`, default the run's) resident, and `held`, the
  copies its driver keeps meanwhile."""
  held = held or {}
  params = b.params if params is None else params
  phases, cache = b.sampler_phases(rows, sampler_lib.bucket(width, minimum=64), prompt_len,
                                   waiting=sum(held.values()), params=params)
  return Program(name, f"{rows} rows x {width} tokens", phases,
                 {"weights": _bytes_per_device(params), **held, "KV cache": cache})


def evaluation_program(name: str, b: Builder, prompt_len: int, message_len: int,
                       protocols: Sequence[evaluate_lib.Protocol], batch_size: int, new: int,
                       held: dict[str, float] | None = None, params=None) -> Program:
  """Evaluation's samplers for `protocols`: greedy dialogues of `batch_size` rows per
  call (rounded up to whole rows per device, as `evaluate.evaluate` rounds them) as long
  as the longest protocol's, and pass@k's (the Replier's rows). It runs before training
  and after it, with no train state; `held`: copies the driver keeps meanwhile."""
  turns = max(p.turns for p in protocols if not p.samples)
  pass_k = max((p.samples for p in protocols), default=0)
  shards = _row_shards(b)
  rows = -(-batch_size // shards) * shards
  width = rollout.episode_len_bound([prompt_len], turns, new, message_len)
  program = sampler_program(name, b, rows, width, prompt_len, held, params)
  program.shape = f"greedy: {program.shape}, {turns} turn(s)"
  if pass_k:
    k_rows = max(batch_size // pass_k, 1) * pass_k
    k_rows += rollout.whole_rows_padding(k_rows, pass_k, shards)
    k_width = rollout.episode_len_bound([prompt_len], 1, new, 0)
    sampled = sampler_program(name, b, k_rows, k_width, prompt_len, held, params)
    program.phases += [dataclasses.replace(p, name=p.name.replace("sampler", "pass@k sampler"))
                       for p in sampled.phases]
    program.resident["KV cache"] = max(program.resident["KV cache"],
                                       sampled.resident["KV cache"])
    program.shape += f"; pass@{pass_k}: {sampled.shape}"
  return program


def self_explore_programs(c, cfg, b: Builder, prompts: Prompts) -> list[Program]:
  """Self-Explore's stages as `Pipeline.run` holds them: the base model throughout (the
  frozen base, with LoRA); the SFT model while it samples rationales; the RFT model from
  exploration on, through both DPO stages (their start and reference) and evaluation,
  which reads one other model at a time. A stage's model is plain weights: with LoRA,
  its adapters merged in."""
  p, shards = prompts.prompt, _row_shards(b)
  lora_run = cfg.lora_scale is not None
  base = {"base": _bytes_per_device(b.base)}
  model = _bytes_per_device(b.merged)
  width = _rounded(p + max(c.rationales.max_new_tokens, c.explore.max_new_tokens) + 1)

  def stage(name, group, objective, held):
    sc = ml_collections.ConfigDict(c.to_dict())
    sc.offline, sc.optim = c[group].offline, c[group].optim
    return _offline_program(name, sc, cfg, b, objective, width, held=held)

  def replier_rows(sampling):  # The Replier's rows, padded to whole rows per device.
    return sampling.batch_size + rollout.whole_rows_padding(
        sampling.batch_size, sampling.group_size, shards)

  # With LoRA a stage trains adapters on the frozen base (the weights); without it, the
  # train state is a copy and the base waits. DPO adapts the RFT model: with QLoRA its
  # frozen base is the RFT model quantized, beside the merged one the pipeline holds.
  trains_on_base = {} if lora_run else base
  rft_held = base | ({"RFT model": model} if not lora_run or cfg.quantize != "none" else {})
  # Explore's prompts continue a rationale's prefix.
  explore_prompt = p + c.rationales.max_new_tokens + 1
  return [
      stage("stage sft", "train_sft", "sft", trains_on_base),
      sampler_program("stage sample (the SFT model)", b, replier_rows(c.rationales),
                      p + c.rationales.max_new_tokens + 1, p, base, b.merged),
      stage("stage rft", "train_rft", "sft", trains_on_base),
      sampler_program("stage explore (the RFT model)", b, replier_rows(c.explore),
                      explore_prompt + c.explore.max_new_tokens + 1, explore_prompt, base,
                      b.merged),
      stage("stages dpo_step, dpo_outcome", "train_dpo", "dpo", rft_held),
      evaluation_program("evaluation (each model in turn)", b, prompts.evaluation, 0,
                         [evaluate_lib.Protocol("greedy", turns=1)], c.evaluate.batch_size,
                         c.evaluate.max_new_tokens, base | {"RFT model": model}, b.merged),
  ]


def experiment_programs(name: str, c, cfg, b: Builder, prompts: Prompts,
                        protocols: Sequence[evaluate_lib.Protocol] | None = None,
                        keeps_base: bool = False) -> list[Program]:
  """The programs of an experiment config (configs/score.py, a study's arm): training,
  by the kind of loop its objective trains with, then evaluation by `protocols`
  (default `experiment.protocols`). `keeps_base`: the driver keeps the initial weights
  while it evaluates the trained ones (a study, which trains every arm from them)."""
  held = ({"initial weights": _bytes_per_device(b.params)}
          if keeps_base and cfg.lora_scale is None else {})
  evaluation = evaluation_program(
      f"{name} evaluation" if name != "train" else "evaluation", b, prompts.evaluation,
      prompts.message, protocols or experiment.protocols(c), c.evaluate.batch_size,
      c.sampler.max_new_tokens, held)
  return _training_programs(name, c, cfg, b, prompts) + [evaluation]


def _training_programs(name: str, c, cfg, b: Builder, prompts: Prompts) -> list[Program]:
  p, new = prompts.prompt, c.sampler.max_new_tokens
  how = experiment.kind(c)
  if how == experiment.NO_TRAINING:
    return []
  if how == "online":
    return [_online_program(name, c, cfg, b, prompts)]
  if how == "self_training":  # Fine-tuned on its samples: the sampler's episodes.
    turns, group = objectives.get(c.objective).turns, c[c.objective].group_size
    width = p + turns * (new + 1) + (turns - 1) * prompts.message
    # Each call's rows, padded (as `rollout.rollout` pads them) to whole rows per device.
    rows = max(c.evaluate.batch_size // group, 1) * group
    rows += rollout.whole_rows_padding(rows, group, _row_shards(b))
    return [_offline_program(name, c, cfg, b, c.objective, _rounded(width), rows,
                             sampler_lib.bucket(width, 64), p)]
  return [_offline_program(name, c, cfg, b, c.objective, _rounded(p + new + 1))]


def programs(c, cfg, b: Builder, prompts: Prompts) -> list[Program]:
  """Every program of config `c` (a main experiment, a study, Self-Explore)."""
  if "arms" in c:  # configs/study.py: every arm, and each distinct evaluation once.
    out, evaluations = [], {}
    for name in study.arm_names(c):
      ac = study.arm_config(c, name)
      *train, evaluation = experiment_programs(f"arm {name}", ac, cfg, b, prompts,
                                               study.protocols(c, ac), keeps_base=True)
      out += train
      evaluations.setdefault(evaluation.shape, (evaluation, []))[1].append(name)
    return out + [dataclasses.replace(e, name="evaluation of arm" + "s" * (len(names) > 1)
                                      + " " + ", ".join(names))
                  for e, names in evaluations.values()]
  if "train_sft" in c:  # configs/self_explore.py
    return self_explore_programs(c, cfg, b, prompts)
  return experiment_programs("train", c, cfg, b, prompts)


# ---------------------------------------------------------------------------
# The whole plan.


@dataclasses.dataclass
class Plan:
  config: str
  target: str
  capacity_gib: float
  model: str
  num_params: int
  mesh: dict[str, int]
  prompt: str
  programs: list[Program]

  @property
  def peak(self) -> tuple[Program, Phase]:
    program = max(self.programs, key=lambda p: p.peak.peak)
    return program, program.peak

  @property
  def fits(self) -> bool:
    return self.peak[1].peak <= self.capacity_gib * GIB

  def suggestions(self, c) -> list[str]:
    """What would lower the peak, from what the config does not yet use."""
    out = []
    if c.model.get("remat", "none") != "full":
      out.append("--config.model.remat=full (recompute each layer in the backward pass)")
    if not c.model.get("logits_chunk", 0):
      out.append("--config.model.logits_chunk=256 (log-probs without the whole B x T x V "
                 "logits)")
    adapters = pretrained_lora(c)
    if adapters is None:
      out.append("--config.model.lora.rank=16 (train adapters: no optimizer state or "
                 "reference copy of the weights)")
    elif adapters.quantize != "nf4":
      out.append("--config.model.lora.quantize=nf4 (QLoRA: the frozen base in 4 bits)")
    program, phase = self.peak
    if phase.name in ("train step", "reference log-probs") and "optim" in c:
      out.append(f"--config.optim.micro_batches={2 * c.optim.get('micro_batches', 1)} "
                 "(the same update, gradients accumulated over slices of the batch)")
    if c.model.param_dtype == "float32":
      out.append("--config.model.param_dtype=bfloat16 --config.model.dtype=bfloat16")
    if c.mesh.rules == "data_parallel":
      out.append("--config.mesh.rules=fsdp --config.mesh.fsdp=-1 --config.mesh.data=1 "
                 "(shard weights and optimizer state over the devices)")
    need = phase.peak / GIB
    out.append(f"more devices: the peak ({phase.name} of {program.name}) is {need:.1f} GiB "
               f"per device against {self.capacity_gib:.1f}")
    if program.name.startswith("evaluation") or program.name.endswith(" evaluation"):
      out.append(f"--config.evaluate.batch_size={max(c.evaluate.batch_size // 2, 1)} "
                 "(evaluation's rows per sampler call)")
    elif phase.name.startswith("sampler") and "rollout" in c:
      out.append(f"--config.rollout.sample_batches={2 * c.rollout.get('sample_batches', 1)} "
                 "(sample the step's rows in consecutive batches)")
    out.append("a smaller batch (rollout.prompts_per_step, offline.batch_size, "
               "rationales.batch_size)")
    return out

  def render(self, c) -> str:
    lines = [f"plan: {self.config}",
             f"model: {self.model} ({self.num_params / 1e9:.3f}B parameters, "
             f"{c.model.param_dtype} params, {c.model.dtype} compute, remat="
             f"{c.model.get('remat', 'none')}, logits_chunk={c.model.get('logits_chunk', 0)})",
             f"target: {self.target}, {self.capacity_gib:.1f} GiB per device; mesh "
             + ", ".join(f"{k} {v}" for k, v in self.mesh.items()) + f" ({c.mesh.rules})",
             f"prompts: {self.prompt}",
             "checks: every constraint between config fields holds", ""]
    for p in self.programs:
      lines.append(f"{p.name}  [{p.shape}]")
      lines.append("  resident: " + ", ".join(f"{k} {v / GIB:.3g}" for k, v in
                                              p.resident.items() if v) + " GiB")
      for phase in p.phases:
        lines.append(f"  {phase.name:<20s} {phase.peak / GIB:8.2f} GiB per device "
                     f"(temporaries {phase.temp / GIB:.2f})")
    program, phase = self.peak
    lines.append("")
    if self.fits:
      lines.append(f"fits: peak {phase.peak / GIB:.2f} of {self.capacity_gib:.1f} GiB per "
                   f"device ({phase.name}, {program.name})")
    else:
      lines.append(f"does not fit: peak {phase.peak / GIB:.2f} of {self.capacity_gib:.1f} "
                   f"GiB per device ({phase.name}, {program.name}); would lower it: "
                   + "; ".join(self.suggestions(c)))
    return "\n".join(lines)


def pretrained_lora(c):
  return pretrained.lora_config(c.model)


def check(c) -> None:
  """Every constraint between fields of whichever config file `c` is."""
  if "arms" in c:
    study.check(c)
  elif "train_sft" in c:
    config_checks.check_self_explore(c)
  else:
    config_checks.check_experiment(c)


def make_plan(c, config_name: str, *, topology: str | None = None,
              devices: int | None = None, slices: int = 1, hbm_gib: float | None = None,
              model: str | None = None, prompt_len: int | None = None) -> Plan:

  check(c)
  devs, target, capacity = target_devices(topology, devices, slices)
  capacity = hbm_gib or capacity
  if capacity is None:
    raise PlanError(f"{target}: no known memory per device; give --hbm_gib")
  if c.mesh.get("sampler_devices", 0):
    raise PlanError(f"mesh.sampler_devices={c.mesh.sampler_devices}: plan sizes every "
                    "device running both sampler and trainer; it does not yet size a "
                    "sampler on devices of its own (plan with mesh.sampler_devices=0)")
  cfg = model_config(c, model)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.dcn,
                            devices=devs)
  rules = sharding.RULES[c.mesh.rules]
  # Again with the mesh's -1 resolved: batches against the target's batch shards.
  check(study.apply_overrides(c, [f"mesh.{axis}={n}" for axis, n in
                                  zip(sharding.MESH_AXES, mesh.devices.shape)]))
  if prompt_len:
    prompts = Prompts(prompt_len, prompt_len // 4,
                      f"--prompt_len={prompt_len}, messages {prompt_len // 4}")
  else:
    prompts = prompt_lengths(c, model, DEFAULT_PROMPT_LEN)
  b = Builder(cfg, mesh, rules)
  progs = programs(c, cfg, b, prompts)
  return Plan(config=config_name, target=target, capacity_gib=capacity,
              model=model or c.model.name, num_params=shapes.num_params(cfg),
              mesh=dict(zip(sharding.MESH_AXES, mesh.devices.shape)),
              prompt=f"{prompts.prompt} tokens (evaluation {prompts.evaluation}), messages "
                     f"{prompts.message} ({prompts.source})",
              programs=progs)


def run(args, overrides: Sequence[str]) -> int:
  """The `jaxscore plan` command: prints the plan; 0 fits, 1 does not."""
  if args.devices and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  c = load_config(args.config, overrides)
  plan = make_plan(c, args.config, topology=args.topology, devices=args.devices,
                   slices=args.slices, hbm_gib=args.hbm_gib, model=args.model,
                   prompt_len=args.prompt_len)
  print(plan.render(c))
  return 0 if plan.fits else 1


