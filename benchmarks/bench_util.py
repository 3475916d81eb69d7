"""Pieces the benchmark scripts share: timing, the matmul peak, timed scoring."""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp


def timed(fn, repeats=3):
  """Best-of-n wall time of fn() (after one warm-up call that compiles)."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """FLOP/s of XLA's n x n matmul on the default device: the peak a step is held to."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / timed(lambda: f(a).block_until_ready(), repeats)


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
