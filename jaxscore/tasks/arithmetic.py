"""A built-in procedural arithmetic task: no download, seeded, disjoint splits.

Levels: `add1` / `add2` (1- and 2-digit addition), `mul1` / `mul2` (multiplication),
`chain` (a + b - c, two steps), `mixed` (one-digit a + b or a + b - c, half each:
rationales of one or two steps, the way GSM8K's vary in length), `word` (two-step word
problems with a stated numeric answer). Every problem carries a gold solution: one line
of arithmetic per step, then "The answer is N." A problem belongs to the test split
when a hash of its text falls in the test fraction, so the splits never share
a problem, whatever the seeds. Small levels have few distinct problems (`add1` has 100
in all, about `test_fraction` of them in test); asking for more returns all there are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

from jaxscore.tasks import answers, base

LEVELS = ("add1", "add2", "mul1", "mul2", "chain", "mixed", "word")
_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Juno")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "coins", "shells", "cards")


def _operands(rng: random.Random, digits: int) -> tuple[int, int]:
  lo, hi = (0, 9) if digits == 1 else (10, 99)
  return rng.randint(lo, hi), rng.randint(lo, hi)


def generate(rng: random.Random, level: str) -> tuple[str, int, dict]:
  """(question, answer, operands) of one random problem of `level`."""
  if level == "mixed":  # Single digits: this is about steps, not digits.
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
      return f"What is {a} + {b}?", a + b, {"a": a, "b": b, "op": "+", "level": "add"}
    return f"What is {a} + {b} - {c}?", a + b - c, {"a": a, "b": b, "c": c, "level": "chain"}
  if level in ("add1", "add2", "mul1", "mul2"):
    a, b = _operands(rng, int(level[-1]))
    op = "+" if level.startswith("add") else "*"
    answer = a + b if op == "+" else a * b
    shown = "+" if op == "+" else "×"
    return f"What is {a} {shown} {b}?", answer, {"a": a, "b": b, "op": op}
  if level == "chain":  # Two steps: a + b, then minus c.
    a, b, c = rng.randint(2, 19), rng.randint(2, 9), rng.randint(1, 9)
    return f"What is {a} + {b} - {c}?", a + b - c, {"a": a, "b": b, "c": c}
  if level == "word":
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    boxes, per_box, given = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 9)
    answer = boxes * per_box - given
    question = (f"{name} buys {boxes} boxes of {item} with {per_box} {item} in each box, "
                f"then gives {given} {item} to a friend. How many {item} does {name} "
                "have now?")
    return question, answer, {"boxes": boxes, "per_box": per_box, "given": given}
  raise ValueError(f"level={level!r}: expected one of {', '.join(LEVELS)}")


def solution(level: str, answer: int, operands: dict) -> str:
  """A worked gold response: one line of arithmetic per step, then the answer."""
  level = operands.get("level", level)  # A `mixed` problem's own level.
  if level == "chain":
    total = operands["a"] + operands["b"]
    steps = [f"{operands['a']} + {operands['b']} = {total}",
             f"{total} - {operands['c']} = {answer}"]
  elif level == "word":
    total = operands["boxes"] * operands["per_box"]
    steps = [f"{operands['boxes']} × {operands['per_box']} = {total}",
             f"{total} - {operands['given']} = {answer}"]
  else:
    shown = "+" if operands["op"] == "+" else "×"
    steps = [f"{operands['a']} {shown} {operands['b']} = {answer}"]
  return "\n".join(steps + [f"The answer is {answer}."])


def in_test_split(question: str, test_fraction: float) -> bool:
  digest = hashlib.sha256(question.encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


@dataclasses.dataclass
class ArithmeticTask:
  """Procedural arithmetic with exact integer answers."""

  level: str = "add1"
  num_train: int = 1000
  num_test: int = 100
  test_fraction: float = 0.2
  seed: int = 0
  prompt_template: str = "{question} Answer with a single number."
  instruction: str = ("There might be an error in the answer above. Please correct the "
                      "error, if any, and give the final answer as a single number.")
  # Small models rarely follow a strict format; take the last number they write.
  fallback_last_number: bool = True
  name: str = "arithmetic"

  def __post_init__(self):
    if self.level not in LEVELS:
      raise ValueError(f"level={self.level!r}: expected one of {', '.join(LEVELS)}")

  def problems(self, split: str) -> list[base.Problem]:
    if split not in ("train", "test"):
      raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    want = self.num_train if split == "train" else self.num_test
    rng = random.Random(f"{self.seed}-{self.level}-{split}")
    seen, out = set(), []
    # Stop when the level has no unseen problems left (e.g. add1 has 100).
    misses = 0
    while len(out) < want and misses < 20 * max(want, 100):
      question, answer, operands = generate(rng, self.level)
      if question in seen or in_test_split(question, self.test_fraction) != (split == "test"):
        misses += 1
        continue
      seen.add(question)
      out.append(base.Problem(
          id=f"{self.level}-{split}-{len(out)}", question=question,
          prompt=self.prompt_template.format(question=question), answer=str(answer),
          solution=solution(self.level, answer, operands),
          metadata={"level": self.level, **operands}))
    if not out:
      raise ValueError(f"arithmetic level {self.level!r} has no {split} problems")
    return out

  def score(self, problems, responses) -> list[base.Score]:
    base.check_lengths(problems, responses)
    scores = []
    for problem, response in zip(problems, responses):
      extracted = answers.extract_answer(response, self.fallback_last_number)
      if extracted is None:
        scores.append(base.Score(0.0, None, base.NO_ANSWER))
      elif answers.numbers_equal(problem.answer, extracted):
        scores.append(base.Score(1.0, extracted, base.CORRECT))
      else:
        scores.append(base.Score(0.0, extracted, base.WRONG))
    return scores
