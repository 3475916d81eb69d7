"""Train and evaluate any registered objective: evaluate, train, evaluate again, report.

  python -m jaxscore.main --config=configs/score.py:cpu --workdir=runs/score-cpu
  python -m jaxscore.main --config=configs/score.py:cpu --workdir=... --mode=evaluate

`--mode=evaluate` evaluates the workdir's trained checkpoint (`evaluate.checkpoint`:
latest or best). Rerunning the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import time

from absl import flags, logging
from ml_collections import config_flags

from jaxscore.infra import entry

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, entry.config_help("score.py:cpu"), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Checkpoints, logs and reports: a local path or gs://.")
_MODE = flags.DEFINE_enum("mode", "train_and_evaluate", ["train_and_evaluate", "train", "evaluate"],
                          "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def eval_turns(c) -> int:
  return c.evaluate.num_turns or c.rollout.num_turns


def run_eval(c, setup, params, workdir, name: str) -> dict:
  """The greedy T-turn evaluation, plus sampled pass@k if configured."""
  import jax

  from jaxscore import evaluate
  from jaxscore.sampling import rollout

  problems = setup.task.problems(c.task.eval_split)
  if c.evaluate.num_problems:
    problems = problems[:c.evaluate.num_problems]
  feedback = rollout.Feedback(c.evaluate.feedback or c.rollout.feedback,
                              c.rollout.feedback_template)
  t0 = time.perf_counter()
  result, records = evaluate.evaluate(
      params, setup, problems, num_turns=eval_turns(c),
      max_new_tokens=c.sampler.max_new_tokens, batch_size=c.evaluate.batch_size, seed=c.seed,
      feedback=feedback)
  if c.evaluate.pass_k_samples:
    passk, passk_records = evaluate.evaluate_pass_at_k(
        params, setup, problems, num_samples=c.evaluate.pass_k_samples,
        temperature=c.evaluate.pass_k_temperature, max_new_tokens=c.sampler.max_new_tokens,
        batch_size=c.evaluate.batch_size, seed=c.seed)
    result |= {k: v for k, v in passk.items() if k.startswith("pass@")}
    result["pass@k_temperature"] = passk["temperature"]
    for record, extra in zip(records, passk_records):
      record["pass@k"] = {"num_correct": extra["num_correct"], "samples": extra["samples"]}
  result["seconds"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    evaluate.write_report(workdir / "eval", name, result, records)
  keys = evaluate.table_keys(eval_turns(c)) + [k for k in result if k.startswith("pass@")
                                                and k != "pass@turns"]
  print(f"[{name}] " + ", ".join(f"{k}={result[k]:.3f}" for k in keys if k in result))
  return result


def train(c, setup, params, workdir):
  """Trains `c.objective` with the loop of its kind; returns (state, info)."""
  from jaxscore import objectives, tasks
  from jaxscore.loops import offline, online

  if objectives.get(c.objective).kind == "online":
    return online.train(c, setup, params, params, workdir)
  objective = offline.make_objective(c, setup.cfg)
  examples = objective.examples(setup, tasks.train_problems(setup.task, c.task))
  return offline.train(c, setup.cfg, objective, params, params, examples, workdir)


def main(argv):
  del argv
  import jax

  from jaxscore import config_checks, evaluate, objectives
  from jaxscore.infra import distributed, files
  from jaxscore.loops import common
  from jaxscore.sampling import rollout as rollout_lib

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  c, workdir, mode = _CONFIG.value, files.path(_WORKDIR.value), _MODE.value
  config_checks.check_experiment(c)
  d = c.distributed
  distributed.initialize(d.coordinator_address or None, d.num_processes or None,
                         d.process_id if d.process_id >= 0 else None, d.auto)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0 and mode != "evaluate":
    (workdir / "config.json").write_text(c.to_json(indent=1))
  title = objectives.get(c.objective).title
  setup, eval_setup, params = rollout_lib.from_config(c)
  results = {}
  if mode == "train_and_evaluate" and c.evaluate.before:
    results["before"] = run_eval(c, eval_setup, params, workdir, "before")
  if mode in ("train_and_evaluate", "train"):
    state, info = train(c, setup, params, workdir)
    if info["preempted"] or mode == "train":
      return
    params = state.params
  label, name = f"after {title}", "after"
  if mode == "evaluate" or c.evaluate.checkpoint != "latest":
    trained, step = common.restore_params(c, workdir, setup.cfg, params, c.evaluate.checkpoint)
    if step is None:
      print(f"no checkpoint in {workdir / 'checkpoints'}: evaluating the initial model")
      label, name = "initial", "initial"
    else:
      print(f"evaluating the {c.evaluate.checkpoint} checkpoint (step {step})")
      params = trained
  results[label] = run_eval(c, eval_setup, params, workdir, name)
  report = workdir / "report.json"
  if results and jax.process_index() == 0:
    report.write_text(json.dumps(results, indent=1))
    evaluate.plot_accuracy(results, workdir / "eval" / "accuracy.png")
    print("\n" + evaluate.format_table(results, eval_turns(c)))
    from jaxscore.infra import wandb_log

    wandb_log.log_evaluation(c, workdir, results, eval_turns(c))
    print(f"\nreport: {report}\nplots: {workdir / 'eval'}")


if __name__ == "__main__":
  entry.run(main, "jaxscore.main")
