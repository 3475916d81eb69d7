"""Rollouts with feedback that stops rows: the batch whole against the batch in parts that
take turns on the device, so one part is scored while the other samples.

  python benchmarks/score_overlap.py [--data ../shared/data] [--out benchmarks/results]

Embedded SmolLM2-135M, float32, unary feedback ("Your answer is incorrect. Please try
again.") after each wrong attempt, greedy so that every setting samples the same tokens
(the split does not change greedy results). Two tasks at the two ends
of scoring cost, measured side by side in one run, the settings alternating in rounds:
  * MBPP (../shared/data/mbpp): every attempt's program runs against the tests in the
    bubblewrap sandbox (slow scoring);
  * arithmetic: answers checked in process (scoring costs almost nothing, so splitting
    only costs the smaller batch).
Writes `score_overlap.md` and `score_overlap.json` under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax

from jaxscore import tasks
from jaxscore.loops import online
from jaxscore.models import pretrained
from jaxscore.sampling import formats
from jaxscore.sampling import rollout as rollout_lib
from jaxscore.sampling import sampler as sampler_lib

from bench_util import TimedTask  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parents[1]


def measure(model, task, split: str, args) -> dict:
  """Episodes/s and scoring seconds per setting of `score_overlap_splits`."""
  timed = TimedTask(task)
  setup = rollout_lib.Setup(model.cfg, model.tokenizer,
                            formats.make_format(model.tokenizer, "chat"), timed)
  # Prompts up to --max_prompt tokens (a few MBPP prompts are far longer than the rest
  # and would size every buffer).
  problems = [p for p, n in zip(timed.problems(split),
                                rollout_lib.prompt_lens(setup, timed.problems(split)))
              if n <= args.max_prompt]
  feedback = rollout_lib.Feedback("unary")
  smp = rollout_lib.make_sampler(setup, rollout_lib.prompt_lens(setup, problems), args.turns,
                                 args.new_tokens,
                                 message_len=rollout_lib.instruction_len(setup, feedback))
  sampling = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens)
  params = jax.device_put(model.params)
  splits = [int(s) for s in args.splits.split(",")]
  totals = {s: dict(seconds=0.0, scoring=0.0, episodes=0, turns=0.0) for s in splits}
  for i in range(args.rounds + 1):  # Round 0 compiles.
    # Greedy: rounds differ by their problems.
    rows = [p for p in online.batch_problems(problems, i, args.prompts, 0)
            for _ in range(args.group)]
    for s in splits:
      timed.seconds = 0.0
      t0 = time.perf_counter()
      ro = rollout_lib.rollout(params, smp, setup, rows, args.turns, sampling,
                               jax.random.key(i), feedback=feedback, score_overlap_splits=s)
      jax.block_until_ready(ro.episode)
      if i:
        t = totals[s]
        t["seconds"] += time.perf_counter() - t0
        t["scoring"] += timed.seconds
        t["episodes"] += len(rows)
        t["turns"] += float(ro.turns_BxN.sum())
  return {s: dict(episodes_per_s=t["episodes"] / t["seconds"],
                  turns_per_episode=t["turns"] / t["episodes"],
                  scoring_share=t["scoring"] / t["seconds"], seconds=t["seconds"])
          for s, t in totals.items()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--group", type=int, default=2)
  parser.add_argument("--turns", type=int, default=3)
  parser.add_argument("--new_tokens", type=int, default=96)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--splits", default="1,2")
  parser.add_argument("--max_prompt", type=int, default=192)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = parser.parse_args()

  model = pretrained.load("smollm2-135m-instruct")
  mbpp = tasks.make_task("mbpp", sources={"test": str(pathlib.Path(args.data) / "mbpp" /
                                                      "mbpp.jsonl")})
  arithmetic = tasks.make_task("arithmetic", level="add1")
  results = {"mbpp (sandboxed tests)": measure(model, mbpp, "test", args),
             "arithmetic (in process)": measure(model, arithmetic, "train", args)}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = dict(device=str(jax.devices()[0]), cpus=os.cpu_count(), jax=jax.__version__,
              batch=args.prompts * args.group, turns=args.turns, new_tokens=args.new_tokens,
              rounds=args.rounds)
  (out / "score_overlap.json").write_text(json.dumps(
      {"meta": meta, "results": {k: {str(s): r for s, r in v.items()}
                                 for k, v in results.items()}}, indent=2))
  lines = ["# Scoring overlapped with sampling (generated by benchmarks/score_overlap.py)", "",
           f"Embedded SmolLM2-135M, float32, {meta['device']}, {meta['cpus']} CPUs, jax "
           f"{meta['jax']}. Batch {meta['batch']} episodes ({args.prompts} prompts x "
           f"{args.group}), up to {args.turns} turns of up to {args.new_tokens} tokens, unary "
           "feedback after wrong attempts, greedy (identical tokens in every setting). The settings alternate within each "
           f"of {args.rounds} timed rounds (after a compiling one), on the same problems and "
           "seeds. `splits` = `rollout.score_overlap_splits`: the batch cut in that many parts "
           "that take turns on the device, one part scored while the others sample.", "",
           "| task | splits | episodes/s | vs whole batch | turns per episode | "
           "time scoring (share of rollout) |", "|---|---|---|---|---|---|"]
  for task_name, per_split in results.items():
    base = per_split[min(per_split)]["episodes_per_s"]
    for s, r in per_split.items():
      lines.append(f"| {task_name} | {s} | {r['episodes_per_s']:.2f} | "
                   f"{r['episodes_per_s'] / base:.2f}x | {r['turns_per_episode']:.2f} | "
                   f"{100 * r['scoring_share']:.0f}% |")
  (out / "score_overlap.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
