"""Multi-turn evaluation: Acc@t per turn, Delta(t1, tN), Delta i->c, Delta c->i, and the
edit-distance ratio between the first and last attempts (SCoRe, arXiv 2409.12917; with two
turns these are the paper's Delta(t1, t2) metrics). N counts turns."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from jaxscore.infra import files, sharding
from jaxscore.sampling import replies
from jaxscore.sampling import rollout as rollout_lib
from jaxscore.sampling import sampler as sampler_lib
from jaxscore.tasks import base


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Greedy multi-turn evaluation on the task's eval split, before and after training:
  an experiment config's `evaluate` group."""

  before: bool = True  # Evaluate the initial model too (the before/after table).
  checkpoint: str = "latest"  # Which trained checkpoint: latest | best (training reward).
  num_problems: int = 0  # 0 = the whole split.
  batch_size: int = 32  # Rows per sampler call.
  num_turns: int = 0  # Turns of the greedy dialogue; 0 = rollout.num_turns.
  # Between turns ("" = rollout.feedback); with none | unary | template, Acc@t is the
  # fraction answered correctly by turn t (a T-turn dialogue with feedback).
  feedback: str = ""
  pass_k_samples: int = 0  # n > 0: also sampled single-turn pass@k, k = 1, 2, .. n.
  pass_k_temperature: float = 1.0


def edit_distance(a: Sequence, b: Sequence) -> int:
  """Levenshtein distance between two strings or two sequences of token ids.

  One numpy pass per element of `a`: within a row of the table, the cheapest route
  through insertions is a running minimum, so attempts of a thousand tokens cost
  milliseconds (the training loop measures it every step).
  """
  x, y = _codes(a), _codes(b)
  cols = np.arange(len(y) + 1)
  prev = cols.copy()
  for i, xi in enumerate(x, 1):
    cur = np.empty_like(prev)
    cur[0] = i
    cur[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (y != xi))  # Deletion, substitution.
    prev = np.minimum.accumulate(cur - cols) + cols  # Insertions.
  return int(prev[-1])


def _codes(s: Sequence) -> np.ndarray:
  """Equal items, equal integers: code points, token ids, or hashes of other items."""
  if isinstance(s, str):
    return np.frombuffer(s.encode("utf-32-le"), np.uint32).astype(np.int64)
  items = list(s)
  arr = np.asarray(items)
  if arr.dtype.kind in "iub":
    return arr.astype(np.int64).reshape(-1)
  return np.asarray([hash(x) for x in items], np.int64)


def metrics(rewards_BxN: np.ndarray, ids: list[list[list[int]]] | None = None) -> dict:
  """Metrics from per-turn 0/1 rewards (fractions of all problems); the deltas compare
  the first and the last turn."""
  r = np.asarray(rewards_BxN, bool)
  n = r.shape[1]
  out = {f"acc@t{t + 1}": float(r[:, t].mean()) for t in range(n)}
  if n >= 2:
    first, last = r[:, 0], r[:, -1]
    out[f"delta(t1,t{n})"] = out[f"acc@t{n}"] - out["acc@t1"]
    out["delta_i->c"] = float((~first & last).mean())
    out["delta_c->i"] = float((first & ~last).mean())
    if ids is not None:
      ratios = [edit_distance(a, b) / max(len(a) + len(b), 1) for a, b in zip(ids[0], ids[-1])]
      out["edit_distance_ratio"] = float(np.mean(ratios))
  out["pass@turns"] = float(r.any(axis=1).mean())
  return out


def table_keys(num_turns: int) -> list[str]:
  """The metrics a report table shows for `num_turns` turns."""
  keys = [f"acc@t{t}" for t in range(1, num_turns + 1)]
  if num_turns >= 2:
    keys += [f"delta(t1,t{num_turns})", "delta_i->c", "delta_c->i"]
  return keys


