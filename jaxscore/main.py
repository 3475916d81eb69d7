"""SCoRe end to end: evaluate, train stage I then II, evaluate again, report.

  python -m jaxscore.main --config=configs/score.py:cpu --workdir=runs/score-cpu
  python -m jaxscore.main --config=configs/score.py:cpu --workdir=... --mode=evaluate

Rerunning the same command resumes from the workdir's latest checkpoint.
"""

from __future__ import annotations

import json
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Checkpoints, logs and reports: a local path or gs://.")
_MODE = flags.DEFINE_enum("mode", "train_and_evaluate", ["train_and_evaluate", "train", "evaluate"],
                          "What to run.")
flags.mark_flags_as_required(["config", "workdir"])

TABLE_KEYS = ("acc@t1", "acc@t2", "delta(t1,t2)", "delta_i->c", "delta_c->i")


def build(c):
  """Model, tokenizer, format and tasks from a config."""
  import jax

  from jaxscore import chat, pretrained, tasks, trainer

  model = pretrained.load(c.model.name, param_dtype=c.model.param_dtype, dtype=c.model.dtype)
  params = jax.device_put(model.params)
  fmt = chat.make_format(model.tokenizer, c.format)
  task = tasks.make_task(c.task.name, **c.task.kwargs.to_dict())
  eval_task = (tasks.make_task(c.task.eval_name, **c.task.eval_kwargs.to_dict())
               if c.task.eval_name else task)
  setup = trainer.RLSetup(cfg=model.cfg, tokenizer=model.tokenizer, fmt=fmt, task=task,
                          ref_params=params)
  return setup, params, eval_task


def run_eval(c, setup, params, eval_task, workdir, name: str) -> dict:
  import jax

  from jaxscore import evaluate

  problems = eval_task.problems(c.task.eval_split)
  if c.task.num_eval:
    problems = problems[:c.task.num_eval]
  t0 = time.perf_counter()
  result, records = evaluate.evaluate(
      params, setup.cfg, setup.tokenizer, setup.fmt, eval_task, problems,
      num_turns=c.sampler.num_turns, max_new_tokens=c.sampler.max_new_tokens,
      batch_size=c.sampler.eval_batch_size, seed=c.seed)
  result["seconds"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    evaluate.write_report(workdir / "eval", name, result, records)
  print(f"[{name}] " + ", ".join(f"{k}={result[k]:.3f}" for k in TABLE_KEYS if k in result))
  return result


def format_table(results: dict[str, dict]) -> str:
  keys = [k for k in TABLE_KEYS if all(k in r for r in results.values())]
  head = "| model | " + " | ".join(keys) + " |"
  rows = [head, "|" + "---|" * (len(keys) + 1)]
  for name, r in results.items():
    rows.append(f"| {name} | " + " | ".join(f"{100 * r[k]:.1f}" for k in keys) + " |")
  return "\n".join(rows)


def main(argv):
  del argv
  import jax

  from jaxscore import distributed, evaluate, files, trainer

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  c, workdir = _CONFIG.value, files.path(_WORKDIR.value)
  d = c.distributed
  distributed.initialize(d.coordinator_address or None, d.num_processes or None,
                         d.process_id if d.process_id >= 0 else None, d.auto)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(c.to_json(indent=1))
  setup, params, eval_task = build(c)
  results = {}
  report = workdir / "report.json"
  if _MODE.value in ("train_and_evaluate", "evaluate") and c.evaluate_before:
    results["before"] = run_eval(c, setup, params, eval_task, workdir, "before")
  if _MODE.value in ("train_and_evaluate", "train"):
    state, info = trainer.train(c, setup, params, workdir)
    params = state.params
    if info["preempted"]:
      return
  if _MODE.value == "train_and_evaluate":
    results["after SCoRe"] = run_eval(c, setup, params, eval_task, workdir, "after")
  if results and jax.process_index() == 0:
    report.write_text(json.dumps(results, indent=1))
    evaluate.plot_accuracy(results, workdir / "eval" / "accuracy.png")
    print("\n" + format_table(results))
    print(f"\nreport: {report}\nplots: {workdir / 'eval'}")


if __name__ == "__main__":
  app.run(main)
