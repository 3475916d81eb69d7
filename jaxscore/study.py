"""Runs a study's arms one after another on equal sample budgets, evaluates each with
both protocols, and reports them in one table.

  python -m jaxscore.study --config=configs/study.py:cpu --workdir=runs/study

An arm is `method` plus config overrides (configs/study.py):
  none      no training (the base model; Self-Refine is prompting only);
  rl        the online loop with the arm's objective (GRPO single- or multi-turn, SCoRe);
  star      STaR: sample rationales, keep the correct ones, fine-tune the base model on
            all kept so far; `study.star_iterations` times, each from the latest model;
  pair_sft  Pair-SFT: sample rationales from the base model, pair each problem's wrong
            and correct ones into (wrong attempt, feedback, correct attempt) traces and
            fine-tune on the correct attempt.
Every arm samples `study.episodes` training episodes (RL: steps x prompts x group; STaR
and Pair-SFT: problems x samples); the summary reports the episodes and tokens each
actually sampled. Evaluation, on the same test problems for every arm:
  - single-turn pass@k by sampling (`study.pass_k_samples`, unbiased estimator);
  - a T-turn dialogue (`study.eval_turns`) with `study.eval_feedback` after each wrong
    answer: Acc@t is the fraction answered correctly by turn t (Self-Refine's own
    critique prompt instead, given after every answer: its Acc@t is turn t's answer).
Each arm writes `<workdir>/arms/<name>/result.json` when finished; a rerun skips it.
Its training runs then keep only their parameters (`.../params/`, no optimizer state).
Then `summary.json`, `summary.md` and `summary.png`, with 95% bootstrap intervals over
the test problems.
"""

from __future__ import annotations

import json
import time
from typing import Any

import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from jaxscore.infra import entry

METHODS = ("none", "rl", "star", "pair_sft")


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
  if method not in METHODS:
    raise ValueError(f"config arms.{name}: method={method!r}, expected one of "
                     f"{', '.join(METHODS)}")
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
  ac = ml_collections.ConfigDict(c.to_dict())
  for key, value in overrides.items():
    node, parts = ac, key.split(".")
    for part in parts[:-1]:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ValueError(f"config arms.{name}: {key} is not a config field")
      node = node[part]
    if parts[-1] not in node:
      raise ValueError(f"config arms.{name}: {key} is not a config field")
    node[parts[-1]] = _typed(value, node[parts[-1]], f"arms.{name}: {key}")
  ac.lock()
  return method, ac


