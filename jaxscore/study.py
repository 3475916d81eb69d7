"""Runs a study's arms one after another on equal sample budgets, evaluates each with
the same three protocols, and reports them in one table.

  python -m jaxscore.study --config=configs/study.py:cpu --workdir=runs/study

An arm is `method` plus config overrides (configs/study.py):
  none      no training (the base model; Self-Refine is its own prompt, only);
  rl        the online loop with the arm's objective (GRPO single- or multi-turn, SCoRe);
  star      multi-turn STaR: sample two-turn traces with SCoRe's instruction between the
            attempts, keep those whose second attempt is right (after a wrong first one,
            or, D+, a right one), fine-tune the base model on all kept so far to give
            the second attempt; `study.star_iterations` rounds, each sampling from the
            latest model;
  pair_sft  Pair-SFT: sample attempts from the base model, pair each wrong one with a
            random correct response to the same problem, under SCoRe's instruction,
            and fine-tune on (problem, wrong attempt, instruction) -> correct response.
Every arm trains on the same problems in the same seeded order (the RL loop's) and
samples `study.episodes` training episodes (RL: steps x prompts x group; STaR and
Pair-SFT: problems x samples), or, with `study.budget=tokens`, `study.tokens` sampled
training tokens (all turns; the episodes become a cap, and an arm that reaches its cap
first is flagged); the summary reports the episodes and the tokens each actually sampled.
Evaluation protocols, on the same test problems for every arm (see
`Study.evaluate`): single-turn pass@k, a T-turn dialogue with feedback that reveals
correctness, and the intrinsic self-correction protocol (SCoRe's instruction after every
attempt, correctness never revealed).
Each arm writes `<workdir>/arms/<name>/result.json` when finished; a rerun skips it.
Its training runs then keep only their parameters (`.../params/`, no optimizer state).
Then `summary.json`, `summary.md` and `summary.png`, with 95% bootstrap intervals over
the test problems, and each arm's paired difference to `study.reference_arm`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from jaxscore import config_checks, evaluate, objectives, tasks
from jaxscore.infra import entry, files
from jaxscore.loops import common, offline, online
from jaxscore.objectives import sft
from jaxscore.sampling import rollout, sampler

# How an arm trains (its `method=`): not at all, by RL with its objective, STaR or Pair-SFT.
ARM_METHODS = ("none", "rl", "star", "pair_sft")


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
  group_size: int = 4  # STaR and Pair-SFT: episodes sampled per problem.
  star_iterations: int = 2  # STaR rounds: sample -> filter -> fine-tune the base model.
  sample_temperature: float = 1.0  # STaR and Pair-SFT sampling.


def parse_arm(spec: str, name: str) -> dict[str, str]:
  """`"method=rl;objective=grpo;grpo.reward=outcome"` -> {key: text value}."""
  out = {}
  for part in (p.strip() for p in spec.split(";")):
    if not part:
      continue
    key, eq, value = part.partition("=")
    if not eq:
      raise ValueError(f"config arms.{name}: {part!r} is not key=value")
    out[key.strip()] = value.strip()
  method = out.get("method", "rl")
  if method not in ARM_METHODS:
    raise ValueError(f"config arms.{name}: method={method!r}, expected one of "
                     f"{', '.join(ARM_METHODS)}")
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


def arm_config(c, name: str) -> tuple[str, ml_collections.ConfigDict]:
  """(method, the study config with arm `name`'s overrides)."""
  if name not in c.arms:
    raise ValueError(f"config study.arms: no arm {name!r} (arms: {', '.join(c.arms)})")
  overrides = parse_arm(c.arms[name], name)
  method = overrides.pop("method", "rl")
  return method, apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()],
                                 f"config arms.{name}")


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
  for field in ("episodes", "train_turns", "eval_turns", "pass_k_samples",
                "group_size", "star_iterations", "intrinsic_turns"):
    require(s[field] >= 1, f"study.{field}={s[field]}: must be >= 1")
  require(s.budget in ("episodes", "tokens"),
          f"study.budget={s.budget!r}: expected episodes or tokens")
  require(s.budget != "tokens" or s.tokens >= 1,
          f"study.budget=tokens needs study.tokens >= 1 (sampled training tokens per arm), "
          f"got study.tokens={s.tokens}")
  config_checks.built("study.eval_feedback", lambda: rollout.Feedback(
      s.eval_feedback, c.rollout.feedback_template))
  names = [n.strip() for n in s.arms.split(",") if n.strip()]
  require(bool(names), "study.arms is empty: name at least one arm")
  require(s.reference_arm in c.arms, f"study.reference_arm={s.reference_arm!r} is not an "
          f"arm (arms: {', '.join(c.arms)})")
  for name in names:
    try:
      _, ac = arm_config(c, name)  # Every method trains (or not) with the same groups.
    except ValueError as e:
      raise config_checks.ConfigError(str(e)) from None
    try:
      config_checks.check_experiment(ac)
    except config_checks.ConfigError as e:
      raise config_checks.ConfigError(f"arms.{name}: {e}") from None


