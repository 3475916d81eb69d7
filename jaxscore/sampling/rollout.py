"""Multi-turn rollouts of a policy on a task, shared by training and evaluation.

  setup = Setup(cfg, tokenizer, fmt, task)
  smp = make_sampler(setup, prompt_lens(setup, problems), num_turns, max_new_tokens)
  ro = rollout(params, smp, setup, problems, num_turns, sampling, rng)

An episode is prompt, attempt 1, the task's instruction, attempt 2, ...; each turn is
scored on the host (or in worker processes) while the next turn samples. N counts turns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxscore.infra import sharding
from jaxscore.models import model as model_lib
from jaxscore.sampling import sampler as sampler_lib
from jaxscore.tasks import base


@dataclasses.dataclass(frozen=True)
class Setup:
  """The pieces every rollout needs, always together and in this order."""

  cfg: model_lib.ModelConfig
  tokenizer: Any
  fmt: Any  # formats.ChatFormat | formats.PlainFormat
  task: base.Task | None  # None for free-form sampling (e.g. `jaxscore chat`).


@dataclasses.dataclass
class Rollouts:
  """Texts and token ids per turn of a batch of episodes, and their rewards.

  With several processes, each scores the rows it holds (`rows`, a slice); `scores`
  covers those rows and `rewards_BxN` all rows, gathered.
  """

  problems: list[base.Problem]
  texts: list[list[str]]  # [turn][row]
  ids: list[list[list[int]]]  # [turn][row]
  scores: list[list[base.Score]]  # [turn][row in `rows`]
  rewards_BxN: np.ndarray
  rows: slice
  episode: sampler_lib.Episode

  def transcripts(self, n: int) -> list[dict]:
    """The first `n` episodes as JSON records."""
    return [{"id": self.problems[i].id, "prompt": self.problems[i].prompt,
             "answer": self.problems[i].answer,
             "attempts": [self.texts[t][i] for t in range(len(self.texts))],
             "rewards": self.rewards_BxN[i].tolist()}
            for i in range(min(n, len(self.problems)))]


def episode_len_bound(prompt_lens: Sequence[int], num_turns: int, max_new_tokens: int,
                      message_len: int) -> int:
  """The longest episode the sampler can write: the longest prompt, every attempt at
  full length plus its end-of-turn, and each message between turns plus its
  end-of-turn."""
  return (max(prompt_lens) + num_turns * (max_new_tokens + 1)
          + (num_turns - 1) * (message_len + 1))


def instruction_len(setup: Setup) -> int:
  """Tokens of the message between attempts (the task's instruction)."""
  return len(setup.fmt.instruction_ids(setup.task.instruction)) if setup.task else 0


def prompt_lens(setup: Setup, problems: Sequence[base.Problem]) -> list[int]:
  return [len(setup.fmt.prompt_ids(p.prompt)) for p in problems]


def make_sampler(setup: Setup, prompt_lens: Sequence[int], num_turns: int,
                 max_new_tokens: int, message_len: int | None = None, batch_sharding=None,
                 rules=None) -> sampler_lib.Sampler:
  """A sampler whose buffer holds the longest episode: prompts of `prompt_lens` tokens,
  `num_turns` attempts, and messages of `message_len` tokens between them (default: the
  task's instruction)."""
  if message_len is None:
    message_len = instruction_len(setup)
  bound = episode_len_bound(prompt_lens, num_turns, max_new_tokens, message_len)
  stop_ids = sorted({setup.tokenizer.eos_token_id, setup.fmt.end_of_turn_id} - {None})
  return sampler_lib.Sampler(
      setup.cfg, max_len=sampler_lib.bucket(bound, minimum=64), stop_ids=stop_ids,
      end_of_turn_id=setup.fmt.end_of_turn_id, pad_id=setup.tokenizer.pad_token_id or 0,
      batch_sharding=batch_sharding, rules=rules, max_prompt_len=max(prompt_lens))


def rollout(params, smp: sampler_lib.Sampler, setup: Setup,
            problems: Sequence[base.Problem], num_turns: int,
            sampling: sampler_lib.SamplingConfig, rng, score_pool=None) -> Rollouts:
  """Samples `num_turns` attempts per problem, scoring each turn while the next samples.

  With a multi-process sampler, each process tokenizes, feeds and scores only its rows.
  """
  fmt, tokenizer, task = setup.fmt, setup.tokenizer, setup.task
  instruction = fmt.instruction_ids(task.instruction)
  mine = slice(*sharding.process_rows(len(problems)))
  feed = problems[mine] if smp.batch_sharding is not None else problems
  prompts = [fmt.prompt_ids(p.prompt) for p in feed]
  state = smp.start(prompts, rng)
  texts, ids, pending = [], [], []
  # Unseen tokens per row, known here: no device-to-host sync to size the prefill, and
  # the same bound (hence the same program) on every process.
  unseen = smp.max_prompt_len or max(map(len, prompts))
  for turn in range(1, num_turns + 1):
    if turn > 1:
      state = smp.add_message(state, [instruction] * len(feed))
      unseen = 2 + len(instruction)  # Last sampled token, a closing end-of-turn, message.
    state = smp.generate(params, state, sampling, pending=unseen)
    turn_ids = smp.episode(state).response_ids(turn)
    turn_texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in turn_ids]
    texts.append(turn_texts)
    ids.append(turn_ids)
    # Rewards run on the host (or in worker processes) while the device samples on;
    # each process scores the rows it holds.
    args = (list(problems[mine]), turn_texts[mine])
    pending.append(score_pool.submit(task.score, *args) if score_pool is not None
                   else task.score(*args))
  scores = [p.result() if hasattr(p, "result") else p for p in pending]
  local = np.array([[s.reward for s in turn] for turn in scores], np.float32).T
  return Rollouts(list(problems), texts, ids, scores, sharding.gather_rows(local), mine,
                  smp.episode(state))
