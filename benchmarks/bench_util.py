"""Pieces the benchmark scripts share: timing, the matmul peak, timed scoring, and the
model and precision for the backend they run on (CPU, GPU or TPU, unchanged)."""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp

from jaxscore.models import model as model_lib
from jaxscore.models import pretrained, shapes, weights

# Random weights in the published shapes of larger models (--model), for accelerators.
MODELS = ("embedded", *shapes.NAMED)


def accelerated() -> bool:
  return jax.default_backend() != "cpu"


def load_model(name: str, training: bool = False):
  """(cfg, params, tokenizer): the embedded model, or random weights in the shape of a
  larger one with the embedded tokenizer (its ids are valid in either vocabulary).

  float32 on CPU. On an accelerator, compute is bfloat16, its baseline; weights are
  bfloat16 for sampling and float32 (master weights, mixed precision) for training."""
  m = pretrained.load(pretrained.DEFAULT_MODEL)
  if name == "embedded":
    cfg, params = m.cfg, jax.device_put(m.params)
  else:
    cfg = shapes.config(name)
    params = model_lib.init(cfg, jax.random.key(0))
  if accelerated():
    cfg = cfg.replace(dtype="bfloat16")
    if not training:
      cfg = cfg.replace(param_dtype="bfloat16")
      params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  return cfg, params, m.tokenizer


def results_stem(stem: str) -> str:
  """Results per backend: `<stem>` on CPU, `<stem>_gpu` / `<stem>_tpu` elsewhere."""
  backend = jax.default_backend()
  return stem if backend == "cpu" else f"{stem}_{backend}"


def transformers_model(cfg: model_lib.ModelConfig, params):
  """transformers' model of the same architecture with the same weights, for
  `generate`; on CUDA (bfloat16) when JAX runs on a GPU, float32 on CPU."""
  import torch
  import transformers

  hf = weights.config_to_hf(cfg)
  model_type = hf.pop("model_type")
  for key in ("architectures", "torch_dtype", "dtype"):
    hf.pop(key)
  config = transformers.AutoConfig.for_model(model_type, **hf)
  gpu = jax.default_backend() == "gpu"
  dtype = torch.bfloat16 if gpu else torch.float32
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
  tensors = weights.params_to_tensors(params, cfg)
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
  tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
  if set(missing) - tied or unexpected:
    raise ValueError(f"weights do not match transformers' {model_type}: missing "
                     f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
  if cfg.tie_embeddings:
    model.tie_weights()
  return model.to("cuda" if gpu else "cpu").eval()


def timed(fn, repeats=3):
  """Best-of-n wall time of fn() (after one warm-up call that compiles)."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def sustained_matmul(n: int = 2048, seconds: float = 2.0, dtype=jnp.float32):
  """(fn, flops): `fn()` runs a chain of n x n matmuls for about `seconds` and `flops` is
  their work. Timed in each round next to the step it is compared with (on this shared
  machine the best of five 2048^3 matmuls moved by 35% between rounds a minute apart),
  and held for seconds like the step."""
  x, eye = jnp.ones((n, n), dtype), jnp.eye(n, dtype=dtype)  # x @ eye stays finite.
  one = jax.jit(lambda x, w: x @ w)
  count = max(int(seconds / timed(lambda: one(x, eye).block_until_ready(), 3)), 1)
  chain = jax.jit(lambda x, w: jax.lax.fori_loop(0, count, lambda _, y: y @ w, x))
  fn = lambda: chain(x, eye).block_until_ready()
  fn()  # Compiles.
  return fn, 2 * n**3 * count


class TimedTask:
  """A task whose `score` calls are timed (rollouts call it between turns)."""

  def __init__(self, task):
    self.task, self.seconds = task, 0.0
    self.name, self.instruction = task.name, task.instruction

  def problems(self, split):
    return self.task.problems(split)

  def score(self, problems, responses):
    t0 = time.perf_counter()
    out = self.task.score(problems, responses)
    self.seconds += time.perf_counter() - t0
    return out


def write_results(out: pathlib.Path, stem: str, payload: dict, lines: list[str]) -> None:
  """`<stem>.json` (the numbers) and `<stem>.md` (the table) under `out`; prints the table."""
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
  (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
