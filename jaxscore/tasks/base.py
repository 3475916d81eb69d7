"""The task interface: problems in, 0/1 rewards out, with the reason for each."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

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

  def problems(self, split: str) -> list[Problem]:
    ...

  def score(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[Score]:
    ...


def check_lengths(problems: Sequence[Problem], responses: Sequence[str]) -> None:
  if len(problems) != len(responses):
    raise ValueError(f"{len(problems)} problems but {len(responses)} responses")
