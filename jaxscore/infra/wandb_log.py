"""Weights & Biases logging, optional (`pip install 'jaxscore[wandb]'`, `log.wandb_project`).

One W&B run per workdir, named after it: its id is kept in `<workdir>/wandb_run_id`, so a
resumed run (and the evaluation after training) continues the same W&B run. Only
process 0 logs. A resumed run re-logs the steps after its last checkpoint with the
values it logged before (resume is exact); W&B keeps the first of each step.
`WANDB_MODE=offline` writes the run under `<workdir>/wandb` with no network.
"""

from __future__ import annotations

import secrets
from typing import Any

import jax

from jaxscore.infra import files

RUN_ID = "wandb_run_id"


def start(workdir, project: str, entity: str = "", config: dict | None = None):
  """The workdir's W&B run (created, or resumed by its stored id); None when
  `project` is empty or this is not process 0."""
  if not project or jax.process_index() != 0:
    return None
  try:
    import wandb
  except ImportError:
    raise ImportError("log.wandb_project is set but wandb is not installed: "
                      "pip install 'jaxscore[wandb]'") from None
  workdir = files.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  id_file = workdir / RUN_ID
  run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
  if not id_file.exists():
    id_file.write_text(run_id)
  local = None if files.is_remote(workdir) else str(workdir)
  return wandb.init(project=project, entity=entity or None, id=run_id, resume="allow",
                    name=workdir.name, dir=local, config=config or {})


def scalars(metrics: dict) -> dict[str, float]:
  return {k: v for k, v in metrics.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_table(workdir, project: str, entity: str, key: str, columns: list[str],
              rows: list[list[Any]]) -> None:
  """`rows` as a `wandb.Table` under `key` in the workdir's run (e.g. the evaluation's
  accuracy table after training)."""
  run = start(workdir, project, entity)
  if run is None:
    return
  import wandb

  run.log({key: wandb.Table(columns=columns, data=rows)})
  run.finish()


def log_evaluation(c, workdir, results: dict[str, dict], columns: list[str]) -> None:
  """The evaluation table's `columns` (evaluate.table_keys), as the run prints them (in
  %), to the workdir's W&B run when the experiment config sets `log.wandb_project`."""
  project = c.log.get("wandb_project", "")
  if not project:
    return
  keys = [k for k in columns if all(k in r for r in results.values())]
  log_table(workdir, project, c.log.get("wandb_entity", ""), "evaluation", ["model", *keys],
            [[name, *(100 * r[k] for k in keys)] for name, r in results.items()])
