"""Self-Explore's data (Hwang et al., arXiv 2404.10346): sampled rationales, the RFT set,
outcome pairs, first-pit exploration and step-level pairs.

The pieces that decide what is learned are plain functions of texts and scores, so they
are tested with scripted samplers; `jaxscore.sampling.replies` samples for real.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
import re
from collections.abc import Callable, Sequence

import numpy as np

from jaxscore.evaluate import edit_distance
from jaxscore.self_explore import steps as steps_lib
from jaxscore.tasks import base

# ---------------------------------------------------------------------------
# Stage 2: rationales -> RFT set and outcome pairs.

_EQUATION = re.compile(r"[-\d.,]+\s*[-+*/×x÷]\s*[-\d.,]+\s*=\s*[-\d.,]+|<<[^>]*>>")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow, ast.Mod: operator.mod,
        ast.FloorDiv: operator.floordiv}


def reasoning_key(text: str) -> str:
  """What makes two correct rationales the same reasoning: their equations (GSM8K's
  `<<...>>` annotations or `a op b = c` lines), else their words."""
  equations = [re.sub(r"\s+", "", e) for e in _EQUATION.findall(text)]
  return "|".join(equations) if equations else " ".join(text.split())


def _arithmetic(node) -> float:
  """The value of a +, -, *, /, **, % expression of numbers (no names, no calls)."""
  if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
    return float(node.value)
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    value = _arithmetic(node.operand)
    return -value if isinstance(node.op, ast.USub) else value
  if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
    left, right = _arithmetic(node.left), _arithmetic(node.right)
    if isinstance(node.op, ast.Pow) and abs(right) > 64:
      raise ValueError("exponent too large")
    return _OPS[type(node.op)](left, right)
  raise ValueError(f"not arithmetic: {ast.dump(node)}")


def equation_holds(equation: str) -> bool:
  """Whether `lhs = rhs` is arithmetically right (within 1e-3, as the reference code
  checks GSM8K's `<<48/2=24>>` annotations); an equation that does not parse is wrong."""
  equation = equation.strip().strip("<>").replace(",", "").replace("×", "*").replace("÷", "/")
  lhs, eq, rhs = equation.partition("=")
  if not eq:
    return False
  try:
    value = _arithmetic(ast.parse(lhs.replace("x", "*").strip(), mode="eval").body)
    return abs(value - float(rhs.strip())) < 1e-3
  except (SyntaxError, ValueError, ZeroDivisionError, OverflowError):
    return False


def equations_hold(text: str) -> bool:
  """Every equation of a rationale is right: a correct final answer reached through a
  wrong calculation does not count as a correct rationale (GSM8K's rule)."""
  return all(equation_holds(e) for e in _EQUATION.findall(text))


def rft_set(correct: Sequence[str], max_per_problem: int = 8) -> list[str]:
  """Up to `max_per_problem` correct rationales with distinct reasoning, in order."""
  seen, out = set(), []
  for text in correct:
    key = reasoning_key(text)
    if key not in seen:
      seen.add(key)
      out.append(text.strip())
    if len(out) >= max_per_problem:
      break
  return out


def normalized_edit_distance(a: str, b: str) -> float:
  """Edit distance over characters divided by the two lengths together."""
  return edit_distance(a, b) / max(len(a) + len(b), 1)


def distinct_by_edit_distance(texts: Sequence[str], max_count: int, rng: np.random.Generator,
                              threshold: float = 0.2) -> list[str]:
  """MATH's deduplication: in a seeded random order, keep a text whose edit distance to
  every kept one, over their mean length, exceeds `threshold`. (The reference code
  divides by `len(a) + len(b) // 2`, an operator-precedence slip for the mean length.)"""
  pool = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
  kept: list[str] = []
  for i in rng.permutation(len(pool)):
    text = pool[i]
    if all(edit_distance(text, k) / max((len(text) + len(k)) / 2, 1) > threshold
           for k in kept):
      kept.append(text)
    if len(kept) >= max_count:
      break
  return kept


def outcome_pairs(correct: Sequence[str], wrong: Sequence[str]) -> list[tuple[str, str]]:
  """GSM8K: each correct rationale paired with the remaining wrong one farthest from it
  (edit distance over characters), each wrong one used once."""
  pool = list(dict.fromkeys(w.strip() for w in wrong if w.strip()))
  pairs = []
  for c in correct:
    if not pool:
      break
    rejected = max(pool, key=lambda w: (edit_distance(c, w), -len(w)))
    pool.remove(rejected)
    pairs.append((c, rejected))
  return pairs


MATH_PAIR_THRESHOLDS = (0.5, 0.4, 0.3)


def outcome_pairs_math(correct: Sequence[str], wrong: Sequence[str]) -> list[tuple[str, str]]:
  """MATH: each correct rationale paired with the *shortest* remaining wrong one whose
  normalised edit distance to it exceeds 0.5, else 0.4, else 0.3, else the shortest:
  far enough to differ, short enough not to be a degenerate repetition. Each wrong one
  is used once."""
  pool = list(dict.fromkeys(w.strip() for w in wrong if w.strip()))
  pairs = []
  for c in correct:
    if not pool:
      break
    distance = {w: normalized_edit_distance(c, w) for w in pool}
    for threshold in (*MATH_PAIR_THRESHOLDS, -1.0):
      far = [w for w in pool if distance[w] > threshold]
      if far:
        break
    rejected = min(far, key=lambda w: (len(w), w))
    pool.remove(rejected)
    pairs.append((c, rejected))
  return pairs


RULES = ("gsm8k", "math")


def rationale_data(correct: Sequence[str], wrong: Sequence[str], max_per_problem: int,
                   rules: str, rng: np.random.Generator) -> tuple[list[str], list[tuple[str, str]]]:
  """(RFT set, outcome pairs) of one problem's sampled rationales, by the reference
  code's rules for GSM8K or MATH.

  gsm8k: correct rationales whose every equation holds, distinct by their equations,
    each paired with the farthest wrong one.
  math: correct rationales distinct by edit distance (and wrong ones likewise, up to
    3x as many), each paired with the shortest wrong one far enough from it.
  """
  if rules == "gsm8k":
    distinct = rft_set([t for t in correct if equations_hold(t)], max_per_problem)
    return distinct, outcome_pairs(distinct, wrong)
  if rules == "math":
    distinct = distinct_by_edit_distance(correct, max_per_problem, rng)
    if not distinct:
      return [], []
    wrong = distinct_by_edit_distance(wrong, 3 * max_per_problem, rng)
    return distinct, outcome_pairs_math(distinct, wrong)
  raise ValueError(f"rationales.rules={rules!r}: expected one of {', '.join(RULES)}")


# ---------------------------------------------------------------------------
# Stage 4: first-pit exploration.


@dataclasses.dataclass
class Exploration:
  """One wrong rationale explored step by step; steps and pit are 1-based."""

  problem: base.Problem
  chosen: str  # The correct rationale it was paired with.
  rejected: str
  steps: list[str]
  completions: list[list[str]] = dataclasses.field(default_factory=list)  # [step][sample]
  correct: list[list[bool]] = dataclasses.field(default_factory=list)
  pit: int | None = None  # The first step from which no completion reaches the answer.

  def to_json(self) -> dict:
    return {"id": self.problem.id, "chosen": self.chosen, "rejected": self.rejected,
            "steps": self.steps, "completions": self.completions, "correct": self.correct,
            "pit": self.pit}


# (problem, reply so far) for each query, and k -> k completions per query.
ContinueFn = Callable[[Sequence[tuple[base.Problem, str]], int], list[list[str]]]


def explore(pairs: Sequence[tuple[base.Problem, str, str]], continue_fn: ContinueFn,
            task: base.Task, k: int = 4, style: str = "lines",
            max_steps: int = 9) -> list[Exploration]:
  """Explores the rejected rationale of each (problem, chosen, rejected) pair.

  Step t (1-based) continues `steps[:t]` k times; the first t with no completion that
  reaches the gold answer (scored on the completion alone) is the pit, and exploring that
  rationale stops. All active rationales are explored together, one step index at a time.
  A rationale whose every step has a successful continuation has no pit.
  """
  runs = [Exploration(p, c, r, steps_lib.split_steps(r, style, max_steps))
          for p, c, r in pairs]
  active = [e for e in runs if e.steps]
  t = 1
  while active:
    prefixes = ["".join(e.steps[:t]) for e in active]
    completions = continue_fn([(e.problem, pre) for e, pre in zip(active, prefixes)], k)
    flat_problems = [e.problem for e in active for _ in range(k)]
    # The completion alone is scored, as the reference code does: the prefix's own
    # (wrong) final answer cannot make a completion count or hide a pit.
    scores = task.score(flat_problems, [c for cs in completions for c in cs])
    still = []
    for i, e in enumerate(active):
      ok = [s.reward > 0 for s in scores[i * k:(i + 1) * k]]
      e.completions.append(list(completions[i]))
      e.correct.append(ok)
      if not any(ok):
        e.pit = t
      elif t < len(e.steps):
        still.append(e)
    active, t = still, t + 1
  return runs


def step_pairs(explorations: Sequence[Exploration]) -> list[dict]:
  """Step-level preference pairs at each first pit, as texts.

  prompt = question + steps before the pit (`prefix`); rejected = the pit step;
  chosen = the shortest correct completion from the prefix not yet used for this
  problem (for a pit at step 1, the paired correct rationale). Per problem, no chosen
  and no rejected text appears twice.
  """
  used_chosen: dict[str, set[str]] = {}
  used_rejected: dict[str, set[str]] = {}
  out = []
  for e in explorations:
    if e.pit is None:
      continue
    pid = e.problem.id
    chosen_seen = used_chosen.setdefault(pid, set())
    rejected_seen = used_rejected.setdefault(pid, set())
    rejected = e.steps[e.pit - 1]
    if e.pit == 1:
      prefix, candidates = "", [e.chosen]
    else:
      prefix = "".join(e.steps[:e.pit - 1])
      before = zip(e.completions[e.pit - 2], e.correct[e.pit - 2])
      candidates = sorted({c for c, ok in before if ok}, key=lambda c: (len(c), c))
    candidates = [c for c in candidates
                  if c not in chosen_seen and c.strip() != rejected.strip()]
    if not candidates or rejected in rejected_seen:
      continue
    chosen_seen.add(candidates[0])
    rejected_seen.add(rejected)
    out.append({"id": pid, "pit": e.pit, "prefix": prefix, "chosen": candidates[0],
                "rejected": rejected})
  return out


def pit_statistics(explorations: Sequence[Exploration], pairs: Sequence[dict]) -> dict:
  pits = [e.pit for e in explorations if e.pit is not None]
  counts = np.bincount(pits, minlength=max(pits, default=0) + 1)[1:] if pits else []
  return {"explored": len(explorations), "with_pit": len(pits),
          "without_pit": len(explorations) - len(pits),
          "pits_by_step": {str(i + 1): int(n) for i, n in enumerate(counts)},
          "step_pairs": len(pairs),
          "mean_steps": float(np.mean([len(e.steps) for e in explorations]))
          if explorations else 0.0}
