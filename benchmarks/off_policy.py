"""Sampling overlapped with training: the online loop on-policy against one step
off-policy (`rollout.off_policy_steps=1`), colocated (the next step sampled on the same
devices while the update runs) and disaggregated (`mesh.sampler_devices=N`: the last N
devices sample, the others train), side by side in one run.

  python benchmarks/off_policy.py [--steps 6] [--out benchmarks/results]

Two groups of runs, each in a process of its own with that many fake CPU devices (all
sharing this machine's cores): on 2 devices, on-policy, colocated and 1 + 1; on 4,
on-policy and 1 + 3 (16 rows sample as 18 over the sampler's three devices, the two
extra dropped). The `cpu` config (the embedded SmolLM2-135M on held-out 1-digit
additions) with GRPO, the objective whose ratio to the behaviour log-probs corrects for
stale samples: the same seed, problems and steps every way. Per run: seconds per step
after the first (which compiles), episodes/s and sampled tokens/s, the time each step
waits for its rollouts, the share of the step during which the update and the sampling
are in flight on their devices and the share during which neither is (each group of
devices' idle time, an upper bound: it also holds the reference log-probs and host
work), and the training reward of the last half of the steps with a 95% bootstrap
interval, and its difference from the group's on-policy run. Writes `off_policy.md`
and `off_policy.json` under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Name: (devices, rollout.off_policy_steps, mesh.sampler_devices).
RUNS = {"on_policy": (2, 0, 0), "colocated": (2, 1, 0), "disaggregated": (2, 1, 1),
        "on_policy_4": (4, 0, 0), "disaggregated_1_3": (4, 1, 3)}
NAMES = {"on_policy": "on-policy (sample, then update), 2 devices",
         "colocated": "one step off-policy, colocated, 2 devices",
         "disaggregated": "one step off-policy, disaggregated, 1 + 1 devices",
         "on_policy_4": "on-policy, 4 devices",
         "disaggregated_1_3": "one step off-policy, disaggregated, 1 + 3 devices"}
BASELINE = {2: "on_policy", 4: "on_policy_4"}


def busy_shares(records: list[dict], sampler_devices: int) -> dict:
  """Shares of the step time with the update in flight, with sampling in flight, and
  each device group's idle share (neither of its phases in flight)."""
  step = sum(r["time/step_s"] for r in records)
  update, sampling, union = 0.0, 0.0, 0.0
  for r in records:
    spans = [(0.0, r["time/rollout_s"]),
             (r["time/update_start_s"], r["time/update_start_s"] + r["time/update_s"])]
    if "time/sample_ahead_s" in r:
      start = r["time/sample_ahead_start_s"]
      spans.append((start, start + r["time/sample_ahead_s"]))
    update += r["time/update_s"]
    sampling += r["time/rollout_s"] + r.get("time/sample_ahead_s", 0.0)
    union += _union_length(spans)
  shares = {"update_in_flight": update / step, "sampling_in_flight": sampling / step}
  if sampler_devices:  # Each group idles while its own phase is not in flight.
    shares |= {"trainer_idle": 1 - update / step, "sampler_idle": 1 - sampling / step}
  else:
    shares |= {"trainer_idle": 1 - union / step, "sampler_idle": 1 - union / step}
  return shares


