"""One experiment from its config: train with the loop of the objective's kind,
evaluate by protocol. `python -m jaxscore.main`, `jaxscore evaluate`, the study's arms
and the notebook call these; Self-Explore's pipeline evaluates through `evaluate_models`.

  setup, eval_setup, params = rollout.from_config(c)
  before = experiment.evaluate(c, eval_setup, params, workdir, "before")
  params, info = experiment.train(c, setup, params, workdir)
  after = experiment.evaluate(c, eval_setup, params, workdir, "after")
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from jaxscore import evaluate as evaluate_lib
from jaxscore import objectives, tasks
from jaxscore.infra import files
from jaxscore.loops import common, offline, online, self_training
from jaxscore.sampling import rollout

# `objective=none`: no training; the model is evaluated as it is (a baseline arm).
NO_TRAINING = "none"


def kind(c) -> str:
  """How `c.objective` trains: online | offline | self_training | none."""
  return NO_TRAINING if c.objective == NO_TRAINING else objectives.get(c.objective).kind


def eval_turns(c) -> int:
  """Turns of the greedy evaluation dialogue: evaluate.num_turns, else the rollout's."""
  return c.evaluate.num_turns or c.rollout.num_turns


def protocols(c) -> list[evaluate_lib.Protocol]:
  """The `evaluate` group's protocols: the greedy T-turn evaluation with its feedback,
  and sampled pass@k if `evaluate.pass_k_samples` is set."""
  feedback = rollout.Feedback(c.evaluate.feedback or c.rollout.feedback,
                              c.rollout.feedback_template)
  out = [evaluate_lib.Protocol("greedy", eval_turns(c), feedback)]
  if c.evaluate.pass_k_samples:
    out.append(evaluate_lib.Protocol("pass_at_k", samples=c.evaluate.pass_k_samples,
                                     temperature=c.evaluate.pass_k_temperature))
  return out


def evaluate(c, setup, params, workdir, name: str) -> dict:
  """`protocols(c)` on the eval split; writes `<workdir>/eval/<name>.*` and returns the
  greedy protocol's metrics with pass@k's added."""
  problems = tasks.eval_problems(setup.task, c.task, c.evaluate.num_problems)
  t0 = time.perf_counter()
  greedy, *rest = protocols(c)
  result, records, _ = run(c, setup, params, problems, greedy)
  for protocol in rest:  # pass@k
    passk, passk_records, _ = run(c, setup, params, problems, protocol)
    result |= {k: v for k, v in passk.items() if k.startswith("pass@")}
    result["pass@k_temperature"] = passk["temperature"]
    for record, extra in zip(records, passk_records):
      record["pass@k"] = {"num_correct": extra["num_correct"], "samples": extra["samples"]}
  result["seconds"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    evaluate_lib.write_report(files.path(workdir) / "eval", name, result, records)
  keys = evaluate_lib.table_keys(eval_turns(c)) + [
      k for k in result if k.startswith("pass@") and k != "pass@turns"]
  print(f"[{name}] " + ", ".join(f"{k}={result[k]:.3f}" for k in keys if k in result))
  return result


def run(c, setup, params, problems, protocol: evaluate_lib.Protocol):
  """`evaluate.run_protocol` with the config's lengths, batch and seed."""
  return evaluate_lib.run_protocol(params, setup, problems, protocol,
                                   max_new_tokens=c.sampler.max_new_tokens,
                                   batch_size=c.evaluate.batch_size, seed=c.seed,
                                   rules=common.mesh_from_config(c)[1])


def scores(c, setup, params, problems, protocol: evaluate_lib.Protocol, directory=None
           ) -> tuple[dict, dict[str, list[float]]]:
  """(metrics, per-problem scores named `<protocol>/<metric>`, pass@k's as `pass@k`) of
  one protocol; its records go to `<directory>/<protocol>.json`."""
  result, records, per_problem = run(c, setup, params, problems, protocol)
  if directory is not None and jax.process_index() == 0:
    (files.path(directory) / f"{protocol.name}.json").write_text(json.dumps(records, indent=1))
  return result, {k if protocol.samples else f"{protocol.name}/{k}": v
                  for k, v in per_problem.items()}


def intervals(per_problem: dict[str, list[float]], seed: int = 0) -> dict:
  """(mean, low, high) of each per-problem score: a 95% bootstrap over problems."""
  return {k: evaluate_lib.paired_bootstrap(np.asarray(v, float), np.zeros(len(v)), seed=seed)
          for k, v in per_problem.items()}


def train(c, setup, params, workdir, *, token_budget: int | None = None):
  """Trains `c.objective` from `params` with the loop of its kind; returns (params,
  info), where info has `preempted` and the sampled `episodes` and `tokens` (0 for a
  loop that samples nothing). `token_budget` stops a sampling loop after the step (or
  sampling call) that reaches that many sampled tokens."""
  workdir = files.path(workdir)
  how = kind(c)
  if how == NO_TRAINING:
    return params, {"preempted": False, "episodes": 0, "tokens": 0}
  if how == "self_training":
    return self_training.train(c, setup, params, workdir, token_budget=token_budget)
  if how == "online":
    state, info = online.train(c, setup, params, params, workdir, token_budget=token_budget)
    return state.params, info | sampled(workdir)
  objective = offline.make_objective(c, setup.cfg)
  examples = objective.examples(setup, tasks.train_problems(setup.task, c.task))
  state, info = offline.train(c, setup.cfg, objective, params, params, examples, workdir)
  return state.params, info | {"episodes": 0, "tokens": 0}


def sampled(workdir) -> dict:
  """Episodes and tokens an online run in `workdir` sampled, from its metrics (a step
  logged twice, before and after a resume, counts once)."""
  path = files.path(workdir) / "metrics.jsonl"
  steps = {}
  for line in path.read_text().splitlines() if path.exists() else ():
    if line.strip():
      record = json.loads(line)
      if "budget/episodes" in record:
        steps[record["step"]] = record
  return {"episodes": int(sum(r["budget/episodes"] for r in steps.values())),
          "tokens": int(sum(r["budget/tokens"] for r in steps.values()))}


def run_dir(c, workdir):
  """Where the run's checkpoints are: `workdir`, or a self-training run's last round."""
  workdir = files.path(workdir)
  if kind(c) != "self_training":
    return workdir
  rounds = sorted((p.parent for p in workdir.glob("train*/checkpoints")),
                  key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1)
  return rounds[-1] if rounds else workdir