def format_table(results: dict[str, dict], num_turns: int) -> str:
  """A markdown table of evaluation results (in %), one row per model."""
  passk = sorted((k for k in next(iter(results.values()), {})
                  if k.startswith("pass@") and k[5:].isdigit()), key=lambda k: int(k[5:]))
  keys = [k for k in table_keys(num_turns) + passk if all(k in r for r in results.values())]
  rows = ["| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
  for name, r in results.items():
    rows.append(f"| {name} | " + " | ".join(f"{100 * r[k]:.1f}" for k in keys) + " |")
  return "\n".join(rows)


def evaluate(params, setup: rollout_lib.Setup, problems: Sequence[base.Problem], *,
             num_turns: int = 2, max_new_tokens: int = 256, batch_size: int = 32,
             seed: int = 0, feedback: rollout_lib.Feedback | None = None,
             rules: sharding.Rules | None = None) -> tuple[dict, list[dict]]:
  """Greedy multi-turn evaluation; returns (metrics, per-problem transcripts).

  With feedback that stops at the first correct answer (a T-turn dialogue), Acc@t is
  the fraction of problems answered correctly by turn t. Default feedback: the task's
  self-correction instruction after every attempt. On a mesh (the mesh `params` live
  on) each call's rows split over its batch axes, as the training sampler's do, with
  the KV cache laid out by `rules` (the run's sharding rules); `batch_size` is rounded
  up to whole rows per device.
  """
  feedback = rollout_lib.Feedback() if feedback is None else feedback
  greedy = sampler_lib.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
  rules = rules or sharding.RULES["data_parallel"]
  rows = sharding.rows_sharding(params, rules)
  smp = rollout_lib.make_sampler(setup, rollout_lib.prompt_lens(setup, problems), num_turns,
                                 max_new_tokens,
                                 message_len=rollout_lib.instruction_len(setup, feedback),
                                 batch_sharding=rows, rules=rules if rows else None)
  batch_size = -(-batch_size // smp.row_shards) * smp.row_shards
  rewards, ids, records = [], [[] for _ in range(num_turns)], []
  for _, padded, real in sampler_lib.padded_chunks(problems, batch_size):
    ro = rollout_lib.rollout(params, smp, setup, padded, num_turns, greedy,
                             jax.random.key(seed), feedback=feedback)
    r = ro.rewards_BxN[:real]
    rewards.append(np.maximum.accumulate(r, axis=1) if feedback.stops_when_correct else r)
    for t in range(num_turns):
      ids[t] += ro.ids[t][:real]
    for i, p in enumerate(padded[:real]):
      taken = [t for t in range(num_turns) if ro.turns_BxN[i, t]]
      # Another process scored rows outside ours: their rewards arrive, not the details.
      local = ro.rows.start <= i < ro.rows.stop
      detail = lambda t, f: getattr(ro.scores[t][i - ro.rows.start], f) if local else None
      records.append({"id": p.id, "prompt": p.prompt, "answer": p.answer,
                      "attempts": [ro.texts[t][i] for t in taken],
                      "rewards": [float(ro.rewards_BxN[i, t]) for t in taken],
                      "extracted": [detail(t, "extracted") for t in taken],
                      "reasons": [detail(t, "reason") for t in taken]})
  # Rows that stopped early have no later attempt to compare: no edit distance there.
  result = metrics(np.concatenate(rewards), None if feedback.stops_when_correct else ids)
  result["num_problems"] = len(problems)
  result["feedback"] = feedback.kind
  return result, records


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k estimate from n samples of which c are correct:
  1 - C(n - c, k) / C(n, k), as a stable product (Chen et al., 2021)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def evaluate_pass_at_k(params, setup: rollout_lib.Setup, problems: Sequence[base.Problem], *,
                       num_samples: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                       max_new_tokens: int = 256, batch_size: int = 32,
                       seed: int = 0, rules: sharding.Rules | None = None
                       ) -> tuple[dict, list[dict]]:
  """Single-turn pass@k for k = 1, 2, 4, ... up to `num_samples`, sampled.

  Each problem's prompt is prefilled once and its cache copied to its `num_samples` rows
  (`Sampler.generate_grouped`); `batch_size` counts sampled rows per call, split over
  the mesh the params live on as `evaluate` splits them. Returns (metrics, per-problem
  records with the number of correct samples).
  """
  prompts = [setup.fmt.prompt_ids(p.prompt) for p in problems]
  replier = replies.Replier(setup, max(map(len, prompts)), max_new_tokens,
                            max(batch_size // num_samples, 1) * num_samples, rules=rules)
  sampling = sampler_lib.SamplingConfig(temperature=temperature, top_p=top_p)
  texts = [t.strip() for t in replier(params, prompts, sampling, jax.random.key(seed),
                                      group_size=num_samples)]
  scores = setup.task.score([p for p in problems for _ in range(num_samples)], texts)
  correct, records = [], []
  for j, p in enumerate(problems):
    mine = slice(j * num_samples, (j + 1) * num_samples)
    c = int(sum(s.reward for s in scores[mine]))
    correct.append(c)
    records.append({"id": p.id, "answer": p.answer, "num_correct": c, "samples": texts[mine]})
  ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= num_samples]
  result = {f"pass@{k}": float(np.mean([pass_at_k(num_samples, c, k) for c in correct]))
            for k in ks}
  result |= {"num_problems": len(problems), "num_samples": num_samples,
             "temperature": temperature}
  return result, records


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One evaluation protocol, run the same way by every driver (`run_protocol`): greedy
  `turns` attempts with `feedback` between them, or, with `samples` > 0, single-turn
  pass@k from that many samples at `temperature`.

  Feedback that stops a row at its first correct answer (none | unary | template) makes a
  dialogue that reveals correctness: acc@t is correct by turn t. The task's instruction
  after every attempt (feedback=instruction) is the intrinsic protocol: every row takes
  every turn, correctness is never revealed, acc@t is turn t's answer, and delta is the
  last attempt's minus the first's, with its two flips.
  """

  name: str
  turns: int = 1
  feedback: rollout_lib.Feedback = rollout_lib.Feedback()
  samples: int = 0
  temperature: float = 1.0


def turn_scores(records: Sequence[dict], turns: int, stops_when_correct: bool
                ) -> dict[str, list[float]]:
  """Per-problem acc@t (and, without stopping feedback, delta and its flips) of greedy
  records (`evaluate`'s)."""
  out = {}
  for j in range(turns):  # A row that stopped correct stays correct.
    out[f"acc@t{j + 1}"] = [float(max(r["rewards"][:j + 1])) if stops_when_correct
                            else float(r["rewards"][j]) for r in records]
  if not stops_when_correct:
    first = np.array([r["rewards"][0] for r in records])
    last = np.array([r["rewards"][-1] for r in records])
    out |= {"delta": (last - first).tolist(),
            "delta_i->c": ((first == 0) & (last > 0)).astype(float).tolist(),
            "delta_c->i": ((first > 0) & (last == 0)).astype(float).tolist()}
  return out


def run_protocol(params, setup: rollout_lib.Setup, problems: Sequence[base.Problem],
                 protocol: Protocol, *, max_new_tokens: int, batch_size: int, seed: int,
                 rules: sharding.Rules | None = None
                 ) -> tuple[dict, list[dict], dict[str, list[float]]]:
  """(metrics, per-problem records, per-problem scores by metric) of `protocol`
  (`rules`: see `evaluate`)."""
  if protocol.samples:
    result, records = evaluate_pass_at_k(
        params, setup, problems, num_samples=protocol.samples,
        temperature=protocol.temperature, max_new_tokens=max_new_tokens,
        batch_size=batch_size, seed=seed, rules=rules)
    ks = [int(k[5:]) for k in result if k.startswith("pass@")]
    return result, records, {f"pass@{k}": [pass_at_k(protocol.samples, r["num_correct"], k)
                                           for r in records] for k in ks}
  result, records = evaluate(params, setup, problems, num_turns=protocol.turns,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                             feedback=protocol.feedback, rules=rules)
  return result, records, turn_scores(records, protocol.turns,
                                      protocol.feedback.stops_when_correct)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """The Wilson score interval of a binomial proportion (95% at z = 1.96)."""
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return float(centre - half), float(centre + half)


def paired_bootstrap(a_N: np.ndarray, b_N: np.ndarray, num: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
  """(mean(a - b), low, high): a percentile bootstrap interval of the difference of two
  models' mean scores on the same N problems, resampling problems."""
  diff = np.asarray(a_N, np.float64) - np.asarray(b_N, np.float64)
  idx = np.random.default_rng(seed).integers(0, len(diff), (num, len(diff)))
  means = diff[idx].mean(axis=1)
  tail = (1 - level) / 2
  return float(diff.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def write_report(directory: str | os.PathLike, name: str, result: dict, records: list[dict]):
  """`<name>.json` (metrics + transcripts) and `<name>.png` (accuracy per turn)."""
  directory = files.path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / f"{name}.json").write_text(json.dumps({"metrics": result, "transcripts": records},
                                                     indent=1))
  plot_accuracy({name: result}, directory / f"{name}.png")


def plot_accuracy(results: dict[str, dict], path: str | os.PathLike) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, result in results.items():
    turns = sorted(int(k[5:]) for k in result if k.startswith("acc@t"))
    ax.plot(turns, [100 * result[f"acc@t{t}"] for t in turns], marker="o", label=label)
    ax.set_xticks(turns)
  ax.set_xlabel("turn")
  ax.set_ylabel("accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with files.path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
