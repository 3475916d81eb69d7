"""What bounds a decode step on this machine: the step's parts, and the same weight stream
through the peer's matmul.

  python benchmarks/decode_bound.py [--batches 16,64] [--out benchmarks/results]

The embedded SmolLM2-135M in float32 (the sampler's CPU baseline, whose greedy tokens
match transformers'). Per batch, side by side in one process:
  * a whole decode step, from the sampler's greedy turn (64 steps, the cache windows it
    uses) minus its prefill;
  * the layers' seven projections alone: one step's matmuls over every layer's weights,
    in the scan the model runs (each layer's weights sliced out of the stacked array);
  * the LM head alone (the tied 49152 x 576 embedding);
  * the same seven projections in PyTorch (oneDNN/MKL, the library transformers runs on),
    over the same 30 layers' weights, held as 210 separate tensors;
against the weight-bandwidth roofline (every weight read once per step at the bandwidth
of a streaming sum). Then what the issue's decode targets would take, per batch: the
turn time of transformers `generate` on the same prompts and weights (greedy, no early
stop), halved, minus the sampler's own prefill, is the decode-step budget that 2x
transformers leaves; it is set against the step's floor, the larger of its FLOPs at the
float32 matmul peak (a chain of 2048^3 matmuls timed beside it) and its weights at the
read bandwidth. Writes `decode_bound.md` and `decode_bound.json` under --out.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import load_model, sustained_matmul, timed, transformers_model, write_results  # pylint: disable=g-import-not-at-top
from sampler import NEVER, QUESTIONS, hf_run, read_bandwidth_bytes_per_s

from jaxscore.models import model as model_lib
from jaxscore.sampling import formats
from jaxscore.sampling import sampler as sampler_lib

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
NEW_TOKENS = 64


def as_matrix(name: str, w, d: int):
  """A projection weight as the (in x out) matrix it multiplies by."""
  if name in ("q", "k", "v"):
    return w.reshape(d, -1)
  return w.reshape(-1, d) if name == "o" else w


def projections(x_BxD, lp, silu=jax.nn.silu):
  """The seven matmuls of one layer, on the layer's own weights (no attention)."""
  w = {k: as_matrix(k, lp[k], x_BxD.shape[-1]) for k in PROJECTIONS}
  h = x_BxD + (x_BxD @ w["q"]) @ w["o"] + (x_BxD @ w["k"]).sum() + (x_BxD @ w["v"]).sum()
  return h + (silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]


def jax_parts(cfg, params, b: int) -> dict:
  """Seconds of the stacked layers' projections and of the LM head at batch `b`."""
  stack = {k: params["layers"][k] for k in PROJECTIONS}
  x = jnp.ones((b, cfg.embed_dim), jnp.float32)
  layers_fn = jax.jit(lambda p, x: jax.lax.scan(
      lambda h, lp: (projections(h, lp) * 1e-3, None), x, p)[0])
  head_fn = jax.jit(lambda p, x: model_lib.unembed(p, x[:, None], cfg))
  return {"layers_s": timed(lambda: layers_fn(stack, x).block_until_ready(), 10),
          "lm_head_s": timed(lambda: head_fn(params, x).block_until_ready(), 10)}


def torch_layers_s(cfg, params, b: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top

  layers = [{k: torch.from_numpy(np.array(params["layers"][k][i])) for k in PROJECTIONS}
            for i in range(cfg.num_layers)]
  x = torch.ones(b, cfg.embed_dim)

  def run():
    with torch.no_grad():
      h = x
      for lp in layers:
        h = projections(h, lp, torch.nn.functional.silu) * 1e-3
    return h

  return timed(run, 10)


def sampler_turn(model, b: int) -> dict:
  """The sampler's greedy turn at batch `b`: seconds of the turn, of its prefill and per
  decode step, and the decode windows' mean (cache slots attention reads per step)."""
  tok = model.tokenizer
  prompts_ids = chat_prompts(tok, b)
  smp = sampler_lib.Sampler(model.cfg, max_len=256, stop_ids=[NEVER],
                            pad_id=tok.pad_token_id or 0)
  greedy = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS)
  longest = max(map(len, prompts_ids))
  start = lambda: smp.start(prompts_ids, jax.random.key(0))
  turn = timed(lambda: jax.block_until_ready(
      smp.generate(model.params, start(), greedy, pending=longest)))
  prefill = timed(lambda: jax.block_until_ready(
      smp.prefill(model.params, start(), pending=longest)))
  mean_window = float(np.mean([smp.window(longest + i) for i in range(NEW_TOKENS)]))
  return dict(turn_s=turn, prefill_s=prefill, step_s=(turn - prefill) / NEW_TOKENS,
              mean_window=mean_window)


def chat_prompts(tok, b: int) -> list[list[int]]:
  fmt = formats.ChatFormat(tok)
  return [fmt.prompt_ids(QUESTIONS[i % len(QUESTIONS)]) for i in range(b)]


