"""Where the train step's time goes: the step taken apart into pieces timed side by side.

  python benchmarks/train_step_profile.py [--batch 16] [--seq 160] [--chunk 32]
                                          [--remat full] [--model embedded|gemma3-4b|...]
                                          [--out benchmarks/results]

The SCoRe policy-gradient step (Adam) of train_memory.py's fastest variant, and in the
same run, each compiled once and timed in alternating rounds:
  * `step`: the whole train step;
  * `step, gate and up apart`: the same step with the MLP's gate and up as two matmuls
    (`layers.STACK_GATE_UP_MIN_TOKENS` raised past the batch while it compiles), the
    step's form before they ran as one over the stacked weights;
  * `gradient`: the loss's gradient alone (the step without the optimizer update);
  * `loss`: the forward pass and loss alone;
  * `weight matmuls`: every weight matmul of the step at its shapes and nothing else
    (per layer q, k, v, o, gate and up stacked, down and the vocabulary projection:
    forward, input gradient and weight gradient, plus the recomputed forward under
    `remat=full`), the
    floor the step would reach if everything else were free;
  * `attention`: the attention core of every layer (scores, mask, softmax, weighted
    sum), forward and backward, at the step's shapes;
  * a 2-second chain of float32 2048^3 matmuls (the peak the step is held to).
What remains (step - weight matmuls - attention - update) is norms, RoPE, SiLU, the
log-softmax and KL over the vocabulary, and the layer scan's data movement. Writes
`train_step_profile.md` and `.json` (per backend) under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import MODELS, load_model, results_stem, sustained_matmul, write_results  # pylint: disable=g-import-not-at-top
from train_memory import make_batch  # pylint: disable=g-import-not-at-top

from jaxscore.loops import train as train_lib
from jaxscore.models import layers as layers_lib
from jaxscore.objectives import policy_gradient as pg

ROOT = pathlib.Path(__file__).resolve().parents[1]


def weight_matmuls(cfg, b: int, t: int, recompute: bool):
  """(fn, args): the step's weight matmuls alone, forward and backward, over a layer
  scan like the model's."""
  d, f, v = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size
  qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = {"q": (d, qd), "k": (d, kd), "v": (d, kd), "o": (qd, d), "gate": (d, f),
            "up": (d, f), "down": (f, d)}
  layers = {n: jnp.full((cfg.num_layers, *s), 0.01, jnp.float32) for n, s in shapes.items()}
  head = jnp.full((d, v), 0.01, jnp.float32)
  x = jnp.ones((b * t, d), jnp.float32)

  def forward(x, w):
    # Each output feeds a sum, so no matmul is dead code and the shapes stay the model's.
    a = x @ w["q"] @ w["o"] + (x @ w["k"]).sum() + (x @ w["v"]).sum()
    if b * t >= layers_lib.STACK_GATE_UP_MIN_TOKENS:  # One matmul, as the model runs it.
      gu = jnp.einsum("nd,dcf->ncf", a, jnp.stack([w["gate"], w["up"]], axis=1))
      h = gu[:, 0] * 1e-3 + gu[:, 1] * 1e-3
    else:
      h = (a @ w["gate"]) * 1e-3 + (a @ w["up"]) * 1e-3
    return h @ w["down"]

  layer = jax.checkpoint(forward) if recompute else forward

  def loss(layers, head, x):
    y, _ = jax.lax.scan(lambda c, w: (layer(c, w), None), x, layers)
    return jnp.sum(y @ head)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), (layers, head, x)


def attention_core(cfg, b: int, t: int):
  """(fn, args): every layer's attention core, forward and backward."""
  q = jnp.ones((cfg.num_layers, b, t, cfg.num_heads, cfg.head_dim), jnp.float32)
  k = jnp.ones((cfg.num_layers, b, cfg.num_kv_heads, t, cfg.head_dim), jnp.float32)
  visible = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0)

  def loss(q, k):
    out = jax.lax.map(lambda qk: layers_lib.attention(
        qk[0], [qk[1]], [qk[1]], visible, layers_lib.attention_scale(cfg)), (q, k))
    return jnp.sum(out)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), (q, k)


def train_step(cfg, params, batch, opt, stack_min_tokens=None):
  """A call of the train step on donated state, as the training loop runs it (each call
  updates the state in place), compiled now; `stack_min_tokens` overrides
  `layers.STACK_GATE_UP_MIN_TOKENS` while it is traced."""
  step = jax.jit(train_lib.make_train_step(
      lambda *a: pg.policy_gradient_loss(*a, cfg=cfg, loss_cfg=pg.PolicyLossConfig()), opt),
      donate_argnums=(0,))
  state = [train_lib.TrainState.create(jax.tree.map(jnp.copy, params), opt)]
  default = layers_lib.STACK_GATE_UP_MIN_TOKENS
  layers_lib.STACK_GATE_UP_MIN_TOKENS = stack_min_tokens or default
  try:
    compiled = step.lower(state[0], batch, jax.random.key(0), params).compile()
  finally:
    layers_lib.STACK_GATE_UP_MIN_TOKENS = default

  def call():
    state[0] = compiled(state[0], batch, jax.random.key(0), params)[0]
    return state[0]

  return call


