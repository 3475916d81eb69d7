"""Runs a study's arms one after another on equal sample budgets, evaluates each with
the same three protocols, and reports them in one table.

  python -m jaxscore.study --config=configs/study.py:cpu --workdir=runs/study

An arm is a line of config overrides (configs/study.py): its objective and anything it
changes. Every arm trains with `jaxscore.experiment.train`, so any objective is an arm:
  objective=none      no training (the base model; Self-Refine is its own prompt, only);
  grpo, score, pg     the online loop (GRPO single- or multi-turn, SCoRe, its ablations);
  star, pair_sft      self-training on the base model's samples (multi-turn STaR,
                      Pair-SFT: jaxscore.objectives.self_training).
Every arm trains on the same problems in the same seeded order (the RL loop's) and
samples `study.episodes` training episodes (RL: steps x prompts x group; STaR and
Pair-SFT: problems x samples), or, with `study.budget=tokens`, `study.tokens` sampled
training tokens (all turns; the episodes become a cap, and an arm that reaches its cap
first is flagged); the summary reports the episodes and the tokens each actually sampled.
Evaluation protocols, on the same test problems for every arm (`protocols`): a T-turn
dialogue with feedback that reveals correctness, the intrinsic self-correction protocol
(SCoRe's instruction after every attempt, correctness never revealed) and single-turn
pass@k.
Each arm writes `<workdir>/arms/<name>/result.json` when finished; a rerun skips it.
Its training runs then keep only their parameters (`.../params/`, no optimizer state).
Then `summary.json`, `summary.md` and `summary.png`, with 95% bootstrap intervals over
the test problems, and each arm's paired difference to `study.reference_arm`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from jaxscore import config_checks, evaluate, experiment, tasks
from jaxscore.infra import entry, files
from jaxscore.loops import common
from jaxscore.sampling import rollout


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """The study's own fields (configs/study.py's `study` group); each arm is a line of
  overrides in the `arms` group."""
  arms: str = ("base,self_refine,single_turn_grpo,multi_turn_per_turn,multi_turn_outcome,"
               "multi_turn_decayed,score,star,pair_sft")  # The arms run, in this order.
  # What every arm gets the same amount of: `episodes` (sampled training episodes) or
  # `tokens` (sampled training tokens, all turns: multi-turn episodes are longer). With
  # `tokens`, `episodes` becomes each arm's cap (RL steps, STaR/Pair-SFT problems), and
  # the summary flags an arm that reached its cap before the token budget.
  budget: str = "episodes"
  episodes: int = 3072  # Sampled training episodes per arm (the equal budget).
  tokens: int = 0  # budget=tokens: sampled training tokens per arm.
  train_turns: int = 3  # Turns of the multi-turn arms' training episodes.
  eval_turns: int = 8  # T of the T-turn dialogue with feedback.
  eval_feedback: str = "unary"  # Between evaluation turns (none | unary | template).
  # The intrinsic protocol: this many greedy attempts with SCoRe's instruction after
  # each, correctness never revealed (SCoRe's evaluation: 2).
  intrinsic_turns: int = 2
  # The arm every other one is compared with, by paired intervals over problems.
  reference_arm: str = "single_turn_grpo"
  pass_k_samples: int = 8  # n samples per problem for pass@k, k = 1, 2, 4, ... n.
  pass_k_temperature: float = 1.0


def parse_arm(spec: str, name: str) -> dict[str, str]:
  """`"objective=grpo;grpo.reward=outcome"` -> {key: text value}."""
  out = {}
  for part in (p.strip() for p in spec.split(";")):
    if not part:
      continue
    key, eq, value = part.partition("=")
    if not eq:
      raise ValueError(f"config arms.{name}: {part!r} is not key=value")
    out[key.strip()] = value.strip()
  return out


def _typed(value: str, like: Any, where: str):
  if isinstance(like, bool):
    if value.lower() not in ("true", "false"):
      raise ValueError(f"{where}={value!r}: expected true or false")
    return value.lower() == "true"
  try:
    return type(like)(value) if isinstance(like, (int, float)) else value
  except ValueError:
    raise ValueError(f"{where}={value!r}: expected a value of type {type(like).__name__}") from None


def arm_names(c) -> list[str]:
  """The arms `study.arms` runs, in order."""
  return [n.strip() for n in c.study.arms.split(",") if n.strip()]


def arm_config(c, name: str) -> ml_collections.ConfigDict:
  """The study config with arm `name`'s overrides: an experiment config."""
  if name not in c.arms:
    raise ValueError(f"config study.arms: no arm {name!r} (arms: {', '.join(c.arms)})")
  overrides = parse_arm(c.arms[name], name)
  return apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()], f"config arms.{name}")


