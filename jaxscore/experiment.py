"""One RL experiment from its config (configs/score.py): train with the loop of the
objective's kind, evaluate by the config's protocol. `python -m jaxscore.main`, `jaxscore
evaluate` and the notebook call these.

  setup, eval_setup, params = rollout.from_config(c)
  before = experiment.evaluate(c, eval_setup, params, workdir, "before")
  state, info = experiment.train(c, setup, params, workdir)
  after = experiment.evaluate(c, eval_setup, state.params, workdir, "after")
"""

from __future__ import annotations

import time

import jax

from jaxscore import evaluate as evaluate_lib
from jaxscore import objectives, tasks
from jaxscore.loops import offline, online
from jaxscore.sampling import rollout


def eval_turns(c) -> int:
  """Turns of the greedy evaluation dialogue: evaluate.num_turns, else the rollout's."""
  return c.evaluate.num_turns or c.rollout.num_turns


def evaluate(c, setup, params, workdir, name: str) -> dict:
  """The greedy T-turn evaluation on the eval split, plus sampled pass@k if configured;
  writes `<workdir>/eval/<name>.*` and returns the result."""
  problems = setup.task.problems(c.task.eval_split)
  if c.evaluate.num_problems:
    problems = problems[:c.evaluate.num_problems]
  feedback = rollout.Feedback(c.evaluate.feedback or c.rollout.feedback,
                              c.rollout.feedback_template)
  t0 = time.perf_counter()
  result, records = evaluate_lib.evaluate(
      params, setup, problems, num_turns=eval_turns(c),
      max_new_tokens=c.sampler.max_new_tokens, batch_size=c.evaluate.batch_size, seed=c.seed,
      feedback=feedback)
  if c.evaluate.pass_k_samples:
    passk, passk_records = evaluate_lib.evaluate_pass_at_k(
        params, setup, problems, num_samples=c.evaluate.pass_k_samples,
        temperature=c.evaluate.pass_k_temperature, max_new_tokens=c.sampler.max_new_tokens,
        batch_size=c.evaluate.batch_size, seed=c.seed)
    result |= {k: v for k, v in passk.items() if k.startswith("pass@")}
    result["pass@k_temperature"] = passk["temperature"]
    for record, extra in zip(records, passk_records):
      record["pass@k"] = {"num_correct": extra["num_correct"], "samples": extra["samples"]}
  result["seconds"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    evaluate_lib.write_report(workdir / "eval", name, result, records)
  keys = evaluate_lib.table_keys(eval_turns(c)) + [
      k for k in result if k.startswith("pass@") and k != "pass@turns"]
  print(f"[{name}] " + ", ".join(f"{k}={result[k]:.3f}" for k in keys if k in result))
  return result


def train(c, setup, params, workdir):
  """Trains `c.objective` with the loop of its kind; returns (state, info)."""
  if objectives.get(c.objective).kind == "online":
    return online.train(c, setup, params, params, workdir)
  objective = offline.make_objective(c, setup.cfg)
  examples = objective.examples(setup, tasks.train_problems(setup.task, c.task))
  return offline.train(c, setup.cfg, objective, params, params, examples, workdir)