def step_flops(cfg, params, b: int, mean_window: float) -> float:
  """FLOPs of one decode step at batch `b`: every projection and the LM head, and
  attention's scores and weighted values over the mean window."""
  weights = sum(params["layers"][k].size for k in PROJECTIONS) + params["embed"].size
  attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * mean_window
  return b * (2 * weights + attention)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", default="16,64")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  args = parser.parse_args()
  cfg, params, tokenizer = load_model("embedded")
  model = types.SimpleNamespace(cfg=cfg, params=params, tokenizer=tokenizer)
  hf_model = transformers_model(cfg, params)
  bandwidth = read_bandwidth_bytes_per_s()
  layer_bytes = sum(params["layers"][k].nbytes for k in PROJECTIONS)
  head_bytes = params["embed"].nbytes
  peak_fn, peak_flops = sustained_matmul()
  rows = []
  for b in map(int, args.batches.split(",")):
    t0 = time.perf_counter()
    peak_fn()  # Beside the batch's measurements: this machine's speed drifts.
    peak = peak_flops / (time.perf_counter() - t0)
    turn = sampler_turn(model, b)
    hf_s, _ = hf_run(hf_model, tokenizer, chat_prompts(tokenizer, b), NEW_TOKENS)
    row = dict(batch=b, **turn, hf_turn_s=hf_s, peak_flops_per_s=peak,
               flops=step_flops(cfg, params, b, turn["mean_window"]), **jax_parts(cfg, params, b),
               torch_layers_s=torch_layers_s(cfg, params, b))
    rows.append(row)
    print(row, flush=True)
  meta = dict(cpus=os.cpu_count(), jax=jax.__version__, bandwidth_GBps=bandwidth / 1e9,
              layer_MB=layer_bytes / 1e6, head_MB=head_bytes / 1e6, new_tokens=NEW_TOKENS)
  write_results(pathlib.Path(args.out), "decode_bound", dict(meta=meta, rows=rows),
                report(meta, rows))


def report(meta: dict, rows: list[dict]) -> list[str]:
  gbps = lambda mb, s: mb / 1e3 / s
  roofline_s = (meta["layer_MB"] + meta["head_MB"]) / 1e3 / meta["bandwidth_GBps"]
  lines = [
      "# What bounds a decode step (generated by benchmarks/decode_bound.py)", "",
      f"Embedded SmolLM2-135M, float32, {meta['cpus']} CPUs, jax {meta['jax']}. "
      f"Streaming-sum read bandwidth {meta['bandwidth_GBps']:.1f} GB/s; the layers' "
      f"projection weights {meta['layer_MB']:.0f} MB, the LM head {meta['head_MB']:.0f} MB: "
      f"the weight-bandwidth roofline of a step is {1e3 * roofline_s:.1f} ms. GB/s: "
      "weight bytes over the time of the part that reads them.", "",
      "| batch | decode step ms | roofline share | layers' projections ms (GB/s) "
      "| LM head ms (GB/s) | rest of the step ms | PyTorch projections ms (GB/s) |",
      "|---|---|---|---|---|---|---|"]
  for r in rows:
    rest = r["step_s"] - r["layers_s"] - r["lm_head_s"]
    lines.append(
        f"| {r['batch']} | {1e3 * r['step_s']:.1f} | {100 * roofline_s / r['step_s']:.0f}% | "
        f"{1e3 * r['layers_s']:.1f} ({gbps(meta['layer_MB'], r['layers_s']):.1f}) | "
        f"{1e3 * r['lm_head_s']:.1f} ({gbps(meta['head_MB'], r['lm_head_s']):.1f}) | "
        f"{1e3 * rest:.1f} | {1e3 * r['torch_layers_s']:.1f} "
        f"({gbps(meta['layer_MB'], r['torch_layers_s']):.1f}) |")
  return lines + target_report(meta, rows, roofline_s)


def target_report(meta: dict, rows: list[dict], roofline_s: float) -> list[str]:
  """What 2x transformers `generate` (end to end, one greedy turn) leaves a decode step,
  against the step's floor on this machine."""
  n = meta["new_tokens"]
  lines = [
      "", "## What the targets would take", "",
      f"One greedy turn of {n} new tokens per row, no early stop, the same chat prompts and "
      "weights. 2x transformers means the turn in half transformers' time; what is left "
      "after the sampler's prefill, over the turn's decode steps, is the step budget. The "
      "step's floor is the larger of its FLOPs (projections, LM head, attention over the "
      "mean window) at the float32 matmul peak timed beside it and its weights at the "
      "read bandwidth.", "",
      "| batch | transformers turn s | jaxscore turn s (prefill s) | ratio | step budget "
      "for 2x ms (prefill free) | step floor ms | budget / floor (prefill free) | step ms "
      "now | step GFLOP/s now (% of peak) | peak GFLOP/s |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    budget, free = (r["hf_turn_s"] / 2 - r["prefill_s"]) / n, r["hf_turn_s"] / 2 / n
    floor = max(r["flops"] / r["peak_flops_per_s"], roofline_s)
    achieved = r["flops"] / r["step_s"]
    lines.append(
        f"| {r['batch']} | {r['hf_turn_s']:.2f} | {r['turn_s']:.2f} ({r['prefill_s']:.2f}) | "
        f"{r['hf_turn_s'] / r['turn_s']:.2f}x | {1e3 * budget:.1f} ({1e3 * free:.1f}) | "
        f"{1e3 * floor:.1f} | {budget / floor:.2f} ({free / floor:.2f}) | "
        f"{1e3 * r['step_s']:.1f} | {achieved / 1e9:.0f} "
        f"({100 * achieved / r['peak_flops_per_s']:.0f}%) | {r['peak_flops_per_s'] / 1e9:.0f} |")
  sixty = roofline_s / 0.6
  lines += [
      "", "A budget / floor of x means the target needs the whole step (matmuls, attention, "
      "sampling) to run at 1/x times its floor's rate (the matmul peak or the streaming "
      "read rate): under 1, faster than this machine can; "
      "`prefill free` is the budget if the sampler's prefill took no time at all. 60% of "
      f"the weight-bandwidth roofline means a step of {1e3 * sixty:.1f} ms; " + "; ".join(
          f"at batch {r['batch']} the layers' projections alone take "
          f"{1e3 * r['layers_s']:.1f} ms in XLA and {1e3 * r['torch_layers_s']:.1f} ms in "
          "PyTorch" for r in rows) + "."]
  return lines


if __name__ == "__main__":
  main()
