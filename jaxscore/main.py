"""Train and evaluate any registered objective: evaluate, train, evaluate again, report.

  python -m jaxscore.main --config=configs/score.py:cpu --workdir=runs/score-cpu
  python -m jaxscore.main --config=configs/score.py:cpu --workdir=... --mode=evaluate

`--mode=evaluate` evaluates the workdir's trained checkpoint (`evaluate.checkpoint`:
latest or best). Rerunning the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import json

import jax
from absl import flags, logging
from ml_collections import config_flags

from jaxscore import config_checks, evaluate, experiment, objectives
from jaxscore.infra import distributed, entry, files, wandb_log
from jaxscore.loops import common
from jaxscore.sampling import rollout


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  c, workdir, mode = flags.FLAGS.config, files.path(flags.FLAGS.workdir), flags.FLAGS.mode
  config_checks.check_experiment(c)
  d = c.distributed
  distributed.initialize(d.coordinator_address or None, d.num_processes or None,
                         d.process_id if d.process_id >= 0 else None, d.auto)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0 and mode != "evaluate":
    (workdir / "config.json").write_text(c.to_json(indent=1))
  title = ("no training" if c.objective == experiment.NO_TRAINING
           else objectives.get(c.objective).title)
  setup, eval_setup, params = rollout.from_config(c)
  results = {}
  if mode == "train_and_evaluate" and c.evaluate.before:
    results["before"] = experiment.evaluate(c, eval_setup, params, workdir, "before")
  if mode in ("train_and_evaluate", "train"):
    trained, info = experiment.train(c, setup, params, workdir)
    if info["preempted"] or mode == "train":
      return
    params = trained
  label, name = f"after {title}", "after"
  if mode == "evaluate" or c.evaluate.checkpoint != "latest":
    trained, step = common.restore_params(c, experiment.run_dir(c, workdir), setup.cfg, params,
                                          c.evaluate.checkpoint)
    if step is None:
      print(f"no checkpoint in {workdir / 'checkpoints'}: evaluating the initial model")
      label, name = "initial", "initial"
    else:
      print(f"evaluating the {c.evaluate.checkpoint} checkpoint (step {step})")
      params = trained
  results[label] = experiment.evaluate(c, eval_setup, params, workdir, name)
  report = workdir / "report.json"
  if results and jax.process_index() == 0:
    report.write_text(json.dumps(results, indent=1))
    evaluate.plot_accuracy(results, workdir / "eval" / "accuracy.png")
    turns = experiment.eval_turns(c)
    print("\n" + evaluate.format_table(results, turns))
    wandb_log.log_evaluation(c, workdir, results, evaluate.table_keys(turns))
    print(f"\nreport: {report}\nplots: {workdir / 'eval'}")


if __name__ == "__main__":
  # The flags exist only when this module runs: importing it defines none.
  config_flags.DEFINE_config_file("config", None, entry.config_help("score.py:cpu"),
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, logs and reports: a local path or gs://.")
  flags.DEFINE_enum("mode", "train_and_evaluate", ["train_and_evaluate", "train", "evaluate"],
                    "What to run.")
  flags.mark_flags_as_required(["config", "workdir"])
  entry.run(main, "jaxscore.main")
