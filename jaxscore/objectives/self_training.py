"""Self-training: fine-tune on what the model itself samples, filtered by the task's
checker. The loss is SFT's; what is learned is chosen from sampled episodes.

  star      multi-turn STaR (Zelikman et al., 2022; its multi-turn form as in SCoRe,
            Kumar et al., 2024): sample two-attempt episodes with the task's instruction
            between the attempts, keep those whose second attempt is right, and learn the
            second attempt in the context of the first; `rounds` rounds, each sampling from
            the latest model and fine-tuning the base model on everything kept so far.
  pair_sft  Pair-SFT (Welleck et al., 2023, as SCoRe's baseline): sample single attempts,
            pair each wrong one with a random correct response to the same problem, and
            learn (problem, wrong attempt, instruction) -> correct response.

Both are `kind = "self_training"`: `loops.self_training` samples, calls `keep` and
fine-tunes with the offline loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxscore.objectives import base, sft


@dataclasses.dataclass(frozen=True)
class STaRConfig:
  group_size: int = 4  # Episodes sampled per problem.
  rounds: int = 2  # sample -> keep -> fine-tune the base model on all kept so far.
  temperature: float = 1.0  # Sampling temperature.
  problems_per_round: int = 0  # Training problems sampled per round; 0: all of them.
  aggregation: str = "token_mean"  # The SFT loss's (token_mean | sequence_mean | sum).


@dataclasses.dataclass(frozen=True)
class PairSFTConfig:
  group_size: int = 4  # Attempts sampled per problem.
  temperature: float = 1.0
  problems_per_round: int = 0  # Training problems sampled; 0: all of them.
  aggregation: str = "token_mean"


def correction_example(setup, problem, first: str, second: str) -> dict:
  """(problem, first attempt, the task's instruction) -> second attempt."""
  fmt = setup.fmt
  return {"prompt": fmt.prompt_ids(problem.prompt) + fmt.attempt_ids(first)
          + fmt.instruction_ids(setup.task.instruction),
          "completion": sft.completion_ids(fmt, setup.tokenizer, second)}


def real_rows(batches: Sequence[tuple[Any, int]]):
  """(rollouts, row) of every real row of `batches` of (rollouts, real rows): padding
  rows past `real` are never kept."""
  for ro, real in batches:
    for r in range(real):
      yield ro, r


class SelfTrainingObjective(sft.SFT):
  """SFT on examples kept from the model's own samples."""

  kind = "self_training"
  turns: int  # Attempts per sampled episode (the task's instruction between them).

  @property
  def rounds(self) -> int:
    return 1

  @property
  def resamples(self) -> bool:
    """True: each round samples from the latest model; False: from the base model."""
    return False

  def examples(self, setup, problems):
    raise ValueError(f"{self.name} learns from its own samples: train it with "
                     "jaxscore.loops.self_training (experiment.train does)")

  def keep(self, setup, batches: Sequence[tuple[Any, int]], rng: np.random.Generator
           ) -> list[dict]:
    """Training examples from `batches` of (rollouts, real rows): padding rows past
    `real` are never kept."""
    raise NotImplementedError


@base.register("star")
class STaR(SelfTrainingObjective):
  """Multi-turn STaR."""

  title = "STaR"
  Config = STaRConfig
  turns = 2

  @property
  def rounds(self) -> int:
    return self.config.rounds

  @property
  def resamples(self) -> bool:
    return True

  def keep(self, setup, batches, rng):
    """Episodes whose second attempt is right (after a wrong first one, or, D+, a right
    one)."""
    del rng
    return [correction_example(setup, ro.problems[r], ro.texts[0][r], ro.texts[1][r])
            for ro, r in real_rows(batches) if ro.rewards_BxN[r, 1] > 0]


@base.register("pair_sft")
class PairSFT(SelfTrainingObjective):
  """Pair-SFT."""

  title = "Pair-SFT"
  Config = PairSFTConfig
  turns = 1

  def keep(self, setup, batches, rng):
    """Every wrong attempt with a random correct response to the same problem; a
    problem with no correct response gives nothing."""
    by_problem: dict[str, tuple[Any, list[str], list[str]]] = {}
    for ro, r in real_rows(batches):
      p = ro.problems[r]
      _, right, wrong = by_problem.setdefault(p.id, (p, [], []))
      (right if ro.rewards_BxN[r, 0] > 0 else wrong).append(ro.texts[0][r])
    return [correction_example(setup, p, w, right[rng.integers(len(right))])
            for p, right, wrong in by_problem.values() for w in (wrong if right else [])]
