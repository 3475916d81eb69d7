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
of a streaming sum). Writes `decode_bound.md` and `decode_bound.json` under --out.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import load_model, timed, write_results  # pylint: disable=g-import-not-at-top
from sampler import NEVER, QUESTIONS, read_bandwidth_bytes_per_s

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


def decode_step_s(model, b: int) -> float:
  """Seconds per decode step of the sampler's greedy turn at batch `b` (prefill out)."""
  tok = model.tokenizer
  fmt = formats.ChatFormat(tok)
  prompts_ids = [fmt.prompt_ids(QUESTIONS[i % len(QUESTIONS)]) for i in range(b)]
  smp = sampler_lib.Sampler(model.cfg, max_len=256, stop_ids=[NEVER],
                            pad_id=tok.pad_token_id or 0)
  greedy = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS)
  static = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=0)
  longest = max(map(len, prompts_ids))
  start = lambda: smp.start(prompts_ids, jax.random.key(0))
  turn = timed(lambda: jax.block_until_ready(
      smp.generate(model.params, start(), greedy, pending=longest)))
  prefill = timed(lambda: jax.block_until_ready(smp._prefill(  # pylint: disable=protected-access
      model.params, start(), chunk=sampler_lib.bucket(longest), sampling=static)))
  return (turn - prefill) / NEW_TOKENS


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", default="16,64")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  args = parser.parse_args()
  cfg, params, tokenizer = load_model("embedded")
  model = types.SimpleNamespace(cfg=cfg, params=params, tokenizer=tokenizer)
  bandwidth = read_bandwidth_bytes_per_s()
  layer_bytes = sum(params["layers"][k].nbytes for k in PROJECTIONS)
  head_bytes = params["embed"].nbytes
  rows = []
  for b in map(int, args.batches.split(",")):
    row = dict(batch=b, step_s=decode_step_s(model, b), **jax_parts(cfg, params, b),
               torch_layers_s=torch_layers_s(cfg, params, b))
    rows.append(row)
    print(row, flush=True)
  meta = dict(cpus=os.cpu_count(), jax=jax.__version__, bandwidth_GBps=bandwidth / 1e9,
              layer_MB=layer_bytes / 1e6, head_MB=head_bytes / 1e6)
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
  return lines


if __name__ == "__main__":
  main()
