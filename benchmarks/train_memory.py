"""Train-step memory and speed of the memory options, side by side in one run.

  python benchmarks/train_memory.py [--batch 16] [--seq 160] [--chunk 128]
                                    [--model embedded|gemma3-4b|...] [--out benchmarks/results]

The SCoRe policy-gradient train step (Adam, k3 KL in the loss) on one batch of the
given shape, compiled once per variant:
  * baseline: float32, whole logits, no rematerialization;
  * `logits_chunk`: per-token log-probs from logits --chunk positions at a time;
  * `remat=full` and `remat=dots`: what the backward pass keeps of each layer;
  * chunked logits with full remat;
  * mixed precision: float32 params and optimizer state, bfloat16 compute.
For each: XLA's memory analysis of the compiled step (temporaries: the activation and
logits memory the step needs beyond its inputs and outputs) and the step time, the
variants timed in alternating rounds; FLOP/s against a float32 matmul measured in the
same run. On a GPU or TPU the same script runs unchanged (bfloat16 variants matter
there). Writes `train_memory.md` and `train_memory.json` (per backend) under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import MODELS, load_model, results_stem, sustained_matmul, write_results  # pylint: disable=g-import-not-at-top

from jaxscore.loops import train as train_lib
from jaxscore.models import logprobs
from jaxscore.objectives import policy_gradient as pg

ROOT = pathlib.Path(__file__).resolve().parents[1]
def make_batch(cfg, b: int, t: int) -> pg.RLBatch:
  """Two turns per row: prompt (first quarter), attempt, instruction, attempt."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (b, t), dtype=np.int32)
  turn = np.zeros((b, t), np.int32)
  q = t // 4
  turn[:, q:2 * q] = 1
  turn[:, 2 * q + q // 4:] = 2
  f = lambda x: jnp.asarray(x, jnp.float32)
  return pg.RLBatch(tokens_BxT=jnp.asarray(tokens), mask_BxT=jnp.ones((b, t), bool),
                    turn_BxT=jnp.asarray(turn), advantages_BxT=f(rng.normal(size=(b, t))),
                    kl_coef_BxT=f(np.full((b, t), 0.1)),
                    ref_logp_BxT=f(-rng.random((b, t)) * 5),
                    old_logp_BxT=f(-rng.random((b, t)) * 5))


def loss_head_temp_gib(cfg, params, batch: pg.RLBatch) -> float:
  """Temporaries of the loss alone: from final hidden states to the policy-gradient
  loss (final norm, vocabulary projection, log-softmax, KL), forward and backward."""

  b, t = batch.tokens_BxT.shape
  x = jax.ShapeDtypeStruct((b, t, cfg.embed_dim), jnp.dtype(cfg.dtype))

  def loss(params, x_BxTxD):
    logp, entropy, _ = logprobs.token_stats(params, x_BxTxD, batch.tokens_BxT, cfg)
    return pg.token_objective(logp, batch, pg.PolicyLossConfig(), entropy_BxT=entropy)[0]

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**30


def measure(variants: dict, cfg0, params, batch, opt, rounds: int,
            peak_dtype) -> tuple[dict, list[float]]:
  """(per variant: compile time, XLA temporaries of the step and of the loss alone, and
  the median step time over `rounds` rounds in which the variants alternate; the
  sustained matmul FLOP/s measured at the start of each round)."""
  steps, results = {}, {}
  for name, fields in variants.items():
    cfg = dataclasses.replace(cfg0, **fields)
    loss_fn = lambda *a, cfg=cfg: pg.policy_gradient_loss(
        *a, cfg=cfg, loss_cfg=pg.PolicyLossConfig())
    # Donated state, as the training loop runs the step: each call updates it in place.
    step = jax.jit(train_lib.make_train_step(loss_fn, opt), donate_argnums=(0,))
    state = train_lib.TrainState.create(jax.tree.map(jnp.copy, params), opt)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(0), params).compile()
    mem = compiled.memory_analysis()
    steps[name] = [compiled, state]
    results[name] = dict(compile_s=time.perf_counter() - t0,
                         temp_gib=mem.temp_size_in_bytes / 2**30,
                         loss_head_temp_gib=loss_head_temp_gib(cfg, params, batch),
                         argument_gib=mem.argument_size_in_bytes / 2**30, times=[])
    steps[name][1] = jax.block_until_ready(
        compiled(state, batch, jax.random.key(0), params)[0])  # Warm-up.
    print(name, json.dumps(results[name]), flush=True)
  peak_fn, peak_flops = sustained_matmul(dtype=peak_dtype)
  peaks = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    peak_fn()
    peaks.append(peak_flops / (time.perf_counter() - t0))
    for name, entry in steps.items():
      t0 = time.perf_counter()
      entry[1] = jax.block_until_ready(entry[0](entry[1], batch, jax.random.key(0), params)[0])
      results[name]["times"].append(time.perf_counter() - t0)
  base = next(iter(results.values()))
  base["step_s"] = float(np.median(base["times"]))
  for r in results.values():
    r["step_s"] = float(np.median(r["times"]))
    r["temp_vs_baseline"] = base["temp_gib"] / r["temp_gib"]
    r["loss_head_vs_baseline"] = base["loss_head_temp_gib"] / r["loss_head_temp_gib"]
    r["speed_vs_baseline"] = base["step_s"] / r["step_s"]
  return results, peaks


