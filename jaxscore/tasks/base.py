"""The task interface: problems in, 0/1 rewards out, with the reason for each."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from jaxscore.tasks import records

# Why a response got its reward.
CORRECT, WRONG, NO_ANSWER, TIMEOUT, ERROR = "correct", "wrong", "no_answer", "timeout", "error"


@dataclasses.dataclass(frozen=True)
class Problem:
  id: str
  question: str  # The problem as written in the dataset.
  prompt: str  # The first-turn user message built from it.
  answer: str | None = None  # Gold answer (math tasks).
  tests: tuple[str, ...] = ()  # Test code (code tasks).
  solution: str | None = None  # A gold response (rationale or program), for SFT.
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Score:
  reward: float  # 1.0 correct, 0.0 otherwise.
  extracted: str | None  # The answer or program taken from the response.
  reason: str  # CORRECT, WRONG, NO_ANSWER, TIMEOUT or ERROR.


class Task(Protocol):
  name: str
  instruction: str  # The self-correction instruction between attempts.

  def problems(self, split: str) -> Sequence[Problem]:
    ...

  def score(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[Score]:
    ...


def check_lengths(problems: Sequence[Problem], responses: Sequence[str]) -> None:
  if len(problems) != len(responses):
    raise ValueError(f"{len(problems)} problems but {len(responses)} responses")


def build_problems(recs: Sequence[tuple[str, dict[str, Any]]],
                   build: Callable[[int, str, dict[str, Any]], Problem]) -> Sequence[Problem]:
  """`build(index, where, record)` over a dataset's records.

  Records held in memory (files, the hub) are built and checked at once, so a bad record
  fails before any training. A lazily read dataset (TFDS) gives problems built on access,
  so that it never has to fit in memory; its records share one typed schema, so checking
  the first one now catches a dataset of the wrong shape.
  """
  if isinstance(recs, list):
    return [build(i, where, r) for i, (where, r) in enumerate(recs)]
  problems = records.LazySequence(len(recs), lambda i: build(i, *recs[i]))
  problems[0]  # pylint: disable=pointless-statement
  return problems