def apply_overrides(c, overrides, where: str = "--config") -> ml_collections.ConfigDict:
  """A locked copy of `c` with `key=value` overrides (dotted keys, values typed like the
  field they replace); an unknown key is an error naming it and `where`."""
  out = ml_collections.ConfigDict(c.to_dict())
  for item in overrides:
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"{where}: {item!r} is not key=value")
    node, parts = out, key.split(".")
    for part in parts[:-1]:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ValueError(f"{where}: {key} is not a config field")
      node = node[part]
    if parts[-1] not in node:
      raise ValueError(f"{where}: {key} is not a config field")
    node[parts[-1]] = _typed(value, node[parts[-1]], f"{where.removeprefix('config ')}: {key}")
  out.lock()
  return out


def check(c) -> None:
  """configs/study.py's consistency (jaxscore.config_checks): the study's own fields,
  then every arm as the study builds it, before a model loads."""
  require, s = config_checks.require, c.study
  for field in ("episodes", "train_turns", "eval_turns", "pass_k_samples", "intrinsic_turns"):
    require(s[field] >= 1, f"study.{field}={s[field]}: must be >= 1")
  require(s.budget in ("episodes", "tokens"),
          f"study.budget={s.budget!r}: expected episodes or tokens")
  require(s.budget != "tokens" or s.tokens >= 1,
          f"study.budget=tokens needs study.tokens >= 1 (sampled training tokens per arm), "
          f"got study.tokens={s.tokens}")
  config_checks.built("study.eval_feedback", lambda: rollout.Feedback(
      s.eval_feedback, c.rollout.feedback_template))
  names = arm_names(c)
  require(bool(names), "study.arms is empty: name at least one arm")
  require(s.reference_arm in c.arms, f"study.reference_arm={s.reference_arm!r} is not an "
          f"arm (arms: {', '.join(c.arms)})")
  for name in names:
    try:
      ac = arm_config(c, name)
    except ValueError as e:
      raise config_checks.ConfigError(str(e)) from None
    try:
      config_checks.check_experiment(ac)
    except config_checks.ConfigError as e:
      raise config_checks.ConfigError(f"arms.{name}: {e}") from None


def protocols(c, ac) -> list[evaluate.Protocol]:
  """The three protocols every arm is evaluated by, on the same test problems:
    dialogue   greedy `study.eval_turns` turns with `study.eval_feedback` after each
               wrong answer: acc@t is correct by turn t (correctness is revealed);
    intrinsic  greedy `study.intrinsic_turns` attempts with SCoRe's instruction after
               every one (an arm's own, e.g. Self-Refine's critique prompt), every
               episode takes every turn and correctness is never revealed: acc@t is
               turn t's answer, delta = acc@tT - acc@t1, with delta_i->c and c->i;
    pass_at_k  single-turn, sampled (`study.pass_k_samples`, unbiased estimator)."""
  s = c.study
  dialogue = rollout.Feedback(s.eval_feedback, ac.rollout.feedback_template
                              if s.eval_feedback == "template" else "")
  own = ac.rollout.feedback_template if ac.evaluate.feedback == "instruction" else ""
  return [evaluate.Protocol("dialogue", s.eval_turns, dialogue),
          evaluate.Protocol("intrinsic", s.intrinsic_turns, rollout.Feedback("instruction", own)),
          evaluate.Protocol("pass_at_k", samples=s.pass_k_samples,
                            temperature=s.pass_k_temperature)]


