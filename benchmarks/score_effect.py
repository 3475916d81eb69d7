"""Does SCoRe make the second attempt fix the first? SCoRe against its ablations on a task
where the embedded model has room to self-correct, with intervals.

  python benchmarks/score_effect.py [--workdir runs/score_effect]
      [--config configs/study.py:score_effect] [--out benchmarks/results]
      [--config.KEY=VALUE ...]

Runs the study `configs/study.py:score_effect` (resumable: rerun the command and the
arms already finished are kept): the base model, SCoRe (Stage I + II), SCoRe with
alpha = 0, Stage II only (multi-turn RL without Stage I) and single-turn RL, every arm
trained on the same problems with the same number of sampled episodes and evaluated by
the intrinsic protocol (SCoRe's instruction after each attempt, correctness never
revealed). Writes `score_effect.md`, `.json` and `.png`: Acc@t1, Acc@t2, Delta, the two
flips and the edit-distance ratio with 95% intervals over problems; each arm's Delta
minus SCoRe's, paired over the same problems; and per training step what SCoRe watches
for collapse (the edit-distance ratio between attempts, Delta on the training batch and
attempt 1's KL to the reference).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
INTRINSIC = ("intrinsic/acc@t1", "intrinsic/acc@t2", "intrinsic/delta",
             "intrinsic/delta_i->c", "intrinsic/delta_c->i")
CURVES = (("self_correction/edit_distance_ratio", "edit-distance ratio, attempt 1 vs 2"),
          ("self_correction/delta", "Delta(t1, t2) on the training batch"),
          ("kl/t1", "KL of attempt 1 to the reference"))


def run_study(config: str, workdir: pathlib.Path, overrides: list[str]) -> None:
  cmd = [sys.executable, "-m", "jaxscore.study", f"--config={config}",
         f"--workdir={workdir}", *overrides]
  print(" ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def load(workdir: pathlib.Path) -> dict:
  """Each finished arm's result and its training curves (metrics.jsonl), in the study's
  order, and the names of the arms not finished yet."""
  config = json.loads((workdir / "config.json").read_text())
  out, missing = {}, []
  for name in [n.strip() for n in config["study"]["arms"].split(",") if n.strip()]:
    if not (workdir / "arms" / name / "result.json").exists():
      missing.append(name)
      continue
    arm = json.loads((workdir / "arms" / name / "result.json").read_text())
    log = workdir / "arms" / name / "train" / "metrics.jsonl"
    arm["curves"] = ([json.loads(line) for line in log.read_text().splitlines() if line]
                     if log.exists() else [])
    out[name] = arm
  return {"config": config, "arms": out, "missing": missing}


SAMPLED = ("acc@t1", "acc@t2", "delta", "delta_i->c", "delta_c->i")


def sampled_intrinsic(workdir: pathlib.Path, samples: int, seed: int = 0) -> dict:
  """The intrinsic protocol sampled at the training temperature: `samples` episodes per
  test problem from each finished arm's latest parameters, SCoRe's instruction after
  the first attempt. Greedy decoding shows what the model does most often; sampling
  shows whether a second look repairs the first attempts the model does make, which is
  where a greedy first attempt near 100% leaves nothing to measure. Per arm, each
  metric per problem (the mean over its samples), saved as
  arms/<name>/intrinsic_sampled.json (an arm already evaluated is read back)."""
  import jax
  import ml_collections

  from jaxscore import study
  from jaxscore.loops import common
  from jaxscore.sampling import rollout, sampler

  c = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  names = [n for n in load(workdir)["arms"]]
  todo = [n for n in names if not (workdir / "arms" / n / "intrinsic_sampled.json").exists()]
  if todo:
    setup, eval_setup, base = rollout.from_config(c)
    problems = eval_setup.task.problems(c.task.eval_split)
    if c.evaluate.num_problems:
      problems = problems[:c.evaluate.num_problems]
    rows = [p for p in problems for _ in range(samples)]
    smp = rollout.make_sampler(eval_setup, rollout.prompt_lens(eval_setup, problems), 2,
                               c.sampler.max_new_tokens)
  for name in todo:
    ac = study.arm_config(c, name)
    params, step = common.restore_params(ac, workdir / "arms" / name / "train", setup.cfg,
                                         base, "latest")
    sampling = sampler.SamplingConfig(temperature=c.sampler.temperature,
                                      max_new_tokens=c.sampler.max_new_tokens)
    ro = rollout.rollout(params, smp, eval_setup, rows, 2, sampling, jax.random.key(seed),
                         feedback=rollout.Feedback("instruction"), group_size=samples)
    r = np.asarray(ro.rewards_BxN, float).reshape(len(problems), samples, 2)
    t1, t2 = r[..., 0], r[..., 1]
    per_problem = {"acc@t1": t1.mean(1), "acc@t2": t2.mean(1), "delta": (t2 - t1).mean(1),
                   "delta_i->c": ((t1 == 0) & (t2 == 1)).mean(1),
                   "delta_c->i": ((t1 == 1) & (t2 == 0)).mean(1)}
    out = {"samples": samples, "temperature": c.sampler.temperature, "step": step,
           "num_problems": len(problems),
           "per_problem": {k: v.tolist() for k, v in per_problem.items()}}
    (workdir / "arms" / name / "intrinsic_sampled.json").write_text(json.dumps(out))
    print(f"[{name}] sampled intrinsic: " + ", ".join(
        f"{k}={float(np.mean(v)):.3f}" for k, v in per_problem.items()), flush=True)
  return {n: json.loads((workdir / "arms" / n / "intrinsic_sampled.json").read_text())
          for n in names}


def sampled_report(sampled: dict, refs: list[str], seed: int = 0) -> list[str]:
  """The sampled protocol's table, with each arm's Delta minus each of `refs`' Deltas,
  paired over the same problems."""
  first = next(iter(sampled.values()))
  refs = [r for r in refs if r in sampled]
  lines = ["", f"The same protocol sampled at temperature {first['temperature']} "
           f"({first['samples']} episodes per problem, each problem's mean; intervals over "
           f"the {first['num_problems']} problems):", "",
           "| arm | Acc@t1 | Acc@t2 | Delta(t1,t2) | Delta i->c | Delta c->i | "
           + " | ".join(f"Delta minus {r}'s (paired)" for r in refs) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(refs)]
  for name, s in sampled.items():
    pp = {k: np.asarray(v) for k, v in s["per_problem"].items()}
    cells = [_cell(paired(pp[k], np.zeros_like(pp[k]), seed), signed="delta" in k)
             for k in SAMPLED]
    diffs = ["-" if name == r else _cell(
        paired(pp["delta"], np.asarray(sampled[r]["per_problem"]["delta"]), seed), True)
             for r in refs]
    lines.append(f"| {name} | " + " | ".join(cells + diffs) + " |")
  return lines


def paired(a, b, seed: int = 0) -> tuple[float, float, float]:
  from jaxscore import evaluate

  return tuple(float(x) for x in evaluate.paired_bootstrap(np.asarray(a), np.asarray(b),
                                                            seed=seed))


def _cell(v, signed: bool = False) -> str:
  f = "{:+.1f}" if signed else "{:.1f}"
  mean, lo, hi = (100 * x for x in v)
  return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def verdict(delta: tuple[float, float, float], n: int, who: str = "SCoRe") -> str:
  mean, lo, hi = delta
  if lo > 0:
    return (f"{who}'s second attempt improves on its first: Delta(t1,t2) = "
            f"{100 * mean:+.1f} points, 95% interval [{100 * lo:+.1f}, {100 * hi:+.1f}] over "
            f"{n} problems, which excludes zero.")
  if hi < 0:
    return (f"{who}'s second attempt is worse than its first: Delta(t1,t2) = "
            f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] over {n} problems.")
  return (f"{who}'s Delta(t1,t2) = {100 * mean:+.1f} points, 95% interval "
          f"[{100 * lo:+.1f}, {100 * hi:+.1f}] over {n} problems: it includes zero, so this "
          "run does not show the second attempt fixing the first (within noise).")


def _is_tuned_score(name: str, spec: str, ref: str) -> bool:
  """A SCoRe arm with both stages, other than the reference (a tuning of it)."""
  return name != ref and "objective=score" in spec and "stages=I:" in spec \
      and "alpha=0" not in spec


def report(data: dict, sampled: dict | None = None) -> tuple[str, dict]:
  arms, c = data["arms"], data["config"]
  first = next(iter(arms.values()))
  n = first["num_problems"]
  ref = c["study"]["reference_arm"]
  # Results written before arms named their objective name their method.
  summary = {name: {"objective": a.get("objective", a.get("method")), "spec": a["spec"],
                    "budget": a["budget"],
                    "seconds": a["seconds"], "edit_distance_ratio": a["edit_distance_ratio"],
                    **{k: a["metrics"][k] for k in INTRINSIC}}
             for name, a in arms.items()}
  diffs = {name: {k: paired(a["per_problem"][k], arms[ref]["per_problem"][k], c["seed"])
                  for k in ("intrinsic/acc@t2", "intrinsic/delta")}
           for name, a in arms.items() if name != ref and ref in arms}
  lines = _greedy_lines(summary, diffs, c, n)
  if ref in summary:
    lines += ["", verdict(summary[ref]["intrinsic/delta"], n)]
  for name, s in summary.items():
    if _is_tuned_score(name, s["spec"], ref):
      stages = s["spec"].split("score.stages=")[1].split(";")[0]
      lines += ["", f"Tuned within SCoRe's recipe ({name}: stages {stages}, all else "
                f"equal): " + verdict(s["intrinsic/delta"], n, who=name)]
  if sampled:
    tuned = [name for name, s in summary.items() if _is_tuned_score(name, s["spec"], ref)]
    lines += sampled_report(sampled, [ref, *tuned], c["seed"])
    for name, a in sampled.items():
      if _is_tuned_score(name, arms[name]["spec"], ""):  # Every SCoRe arm with Stage I.
        delta = paired(np.asarray(a["per_problem"]["delta"]), np.zeros(a["num_problems"]),
                       c["seed"])
        lines += ["", f"Sampled, {name}: " + verdict(delta, a["num_problems"], who=name)]
  if data["missing"]:
    lines += ["", "Not finished yet (rerun the command to resume): "
              + ", ".join(data["missing"]) + "."]
  lines += _curve_lines(arms)
  return "\n".join(lines) + "\n", {"summary": summary, "differences_to_" + ref: diffs,
                                   "sampled_intrinsic": sampled or {},
                                   "curves": {name: a["curves"] for name, a in arms.items()}}


def _greedy_lines(summary: dict, diffs: dict, c: dict, n: int) -> list[str]:
  """The greedy intrinsic protocol's table and each arm's paired difference."""
  task, ref = c["task"], c["study"]["reference_arm"]
  lines = [
      "# SCoRe's effect on the embedded model (generated by benchmarks/score_effect.py)", "",
      f"Task: `{task['name']}` {task['kwargs']}, {n} test problems. Model: "
      f"{c['model']['name']}. Every trained arm sampled {c['study']['episodes']} training "
      f"episodes ({c['rollout']['prompts_per_step']} prompts x {c['rollout']['group_size']} "
      f"samples per step, lr {c['optim']['learning_rate']}, alpha {c['score']['alpha']}, "
      f"beta1 {c['score']['beta1']}, beta2 {c['score']['beta2']}). Intrinsic protocol: "
      "greedy, SCoRe's instruction after the first attempt, correctness never revealed. "
      "% with 95% bootstrap intervals over problems; the edit-distance ratio is between the "
      "two attempts' tokens (0: the second repeats the first).", "",
      "| arm | episodes | Acc@t1 | Acc@t2 | Delta(t1,t2) | Delta i->c | Delta c->i | "
      "edit ratio | train min |", "|---|---|---|---|---|---|---|---|---|"]
  for name, s in summary.items():
    lines.append(
        f"| {name} | {s['budget']['episodes']} | " +
        " | ".join(_cell(s[k], signed="delta" in k) for k in INTRINSIC) +
        f" | {s['edit_distance_ratio'] or 0:.3f} | {s['seconds']['train'] / 60:.1f} |")
  if diffs:
    lines += ["", f"Each arm minus {ref}, paired over the same problems (points, 95%):", "",
              "| arm | Acc@t2 | Delta(t1,t2) |", "|---|---|---|"]
    for name, d in diffs.items():
      lines.append(f"| {name} | {_cell(d['intrinsic/acc@t2'], True)} | "
                   f"{_cell(d['intrinsic/delta'], True)} |")
  return lines


def _curve_lines(arms: dict) -> list[str]:
  lines = ["", "Training curves (score_effect.png), mean per stage and over the last "
           "6 steps:", "", "| arm | " + " | ".join(SHORT.values()) + " |",
           "|---|" + "---|" * len(SHORT)]
  for name, a in arms.items():
    if a["curves"]:
      lines.append(f"| {name} | " + " | ".join(_phases(a["curves"], key) for key in SHORT)
                   + " |")
  return lines


SHORT = {"self_correction/edit_distance_ratio": "edit ratio", "self_correction/delta":
         "train Delta", "kl/t1": "KL attempt 1"}


def _phases(records: list[dict], key: str) -> str:
  """Mean of `key` per stage (in order) and over the last 6 steps."""
  rows = [r for r in records if key in r]
  if not rows:
    return "-"
  stages = list(dict.fromkeys(r.get("phase", "all") for r in rows))
  parts = [f"{stage}: {np.mean([r[key] for r in rows if r.get('phase', 'all') == stage]):.3f}"
           for stage in stages]
  return ", ".join(parts + [f"last 6: {np.mean([r[key] for r in rows[-6:]]):.3f}"])


def plot(arms: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.8))
  colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
  for name, a in arms.items():
    for ax, (key, _) in zip(axes, CURVES):
      points = [(r["step"], r[key]) for r in a["curves"] if key in r and "step" in r]
      if points:  # One color per arm in every panel, whichever curves it has.
        ax.plot(*zip(*points), marker=".", label=name, color=colors[name])
  for ax, (_, label) in zip(axes, CURVES):
    ax.set(xlabel="training step", title=label)
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize=8)  # The last panel has every trained arm.
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/study.py:score_effect")
  parser.add_argument("--workdir", default=str(ROOT / "runs" / "score_effect"))
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--report_only", action="store_true",
                      help="write the report from the arms finished so far; train nothing")
  parser.add_argument("--sampled_samples", type=int, default=4,
                      help="episodes per test problem of the sampled intrinsic protocol "
                           "(0: greedy only)")
  args, overrides = parser.parse_known_args()
  workdir, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
  if not args.report_only:
    run_study(args.config, workdir, overrides)
  data = load(workdir)
  sampled = sampled_intrinsic(workdir, args.sampled_samples) if args.sampled_samples else None
  text, payload = report(data, sampled)
  out.mkdir(parents=True, exist_ok=True)
  (out / "score_effect.md").write_text(text)
  (out / "score_effect.json").write_text(json.dumps(payload, indent=1))
  plot(data["arms"], out / "score_effect.png")
  print(text)


if __name__ == "__main__":
  main()
