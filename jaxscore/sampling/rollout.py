"""Multi-turn rollouts of a policy on a task, shared by training and evaluation.

  setup = Setup(cfg, tokenizer, fmt, task)
  smp = make_sampler(setup, prompt_lens(setup, problems), num_turns, max_new_tokens)
  ro = rollout(params, smp, setup, problems, num_turns, sampling, rng)

An episode is prompt, attempt 1, a user message, attempt 2, ...; N counts turns. What
the user says between attempts is a `Feedback`:
  - `instruction` (SCoRe): the task's self-correction instruction after every attempt,
    and every row takes every turn. The message does not depend on the answer, so each
    turn is scored on the host (or in worker processes) while the next turn samples.
  - `none`, `unary` ("Your answer is incorrect. Please try again.") or `template` (any
    text, optionally with the checker's `{reason}`): a row stops at its first correct
    answer; only wrong rows get the message and sample again. The message depends on
    the score, so the device waits for it; stopped rows stay in the batch as finished
    (one compiled shape) and the rollout ends early when every row has stopped.
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


UNARY_FEEDBACK = "Your answer is incorrect. Please try again."
FEEDBACK_KINDS = ("instruction", "none", "unary", "template")
# The checker's reason as `{reason}` in a feedback template.
REASON_TEXT = {base.WRONG: "the final answer is wrong",
               base.NO_ANSWER: "no final answer was found",
               base.TIMEOUT: "the program ran out of time",
               base.ERROR: "the program failed or its tests did not pass"}


@dataclasses.dataclass(frozen=True)
class Feedback:
  """What the user says after an attempt (see the module docstring)."""

  kind: str = "instruction"  # instruction | none | unary | template
  # kind=template: e.g. "Incorrect: {reason}. Try again."; kind=instruction: replaces the
  # task's instruction (e.g. Self-Refine's critique-then-revise prompt).
  template: str = ""

  def __post_init__(self):
    if self.kind not in FEEDBACK_KINDS:
      raise ValueError(f"feedback={self.kind!r}: expected one of {', '.join(FEEDBACK_KINDS)}")
    if self.kind == "template":
      try:
        self.template.format(reason="")
      except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"feedback_template={self.template!r}: only {{reason}} may be "
                         f"substituted ({e!r})") from None
      if not self.template:
        raise ValueError("feedback='template' needs a non-empty feedback_template")

  @property
  def stops_when_correct(self) -> bool:
    return self.kind != "instruction"

  def message(self, task: base.Task | None, score: base.Score | None = None) -> str:
    if self.kind == "instruction":
      return self.template or (task.instruction if task else "")
    if self.kind == "none":
      return ""
    if self.kind == "unary":
      return UNARY_FEEDBACK
    reason = REASON_TEXT.get(score.reason, score.reason) if score is not None else ""
    return self.template.format(reason=reason)

  def messages(self, task: base.Task | None) -> list[str]:
    """Every message this feedback can send (to size the sampler's buffer)."""
    if self.kind != "template":
      return [self.message(task)]
    return [self.template.format(reason=r) for r in REASON_TEXT.values()]


@dataclasses.dataclass
class Rollouts:
  """Texts and token ids per turn of a batch of episodes, and their rewards.

  With several processes, each scores the rows it holds (`rows`, a slice); `scores`
  covers those rows and `rewards_BxN`, `turns_BxN` all rows, gathered. A turn a row did
  not take (it stopped earlier) has text "", no ids, score None and reward 0.
  """

  problems: list[base.Problem]
  texts: list[list[str]]  # [turn][row]
  ids: list[list[list[int]]]  # [turn][row]
  scores: list[list[base.Score | None]]  # [turn][row in `rows`]
  rewards_BxN: np.ndarray
  rows: slice
  episode: sampler_lib.Episode
  turns_BxN: np.ndarray | None = None  # bool: the row sampled this turn (None: all).

  def __post_init__(self):
    if self.turns_BxN is None:
      self.turns_BxN = np.ones(self.rewards_BxN.shape, bool)

  def transcripts(self, n: int) -> list[dict]:
    """The first `n` episodes as JSON records."""
    return [{"id": self.problems[i].id, "prompt": self.problems[i].prompt,
             "answer": self.problems[i].answer,
             "attempts": [self.texts[t][i] for t in range(len(self.texts))],
             "rewards": self.rewards_BxN[i].tolist()}
            for i in range(min(n, len(self.problems)))]


def from_config(c) -> tuple[Setup, Setup, Any]:
  """(training setup, evaluation setup, params) of an experiment config (`model`,
  `format`, `task`)."""
  import jax

  from jaxscore import tasks
  from jaxscore.models import pretrained
  from jaxscore.sampling import formats

  model = pretrained.load(c.model.name, param_dtype=c.model.param_dtype, dtype=c.model.dtype)
  params = jax.device_put(model.params)
  fmt = formats.make_format(model.tokenizer, c.format)
  task = tasks.make_task(c.task.name, **c.task.kwargs.to_dict())
  eval_task = (tasks.make_task(c.task.eval_name, **c.task.eval_kwargs.to_dict())
               if c.task.eval_name else task)
  return (Setup(model.cfg, model.tokenizer, fmt, task),
          Setup(model.cfg, model.tokenizer, fmt, eval_task), params)


def episode_len_bound(prompt_lens: Sequence[int], num_turns: int, max_new_tokens: int,
                      message_len: int) -> int:
  """The longest episode the sampler can write: the longest prompt, every attempt at
  full length plus its end-of-turn, and each message between turns plus its
  end-of-turn."""
  return (max(prompt_lens) + num_turns * (max_new_tokens + 1)
          + (num_turns - 1) * (message_len + 1))


def instruction_len(setup: Setup, feedback: Feedback = Feedback()) -> int:
  """Tokens of the longest message between attempts (default: the task's instruction)."""
  if setup.task is None and feedback.kind == "instruction" and not feedback.template:
    return 0
  return max(len(setup.fmt.instruction_ids(m)) for m in feedback.messages(setup.task))


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
            sampling: sampler_lib.SamplingConfig, rng, score_pool=None,
            feedback: Feedback = Feedback()) -> Rollouts:
  """Samples up to `num_turns` attempts per problem with `feedback` between them.

  With a multi-process sampler, each process tokenizes, feeds and scores only its rows.
  The sampler must hold the longest message (`make_sampler(message_len=
  instruction_len(setup, feedback))`).
  """
  if feedback.stops_when_correct:
    return _feedback_rollout(params, smp, setup, problems, num_turns, sampling, rng,
                             feedback)
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