def pieces(cfg, params, batch, opt):
  """name -> a call of one piece of the profile (compiled on its first call)."""
  # The batch and reference are arguments, not constants folded into the program.
  loss_fn = lambda p, batch, ref: pg.policy_gradient_loss(p, batch, None, ref, cfg=cfg,
                                                          loss_cfg=pg.PolicyLossConfig())[0]
  b, t = batch.tokens_BxT.shape
  call = lambda fn, *args: lambda: fn(*args)
  unpack = lambda fn_args: call(fn_args[0], *fn_args[1])
  return {
      "step": train_step(cfg, params, batch, opt),
      # The same step with gate and up as two matmuls, as before they were stacked.
      "step, gate and up apart": train_step(cfg, params, batch, opt,
                                            stack_min_tokens=10**9),
      "gradient": call(jax.jit(jax.grad(loss_fn)), params, batch, params),
      "loss": call(jax.jit(loss_fn), params, batch, params),
      "weight matmuls": unpack(weight_matmuls(cfg, b, t, recompute=cfg.remat == "full")),
      "attention": unpack(attention_core(cfg, b, t)),
  }


def measure(fns: dict, rounds: int) -> dict:
  """Median seconds per piece over `rounds` rounds in which the pieces alternate."""
  times = {name: [] for name in fns}
  for fn in fns.values():
    jax.block_until_ready(fn())  # Compiles.
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(ts)) for name, ts in times.items()}


def report(meta: dict, s: dict) -> list[str]:
  step, apart = s["step"], s["step, gate and up apart"]
  update = max(step - s["gradient"], 0.0)
  rest = step - s["weight matmuls"] - s["attention"] - update
  rows = [("weight matmuls (alone, at their shapes)", s["weight matmuls"]),
          ("attention core, forward and backward", s["attention"]),
          ("optimizer update (step - gradient)", update),
          ("the rest: norms, RoPE, SiLU, vocabulary log-softmax and KL, scan", rest)]
  lines = ["# Train-step profile (generated by benchmarks/train_step_profile.py)", "",
           f"{meta['model']} ({meta['params_m']:.0f}M params), float32, {meta['device']}, "
           f"{meta['cpus']} CPUs, jax {meta['jax']}. SCoRe policy-gradient step (Adam) on "
           f"{meta['batch']} x {meta['seq']} tokens with remat={meta['remat']}, "
           f"logits_chunk={meta['chunk']}; every piece compiled once and timed in "
           f"{meta['rounds']} alternating rounds (median), a 2-second chain of 2048^3 matmuls "
           f"among them: matmul peak {meta['peak_gflops']:.0f} GFLOP/s.", "",
           f"The step takes {step:.2f} s: {100 * meta['model_flops'] / step / meta['peak']:.0f}% "
           f"of the matmul peak in model FLOPs (6 per parameter per token plus attention). "
           f"Its weight matmuls alone take {s['weight matmuls']:.2f} s "
           f"({100 * meta['matmul_flops'] / s['weight matmuls'] / meta['peak']:.0f}% of "
           f"the peak, recomputation included); the gradient alone {s['gradient']:.2f} s, the "
           f"forward loss alone {s['loss']:.2f} s. With gate and up as two matmuls instead "
           f"of one over their stacked weights the same step takes "
           f"{apart:.2f} s ({apart / step:.2f}x the step's time, "
           f"{100 * meta['model_flops'] / apart / meta['peak']:.0f}% of the peak).", "",
           "| piece | s | share of the step |", "|---|---|---|"]
  lines += [f"| {name} | {t:.2f} | {100 * t / step:.0f}% |" for name, t in rows]
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="embedded", choices=MODELS)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=160)
  parser.add_argument("--chunk", type=int, default=32)
  parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = parser.parse_args()

  cfg, params, _ = load_model(args.model, training=True)
  cfg = dataclasses.replace(cfg, remat=args.remat, logits_chunk=args.chunk)
  opt = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-6))
  batch = make_batch(cfg, args.batch, args.seq)
  peak_fn, peak_flops = sustained_matmul()
  seconds = measure(pieces(cfg, params, batch, opt) | {"matmul peak": peak_fn}, args.rounds)
  peak = peak_flops / seconds.pop("matmul peak")
  n_params = sum(x.size for x in jax.tree.leaves(params))
  b, t = args.batch, args.seq
  tokens = b * t
  weights = n_params - cfg.vocab_size * cfg.embed_dim * (1 if cfg.tie_embeddings else 2)
  passes = 4 if args.remat == "full" else 3  # Forward, its recomputation, two gradients.
  meta = dict(model=args.model, params_m=n_params / 1e6, device=str(jax.devices()[0]),
              cpus=os.cpu_count(), jax=jax.__version__, batch=b, seq=t, remat=args.remat,
              chunk=args.chunk, rounds=args.rounds, peak=peak, peak_gflops=peak / 1e9,
              model_flops=(6 * n_params * tokens
                           + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t * tokens),
              matmul_flops=2 * tokens * (passes * weights + 3 * cfg.vocab_size * cfg.embed_dim))
  print(seconds, flush=True)
  write_results(pathlib.Path(args.out), results_stem("train_step_profile"),
                dict(meta=meta, seconds=seconds), report(meta, seconds))


if __name__ == "__main__":
  main()