def bootstrap_mean(x_N: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
  """(mean, low, high): a 95% percentile bootstrap interval over problems."""
  from jaxscore import evaluate

  return evaluate.paired_bootstrap(np.asarray(x_N, float), np.zeros(len(x_N)), seed=seed)


class Study:
  """The base model, task and problems every arm shares."""

  def __init__(self, c, workdir):
    from jaxscore import config_checks
    from jaxscore.infra import files
    from jaxscore.sampling import rollout as rollout_lib

    config_checks.check_study(c)  # Every arm, before the model loads.
    self.c, self.workdir = c, files.path(workdir)
    self.setup, self.eval_setup, self.base_params = rollout_lib.from_config(c)
    self.train_problems = self.setup.task.problems(c.task.train_split)
    problems = self.eval_setup.task.problems(c.task.eval_split)
    self.test_problems = problems[:c.evaluate.num_problems] if c.evaluate.num_problems \
        else problems

  # -- Training, by method. -------------------------------------------------------

  def train(self, method: str, ac, directory) -> tuple[Any, dict]:
    """(params, budget: episodes and tokens sampled for training)."""
    if method == "none":
      return self.base_params, {"episodes": 0, "tokens": 0}
    if method == "rl":
      return self._rl(ac, directory)
    return self._supervised(method, ac, directory)

  def _rl(self, ac, directory):
    from jaxscore.loops import online

    state, info = online.train(ac, self.setup, self.base_params, self.base_params,
                               directory / "train")
    if info["preempted"]:
      raise SystemExit("SIGTERM: rerun the same command to resume")
    records = [json.loads(line) for line in
               (directory / "train" / "metrics.jsonl").read_text().splitlines() if line]
    return state.params, {"episodes": int(sum(r["budget/episodes"] for r in records)),
                          "tokens": int(sum(r["budget/tokens"] for r in records))}

  def _problems_for(self, episodes: int, per_problem: int, offset: int = 0):
    n = max(episodes // per_problem, 1)
    return [self.train_problems[(offset + i) % len(self.train_problems)] for i in range(n)]

  def _sample(self, params, problems, replier, seed_offset: int):
    """`study.samples_per_problem` replies per problem and their scores."""
    import jax

    s, fmt = self.c.study, self.setup.fmt
    rng = jax.random.fold_in(jax.random.key(self.c.seed), seed_offset)
    texts = replier(params, [fmt.prompt_ids(p.prompt) for p in problems],
                    s.sample_temperature, rng, group=s.samples_per_problem)
    rows = [p for p in problems for _ in range(s.samples_per_problem)]
    texts = [t.strip() for t in texts]
    return rows, texts, self.setup.task.score(rows, texts)

  def _supervised(self, method, ac, directory):
    from jaxscore import objectives
    from jaxscore.loops import offline
    from jaxscore.objectives import sft
    from jaxscore.sampling import rollout
    from jaxscore.self_explore import explore

    s, fmt, tok = self.c.study, self.setup.fmt, self.setup.tokenizer
    n = s.samples_per_problem
    longest = max(len(fmt.prompt_ids(p.prompt)) for p in self.train_problems)
    replier = explore.Replier(self.setup, longest, ac.sampler.max_new_tokens,
                              max(ac.evaluate.batch_size // n, 1) * n)
    objective = objectives.make("sft", ac.sft, objectives.Context(self.setup.cfg))
    rounds = s.star_iterations if method == "star" else 1
    per_round = s.episodes // rounds
    params, kept, episodes, log = self.base_params, [], 0, []
    for it in range(rounds):
      problems = self._problems_for(per_round, n, offset=it * (per_round // n))
      rows, texts, scores = self._sample(params, problems, replier, it)
      episodes += len(rows)
      if method == "star":
        # Distinct correct rationales; every round fine-tunes the base model on all.
        for p in problems:
          mine = [t for r, t, sc in zip(rows, texts, scores) if r is p and sc.reward > 0]
          kept += [{"prompt": fmt.prompt_ids(p.prompt),
                    "completion": sft.completion_ids(fmt, tok, t)}
                   for t in explore.rft_set(mine, n)]
      else:
        feedback = rollout.Feedback(s.eval_feedback)
        for p in problems:
          mine = [(t, sc) for r, t, sc in zip(rows, texts, scores) if r is p]
          wrong = [(t, sc) for t, sc in mine if sc.reward == 0]
          right = explore.rft_set([t for t, sc in mine if sc.reward > 0], n)
          for (w, sc), r in zip(wrong, right):
            prompt = (fmt.prompt_ids(p.prompt) + fmt.attempt_ids(w)
                      + fmt.instruction_ids(feedback.message(self.setup.task, sc)))
            kept.append({"prompt": prompt, "completion": sft.completion_ids(fmt, tok, r)})
      log.append({"round": it, "sampled": len(rows), "examples": len(kept),
                  "sample_accuracy": float(np.mean([sc.reward for sc in scores]))})
      print(f"[{method}] round {it}: " + ", ".join(f"{k}={v}" for k, v in log[-1].items()))
      if len(kept) < ac.offline.batch_size:
        print(f"[{method}] {len(kept)} examples are fewer than one batch "
              f"(offline.batch_size={ac.offline.batch_size}): the model is not trained")
        continue
      state, info = offline.train(ac, self.setup.cfg, objective, self.base_params,
                                  self.base_params, kept, directory / f"train{it}")
      if info["preempted"]:
        raise SystemExit("SIGTERM: rerun the same command to resume")
      params = state.params
    return params, {"episodes": episodes, "tokens": replier.tokens_sampled, "rounds": log}

  # -- Evaluation. ------------------------------------------------------------------

  def evaluate(self, ac, params, directory) -> dict:
    from jaxscore import evaluate
    from jaxscore.sampling import rollout

    s = self.c.study
    feedback_kind = ac.evaluate.feedback or s.eval_feedback
    feedback = rollout.Feedback(feedback_kind, ac.rollout.feedback_template
                                if feedback_kind in ("instruction", "template") else "")
    dialogue, records = evaluate.evaluate(
        params, self.eval_setup, self.test_problems, num_turns=s.eval_turns,
        max_new_tokens=ac.sampler.max_new_tokens, batch_size=ac.evaluate.batch_size,
        seed=ac.seed, feedback=feedback)
    passk, passk_records = evaluate.evaluate_pass_at_k(
        params, self.eval_setup, self.test_problems, num_samples=s.pass_k_samples,
        temperature=s.pass_k_temperature, max_new_tokens=ac.sampler.max_new_tokens,
        batch_size=ac.evaluate.batch_size, seed=ac.seed)
    (directory / "dialogue.json").write_text(json.dumps(records, indent=1))
    (directory / "pass_at_k.json").write_text(json.dumps(passk_records, indent=1))
    t = s.eval_turns
    by_turn = np.zeros((len(records), t))
    for i, r in enumerate(records):
      rewards = np.array(r["rewards"] + [r["rewards"][-1] if feedback.stops_when_correct
                                         else 0.0] * (t - len(r["rewards"])))
      by_turn[i] = np.maximum.accumulate(rewards) if feedback.stops_when_correct else rewards
    correct = np.array([r["num_correct"] for r in passk_records])
    ks = [int(k[5:]) for k in passk if k.startswith("pass@")]
    per_problem = {f"pass@{k}": [evaluate.pass_at_k(s.pass_k_samples, c, k) for c in correct]
                   for k in ks}
    per_problem |= {f"acc@t{j + 1}": by_turn[:, j].tolist() for j in range(t)}
    return {"feedback": feedback.kind, "num_problems": len(self.test_problems),
            "metrics": {k: bootstrap_mean(v, ac.seed) for k, v in per_problem.items()},
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
    from jaxscore.loops import common

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


def format_summary(results: dict, c) -> str:
  s = c.study
  first = next(iter(results.values()))
  n = first["num_problems"]
  passk = [k for k in first["metrics"] if k.startswith("pass@")]
  turns = [k for k in first["metrics"] if k.startswith("acc@t")]
  shown = passk + turns if len(turns) <= 4 else passk + [turns[0], turns[1], turns[-1]]
  head = ["arm", "method", "episodes", "tokens"] + shown
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results.items():
    cells = [name, r["method"], str(r["budget"]["episodes"]), str(r["budget"]["tokens"])]
    for k in shown:
      mean, lo, hi = r["metrics"][k]
      cells.append(f"{100 * mean:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]")
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"{n} test problems; % with 95% bootstrap intervals over problems. "
            f"pass@k: {s.pass_k_samples} samples per problem at temperature "
            f"{s.pass_k_temperature}, single turn. acc@t: greedy {s.eval_turns}-turn "
            f"dialogue, '{s.eval_feedback}' feedback after a wrong answer, correct by turn "
            "t (self_refine: its critique prompt after every answer, turn t's answer)."]
  return "\n".join(lines)


def write_summary(workdir, results: dict, c) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  slim = {name: {k: v for k, v in r.items() if k != "per_problem"}
          for name, r in results.items()}
  (workdir / "summary.json").write_text(json.dumps(slim, indent=1))
  table = format_summary(results, c)
  (workdir / "summary.md").write_text(table + "\n")
  print("\n" + table)
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for name, r in results.items():
    m = r["metrics"]
    for ax, prefix in ((left, "pass@"), (right, "acc@t")):
      keys = [k for k in m if k.startswith(prefix)]
      x = [int(k[len(prefix):]) for k in keys]
      mean = np.array([100 * m[k][0] for k in keys])
      lo, hi = (np.array([100 * m[k][j] for k in keys]) for j in (1, 2))
      ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3, label=name)
  left.set(xlabel="k", ylabel="single-turn pass@k (%)", xscale="log")
  left.set_xticks([int(k[5:]) for k in next(iter(results.values()))["metrics"]
                   if k.startswith("pass@")])
  left.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
  right.set(xlabel="turn", ylabel="accuracy by turn (%)")
  for ax in (left, right):
    ax.grid(alpha=0.3)
  right.legend(fontsize=7)
  fig.tight_layout()
  with (workdir / "summary.png").open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  from jaxscore.infra import files

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
