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
    the score, so a batch waits for it; split in parts, one part is scored while the
    others sample. Stopped rows stay in the batch as finished (one compiled shape) and
    the rollout ends early when every row has stopped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxscore import tasks
from jaxscore.infra import sharding
from jaxscore.models import model as model_lib
from jaxscore.models import pretrained
from jaxscore.sampling import formats
from jaxscore.sampling import sampler as sampler_lib
from jaxscore.tasks import base


@dataclasses.dataclass(frozen=True)
class Setup:
  """The pieces every rollout needs, always together and in this order."""

  cfg: model_lib.ModelConfig
  tokenizer: Any
  fmt: Any  # formats.ChatFormat | formats.PlainFormat
  task: base.Task | None  # None for free-form sampling (e.g. `jaxscore chat`).
  # The model's own stop tokens beyond EOS and end of turn (`Pretrained.stop_ids`).
  extra_stop_ids: tuple[int, ...] = ()

  @property
  def stop_ids(self) -> list[int]:
    return sorted({self.tokenizer.eos_token_id, self.fmt.end_of_turn_id,
                   *self.extra_stop_ids} - {None})


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

  def first(self, n: int) -> Rollouts:
    """The first `n` rows (one process: `rows` covers every row)."""
    head = lambda rows: [r[:n] for r in rows]
    return Rollouts(self.problems[:n], head(self.texts), head(self.ids), head(self.scores),
                    self.rewards_BxN[:n], slice(0, n),
                    jax.tree.map(lambda x: x[:n], self.episode), self.turns_BxN[:n])

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
  # Tasks first: a wrong data path is reported before the model loads.
  task = tasks.make_task(c.task.name, **c.task.kwargs.to_dict())
  eval_task = (tasks.make_task(c.task.eval_name, **c.task.eval_kwargs.to_dict())
               if c.task.eval_name else task)
  model = pretrained.from_config(c.model)
  # Straight onto the run's mesh, sharded as training shards them: a model as large as
  # one device's memory never sits whole on the first device, and evaluation runs
  # where training does.
  mesh, rules = sharding.training_mesh(sharding.MeshConfig(**c.get("mesh", {})))
  if model.cfg.quantize != "none":  # QLoRA: the run never holds the full-precision base.
    params = sharding.frozen_base(model.params, model.cfg, mesh, rules)
  else:
    params = jax.device_put(model.params, sharding.param_shardings(
        model.cfg.replace(lora=None), mesh, rules))
  fmt = formats.make_format(model.tokenizer, c.format)
  return (Setup(model.cfg, model.tokenizer, fmt, task, model.stop_ids),
          Setup(model.cfg, model.tokenizer, fmt, eval_task, model.stop_ids), params)


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
  return sampler_lib.Sampler.shared(
      setup.cfg, max_len=sampler_lib.bucket(bound, minimum=64), stop_ids=setup.stop_ids,
      end_of_turn_id=setup.fmt.end_of_turn_id, pad_id=setup.tokenizer.pad_token_id or 0,
      batch_sharding=batch_sharding, rules=rules, max_prompt_len=max(prompt_lens))