def write_report(meta: dict, results: dict, args, out: pathlib.Path) -> None:
  b, t = meta["batch"], meta["seq"]
  stem = results_stem("train_memory")
  lines = ["# Train-step memory options (generated by benchmarks/train_memory.py)", "",
           f"{args.model} ({meta['params_m']:.0f}M params, vocabulary {meta['vocab']}), "
           f"{meta['dtype']} compute, {meta['device']}, {meta['cpus']} CPUs, jax "
           f"{meta['jax']}. SCoRe policy-gradient train step (Adam) on a batch of {b} x {t} "
           f"tokens; the float32 logits alone are {b * t * meta['vocab'] * 4 / 2**30:.2f} "
           f"GiB. Temporaries: XLA's memory analysis of the compiled step (memory beyond its "
           f"inputs and outputs); `loss` is the same for the loss alone (from the final "
           f"hidden states: norm, vocabulary projection, log-softmax, KL; forward and "
           f"backward). Step time: median of {args.rounds} rounds, the variants "
           f"alternating. Matmul peak: a 2-second chain of 2048^3 matmuls at the start of "
           f"each round, median {meta['matmul_peak_gflops']:.0f} GFLOP/s (rounds: "
           + ", ".join(f"{p:.0f}" for p in meta["matmul_peak_rounds_gflops"]) + ").", "",
           "| variant | step temporaries GiB | vs baseline | loss temporaries GiB | vs baseline "
           "| step s | vs baseline | % of matmul peak |",
           "|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    base = name == "baseline"
    ratio = lambda key, unit: "-" if base else f"{r[key]:.2f}x{unit}"
    lines.append(f"| {name} | {r['temp_gib']:.2f} | {ratio('temp_vs_baseline', ' lower')} | "
                 f"{r['loss_head_temp_gib']:.2f} | {ratio('loss_head_vs_baseline', ' lower')} | "
                 f"{r['step_s']:.2f} | {ratio('speed_vs_baseline', '')} | "
                 f"{100 * r['fraction_of_peak']:.0f}% |")
  write_results(out, stem, dict(meta=meta, results=results), lines)



def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="embedded", choices=MODELS)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=160)
  parser.add_argument("--chunk", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = parser.parse_args()

  backend = jax.default_backend()
  cfg0, params, _ = load_model(args.model, training=True)
  accel = backend != "cpu"
  variants = {
      "baseline": {},
      f"logits_chunk={args.chunk}": dict(logits_chunk=args.chunk),
      "remat=full": dict(remat="full"),
      "remat=dots": dict(remat="dots"),
      f"logits_chunk={args.chunk}, remat=full": dict(logits_chunk=args.chunk, remat="full"),
  }
  if not accel:
    variants["bfloat16 compute (float32 params)"] = dict(dtype="bfloat16")
  opt = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-6))
  batch = make_batch(cfg0, args.batch, args.seq)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  b, t = args.batch, args.seq
  flops = (6 * n_params * b * t
           + 12 * cfg0.num_layers * cfg0.num_heads * cfg0.head_dim * t * b * t)

  results, peaks = measure(variants, cfg0, params, batch, opt, args.rounds,
                           jnp.bfloat16 if accel else jnp.float32)
  peak = float(np.median(peaks))
  for r in results.values():
    r["fraction_of_peak"] = flops / r["step_s"] / peak
  meta = dict(backend=backend, device=str(jax.devices()[0]), cpus=os.cpu_count(),
              jax=jax.__version__, model=args.model, params_m=n_params / 1e6,
              vocab=cfg0.vocab_size, batch=b, seq=t, matmul_peak_gflops=peak / 1e9,
              matmul_peak_rounds_gflops=[p / 1e9 for p in peaks],
              dtype=cfg0.dtype, rounds=args.rounds)
  write_report(meta, results, args, pathlib.Path(args.out))

if __name__ == "__main__":
  main()
