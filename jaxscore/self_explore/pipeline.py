"""Self-Explore (arXiv 2404.10346) end to end, as named stages over the library's pieces.

  sft       -> SFT of the base model on the task's gold rationales
  sample    -> N rationales per training problem from the SFT model: the RFT set
               (distinct correct ones) and outcome pairs (correct, wrong)
  rft       -> the base model fine-tuned on the RFT set: explorer, DPO reference and
               DPO initialisation
  explore   -> first pits of the outcome pairs' wrong rationales; step-level pairs
  dpo_step  -> DPO from the RFT model on the step-level pairs (Self-Explore)
  dpo_outcome -> DPO from the RFT model on the outcome pairs (the paper's baseline)
  evaluate  -> greedy accuracy of every model on the test split, with intervals

Each stage writes its data (JSONL) and checkpoint under `<workdir>/<stage>/` and then
`done.json`; a rerun skips finished stages and resumes an unfinished training stage from
its checkpoint, and evaluates only the models whose parameters or evaluation settings
changed since their last evaluation (`eval/<model>.json`). A finished training stage
keeps only its parameters (`<stage>/params/`, latest and best): nothing resumes it, and
Adam's moments would triple its disk use.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxscore import config_checks, objectives, tasks
from jaxscore import evaluate as evaluate_lib
from jaxscore.infra import checkpoint, files, sharding
from jaxscore.loops import common, offline, train
from jaxscore.models import lora, pretrained
from jaxscore.objectives import dpo, sft
from jaxscore.sampling import replies, rollout, sampler
from jaxscore.self_explore import explore as explore_lib

MODELS = ("base", "SFT", "RFT", "outcome DPO", "Self-Explore")


# The config groups the stages read (configs/self_explore.py), with the paper's settings
# (arXiv 2404.10346) and its reference code's where the paper is silent.


@dataclasses.dataclass(frozen=True)
class RationalesConfig:
  """Stage `sample`: N rationales per training problem from the SFT model."""

  group_size: int = 100  # Rationales per problem: the paper's N (100).
  temperature: float = 0.7
  max_new_tokens: int = 512  # The reference code: 512 (GSM8K), 1024 (MATH).
  # Rows per sampler call: a multiple of group_size, since a problem's N samples share
  # one prefill in one call (100 rows of 7B decode fit a v5e-8 slice).
  batch_size: int = 100
  max_rft_per_problem: int = 8  # Distinct correct rationales kept per problem.
  # The reference code's data rules (explore.rationale_data): gsm8k (every equation must
  # hold; distinct by equations; pair with the farthest wrong one) | math (distinct by
  # edit distance; pair with the shortest wrong one above a normalised edit distance of
  # 0.5, then 0.4, then 0.3).
  rules: str = "gsm8k"


@dataclasses.dataclass(frozen=True)
class RFTConfig:
  """Stage `rft`'s data."""

  include_gold: bool = False  # Also train on the gold rationales (RFT as in Yuan et al.).


@dataclasses.dataclass(frozen=True)
class ExploreConfig:
  """Stage `explore`: first pits of the outcome pairs' wrong rationales."""

  group_size: int = 4  # Completions per step prefix: the paper's k (4).
  temperature: float = 0.7
  max_new_tokens: int = 512  # Per completion.
  style: str = "lines"  # Steps are lines (GSM8K) | sentences (MATH, capped at max_steps)
  max_steps: int = 9
  max_rationales: int = 0  # Rationales explored; 0 = every outcome pair's.
  batch_size: int = 64  # Rows per sampler call: a multiple of group_size.


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One training stage (`train_sft`, `train_rft`, `train_dpo`): the offline loop and its
  optimizer."""

  offline: offline.OfflineConfig = dataclasses.field(default_factory=offline.OfflineConfig)
  optim: train.OptimConfig = dataclasses.field(default_factory=train.OptimConfig)
  warmup_fraction: float = 0.0  # > 0: linear warmup over this share of the stage's steps.


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Stage `evaluate`: greedy single-turn accuracy on the test split."""

  num_problems: int = 0  # 0 = the whole test split.
  batch_size: int = 64  # Rows per sampler call.
  max_new_tokens: int = 512


