"""Full fine-tuning against LoRA and QLoRA: train-step memory and time, side by side.

  python benchmarks/lora.py [--model embedded|gemma3-1b|...] [--batch 8] [--seq 160]
                            [--rounds 3] [--out benchmarks/results]

The SCoRe policy-gradient train step (Adam, k3 KL to the reference in the loss) on one
batch, compiled once per variant:
  * full: every weight trained, Adam's two moments, and a second full copy as the
    frozen reference;
  * LoRA rank 8 and 64 on all seven projections: only the adapters trained and held by
    Adam; the frozen base is the reference (one copy);
  * QLoRA rank 8: the same on an int8 and on an nf4 base (blocks of 64 inputs).
For each, XLA's memory analysis of the compiled step: what stays resident across steps
(weights, reference, trainable state), the step's temporaries, and the peak (inputs,
outputs and temporaries, donated buffers counted once); and the step time, the
variants alternating in each round (this machine is shared: one variant's round-to-
round spread is reported next to the ratios). Writes `lora.md` / `lora.json` (per
backend) under --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import MODELS, load_model, results_stem, write_results  # pylint: disable=g-import-not-at-top
from train_memory import make_batch  # pylint: disable=g-import-not-at-top

from jaxscore.loops import train as train_lib
from jaxscore.models import lora
from jaxscore.models import model as model_lib
from jaxscore.objectives import policy_gradient as pg

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30

VARIANTS = {
    "full": None,
    "LoRA r=8": lora.LoraConfig(rank=8, alpha=16.0),
    "LoRA r=64": lora.LoraConfig(rank=64, alpha=128.0),
    "QLoRA r=8, int8 base": lora.LoraConfig(rank=8, alpha=16.0, quantize="int8"),
    "QLoRA r=8, nf4 base": lora.LoraConfig(rank=8, alpha=16.0, quantize="nf4"),
}


def _bytes(tree) -> float:
  return float(sum(x.size * jax.dtypes.itemsize_bits(x.dtype) / 8
                   for x in jax.tree.leaves(tree)))


def build(cfg0, params, adapters_cfg, opt):
  """(compiled step, state, frozen params, byte counts) of one variant: the frozen
  params are the reference (full) or the base that is also the reference (LoRA)."""
  loss_cfg = pg.PolicyLossConfig(kl_estimator="k3")
  if adapters_cfg is None:
    cfg, trainable, frozen = cfg0, jax.tree.map(jnp.copy, params), params
    loss_fn = functools.partial(_loss, cfg=cfg, loss_cfg=loss_cfg)
  else:
    cfg = cfg0.replace(lora=adapters_cfg)
    frozen = jax.jit(functools.partial(lora.quantize_base, cfg=cfg))(params)
    trainable = model_lib.init_lora(cfg, jax.random.key(1))
    loss_fn = lambda a, batch, rng, base: _loss(lora.combine(base, a), batch, rng, base,
                                                cfg=cfg, loss_cfg=loss_cfg)
  state = train_lib.TrainState.create(trainable, opt)
  step = jax.jit(train_lib.make_train_step(loss_fn, opt), donate_argnums=(0,))
  return step, state, frozen, {"trainable": _bytes(trainable),
                               "optimizer": _bytes(state.opt_state),
                               "frozen": _bytes(frozen)}


def _loss(params, batch, rng, ref_params, *, cfg, loss_cfg):
  return pg.policy_gradient_loss(params, batch, rng, ref_params, cfg=cfg, loss_cfg=loss_cfg)


def measure(cfg0, params, batch, opt, rounds: int) -> dict:
  entries, results = {}, {}
  for name, adapters_cfg in VARIANTS.items():
    step, state, frozen, sizes = build(cfg0, params, adapters_cfg, opt)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(0), frozen).compile()
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    state = jax.block_until_ready(compiled(state, batch, jax.random.key(0), frozen)[0])
    entries[name] = [compiled, state, frozen]
    results[name] = dict(compile_s=time.perf_counter() - t0,
                         trainable_params=int(sum(x.size for x in jax.tree.leaves(state.params))),
                         resident_gib=(sizes["trainable"] + sizes["optimizer"]
                                       + sizes["frozen"]) / GIB,
                         **{f"{k}_gib": v / GIB for k, v in sizes.items()},
                         temp_gib=m.temp_size_in_bytes / GIB, peak_gib=peak / GIB, times=[])
    print(name, json.dumps(results[name]), flush=True)
  for _ in range(rounds):
    for name, (compiled, state, frozen) in entries.items():
      t0 = time.perf_counter()
      state = jax.block_until_ready(compiled(state, batch, jax.random.key(0), frozen)[0])
      entries[name][1] = state
      results[name]["times"].append(time.perf_counter() - t0)
  full = results["full"]
  for r in results.values():
    r["step_s"] = float(np.median(r["times"]))
    r["spread"] = float(max(r["times"]) / min(r["times"]))
  for r in results.values():
    r["peak_vs_full"] = full["peak_gib"] / r["peak_gib"]
    r["resident_vs_full"] = full["resident_gib"] / r["resident_gib"]
    r["speed_vs_full"] = full["step_s"] / r["step_s"]
  return results


def write_report(meta: dict, results: dict, out: pathlib.Path) -> None:
  lines = ["# Full fine-tuning, LoRA and QLoRA (generated by benchmarks/lora.py)", "",
           f"{meta['model']} ({meta['params_m']:.0f}M params), {meta['param_dtype']} "
           f"weights, {meta['dtype']} compute, {meta['device']}, {meta['cpus']} CPUs, jax "
           f"{meta['jax']}. SCoRe's policy-gradient train step (Adam, k3 KL to the "
           f"reference) on {meta['batch']} x {meta['seq']} tokens. Resident: the trained "
           "params, Adam's moments and the frozen params (full: the reference copy; LoRA: "
           "the base, which is also the reference). Peak: XLA's memory analysis of the "
           "compiled step (inputs + outputs + temporaries, donated state counted once). "
           f"Step time: median of {meta['rounds']} rounds, the variants alternating; "
           "`spread` is a variant's slowest round over its fastest.", "",
           "| variant | trained params | resident GiB | vs full | step peak GiB | vs full "
           "| temporaries GiB | step s | vs full | spread |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    base = name == "full"
    ratio = lambda key, unit: "-" if base else f"{r[key]:.2f}x{unit}"
    lines.append(
        f"| {name} | {r['trainable_params'] / 1e6:.2f}M | {r['resident_gib']:.3f} | "
        f"{ratio('resident_vs_full', ' lower')} | {r['peak_gib']:.3f} | "
        f"{ratio('peak_vs_full', ' lower')} | {r['temp_gib']:.3f} | {r['step_s']:.2f} | "
        f"{ratio('speed_vs_full', '')} | {r['spread']:.2f} |")
  write_results(out, results_stem("lora"), dict(meta=meta, results=results), lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="embedded", choices=MODELS)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=160)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = parser.parse_args()

  cfg0, params, _ = load_model(args.model, training=True)
  opt = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-6))
  batch = make_batch(cfg0, args.batch, args.seq)
  results = measure(cfg0, params, batch, opt, args.rounds)
  meta = dict(backend=jax.default_backend(), device=str(jax.devices()[0]),
              cpus=os.cpu_count(), jax=jax.__version__, model=args.model,
              params_m=sum(x.size for x in jax.tree.leaves(params)) / 1e6,
              param_dtype=cfg0.param_dtype, dtype=cfg0.dtype, batch=args.batch,
              seq=args.seq, rounds=args.rounds)
  write_report(meta, results, pathlib.Path(args.out))


if __name__ == "__main__":
  main()