def _feedback_rollout(params, smp, setup: Setup, problems, num_turns, sampling, rng,
                      feedback: Feedback) -> Rollouts:
  """Turns until each row's first correct answer; only wrong rows get `feedback`."""
  fmt, tokenizer, task = setup.fmt, setup.tokenizer, setup.task
  mine = slice(*sharding.process_rows(len(problems)))
  feed = problems[mine] if smp.batch_sharding is not None else problems
  local_rows = range(len(problems))[mine]
  state = smp.start([fmt.prompt_ids(p.prompt) for p in feed], rng)
  n = len(problems)
  texts = [[""] * n for _ in range(num_turns)]
  ids = [[[] for _ in range(n)] for _ in range(num_turns)]
  scores = [[None] * len(local_rows) for _ in range(num_turns)]
  rewards = np.zeros((len(local_rows), num_turns), np.float32)
  taken = np.zeros((len(local_rows), num_turns), bool)
  active = np.ones((len(local_rows),), bool)  # This process's rows still answering.
  unseen = smp.max_prompt_len or max(len(fmt.prompt_ids(p.prompt)) for p in feed)
  for turn in range(1, num_turns + 1):
    if turn > 1:
      if not sharding.gather_rows(active[:, None]).any():
        break  # Every row has answered correctly: no more turns to sample.
      msgs = [fmt.instruction_ids(feedback.message(task, scores[turn - 2][i]))
              if active[i] else [] for i in range(len(local_rows))]
      state = smp.add_message(state, msgs, active=active)
      unseen = 2 + max(map(len, msgs))  # Last sampled token, end-of-turn, message.
    state = smp.generate(params, state, sampling, pending=unseen)
    turn_ids = smp.episode(state).response_ids(turn)
    live = np.flatnonzero(active)
    for i in range(n):
      ids[turn - 1][i] = turn_ids[i]
      texts[turn - 1][i] = tokenizer.decode(turn_ids[i], skip_special_tokens=True).strip()
    turn_scores = task.score([problems[local_rows[i]] for i in live],
                             [texts[turn - 1][local_rows[i]] for i in live])
    for i, sc in zip(live, turn_scores):
      scores[turn - 1][i] = sc
      rewards[i, turn - 1] = sc.reward
      taken[i, turn - 1] = True
      active[i] = sc.reward < 1.0
  return Rollouts(list(problems), texts, ids, scores, sharding.gather_rows(rewards), mine,
                  smp.episode(state), turns_BxN=sharding.gather_rows(taken))