# configs/self_explore.py's groups and the dataclass each one is (jaxscore.config).
GROUPS = {
    "model": pretrained.LoadConfig,
    "task": tasks.TaskConfig,
    "rationales": RationalesConfig,
    "rft": RFTConfig,
    "explore": ExploreConfig,
    "train_sft": StageConfig,
    "train_rft": StageConfig,
    "train_dpo": StageConfig,
    "evaluate": EvalConfig,
    "mesh": sharding.MeshConfig,
    "checkpoint": common.CheckpointConfig,
    "log": common.LogConfig,
}


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in files.path(path).read_text().splitlines() if line]


def write_jsonl(path, records: Sequence[dict]) -> None:
  files.path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


class Pipeline:
  """The stages of one Self-Explore run; `run()` does them all."""

  def __init__(self, c, workdir):
    config_checks.check_self_explore(c)  # Before the model loads.
    self.c, self.workdir = c, files.path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    # One task: Self-Explore evaluates on its training task's eval split.
    self.setup, _, self.base_params = rollout.from_config(c)
    self.train_problems = tasks.train_problems(self.setup.task, c.task)
    self.by_id = {p.id: p for p in self.train_problems}

  @property
  def rules(self):
    """The run's sharding rules: sampling and evaluation split their rows over the mesh
    the params live on by them."""
    return sharding.RULES[self.c.mesh.rules]

  # -- Stage bookkeeping. -------------------------------------------------------

  def _dir(self, stage: str):
    d = self.workdir / stage
    d.mkdir(parents=True, exist_ok=True)
    return d

  def _done(self, stage: str) -> dict | None:
    path = self.workdir / stage / "done.json"
    return json.loads(path.read_text()) if path.exists() else None

  def _finish(self, stage: str, info: dict) -> dict:
    (self._dir(stage) / "done.json").write_text(json.dumps(info, indent=1))
    print(f"[{stage}] " + ", ".join(f"{k}={v}" for k, v in info.items()
                                   if not isinstance(v, dict)))
    return info

  def _stage_config(self, group: str, num_examples: int):
    """The config `offline.train` reads, with `group`'s loop and optimizer settings; a
    schedule's length (and a warmup fraction) follow from the data size."""
    c = ml_collections.ConfigDict(self.c.to_dict())
    g = self.c[group]
    c.offline = ml_collections.ConfigDict(g.offline.to_dict())
    c.optim = ml_collections.ConfigDict(g.optim.to_dict())
    per_epoch = offline.steps_per_epoch(num_examples, g.offline.batch_size)
    total = per_epoch * g.offline.num_epochs
    if g.warmup_fraction:
      c.optim.warmup_steps = int(round(g.warmup_fraction * total))
    return c

  def stage_model(self, stage: str, init_params):
    """A finished training stage's model, read back from its checkpoint (its adapters
    merged, with LoRA), or `init_params` for a stage that did not train (too few
    examples)."""
    if not self._done(stage):
      return init_params
    group = "train_dpo" if stage.startswith("dpo") else f"train_{stage}"
    # Restoring reads the mesh and the checkpoint, not the schedule's length.
    c = self._stage_config(group, self.c[group].offline.batch_size)
    params, _ = common.restore_params(c, self._dir(stage), self.setup.cfg, init_params,
                                      "latest")
    return lora.merge(params, self.setup.cfg)

  def _train(self, stage: str, objective: str, group: str, examples, init_params,
             ref_params, stats: dict | None = None):
    """Trains (or resumes, or restores a finished) offline stage; returns its params.
    `stats` go into the stage's done.json."""
    cfg = self.setup.cfg
    c = self._stage_config(group, len(examples))
    obj = objectives.make(objective, self.c[objective], objectives.Context(cfg))
    if self._done(stage):
      return self.stage_model(stage, init_params)
    state, info = offline.train(c, cfg, obj, init_params, ref_params, examples,
                                self._dir(stage))
    if info["preempted"]:
      raise SystemExit(f"SIGTERM during {stage}: rerun the same command to resume")
    self._finish(stage, {"examples": len(examples), "steps": info["step"], **(stats or {})})
    # Nothing resumes a finished stage: it keeps its parameters, not the optimizer.
    common.keep_params_only(c, self._dir(stage), cfg, init_params)
    # With LoRA the stage's adapters are merged into its weights: the next stage (DPO
    # from the RFT model, whose reference is the RFT model too) adapts that model.
    return lora.merge(state.params, cfg)

  # -- The stages. --------------------------------------------------------------

  def sft(self):
    obj = objectives.make("sft", self.c.sft, objectives.Context(self.setup.cfg))
    examples = obj.examples(self.setup, self.train_problems)
    return self._train("sft", "sft", "train_sft", examples, self.base_params, self.base_params)

  def sample(self, sft_params) -> dict:
    """N rationales per problem -> samples.jsonl, rft.jsonl, outcome_pairs.jsonl."""
    if (done := self._done("sample")) is not None:
      return done
    c, fmt, task = self.c.rationales, self.setup.fmt, self.setup.task
    prompts = [fmt.prompt_ids(p.prompt) for p in self.train_problems]
    replier = replies.Replier(self.setup, max(map(len, prompts)), c.max_new_tokens,
                              c.batch_size, rules=self.rules)
    rows = [i for i in range(len(prompts)) for _ in range(c.group_size)]
    texts = replier(sft_params, prompts, sampler.SamplingConfig(temperature=c.temperature),
                    jax.random.key(self.c.seed), group_size=c.group_size)
    scores = task.score([self.train_problems[i] for i in rows], texts)
    samples, rft, pairs = [], [], []
    for i, p in enumerate(self.train_problems):
      mine = [(t.strip(), s.reward > 0) for r, t, s in zip(rows, texts, scores) if r == i]
      correct = [t for t, ok in mine if ok]
      wrong = [t for t, ok in mine if not ok]
      distinct, outcome = explore_lib.rationale_data(
          correct, wrong, c.max_rft_per_problem, c.rules,
          np.random.default_rng([self.c.seed, i]))
      samples.append({"id": p.id, "samples": [t for t, _ in mine],
                      "correct": [ok for _, ok in mine]})
      rft += [{"id": p.id, "response": t} for t in distinct]
      pairs += [{"id": p.id, "chosen": a, "rejected": b} for a, b in outcome]
    d = self._dir("sample")
    write_jsonl(d / "samples.jsonl", samples)
    write_jsonl(d / "rft.jsonl", rft)
    write_jsonl(d / "outcome_pairs.jsonl", pairs)
    accuracy = float(np.mean([s.reward for s in scores]))
    return self._finish("sample", {"samples": len(texts), "sample_accuracy": accuracy,
                                   "rft": len(rft), "outcome_pairs": len(pairs),
                                   "problems_with_correct": len({r["id"] for r in rft})})

  def rft(self):
    records = read_jsonl(self.workdir / "sample" / "rft.jsonl")
    if self.c.rft.include_gold:
      records += [{"id": p.id, "response": p.solution} for p in self.train_problems]
    examples = [self._completion_example(self.by_id[r["id"]], r["response"]) for r in records]
    if len(examples) < self.c.train_rft.offline.batch_size:
      print(f"[rft] {len(examples)} RFT examples are fewer than one batch: the SFT model "
            "stands in for the RFT model")
      return self.stage_model("sft", self.base_params)
    return self._train("rft", "sft", "train_rft", examples, self.base_params, self.base_params)

  def explore(self, rft_params) -> dict:
    """First pits of the outcome pairs' rejected rationales -> step_pairs.jsonl."""
    if (done := self._done("explore")) is not None:
      return done
    c = self.c.explore
    pairs = read_jsonl(self.workdir / "sample" / "outcome_pairs.jsonl")
    if c.max_rationales:
      pairs = pairs[:c.max_rationales]
    fmt = self.setup.fmt
    longest = max((len(fmt.prompt_ids(self.by_id[r["id"]].prompt)) for r in pairs), default=1)
    replier = replies.Replier(self.setup, longest + self.c.rationales.max_new_tokens + 1,
                              c.max_new_tokens, c.batch_size, rules=self.rules)
    calls = [0]

    def continue_fn(queries, k):
      # The k completions of a prefix share its prefill.
      prompts = [fmt.continuation_ids(p.prompt, prefix) for p, prefix in queries]
      calls[0] += 1
      texts = replier(rft_params, prompts, sampler.SamplingConfig(temperature=c.temperature),
                      jax.random.fold_in(jax.random.key(self.c.seed), calls[0]), group_size=k)
      return [texts[i * k:(i + 1) * k] for i in range(len(queries))]

    runs = explore_lib.explore([(self.by_id[r["id"]], r["chosen"], r["rejected"])
                                for r in pairs], continue_fn, self.setup.task, c.group_size,
                               c.style, c.max_steps)
    step = explore_lib.step_pairs(runs)
    d = self._dir("explore")
    write_jsonl(d / "explorations.jsonl", [r.to_json() for r in runs])
    write_jsonl(d / "step_pairs.jsonl", step)
    stats = explore_lib.pit_statistics(runs, step)
    (d / "stats.json").write_text(json.dumps(stats, indent=1))
    return self._finish("explore", stats)

  def dpo(self, stage: str, pairs: Sequence[dict], rft_params):
    """DPO from the RFT model (also the reference) on text pairs; the token data with
    reference log-probs is written once, before training, to `<stage>/data.jsonl`."""
    data_path = self._dir(stage) / "data.jsonl"
    if data_path.exists():
      examples = read_jsonl(data_path)
    else:
      examples = [self._pair_example(r) for r in pairs]
      obj = objectives.make("dpo", self.c.dpo, objectives.Context(self.setup.cfg))
      width = offline.example_width(obj, examples, self.c.train_dpo.offline.max_len) \
          if examples else 0
      examples = dpo.reference_logprobs(examples, rft_params, self.setup.cfg, width)
      write_jsonl(data_path, examples)
    if len(examples) < self.c.train_dpo.offline.batch_size:
      print(f"[{stage}] {len(examples)} pairs are fewer than one batch: no training")
      return rft_params
    obj = objectives.make("dpo", self.c.dpo, objectives.Context(self.setup.cfg))
    width = offline.example_width(obj, examples, self.c.train_dpo.offline.max_len)
    return self._train(stage, "dpo", "train_dpo", examples, rft_params, rft_params,
                       stats={"width": width, **dpo.truncation_counts(examples, width)})

  def evaluate(self, models: Mapping[str, Any]) -> dict:
    """Greedy single-turn accuracy on the test split; per model and against RFT and
    outcome DPO, with 95% intervals over the test problems. A model given as a function
    is loaded when its turn comes and dropped after it."""
    c = self.c.evaluate
    problems = tasks.eval_problems(self.setup.task, self.c.task, c.num_problems)
    protocol = evaluate_lib.Protocol("greedy", turns=1)
    per_problem, by_key = {}, {}
    for name, params in models.items():
      params = params() if callable(params) else params
      stem = self._dir("eval") / name.replace(" ", "_")
      key = self._eval_key(params, problems)
      done = stem.with_suffix(".json")
      if done.exists() and json.loads(done.read_text())["key"] == key:
        per_problem[name] = np.array(json.loads(done.read_text())["acc@t1"])
        print(f"[eval] {name}: evaluated earlier (same parameters, problems and settings)")
        continue
      # A DPO stage with too few pairs returns the RFT model itself: greedy decoding
      # of the same parameters gives the same records.
      fingerprint = json.dumps(key, sort_keys=True)
      if fingerprint not in by_key:
        _, records, scores = evaluate_lib.run_protocol(
            params, self.setup, problems, protocol, max_new_tokens=c.max_new_tokens,
            batch_size=c.batch_size, seed=self.c.seed, rules=self.rules)
        by_key[fingerprint] = (records, scores["acc@t1"])
      records, acc = by_key[fingerprint]
      per_problem[name] = np.array(acc)
      write_jsonl(stem.with_suffix(".jsonl"), records)
      done.write_text(json.dumps({"key": key, "acc@t1": per_problem[name].tolist()}))
    results = {"num_problems": len(problems), "models": {}, "differences": {}}
    for name, r in per_problem.items():
      lo, hi = evaluate_lib.wilson_interval(int(r.sum()), len(r))
      results["models"][name] = {"accuracy": float(r.mean()), "ci95": [lo, hi]}
    if "Self-Explore" in per_problem:
      for other in ("RFT", "outcome DPO"):
        if other in per_problem:
          mean, lo, hi = evaluate_lib.paired_bootstrap(per_problem["Self-Explore"],
                                                       per_problem[other], seed=self.c.seed)
          results["differences"][f"Self-Explore - {other}"] = {"mean": mean, "ci95": [lo, hi]}
    return results

  def _eval_key(self, params, problems) -> dict:
    """What a model's evaluation depends on: its parameters' checksums (a stage that
    retrains changes them), the problems and the evaluation, task and model settings."""
    key = {"params": checkpoint.flat_checksums(params), "seed": self.c.seed,
           "problems": [p.id for p in problems], "evaluate": self.c.evaluate.to_dict(),
           "task": self.c.task.to_dict(), "model": self.c.model.to_dict()}
    return json.loads(json.dumps(key))  # As it reads back (tuples become lists).

  # -- Examples from texts. -------------------------------------------------------

  def _completion_example(self, problem, text: str) -> dict:
    fmt, tok = self.setup.fmt, self.setup.tokenizer
    return {"prompt": fmt.prompt_ids(problem.prompt),
            "completion": sft.completion_ids(fmt, tok, text)}

  def _pair_example(self, pair: dict) -> dict:
    """A step pair continues the reply after `prefix`: the chosen completion ends the
    reply, the rejected pit step does not (unless it is the whole rejected reply)."""
    fmt, tok = self.setup.fmt, self.setup.tokenizer
    problem = self.by_id[pair["id"]]
    prefix = pair.get("prefix", "")
    partial = "pit" in pair
    rejected = (tok.encode(pair["rejected"], add_special_tokens=False) if partial
                else sft.completion_ids(fmt, tok, pair["rejected"]))
    return {"id": pair["id"], "prompt": fmt.continuation_ids(problem.prompt, prefix),
            "chosen": sft.completion_ids(fmt, tok, pair["chosen"]), "rejected": rejected}

  # -- Everything. ------------------------------------------------------------------

  def run(self) -> dict:
    # A stage's model is held while a later stage uses it, and read back from its
    # checkpoint for evaluation: besides the base, the RFT model (which both DPO stages
    # start from) and one other model are held at a time (`jaxscore plan` counts them).
    sft_params = self.sft()
    self.sample(sft_params)
    del sft_params
    rft_params = self.rft()
    explored = self.explore(rft_params)
    self.dpo("dpo_step", read_jsonl(self.workdir / "explore" / "step_pairs.jsonl"), rft_params)
    self.dpo("dpo_outcome", read_jsonl(self.workdir / "sample" / "outcome_pairs.jsonl"),
             rft_params)
    models = {"base": self.base_params,
              "SFT": lambda: self.stage_model("sft", self.base_params),
              "RFT": rft_params,
              "outcome DPO": lambda: self.stage_model("dpo_outcome", rft_params),
              "Self-Explore": lambda: self.stage_model("dpo_step", rft_params)}
    results = self.evaluate(models)
    results["pits"] = explored
    results["sample"] = self._done("sample")
    write_report(self._dir("eval"), results)
    return results