class Study:
  """The base model, task and problems every arm shares, loaded when an arm first needs
  them: rerunning a study whose arms all finished loads no model."""

  def __init__(self, c, workdir):
    check(c)  # Every arm, before the model loads.
    self.c, self.workdir = c, files.path(workdir)

  @functools.cached_property
  def _loaded(self) -> tuple[Any, Any, Any]:
    return rollout.from_config(self.c)

  @functools.cached_property
  def setup(self):
    return self._loaded[0]

  @functools.cached_property
  def eval_setup(self):
    return self._loaded[1]

  @functools.cached_property
  def base_params(self):
    return self._loaded[2]

  @functools.cached_property
  def test_problems(self):
    return tasks.eval_problems(self.eval_setup.task, self.c.task, self.c.evaluate.num_problems)

  def train(self, ac, directory) -> tuple[Any, dict]:
    """(params, budget: episodes and tokens sampled for training); with a token budget,
    whether the arm reached its cap first."""
    budget = self.c.study.tokens if self.c.study.budget == "tokens" else None
    params, info = experiment.train(ac, self.setup, self.base_params, directory / "train",
                                    token_budget=budget)
    if info["preempted"]:
      raise SystemExit("SIGTERM: rerun the same command to resume")
    out = {"episodes": info["episodes"], "tokens": info["tokens"]}
    out |= {"rounds": info["rounds"]} if "rounds" in info else {}
    if budget and experiment.kind(ac) != experiment.NO_TRAINING:
      out["capped"] = bool(out["tokens"] < budget)
    return params, out

  def evaluate(self, ac, params, directory) -> dict:
    """`protocols(c, ac)` on the test problems: per-problem values of each metric, for
    intervals and paired differences."""
    per_problem, feedback, ratio = {}, {}, None
    for protocol in protocols(self.c, ac):
      result, scores = experiment.scores(ac, self.eval_setup, params, self.test_problems,
                                         protocol, directory)
      per_problem |= scores
      if not protocol.samples:
        feedback[protocol.name] = (protocol.feedback.message(self.eval_setup.task)
                                   if protocol.name == "intrinsic" else protocol.feedback.kind)
      if protocol.name == "intrinsic":
        ratio = result.get("edit_distance_ratio")
    return {"feedback": feedback, "num_problems": len(self.test_problems),
            "metrics": experiment.intervals(per_problem, ac.seed),
            "edit_distance_ratio": ratio, "per_problem": per_problem}

  def arm(self, name: str) -> dict:
    directory = self.workdir / "arms" / name
    done = directory / "result.json"
    if done.exists():
      print(f"[{name}] finished earlier: {done}")
      return json.loads(done.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    ac = arm_config(self.c, name)
    print(f"[{name}] {self.c.arms[name]}")
    t0 = time.perf_counter()
    params, budget = self.train(ac, directory)
    t1 = time.perf_counter()
    result = {"arm": name, "objective": ac.objective, "spec": self.c.arms[name],
              "budget": budget, **self.evaluate(ac, params, directory),
              "seconds": {"train": t1 - t0, "evaluate": time.perf_counter() - t1}}
    done.write_text(json.dumps(result, indent=1))
    self._keep_params_only(ac, directory)
    m = result["metrics"]
    print(f"[{name}] " + ", ".join(f"{k}={v[0]:.3f}" for k, v in m.items()))
    return result

  def _keep_params_only(self, ac, directory) -> None:
    """A finished arm is never resumed: its training runs keep their parameters (to
    export or evaluate again) and drop the optimizer state."""
    # A training run is `train/` (RL) or each self-training round's `train/train<r>/`.
    runs = [*directory.glob("*/checkpoints"), *directory.glob("*/*/checkpoints")]
    for run in sorted(p.parent for p in runs):
      common.keep_params_only(ac, run, self.setup.cfg, self.base_params)

  def run(self) -> dict:
    names = arm_names(self.c)
    for name in names:  # Bad arm specs fail before anything runs.
      arm_config(self.c, name)
    results = {name: self.arm(name) for name in names}
    write_summary(self.workdir, results, self.c)
    return results


# -- Reports. -----------------------------------------------------------------------


def _cell(mean: float, lo: float, hi: float, signed: bool = False) -> str:
  f = "{:+.1f}" if signed else "{:.1f}"
  return f"{f.format(100 * mean)} [{f.format(100 * lo)}, {f.format(100 * hi)}]"


def summary_keys(first: dict, c) -> list[str]:
  """The columns of the summary: pass@1 and pass@n, the dialogue's first, second and
  last turns, the intrinsic protocol's turns and deltas."""
  m = first["metrics"]
  passk = [k for k in m if k.startswith("pass@")]
  turns = [k for k in m if k.startswith("dialogue/acc@t")]
  intrinsic = [k for k in m if k.startswith("intrinsic/")]
  return ([passk[0], passk[-1]] if len(passk) > 1 else passk) + \
      list(dict.fromkeys([turns[0], turns[min(1, len(turns) - 1)], turns[-1]])) + intrinsic


def differences(results: dict, reference: str, keys, seed: int = 0) -> dict:
  """Each arm minus `reference`, per metric: (mean, low, high), a paired bootstrap
  over the same test problems."""
  base = results[reference]["per_problem"]
  return {name: {k: evaluate.paired_bootstrap(np.asarray(r["per_problem"][k]),
                                              np.asarray(base[k]), seed=seed)
                 for k in keys}
          for name, r in results.items() if name != reference}


def format_summary(results: dict, c) -> str:
  s = c.study
  first = next(iter(results.values()))
  n = first["num_problems"]
  keys = summary_keys(first, c)
  head = ["arm", "objective", "episodes", "tokens"] + keys
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results.items():
    b = r["budget"]
    cells = [name, r["objective"], str(b["episodes"]),
             str(b["tokens"]) + (" (cap)" if b.get("capped") else "")]
    cells += [_cell(*r["metrics"][k], signed="delta" in k) for k in keys]
    lines.append("| " + " | ".join(cells) + " |")
  budget = (f"Every arm's budget: {s.tokens} sampled training tokens, all turns, "
            f"stopping after the step or batch that reaches it; (cap): the arm reached its "
            f"cap of {s.episodes} episodes first. " if s.budget == "tokens" else
            f"Every arm's budget: {s.episodes} sampled training episodes. ")
  lines += ["", f"{n} test problems; % with 95% bootstrap intervals over problems. "
            + budget +
            f"Three protocols. pass@k: {s.pass_k_samples} samples per problem at "
            f"temperature {s.pass_k_temperature}, single turn. dialogue/acc@t: greedy "
            f"{s.eval_turns}-turn dialogue, '{s.eval_feedback}' feedback after a wrong "
            "answer (correctness is revealed), correct by turn t. intrinsic: greedy "
            f"{s.intrinsic_turns} attempts with SCoRe's instruction after every one (the "
            "arm's own prompt where it has one: self_refine's critique), correctness never "
            "revealed, acc@t is turn t's answer; delta = last - first attempt."]
  ref = s.reference_arm
  if ref in results and len(results) > 1:
    diff_keys = [keys[0], [k for k in keys if k.startswith("dialogue/")][-1],
                 "intrinsic/acc@t1", f"intrinsic/acc@t{s.intrinsic_turns}", "intrinsic/delta"]
    diffs = differences(results, ref, diff_keys, c.seed)
    lines += ["", f"Each arm minus {ref} (percentage points, paired bootstrap over the "
              "same problems, 95%):", "",
              "| arm | " + " | ".join(diff_keys) + " |", "|" + "---|" * (len(diff_keys) + 1)]
    for name, d in diffs.items():
      lines.append(f"| {name} | " + " | ".join(_cell(*d[k], signed=True) for k in diff_keys)
                   + " |")
  return "\n".join(lines)


def write_summary(workdir, results: dict, c) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  slim = {name: {k: v for k, v in r.items() if k != "per_problem"}
          for name, r in results.items()}
  if c.study.reference_arm in results and len(results) > 1:
    keys = [k for k in summary_keys(next(iter(results.values())), c)]
    slim["differences_to_" + c.study.reference_arm] = differences(
        results, c.study.reference_arm, keys, c.seed)
  (workdir / "summary.json").write_text(json.dumps(slim, indent=1))
  table = format_summary(results, c)
  (workdir / "summary.md").write_text(table + "\n")
  print("\n" + table)
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  panels = (("pass@", "k", "single-turn pass@k (%)"),
            ("dialogue/acc@t", "turn", "correct by turn, with feedback (%)"),
            ("intrinsic/acc@t", "attempt", "intrinsic, turn t's answer (%)"))
  for name, r in results.items():
    m = r["metrics"]
    for ax, (prefix, _, _) in zip(axes, panels):
      keys = [k for k in m if k.startswith(prefix)]
      x = [int(k[len(prefix):]) for k in keys]
      mean = np.array([100 * m[k][0] for k in keys])
      lo, hi = (np.array([100 * m[k][j] for k in keys]) for j in (1, 2))
      ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3, label=name)
  for ax, (_, xlabel, ylabel) in zip(axes, panels):
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
  axes[0].set_xscale("log")
  axes[0].set_xticks([int(k[5:]) for k in next(iter(results.values()))["metrics"]
                      if k.startswith("pass@")])
  axes[0].get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  with (workdir / "summary.png").open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def main(argv):
  del argv

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  c = flags.FLAGS.config
  workdir = files.path(flags.FLAGS.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(c.to_json(indent=1))
  Study(c, workdir).run()


if __name__ == "__main__":
  # Defined here, not at import, so that importing this module (tests, notebooks) next to
  # another entry point does not define --config twice.
  config_flags.DEFINE_config_file("config", None, entry.config_help("study.py:cpu"),
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where each arm and the summary go.")
  flags.mark_flags_as_required(["config", "workdir"])
  entry.run(main, "jaxscore.study")