def bootstrap_mean(x_N: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
  """(mean, low, high): a 95% percentile bootstrap interval over problems."""
  return evaluate.paired_bootstrap(np.asarray(x_N, float), np.zeros(len(x_N)), seed=seed)


class Study:
  """The base model, task and problems every arm shares."""

  def __init__(self, c, workdir):
    check(c)  # Every arm, before the model loads.
    self.c, self.workdir = c, files.path(workdir)
    self.setup, self.eval_setup, self.base_params = rollout.from_config(c)
    self.train_problems = tasks.train_problems(self.setup.task, c.task)
    problems = self.eval_setup.task.problems(c.task.eval_split)
    self.test_problems = problems[:c.evaluate.num_problems] if c.evaluate.num_problems \
        else problems
    self._samplers = {}  # STaR's and Pair-SFT's, by (turns, max_new_tokens).

  # -- Training, by method. -------------------------------------------------------

  def train(self, method: str, ac, directory) -> tuple[Any, dict]:
    """(params, budget: episodes and tokens sampled for training)."""
    if method == "none":
      return self.base_params, {"episodes": 0, "tokens": 0}
    if method == "rl":
      return self._rl(ac, directory)
    return self._supervised(method, ac, directory)

  def _rl(self, ac, directory):
    state, info = online.train(ac, self.setup, self.base_params, self.base_params,
                               directory / "train", token_budget=self._token_budget())
    if info["preempted"]:
      raise SystemExit("SIGTERM: rerun the same command to resume")
    records = [json.loads(line) for line in
               (directory / "train" / "metrics.jsonl").read_text().splitlines() if line]
    return state.params, self._budget(sum(r["budget/episodes"] for r in records),
                                      sum(r["budget/tokens"] for r in records))

  def _token_budget(self) -> int | None:
    return self.c.study.tokens if self.c.study.budget == "tokens" else None

  def _budget(self, episodes: int, tokens: int, **extra) -> dict:
    """What an arm sampled; with a token budget, whether it stopped at its cap first."""
    out = {"episodes": int(episodes), "tokens": int(tokens), **extra}
    if self._token_budget():
      out["capped"] = bool(tokens < self._token_budget())
    return out

  def _problems_for(self, count: int, offset: int = 0):
    """`count` training problems from position `offset` of the seeded order in which the
    RL arms draw their prompts, so every arm trains on the same problems in the same
    order (SFT-style arms take the first ones, as the first RL steps do)."""
    return online.seeded_problems(self.train_problems, offset, count, self.c.seed)

  def _sample(self, params, ac, problems, num_turns: int, seed_offset: int,
              token_budget: float | None = None):
    """`study.group_size` episodes per problem of `num_turns` attempts with
    SCoRe's instruction between them (correctness never revealed), sampled at
    `study.sample_temperature`: (rollouts per batch, problems used, tokens sampled).
    With `token_budget`, sampling stops after the batch that reaches it."""
    s = self.c.study
    n = s.group_size
    feedback = rollout.Feedback("instruction")
    key = (num_turns, ac.sampler.max_new_tokens)
    if key not in self._samplers:
      self._samplers[key] = rollout.make_sampler(
          self.setup, rollout.prompt_lens(self.setup, self.train_problems), num_turns,
          ac.sampler.max_new_tokens, message_len=rollout.instruction_len(self.setup, feedback))
    smp = self._samplers[key]
    sampling = sampler.SamplingConfig(temperature=s.sample_temperature,
                                      max_new_tokens=ac.sampler.max_new_tokens)
    per_call = max(ac.evaluate.batch_size // n, 1)  # Problems per sampler call.
    out, used, tokens = [], 0, 0
    for i, start in enumerate(range(0, len(problems), per_call)):
      if token_budget is not None and tokens >= token_budget:
        break
      chunk = list(problems[start:start + per_call])
      chunk += [chunk[-1]] * (per_call - len(chunk))  # One compiled shape.
      real = min(per_call, len(problems) - start) * n
      rng = jax.random.fold_in(jax.random.key(self.c.seed), seed_offset * 100_003 + i)
      ro = rollout.rollout(params, smp, self.setup, [p for p in chunk for _ in range(n)],
                           num_turns, sampling, rng, feedback=feedback, group_size=n)
      tokens += sum(len(ro.ids[t][r]) for t in range(num_turns) for r in range(real))
      used += real // n
      out.append((ro, real))
    return out, used, tokens

  def _star_examples(self, batches) -> list[dict]:
    """Multi-turn STaR: traces whose second attempt is right after a wrong first one
    (and, D+, right after a right one); the model learns the second attempt in the
    context of the first and of SCoRe's instruction."""
    fmt, tok, task = self.setup.fmt, self.setup.tokenizer, self.setup.task
    out = []
    for ro, real in batches:
      for r in range(real):
        if ro.rewards_BxN[r, 1] > 0:
          p = ro.problems[r]
          out.append({"prompt": fmt.prompt_ids(p.prompt) + fmt.attempt_ids(ro.texts[0][r])
                      + fmt.instruction_ids(task.instruction),
                      "completion": sft.completion_ids(fmt, tok, ro.texts[1][r])})
    return out

  def _pair_sft_examples(self, batches, rng: np.random.Generator) -> list[dict]:
    """Pair-SFT: every wrong attempt paired with a random correct response to the same
    problem, under SCoRe's instruction: (x, wrong, p) -> correct."""
    fmt, tok, task = self.setup.fmt, self.setup.tokenizer, self.setup.task
    by_problem: dict[str, tuple[Any, list[str], list[str]]] = {}
    for ro, real in batches:
      for r in range(real):
        p = ro.problems[r]
        _, right, wrong = by_problem.setdefault(p.id, (p, [], []))
        (right if ro.rewards_BxN[r, 0] > 0 else wrong).append(ro.texts[0][r])
    out = []
    for p, right, wrong in by_problem.values():
      for w in (wrong if right else []):
        out.append({"prompt": fmt.prompt_ids(p.prompt) + fmt.attempt_ids(w)
                    + fmt.instruction_ids(task.instruction),
                    "completion": sft.completion_ids(fmt, tok, right[rng.integers(len(right))])})
    return out

  def _supervised(self, method, ac, directory):
    s = self.c.study
    n = s.group_size
    objective = objectives.make("sft", ac.sft, objectives.Context(self.setup.cfg))
    rounds = s.star_iterations if method == "star" else 1
    # Problems per round: the cap with a token budget, which each round gets 1/rounds of.
    count = max(s.episodes // rounds // n, 1)
    round_tokens = self._token_budget() / rounds if self._token_budget() else None
    pair_rng = np.random.default_rng([self.c.seed, 1])
    params, kept, episodes, tokens, log = self.base_params, [], 0, 0, []
    offset = 0  # Problems used so far, in the shared seeded order.
    for it in range(rounds):
      problems = self._problems_for(count, offset=offset)
      # STaR samples two-turn traces from the latest model; Pair-SFT single attempts
      # from the base model.
      batches, used, sampled = self._sample(params, ac, problems,
                                            2 if method == "star" else 1, it,
                                            token_budget=round_tokens)
      offset += used
      episodes, tokens = episodes + used * n, tokens + sampled
      kept += (self._star_examples(batches) if method == "star"
               else self._pair_sft_examples(batches, pair_rng))
      rewards = np.concatenate([ro.rewards_BxN[:real] for ro, real in batches])
      log.append({"round": it, "sampled": used * n, "tokens": sampled, "examples": len(kept),
                  **{f"sample_acc@t{t + 1}": float(rewards[:, t].mean())
                     for t in range(rewards.shape[1])}})
      print(f"[{method}] round {it}: " + ", ".join(f"{k}={v}" for k, v in log[-1].items()))
      if len(kept) < ac.offline.batch_size:
        print(f"[{method}] {len(kept)} examples are fewer than one batch "
              f"(offline.batch_size={ac.offline.batch_size}): the model is not trained")
        continue
      # Every round fine-tunes the base model on everything kept so far.
      state, info = offline.train(ac, self.setup.cfg, objective, self.base_params,
                                  self.base_params, kept, directory / f"train{it}")
      if info["preempted"]:
        raise SystemExit("SIGTERM: rerun the same command to resume")
      params = state.params
    return params, self._budget(episodes, tokens, rounds=log)

  # -- Evaluation. ------------------------------------------------------------------

  def evaluate(self, ac, params, directory) -> dict:
    """Every arm by the same three protocols, on the same test problems:
      pass@k     single-turn, sampled (`study.pass_k_samples`, unbiased estimator);
      dialogue   greedy `study.eval_turns` turns with `study.eval_feedback` after each
                 wrong answer: acc@t is correct by turn t (correctness is revealed);
      intrinsic  greedy `study.intrinsic_turns` attempts with SCoRe's instruction after
                 every one (an arm's own, e.g. Self-Refine's critique prompt), every
                 episode takes every turn and correctness is never revealed: acc@t is
                 turn t's answer, delta = acc@tT - acc@t1, with delta_i->c and c->i.
    Per-problem values for each metric, for intervals and paired differences."""
    s = self.c.study
    run = lambda feedback, turns: evaluate.evaluate(
        params, self.eval_setup, self.test_problems, num_turns=turns,
        max_new_tokens=ac.sampler.max_new_tokens, batch_size=ac.evaluate.batch_size,
        seed=ac.seed, feedback=feedback)
    dialogue_fb = rollout.Feedback(s.eval_feedback, ac.rollout.feedback_template
                                   if s.eval_feedback == "template" else "")
    own = ac.rollout.feedback_template if ac.evaluate.feedback == "instruction" else ""
    intrinsic_fb = rollout.Feedback("instruction", own)
    dialogue, dialogue_records = run(dialogue_fb, s.eval_turns)
    intrinsic, intrinsic_records = run(intrinsic_fb, s.intrinsic_turns)
    passk, passk_records = evaluate.evaluate_pass_at_k(
        params, self.eval_setup, self.test_problems, num_samples=s.pass_k_samples,
        temperature=s.pass_k_temperature, max_new_tokens=ac.sampler.max_new_tokens,
        batch_size=ac.evaluate.batch_size, seed=ac.seed)
    for name, records in (("dialogue", dialogue_records), ("intrinsic", intrinsic_records),
                          ("pass_at_k", passk_records)):
      (directory / f"{name}.json").write_text(json.dumps(records, indent=1))
    per_problem = {f"pass@{k}": [evaluate.pass_at_k(s.pass_k_samples, r["num_correct"], k)
                                 for r in passk_records]
                   for k in (int(key[5:]) for key in passk if key.startswith("pass@"))}
    t = s.eval_turns
    for j in range(t):  # Correct by turn j + 1 (a row that stopped stays correct).
      per_problem[f"dialogue/acc@t{j + 1}"] = [
          float(max(r["rewards"][:j + 1])) for r in dialogue_records]
    first = np.array([r["rewards"][0] for r in intrinsic_records])
    last = np.array([r["rewards"][-1] for r in intrinsic_records])
    for j in range(s.intrinsic_turns):
      per_problem[f"intrinsic/acc@t{j + 1}"] = [r["rewards"][j] for r in intrinsic_records]
    per_problem |= {"intrinsic/delta": (last - first).tolist(),
                    "intrinsic/delta_i->c": ((first == 0) & (last > 0)).astype(float).tolist(),
                    "intrinsic/delta_c->i": ((first > 0) & (last == 0)).astype(float).tolist()}
    return {"feedback": {"dialogue": dialogue_fb.kind, "intrinsic": intrinsic_fb.message(
                self.eval_setup.task)},
            "num_problems": len(self.test_problems),
            "metrics": {k: bootstrap_mean(v, ac.seed) for k, v in per_problem.items()},
            "edit_distance_ratio": intrinsic.get("edit_distance_ratio"),
            "per_problem": per_problem}

  # -- Arms. --------------------------------------------------------------------------

  def arm(self, name: str) -> dict:
    directory = self.workdir / "arms" / name
    done = directory / "result.json"
    if done.exists():
      print(f"[{name}] finished earlier: {done}")
      return json.loads(done.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    method, ac = arm_config(self.c, name)
    print(f"[{name}] method={method}: {self.c.arms[name]}")
    t0 = time.perf_counter()
    params, budget = self.train(method, ac, directory)
    t1 = time.perf_counter()
    result = {"arm": name, "method": method, "spec": self.c.arms[name], "budget": budget,
              **self.evaluate(ac, params, directory),
              "seconds": {"train": t1 - t0, "evaluate": time.perf_counter() - t1}}
    done.write_text(json.dumps(result, indent=1))
    self._keep_params_only(ac, directory)
    m = result["metrics"]
    print(f"[{name}] " + ", ".join(f"{k}={v[0]:.3f}" for k, v in m.items()))
    return result

  def _keep_params_only(self, ac, directory) -> None:
    """A finished arm is never resumed: its training runs keep their parameters (to
    export or evaluate again) and drop the optimizer state."""
    for run in sorted(p.parent for p in directory.glob("*/checkpoints")):
      common.keep_params_only(ac, run, self.setup.cfg, self.base_params)

  def run(self) -> dict:
    names = [n.strip() for n in self.c.study.arms.split(",") if n.strip()]
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
  head = ["arm", "method", "episodes", "tokens"] + keys
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results.items():
    b = r["budget"]
    cells = [name, r["method"], str(b["episodes"]),
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
