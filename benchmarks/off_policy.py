"""Sampling overlapped with training: the online loop on-policy against one step
off-policy (`rollout.off_policy_steps=1`), colocated (the next step sampled on the same
devices while the update runs) and disaggregated (`mesh.sampler_devices=1`: one device
samples, the other trains), side by side in one run on 2 fake CPU devices.

  python benchmarks/off_policy.py [--steps 8] [--out benchmarks/results]

The `cpu` config (the embedded SmolLM2-135M on held-out 1-digit additions) with GRPO, the
objective whose ratio to the behaviour log-probs corrects for stale samples: the same
seed, problems and steps both ways. Per run: seconds per step after the first (which
compiles), episodes/s and sampled tokens/s, the time each step waits for its rollouts
(on-policy: the whole rollout; off-policy: what the update did not hide), and the
training reward of the last half of the steps with a 95% bootstrap interval over its
episodes, and the difference between the two runs. Writes `off_policy.md` and
`off_policy.json` under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

# Two devices for every run (before JAX starts): on-policy and colocated use both for
# sampling and training, disaggregated one for each.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_util import write_results  # noqa: E402

from configs import score as score_config  # noqa: E402
from jaxscore import evaluate  # noqa: E402
from jaxscore.loops import online  # noqa: E402
from jaxscore.sampling import rollout as rollout_lib  # noqa: E402

# Name: (rollout.off_policy_steps, mesh.sampler_devices).
RUNS = {"on_policy": (0, 0), "colocated": (1, 0), "disaggregated": (1, 1)}
NAMES = {"on_policy": "on-policy (sample, then update)",
         "colocated": "one step off-policy, colocated",
         "disaggregated": "one step off-policy, disaggregated (1 + 1 devices)"}


def run(c, setup, params, workdir: pathlib.Path) -> dict:
  online.train(c, setup, params, params, workdir)
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  timed = records[1:]  # The first step compiles.
  seconds = sum(r["time/step_s"] for r in timed)
  return {"step_s": seconds / len(timed),
          "episodes_per_s": sum(r["budget/episodes"] for r in timed) / seconds,
          "tokens_per_s": sum(r["budget/tokens"] for r in timed) / seconds,
          "rollout_wait_s": float(np.mean([r["time/rollout_s"] for r in timed])),
          "rewards": [r["reward"] for r in records],
          "transcripts": str(workdir / "transcripts.jsonl")}


def last_half_rewards(workdir: pathlib.Path, steps: int) -> np.ndarray:
  """Per-episode rewards of the last half of the steps, from the loop's transcripts."""
  rows = [json.loads(l) for l in (workdir / "transcripts.jsonl").read_text().splitlines()]
  return np.array([sum(r["rewards"]) for r in rows if r["step"] > steps - steps // 2])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = parser.parse_args()
  c = score_config.get_config("cpu")
  c.objective = "grpo"
  c.grpo.num_steps = args.steps
  c.rollout.feedback = "instruction"
  c.checkpoint.every_steps = 10**6  # Saved at the end only: not part of the timing.
  c.log.transcripts_every, c.log.num_transcripts = 1, 10**6  # Every episode's reward.
  setup, _, params = rollout_lib.from_config(c)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, (steps_ahead, sampler_devices) in RUNS.items():
      c.rollout.off_policy_steps, c.mesh.sampler_devices = steps_ahead, sampler_devices
      workdir = pathlib.Path(tmp) / name
      results[name] = run(c, setup, params, workdir)
      results[name]["last_half"] = last_half_rewards(workdir, args.steps).tolist()
  sync = np.asarray(results["on_policy"]["last_half"])
  ci, diff = {}, {}
  for name, r in results.items():
    x = np.asarray(r["last_half"])
    ci[name] = evaluate.paired_bootstrap(x, np.zeros(len(x)))
    if name != "on_policy":  # The same problems in the same rows, step by step.
      diff[name] = evaluate.paired_bootstrap(x, sync)
  payload = dict(cpus=os.cpu_count(), devices=jax.device_count(), steps=args.steps,
                 rows=c.rollout.prompts_per_step * c.rollout.group_size,
                 runs={k: {kk: v for kk, v in r.items() if kk != "transcripts"}
                       for k, r in results.items()},
                 reward_last_half=ci, reward_difference=diff)
  write_results(pathlib.Path(args.out), "off_policy", payload, report(payload))


def report(p: dict) -> list[str]:
  runs, ci, diff = p["runs"], p["reward_last_half"], p["reward_difference"]
  lines = [
      "# Sampling overlapped with training (generated by benchmarks/off_policy.py)", "",
      f"The `cpu` config with GRPO: the embedded SmolLM2-135M, {p['rows']} episodes per "
      f"step, {p['steps']} steps each way, on {p['devices']} fake CPU devices that share "
      f"this machine's {p['cpus']} cores, all runs in one process. Timing: steps 2 onward "
      "(the first compiles). Reward: per episode, the sum of its two attempts' 0/1 "
      "rewards, averaged over the episodes of the last half of the steps, 95% bootstrap "
      "intervals over those episodes; each off-policy run minus on-policy is paired over "
      "the same rows (the same problems). Waiting for rollouts: the time a step spends "
      "getting its batch (on-policy, the whole rollout; off-policy, the batch was sampled "
      "during the previous update).", "",
      "| run | s/step | episodes/s | tokens/s | waiting for rollouts, s/step | reward | "
      "minus on-policy |", "|---|---|---|---|---|---|---|"]
  for name, r in runs.items():
    mean, lo, hi = ci[name]
    d = diff.get(name)
    lines.append(f"| {NAMES[name]} | {r['step_s']:.1f} | {r['episodes_per_s']:.2f} | "
                 f"{r['tokens_per_s']:.0f} | {r['rollout_wait_s']:.1f} | "
                 f"{mean:.3f} [{lo:.3f}, {hi:.3f}] | "
                 + (f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "-") + " |")
  base = runs["on_policy"]["episodes_per_s"]
  lines += ["", "Episodes/s against on-policy: " + ", ".join(
      f"{name} {r['episodes_per_s'] / base:.2f}x" for name, r in runs.items()
      if name != "on_policy") + ". Reward differences whose interval holds 0 are within "
      "noise."]
  return lines


if __name__ == "__main__":
  main()
