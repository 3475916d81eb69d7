"""Train-step and full RL-iteration throughput, on any backend.

  python benchmarks/train_step.py [--model embedded|gemma3-4b|qwen3-8b|...]
      [--prompts 4] [--group 4] [--new_tokens 32] [--remat none|full|dots]
      [--logits_chunk N]

The embedded SmolLM2-135M by default, or random weights in the shape of Qwen2.5-1.5B or
Llama-3-8B; float32 on CPU, bfloat16 weights and compute on a GPU or TPU, with the peak
measured in the same dtype. Results per backend: `train_step.md` on CPU,
`train_step_gpu.md` / `train_step_tpu.md` elsewhere.

Measures, in one run:
  * the matmul peak of this machine in the compute dtype (a 2-second chain of 2048^3
    matmuls, timed in every iteration beside the step; the median);
  * tokens/s of the SCoRe train step (forward + backward + Adam) on real episodes, and
    its achieved FLOP/s (6 * params * tokens + attention) as a fraction of that peak;
  * one full RL iteration (two-turn rollout, rewards, reference log-probs, advantages,
    update) with the share of time in each stage.
Writes `<stem>.md` and `<stem>.json` under --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_util import MODELS, TimedTask, load_model, results_stem, sustained_matmul, write_results  # pylint: disable=g-import-not-at-top

from configs import score as score_config  # pylint: disable=g-import-not-at-top
from jaxscore.loops import online
from jaxscore.loops import train as train_lib
from jaxscore.models import logprobs
from jaxscore.sampling import rollout as rollout_lib
from jaxscore.sampling import sampler as sampler_lib


def feedback_rollouts(setup, params, problems, args, turns: int) -> dict:
  """Episodes/s and the share of rollout time spent scoring, for feedback that stops
  rows at their first correct answer (unary) and for the instruction after every turn."""
  timed_task = TimedTask(setup.task)
  setup = rollout_lib.Setup(setup.cfg, setup.tokenizer, setup.fmt, timed_task)
  sampling = sampler_lib.SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens)
  lens = rollout_lib.prompt_lens(setup, problems)
  out = {"turns": turns, "kinds": {}}
  for kind in ("unary", "instruction"):
    fb = rollout_lib.Feedback(kind)
    smp = rollout_lib.make_sampler(setup, lens, turns, args.new_tokens,
                                   message_len=rollout_lib.instruction_len(setup, fb))
    seconds = scoring = taken = episodes = 0.0
    for i in range(args.steps + 1):  # The first iteration compiles.
      rows = [p for p in online.batch_problems(problems, i, args.prompts, 1)
              for _ in range(args.group)]
      timed_task.seconds = 0.0
      t0 = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(2) as pool:  # As the online loop does.
        ro = rollout_lib.rollout(params, smp, setup, rows, turns, sampling,
                                 jax.random.key(100 + i), score_pool=pool, feedback=fb)
      if i:
        seconds += time.perf_counter() - t0
        scoring += timed_task.seconds
        taken += float(ro.turns_BxN.sum())
        episodes += len(rows)
    out["kinds"][kind] = {"episodes_per_s": episodes / seconds,
                          "turns_per_episode": taken / episodes,
                          "scoring_share": scoring / seconds}
  return out


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="embedded", choices=MODELS,
                      help="the embedded model, or random weights of Qwen2.5-1.5B / "
                           "Llama-3-8B shape")
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--group", type=int, default=4)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--pad_multiple", type=int, default=0,
                      help="Train-batch width rounding (0: the longest possible episode).")
  parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
  parser.add_argument("--logits_chunk", type=int, default=0)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  return parser.parse_args()


def make_setup(args):
  """(config, setup, params): the cpu SCoRe config (Stage II) with the --model's weights
  and precision for this backend."""
  c = score_config.get_config("cpu")
  c.rollout.prompts_per_step, c.rollout.group_size = args.prompts, args.group
  c.sampler.max_new_tokens = args.new_tokens
  c.score.stages = "II:1"  # Stage II: every attempt rewarded, the progress bonus.
  setup, _, _ = rollout_lib.from_config(c)
  cfg, params, _ = load_model(args.model, training=True)
  cfg = cfg.replace(remat=args.remat, logits_chunk=args.logits_chunk)
  return c, rollout_lib.Setup(cfg, setup.tokenizer, setup.fmt, setup.task), params


def rl_iterations(c, setup, params, args):
  """Timed RL iterations (after one that compiles): (mean seconds and tokens per stage,
  the last train batch, the final state, the last trajectories)."""
  cfg, ref_params = setup.cfg, params
  objective = online.make_objective(c, setup)
  opt = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-6))
  step_fn = jax.jit(train_lib.make_train_step(objective.loss_fn, opt), donate_argnums=(0,))
  ref_fn = jax.jit(lambda p, t, m: logprobs.token_logprobs(p, t, m, cfg)[0])
  state = train_lib.TrainState.create(jax.tree.map(jnp.copy, params), opt)
  problems = setup.task.problems("train")
  lens = rollout_lib.prompt_lens(setup, problems)
  smp = rollout_lib.make_sampler(setup, lens, 2, args.new_tokens)
  max_len = rollout_lib.episode_len_bound(lens, 2, args.new_tokens,
                                          rollout_lib.instruction_len(setup))
  sampling = sampler_lib.SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens)
  peak_fn, peak_flops = sustained_matmul(dtype=jnp.dtype(cfg.dtype))
  iterations = []
  for i in range(args.steps + 1):  # The first iteration compiles.
    t0 = time.perf_counter()
    peak_fn()  # The peak, timed in every iteration beside the step.
    peak = peak_flops / (time.perf_counter() - t0)
    rows = [p for p in online.batch_problems(problems, i, args.prompts, 0)
            for _ in range(args.group)]
    t0 = time.perf_counter()
    ro = rollout_lib.rollout(state.params, smp, setup, rows, 2, sampling, jax.random.key(i))
    t1 = time.perf_counter()
    # Scoring ran inside the rollout; time it again on the same texts to split it out.
    for texts in ro.texts:
      setup.task.score(ro.problems, texts)
    score_s = time.perf_counter() - t1
    t1 -= score_s
    t2 = time.perf_counter()
    width = online.batch_width(ro.episode, max_len, args.pad_multiple)
    traj = online.trajectories(ro, width, ref_fn, ref_params)
    batch, _ = objective.make_batch(traj, 0)
    jax.block_until_ready(batch)
    t3 = time.perf_counter()
    state, m = step_fn(state, batch, jax.random.key(i), ref_params)
    jax.block_until_ready(m)
    t4 = time.perf_counter()
    iterations.append(dict(rollout=t1 - t0, rewards=score_s, reference_and_advantages=t3 - t2,
                           update=t4 - t3, tokens=int(batch.tokens_BxT.size),
                           total=t4 - t0 - score_s, peak=peak))
  mean = {k: float(np.mean([it[k] for it in iterations[1:]])) for k in iterations[0]}
  mean["peak"] = float(np.median([it["peak"] for it in iterations[1:]]))
  return mean, batch, state, traj


def back_to_back(c, setup, params, traj, args) -> dict:
  """The train step alone, back to back on the last iteration's trajectories, for the
  iteration's objective (SCoRe) and for the plain policy-gradient one: seconds per step
  and the matmul peak timed beside each (means and medians after a compiling run). Set
  against the step inside the iteration, it says whether the objective or the iteration
  around the step accounts for the gap."""
  out = {}
  peak_fn, peak_flops = sustained_matmul(dtype=jnp.dtype(setup.cfg.dtype))
  for name in ("score", "pg"):
    cn = ml_collections.ConfigDict(c.to_dict())
    cn.objective = name
    objective = online.make_objective(cn, setup)
    batch, _ = objective.make_batch(traj, 0)
    opt = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-6))
    step_fn = jax.jit(train_lib.make_train_step(objective.loss_fn, opt), donate_argnums=(0,))
    state = train_lib.TrainState.create(jax.tree.map(jnp.copy, params), opt)
    times, peaks = [], []
    for i in range(args.steps + 1):
      t0 = time.perf_counter()
      peak_fn()
      peaks.append(peak_flops / (time.perf_counter() - t0))
      t0 = time.perf_counter()
      state, m = step_fn(state, batch, jax.random.key(i), params)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    out[name] = {"step_s": float(np.mean(times[1:])), "peak": float(np.median(peaks[1:]))}
    del state
  return out


def main():
  args = parse_args()
  c, setup, params = make_setup(args)
  cfg = setup.cfg
  n_params = sum(x.size for x in jax.tree.leaves(params))
  mean, batch, state, traj = rl_iterations(c, setup, params, args)
  peak = mean.pop("peak")
  alone = back_to_back(c, setup, params, traj, args)
  problems = setup.task.problems("train")
  feedback = feedback_rollouts(setup, state.params, problems, args, turns=3)
  b, l = batch.tokens_BxT.shape
  # Forward + backward: 6 FLOPs per parameter per token, plus attention (QK^T and PV,
  # forward and backward: 12 * layers * heads * head_dim * L per token).
  flops = 6 * n_params * b * l + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * l * b * l
  result = dict(
      device=str(jax.devices()[0]), backend=jax.default_backend(), cpus=os.cpu_count(),
      model=args.model, dtype=cfg.dtype, remat=cfg.remat, logits_chunk=cfg.logits_chunk,
      params=n_params, batch=b, length=l,
      matmul_peak_gflops=peak / 1e9, update_s=mean["update"],
      update_tokens_per_s=mean["tokens"] / mean["update"],
      update_gflops=flops / mean["update"] / 1e9,
      update_fraction_of_peak=flops / mean["update"] / peak,
      iteration_s=mean["total"], iteration_tokens_per_s=mean["tokens"] / mean["total"],
      shares={k: mean[k] / mean["total"] for k in
              ("rollout", "rewards", "reference_and_advantages", "update")},
      back_to_back={name: dict(step_s=r["step_s"], matmul_peak_gflops=r["peak"] / 1e9,
                               fraction_of_peak=flops / r["step_s"] / r["peak"])
                    for name, r in alone.items()},
      feedback_rollouts=feedback)
  write_results(pathlib.Path(args.out), results_stem("train_step"), result,
                render(result, args))


def render(result, args) -> list[str]:
  b, l, feedback = result["batch"], result["length"], result["feedback_rollouts"]
  name = ("Embedded SmolLM2-135M" if args.model == "embedded" else
          f"Random weights in the shape of {args.model}")
  lines = [
      "# Train-step benchmark (generated by benchmarks/train_step.py)", "",
      f"{name} ({result['params'] / 1e6:.1f}M params), {result['dtype']} compute, "
      f"remat={result['remat']}, logits_chunk={result['logits_chunk']}, {result['device']}, "
      f"{result['cpus']} CPUs. Batch {b} episodes ({args.prompts} prompts x {args.group}), "
      f"{l} tokens each (two turns of up to {args.new_tokens} new tokens; "
      f"pad_multiple={args.pad_multiple}, 0 being the longest possible episode). Mean of "
      f"{args.steps} iterations after a compiling one.", "",
      "| measure | value |", "|---|---|",
      f"| {result['dtype']} matmul peak (2 s chain of 2048^3, median over the iterations) "
      f"| {result['matmul_peak_gflops']:.1f} GFLOP/s |",
      f"| train step time | {result['update_s']:.2f} s |",
      f"| train step tokens/s | {result['update_tokens_per_s']:.0f} |",
      f"| train step achieved | {result['update_gflops']:.1f} GFLOP/s "
      f"({100 * result['update_fraction_of_peak']:.0f}% of peak) |",
      f"| full RL iteration | {result['iteration_s']:.2f} s "
      f"({result['iteration_tokens_per_s']:.0f} tokens/s) |"]
  lines += [f"| share: {k} | {100 * v:.0f}% |" for k, v in result["shares"].items()]
  lines += ["", "## The same step alone", "",
            "The step on the last iteration's trajectories, back to back (no rollout or "
            "reference pass between steps), with the peak timed beside each step; the "
            "same FLOP count as above.", "",
            "| step | seconds | fraction of the peak timed beside it |", "|---|---|---|",
            f"| SCoRe, inside the RL iteration | {result['update_s']:.2f} | "
            f"{100 * result['update_fraction_of_peak']:.0f}% |"]
  lines += [f"| {'SCoRe' if name == 'score' else 'policy gradient (pg)'}, back to back | "
            f"{r['step_s']:.2f} | {100 * r['fraction_of_peak']:.0f}% |"
            for name, r in result["back_to_back"].items()]
  lines += ["", f"## Rollouts with feedback ({feedback['turns']} turns, same batch)", "",
            "`unary`: an episode stops at its first correct answer and only wrong rows get "
            "the feedback, so the device waits for each turn's scores; `instruction`: "
            "every row takes every turn and scoring runs in a thread while the next turn "
            "samples (its share is overlapped time, not added time).", "",
            "| feedback | episodes/s | turns per episode | time scoring (share of rollout) |",
            "|---|---|---|---|"]
  for kind, r in feedback["kinds"].items():
    lines.append(f"| {kind} | {r['episodes_per_s']:.2f} | {r['turns_per_episode']:.2f} | "
                 f"{100 * r['scoring_share']:.1f}% |")
  return lines


if __name__ == "__main__":
  main()
