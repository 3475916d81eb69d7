"""Tasks: problems, prompts, and rewards from answer checkers or sandboxed tests."""

import dataclasses
import pathlib
from typing import Any

from jaxscore.tasks.arithmetic import ArithmeticTask
from jaxscore.tasks.base import Problem as Problem
from jaxscore.tasks.base import Score as Score
from jaxscore.tasks.base import Task
from jaxscore.tasks.code_tasks import HumanEvalTask, MBPPTask
from jaxscore.tasks.math_tasks import GSM8KTask, MathTask
from jaxscore.tasks.records import DataError


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Which problems a run trains and evaluates on: an experiment config's `task` group."""

  name: str = "arithmetic"  # arithmetic | gsm8k | math | mbpp | humaneval
  # The task's fields (sources, level, prompt_template, ...): `make_task(name, **kwargs)`.
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  train_split: str = "train"
  eval_split: str = "test"
  # Evaluate on another task (e.g. humaneval after mbpp); "" = the same task.
  eval_name: str = ""
  eval_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  num_train: int = 0  # Training problems used (the split's first); 0 = all of them.


TASKS = {
    "arithmetic": ArithmeticTask,
    "gsm8k": GSM8KTask,
    "math": MathTask,
    "mbpp": MBPPTask,
    "humaneval": HumanEvalTask,
}


def make_task(name: str, **kwargs) -> Task:
  """A task by name; kwargs are the task's fields (sources, prompt_template, ...).

  Configs declare every split's source so that the command line can set it
  (`--config.task.kwargs.sources.train=path.jsonl`): an empty one means the task's
  default (the Hugging Face hub, or a bundled file). A local source that does not exist
  is an error now, before a run loads its model."""
  if name not in TASKS:
    raise ValueError(f"task={name!r}: expected one of {', '.join(TASKS)}")
  if "sources" in kwargs:
    kwargs["sources"] = {split: s for split, s in kwargs["sources"].items() if s}
    for source in kwargs["sources"].values():
      if not source.startswith(("hub:", "tfds:")) and not pathlib.Path(source).exists():
        raise DataError(f"{source}: no such file")
  return TASKS[name](**kwargs)


def train_problems(task: Task, c) -> list[Problem]:
  """The training problems that the `task` group `c` selects."""
  problems = task.problems(c.train_split)
  n = c.get("num_train", 0)  # Configs saved before the field existed use every problem.
  return problems[:n] if n else problems


def eval_problems(task: Task, c, num_problems: int = 0) -> list[Problem]:
  """The first `num_problems` (0: all) of the eval split that the `task` group `c` names."""
  problems = task.problems(c.eval_split)
  return problems[:num_problems] if num_problems else problems