def start_groups(smp: sampler_lib.Sampler, prompts: Sequence[Sequence[int]], rng,
                 group_size: int) -> tuple[sampler_lib.SamplerState, int]:
  """(state, group_size): a sampler state for rows that come in runs of `group_size` identical
  prompts (an RL group's samples), holding each prompt once, so that turn 1
  (`first_turn`) prefills each prompt once and copies its cache to the group. When the
  prompts alone do not split over the devices that hold rows, every row is started
  (group 1)."""
  if group_size > 1:
    if len(prompts) % group_size:
      raise ValueError(f"{len(prompts)} rows are not whole groups of {group_size} "
                       "(rollout.group_size)")
    for i in range(0, len(prompts), group_size):
      if any(list(p) != list(prompts[i]) for p in prompts[i + 1:i + group_size]):
        raise ValueError(f"rows {i}..{i + group_size - 1} do not share one prompt: groups of "
                         f"{group_size} must be consecutive copies of a problem")
    if (len(prompts) // group_size * jax.process_count()) % smp.row_shards:
      group_size = 1
    else:
      prompts = prompts[::group_size]
  return smp.start(prompts, rng), group_size


def first_turn(params, smp: sampler_lib.Sampler, state, sampling, group_size: int, pending: int):
  """Turn 1 from `start_groups`' state: each prompt prefilled once for its `group_size` rows."""
  if group_size > 1:
    return smp.generate_grouped(params, state, sampling, group_size, pending=pending)
  return smp.generate(params, state, sampling, pending=pending)


def whole_rows_padding(rows: int, group_size: int, shards: int, parts: int = 1) -> int:
  """Rows to add (whole groups, copies of the last problem) so that each of `parts`
  equal parts of `rows` splits over the `shards` devices that hold the sampler's rows:
  e.g. 16 rows on 3 sampling devices sample as 18, and the 2 extra are dropped."""
  unit = group_size * parts
  return (-(rows // unit) % (shards // math.gcd(group_size, shards))) * unit


def row_padding(rows: int, group_size: int, shards: int, parts: int = 1) -> int:
  """`whole_rows_padding` of a rollout's rows: one process only; several keep their rows
  as given."""
  if jax.process_count() > 1:
    return 0
  return whole_rows_padding(rows, group_size, shards, parts)


def rollout(params, smp: sampler_lib.Sampler, setup: Setup,
            problems: Sequence[base.Problem], num_turns: int,
            sampling: sampler_lib.SamplingConfig, rng, score_pool=None,
            feedback: Feedback = Feedback(), score_overlap_splits: int = 1,
            group_size: int = 1, sample_batches: int = 1) -> Rollouts:
  """Samples up to `num_turns` attempts per problem with `feedback` between them.

  With a multi-process sampler, each process tokenizes, feeds and scores only its rows.
  The sampler must hold the longest message (`make_sampler(message_len=
  instruction_len(setup, feedback))`). With feedback that stops rows,
  `score_overlap_splits` > 1 scores one part of the rows while the others sample (see
  `_feedback_rollout`). `group_size` > 1: rows come in runs of `group_size` copies of a problem,
  whose prompt is prefilled once for the run. `sample_batches` > 1 samples the rows in
  that many consecutive batches, one after another (`_in_batches`). Rows that do not
  split over the sampler's devices are sampled with copies of the last group added
  (`row_padding`); each row keeps its random stream, so padding changes no real row.
  """
  if sample_batches > 1:
    return _in_batches(params, smp, setup, problems, num_turns, sampling, rng, score_pool,
                       feedback, score_overlap_splits, group_size, sample_batches)
  parts = score_overlap_splits if feedback.stops_when_correct else 1
  pad = row_padding(len(problems), group_size, smp.row_shards, parts)
  padded = list(problems) + [problems[-1]] * pad
  ro = _one_batch(params, smp, setup, padded, num_turns, sampling, rng, score_pool,
                  feedback, score_overlap_splits, group_size)
  return ro.first(len(problems)) if pad else ro


def _one_batch(params, smp, setup: Setup, problems, num_turns: int, sampling, rng,
               score_pool, feedback: Feedback, score_overlap_splits: int,
               group_size: int) -> Rollouts:
  """`rollout` of rows that split over the sampler's devices, in one batch."""
  if feedback.stops_when_correct:
    return _feedback_rollout(params, smp, setup, problems, num_turns, sampling, rng,
                             feedback, score_overlap_splits, group_size)
  fmt, tokenizer, task = setup.fmt, setup.tokenizer, setup.task
  # The message the sampler was sized for: the feedback's own (a Self-Refine critique
  # prompt), else the task's instruction.
  instruction = fmt.instruction_ids(feedback.message(task))
  mine = slice(*sharding.process_rows(len(problems)))
  feed = problems[mine] if smp.batch_sharding is not None else problems
  prompts = [fmt.prompt_ids(p.prompt) for p in feed]
  state, group_size = start_groups(smp, prompts, rng, group_size)
  texts, ids, pending = [], [], []
  # Unseen tokens per row, known here: no device-to-host sync to size the prefill, and
  # the same bound (hence the same program) on every process.
  unseen = smp.max_prompt_len or max(map(len, prompts))
  for turn in range(1, num_turns + 1):
    if turn > 1:
      state = smp.add_message(state, [instruction] * len(feed))
      unseen = 2 + len(instruction)  # Last sampled token, a closing end-of-turn, message.
      state = smp.generate(params, state, sampling, pending=unseen)
    else:
      state = first_turn(params, smp, state, sampling, group_size, unseen)
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


def _in_batches(params, smp, setup: Setup, problems, num_turns: int, sampling, rng,
                score_pool, feedback: Feedback, score_overlap_splits: int, group_size: int,
                batches: int) -> Rollouts:
  """The rows sampled as `batches` consecutive batches of whole groups, each finished
  (decoded and its episode read) before the next starts: one batch's KV cache on the
  devices at a time. Batch k samples with `rng` folded with k, so no two rows share a
  random stream; greedy results do not depend on `batches`."""
  if jax.process_count() > 1:
    raise ValueError("rollout.sample_batches > 1 is not supported with several processes "
                     "yet: use more devices per process or fewer rows per step")
  n = len(problems)
  if n % (batches * group_size):
    raise ValueError(f"{n} rows do not split into rollout.sample_batches={batches} batches "
                     f"of whole groups of {group_size}")
  size = n // batches
  parts = [rollout(params, smp, setup, problems[k * size:(k + 1) * size], num_turns,
                   sampling, jax.random.fold_in(rng, k), score_pool, feedback,
                   score_overlap_splits, group_size) for k in range(batches)]
  concat = lambda field: np.concatenate([getattr(p, field) for p in parts])
  turns = range(len(parts[0].texts))
  return Rollouts(
      list(problems), [[t for p in parts for t in p.texts[i]] for i in turns],
      [[t for p in parts for t in p.ids[i]] for i in turns],
      [[s for p in parts for s in p.scores[i]] for i in turns], concat("rewards_BxN"),
      slice(0, n), jax.tree.map(lambda *xs: jnp.concatenate(xs),
                                *[p.episode for p in parts]),
      turns_BxN=concat("turns_BxN"))


class _FeedbackRows:
  """Some rows of a feedback rollout with their own sampler state. `dispatch` queues a
  turn on the device and returns at once (JAX dispatches asynchronously); `collect`
  waits for it, then decodes and scores the rows that took it."""

  def __init__(self, params, smp, setup: Setup, problems, num_turns, sampling, rng,
               feedback: Feedback, group_size: int = 1):
    self.params, self.smp, self.setup, self.sampling = params, smp, setup, sampling
    self.feedback, self.problems = feedback, list(problems)
    fmt = setup.fmt
    self.mine = slice(*sharding.process_rows(len(problems)))
    feed = self.problems[self.mine] if smp.batch_sharding is not None else self.problems
    self.local_rows = range(len(problems))[self.mine]
    self.state, self.group_size = start_groups(
        smp, [fmt.prompt_ids(p.prompt) for p in feed], rng, group_size)
    n, m = len(problems), len(self.local_rows)
    self.texts = [[""] * n for _ in range(num_turns)]
    self.ids = [[[] for _ in range(n)] for _ in range(num_turns)]
    self.scores = [[None] * m for _ in range(num_turns)]
    self.rewards = np.zeros((m, num_turns), np.float32)
    self.taken = np.zeros((m, num_turns), bool)
    self.active = np.ones((m,), bool)  # This process's rows still answering.
    self.unseen = smp.max_prompt_len or max(len(fmt.prompt_ids(p.prompt)) for p in feed)

  def any_active(self) -> bool:
    """Whether any row of any process still answers (the same on every process)."""
    return bool(sharding.gather_rows(self.active[:, None]).any())

  def dispatch(self, turn: int) -> None:
    if turn > 1:
      task, fmt = self.setup.task, self.setup.fmt
      msgs = [fmt.instruction_ids(self.feedback.message(task, self.scores[turn - 2][i]))
              if self.active[i] else [] for i in range(len(self.local_rows))]
      self.state = self.smp.add_message(self.state, msgs, active=self.active)
      self.unseen = 2 + max(map(len, msgs))  # Last sampled token, end-of-turn, message.
      self.state = self.smp.generate(self.params, self.state, self.sampling,
                                     pending=self.unseen)
    else:
      self.state = first_turn(self.params, self.smp, self.state, self.sampling, self.group_size,
                              self.unseen)

  def collect(self, turn: int) -> None:
    turn_ids = self.smp.episode(self.state).response_ids(turn)  # Waits for the device.
    decode = self.setup.tokenizer.decode
    for i, row_ids in enumerate(turn_ids):
      self.ids[turn - 1][i] = row_ids
      self.texts[turn - 1][i] = decode(row_ids, skip_special_tokens=True).strip()
    live = np.flatnonzero(self.active)
    turn_scores = self.setup.task.score(
        [self.problems[self.local_rows[i]] for i in live],
        [self.texts[turn - 1][self.local_rows[i]] for i in live])
    for i, sc in zip(live, turn_scores):
      self.scores[turn - 1][i] = sc
      self.rewards[i, turn - 1] = sc.reward
      self.taken[i, turn - 1] = True
      self.active[i] = sc.reward < 1.0


def split_rows(num_rows: int, splits: int, group_size: int = 1) -> list[np.ndarray]:
  """Global row indices of each of `splits` parts: every process's rows cut into
  `splits` equal consecutive pieces of whole groups, so each part is itself a batch in
  process order."""
  processes = jax.process_count()
  if num_rows % (processes * splits * group_size):
    raise ValueError(f"{num_rows} rows do not split into {splits} equal parts of whole "
                     f"groups of {group_size} over {processes} process(es) "
                     "(rollout.score_overlap_splits)")
  local, piece = num_rows // processes, num_rows // processes // splits
  return [np.concatenate([p * local + np.arange(k * piece, (k + 1) * piece)
                          for p in range(processes)]) for k in range(splits)]


def _feedback_rollout(params, smp, setup: Setup, problems, num_turns, sampling, rng,
                      feedback: Feedback, splits: int = 1, group_size: int = 1) -> Rollouts:
  """Turns until each row's first correct answer; only wrong rows get `feedback`.

  The next message depends on the score, so one batch cannot sample while it is
  scored. With `splits` > 1 the rows are cut into parts that take turns on the device:
  a part is scored while the others sample. Greedy results do not depend on `splits`.
  """
  index = split_rows(len(problems), splits, group_size)
  rngs = [rng] if splits == 1 else [jax.random.fold_in(rng, k) for k in range(splits)]
  parts = [_FeedbackRows(params, smp, setup, [problems[i] for i in idx], num_turns,
                         sampling, r, feedback, group_size) for idx, r in zip(index, rngs)]
  # Dispatch every part, then as each is collected queue its next turn behind the
  # others: the device works on the other parts while this one is scored.
  sampled = [1] * len(parts)
  for part in parts:
    part.dispatch(1)
  for turn in range(1, num_turns + 1):
    for k, part in enumerate(parts):
      if sampled[k] != turn:
        continue  # Every row of this part has answered correctly.
      part.collect(turn)
      if turn < num_turns and part.any_active():
        part.dispatch(turn + 1)
        sampled[k] = turn + 1
  return _merge(parts, index, problems)


def _merge(parts: Sequence[_FeedbackRows], index: Sequence[np.ndarray],
           problems) -> Rollouts:
  """One Rollouts in the original row order from the parts of `split_rows`."""
  if len(parts) == 1:
    p = parts[0]
    return Rollouts(p.problems, p.texts, p.ids, p.scores, sharding.gather_rows(p.rewards),
                    p.mine, p.smp.episode(p.state),
                    turns_BxN=sharding.gather_rows(p.taken))
  order = np.argsort(np.concatenate(index))  # Original row -> row of the concatenation.
  rows = lambda per_part: [per_part[i] for i in order]
  num_turns = len(parts[0].texts)
  texts = [rows([t for p in parts for t in p.texts[n]]) for n in range(num_turns)]
  ids = [rows([t for p in parts for t in p.ids[n]]) for n in range(num_turns)]
  # This process's rows are its pieces of every part, in order: concatenation keeps them.
  scores = [[s for p in parts for s in p.scores[n]] for n in range(num_turns)]
  gathered = lambda field: np.concatenate(
      [sharding.gather_rows(getattr(p, field)) for p in parts])[order]
  episodes = [p.smp.episode(p.state) for p in parts]
  episode = jax.tree.map(lambda *xs: jnp.take(jnp.concatenate(xs), jnp.asarray(order),
                                              axis=0), *episodes)
  return Rollouts(list(problems), texts, ids, scores, gathered("rewards"),
                  slice(*sharding.process_rows(len(problems))), episode,
                  turns_BxN=gathered("taken"))
