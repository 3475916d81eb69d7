"""GSM8K and MATH (MATH-500 included): problems from files or the hub, checked answers."""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing
from collections.abc import Sequence
from concurrent import futures

from jaxscore.tasks import answers, base, prompts, records

GSM8K_HUB = "hub:openai/gsm8k:main"
MATH500_HUB = "hub:HuggingFaceH4/MATH-500"

GSM8K_PROMPT = ("Solve the following math problem step by step. Write the final answer "
                "on the last line as \"#### <number>\".\n\n{question}")
GSM8K_INSTRUCTION = ("There might be an error in the solution above because of lack of "
                     "understanding of the question. Please correct the error, if any, and "
                     "rewrite the solution. Write the final answer on the last line as "
                     "\"#### <number>\".")
MATH_PROMPT = prompts.MATH_FIRST_TURN + "\n\nProblem:\n{question}"


def gsm8k_gold(answer_field: str, where: str) -> str:
  if "####" not in answer_field:
    raise records.DataError(f"{where}: field 'answer' has no '#### <answer>' line")
  return answer_field.rsplit("####", 1)[1].strip().replace(",", "")


def _source(sources: dict[str, str], split: str, default_hub: str | None) -> tuple[str, str]:
  if split in sources:
    return sources[split], split
  if default_hub is None:
    raise ValueError(f"no data source for split {split!r}: set it in `sources`")
  return default_hub, split


@dataclasses.dataclass
class GSM8KTask:
  """Grade-school math; gold answers after `####`, compared numerically."""

  sources: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> path
  prompt_template: str = GSM8K_PROMPT
  instruction: str = GSM8K_INSTRUCTION
  fallback_last_number: bool = False
  name: str = "gsm8k"

  def problems(self, split: str) -> Sequence[base.Problem]:
    source, split = _source(self.sources, split, GSM8K_HUB)

    def build(i, where, r):
      records.require(r, ("question", "answer"), where, {"question": str, "answer": str})
      return base.Problem(id=f"gsm8k-{split}-{i}", question=r["question"],
                          prompt=self.prompt_template.format(question=r["question"]),
                          answer=gsm8k_gold(r["answer"], where), solution=r["answer"])

    return base.build_problems(records.load_records(source, split), build)

  def score(self, problems, responses) -> list[base.Score]:
    base.check_lengths(problems, responses)
    return [_score_one(p.answer, r, "numeric", self.fallback_last_number)
            for p, r in zip(problems, responses)]


@dataclasses.dataclass
class MathTask:
  """MATH / MATH-500: answers judged by mathematical equivalence (math-verify)."""

  sources: dict[str, str] = dataclasses.field(default_factory=dict)
  prompt_template: str = MATH_PROMPT
  instruction: str = prompts.MATH_SELF_CORRECTION
  workers: int = 2  # Processes for math-verify; 0 checks in this process.
  timeout_s: float = 10.0  # Per response, enforced by the worker pool.
  name: str = "math"

  def problems(self, split: str) -> Sequence[base.Problem]:
    source, split = _source(self.sources, split, MATH500_HUB if split == "test" else None)

    def build(i, where, r):
      records.require(r, ("problem", "solution"), where, {"problem": str, "solution": str})
      answer = r.get("answer")
      if answer is None:  # Original MATH: the answer is the solution's last \boxed{}.
        answer = answers.last_boxed(r["solution"])
        if answer is None:
          raise records.DataError(f"{where}: no 'answer' field and no \\boxed{{}} in 'solution'")
      return base.Problem(
          id=str(r.get("unique_id", f"math-{split}-{i}")), question=r["problem"],
          prompt=self.prompt_template.format(question=r["problem"]), answer=str(answer),
          solution=r["solution"], metadata={k: r[k] for k in ("subject", "level") if k in r})

    return base.build_problems(records.load_records(source, split), build)

  def score(self, problems, responses) -> list[base.Score]:
    base.check_lengths(problems, responses)
    args = [(p.answer, r, "math", False) for p, r in zip(problems, responses)]
    if self.workers <= 0:
      return [_score_one(*a) for a in args]
    return score_in_processes(args, self.workers, self.timeout_s)


def _score_one(gold: str, response: str, kind: str, fallback: bool) -> base.Score:
  extracted = answers.extract_answer(response, fallback)
  if extracted is None:
    return base.Score(0.0, None, base.NO_ANSWER)
  try:
    ok = (answers.numbers_equal(gold, extracted) if kind == "numeric"
          else answers.math_equal(gold, extracted))
  except Exception:  # A malformed answer is wrong, not a crash. pylint: disable=broad-except
    return base.Score(0.0, extracted, base.ERROR)
  return base.Score(1.0 if ok else 0.0, extracted, base.CORRECT if ok else base.WRONG)


_POOLS: dict[int, futures.ProcessPoolExecutor] = {}


@atexit.register
def _shutdown_pools():
  for pool in _POOLS.values():
    pool.shutdown(wait=True, cancel_futures=True)
  _POOLS.clear()


def _pool(workers: int) -> futures.ProcessPoolExecutor:
  # Spawned, not forked: the parent runs JAX threads. Reused across calls.
  if workers not in _POOLS:
    _POOLS[workers] = futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"))
  return _POOLS[workers]


def score_in_processes(args, workers: int, timeout_s: float) -> list[base.Score]:
  """Scores in worker processes (math-verify's signal-based timeout works there)."""
  pool = _pool(workers)
  pending = [pool.submit(_score_one, *a) for a in args]
  out = []
  for (_, response, *_), fut in zip(args, pending):
    try:
      out.append(fut.result(timeout=timeout_s))
    except futures.TimeoutError:
      out.append(base.Score(0.0, answers.extract_answer(response), base.TIMEOUT))
  return out