def _union_length(spans: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for lo, hi in sorted(spans):
    if hi > end:
      total += hi - max(lo, end)
      end = hi
  return total


def run_group(devices: int, steps: int, out: pathlib.Path, only: list[str]) -> None:
  """This process's runs (it has `devices` fake devices): metrics per run to `out`."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import score as score_config  # pylint: disable=g-import-not-at-top
  from jaxscore.loops import online  # pylint: disable=g-import-not-at-top
  from jaxscore.sampling import rollout as rollout_lib  # pylint: disable=g-import-not-at-top

  c = score_config.get_config("cpu")
  c.objective = "grpo"
  c.grpo.num_steps = steps
  c.rollout.feedback = "instruction"
  c.checkpoint.every_steps = 10**6  # Saved at the end only: not part of the timing.
  c.log.transcripts_every, c.log.num_transcripts = 1, 10**6  # Every episode's reward.
  setup, _, params = rollout_lib.from_config(c)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, (group, steps_ahead, sampler_devices) in RUNS.items():
      if group != devices or name not in only:
        continue
      c.rollout.off_policy_steps, c.mesh.sampler_devices = steps_ahead, sampler_devices
      workdir = pathlib.Path(tmp) / name
      online.train(c, setup, params, params, workdir)
      records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
      timed = records[1:]  # The first step compiles.
      seconds = sum(r["time/step_s"] for r in timed)
      episodes = [json.loads(l) for l in (workdir / "transcripts.jsonl").read_text().splitlines()]
      results[name] = {
          "step_s": seconds / len(timed),
          "episodes_per_s": sum(r["budget/episodes"] for r in timed) / seconds,
          "tokens_per_s": sum(r["budget/tokens"] for r in timed) / seconds,
          "rollout_wait_s": float(np.mean([r["time/rollout_s"] for r in timed])),
          **busy_shares(timed, sampler_devices),
          "rewards": [r["reward"] for r in records],
          "last_half": [sum(e["rewards"]) for e in episodes
                        if e["step"] > steps - steps // 2]}
      print(name, json.dumps({k: v for k, v in results[name].items() if k != "last_half"}),
            flush=True)
  out.write_text(json.dumps({"rows": c.rollout.prompts_per_step * c.rollout.group_size,
                             "runs": results}))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--only", default=",".join(RUNS),
                      help="runs to make; the others are kept from --out's off_policy.json")
  parser.add_argument("--group", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--group_out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.group:
    return run_group(args.group, args.steps, pathlib.Path(args.group_out),
                     args.only.split(","))
  import numpy as np  # pylint: disable=g-import-not-at-top

  from jaxscore import evaluate  # pylint: disable=g-import-not-at-top

  only = args.only.split(",")
  unknown = set(only) - set(RUNS)
  if unknown:
    parser.error(f"--only: unknown runs {sorted(unknown)}; expected some of {list(RUNS)}")
  previous = pathlib.Path(args.out) / "off_policy.json"
  kept = json.loads(previous.read_text()) if set(only) != set(RUNS) else {}
  runs, rows = dict(kept.get("runs", {})), kept.get("rows", 0)
  with tempfile.TemporaryDirectory() as tmp:
    for devices in sorted({RUNS[name][0] for name in only}):
      out = pathlib.Path(tmp) / f"{devices}.json"
      env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
      subprocess.run([sys.executable, __file__, f"--steps={args.steps}", f"--only={args.only}",
                      f"--group={devices}", f"--group_out={out}"], env=env, check=True)
      group = json.loads(out.read_text())
      runs |= group["runs"]
      rows = group["rows"]
  runs = {name: runs[name] for name in RUNS if name in runs}
  ci, diff = {}, {}
  for name, r in runs.items():
    x = np.asarray(r["last_half"])
    ci[name] = evaluate.paired_bootstrap(x, np.zeros(len(x)))
    base = BASELINE[RUNS[name][0]]
    if name != base:  # The same problems in the same rows, step by step.
      diff[name] = evaluate.paired_bootstrap(x, np.asarray(runs[base]["last_half"]))
  rerun = sorted(set(kept.get("rerun", [])) | set(only)) if kept else []
  payload = dict(cpus=os.cpu_count(), steps=args.steps, rows=rows, runs=runs,
                 reward_last_half=ci, reward_difference=diff, rerun=rerun)
  from bench_util import write_results  # pylint: disable=g-import-not-at-top
  write_results(pathlib.Path(args.out), "off_policy", payload, report(payload))


def report(p: dict) -> list[str]:
  runs, ci, diff = p["runs"], p["reward_last_half"], p["reward_difference"]
  lines = [
      "# Sampling overlapped with training (generated by benchmarks/off_policy.py)", "",
      f"The `cpu` config with GRPO: the embedded SmolLM2-135M, {p['rows']} episodes per "
      f"step, {p['steps']} steps each way, on fake CPU devices that share this machine's "
      f"{p['cpus']} cores: the 2-device runs in one process, the 4-device runs in another. "
      "Timing: steps 2 onward (the first compiles). In flight: the share of step time "
      "from a phase's dispatch to its results (the update; the sampling, on-policy the "
      "step's rollout, off-policy the next step's). Idle: the share of step time a device "
      "group has neither of its phases in flight (an upper bound: it also holds the "
      "reference log-probs and the host's batching); colocated and on-policy runs share "
      "one group. Reward: per episode, the sum of its two attempts' 0/1 rewards, over the "
      "episodes of the last half of the steps, with 95% bootstrap intervals; each run "
      "minus its group's on-policy run is paired over the same rows.", "",
      "| run | s/step | episodes/s | tokens/s | waiting for rollouts, s/step "
      "| update in flight | sampling in flight | training devices idle "
      "| sampling devices idle | reward | minus on-policy |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in runs.items():
    mean, lo, hi = ci[name]
    d = diff.get(name)
    pct = lambda k: f"{100 * r[k]:.0f}%"
    lines.append(f"| {NAMES[name]} | {r['step_s']:.1f} | {r['episodes_per_s']:.2f} | "
                 f"{r['tokens_per_s']:.0f} | {r['rollout_wait_s']:.1f} | "
                 f"{pct('update_in_flight')} | {pct('sampling_in_flight')} | "
                 f"{pct('trainer_idle')} | {pct('sampler_idle')} | "
                 f"{mean:.3f} [{lo:.3f}, {hi:.3f}] | "
                 + (f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "-") + " |")
  lines += ["", "Episodes/s against the same devices' on-policy run: " + ", ".join(
      f"{name} {r['episodes_per_s'] / runs[BASELINE[RUNS[name][0]]]['episodes_per_s']:.2f}x"
      for name, r in runs.items() if name not in BASELINE.values())
      + ". Reward differences whose interval holds 0 are within noise."]
  if p.get("rerun"):
    lines += ["", f"Rerun on their own after the others (`--only`): {', '.join(p['rerun'])}."]
  return lines


if __name__ == "__main__":
  main()