def format_table(results: dict) -> str:
  n = results["num_problems"]
  rows = ["| model | accuracy (%) | 95% CI | problems |", "|---|---|---|---|"]
  for name, r in results["models"].items():
    lo, hi = r["ci95"]
    rows.append(f"| {name} | {100 * r['accuracy']:.1f} | [{100 * lo:.1f}, {100 * hi:.1f}] "
                f"| {n} |")
  for name, d in results["differences"].items():
    lo, hi = d["ci95"]
    rows.append(f"| {name} | {100 * d['mean']:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                f"| {n} (paired bootstrap) |")
  return "\n".join(rows)


def write_report(directory, results: dict) -> None:
  """results.json, results.md and accuracy.png (bars with 95% intervals)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  (directory / "results.json").write_text(json.dumps(results, indent=1))
  pits = results.get("pits", {})
  md = [format_table(results), "",
        f"Explored {pits.get('explored', 0)} wrong rationales; pits found in "
        f"{pits.get('with_pit', 0)} (by step: {pits.get('pits_by_step', {})}); "
        f"{pits.get('step_pairs', 0)} step-level pairs."]
  (directory / "results.md").write_text("\n".join(md) + "\n")
  names = list(results["models"])
  acc = np.array([100 * results["models"][n]["accuracy"] for n in names])
  ci = np.array([[100 * x for x in results["models"][n]["ci95"]] for n in names])
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.bar(names, acc, yerr=[acc - ci[:, 0], ci[:, 1] - acc], capsize=4, color="#4c72b0")
  ax.set_ylabel("greedy accuracy (%)")
  ax.set_title(f"test problems: {results['num_problems']} (95% Wilson intervals)")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  with (directory / "accuracy.png").open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
