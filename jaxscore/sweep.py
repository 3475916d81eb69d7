"""Config sweeps: a config file's `get_sweep(arg)` lists overrides; each becomes a run.

  python -m jaxscore.sweep --config=configs/score.py:cpu --workdir=runs/sweep
  python -m jaxscore.sweep --config=configs/score.py:math --workdir=gs://b/sweep --launcher=tpu

Each run gets `<workdir>/<key=value,...>` as its workdir. `--launcher=local` runs them one
after another here; `--launcher=tpu` starts each on the TPU VM named by $TPU_NAME with
launch/tpu_vm.sh; `--launcher=xpk` submits each as its own workload to the GKE cluster
named by $CLUSTER with launch/xpk.sh (the workloads queue for the cluster's slices, named
`<$WORKLOAD or jaxscore>-<index>-<hash of the run's name>`). `--dry_run` prints the
commands only. After local runs, a summary
table of every run's final metrics is written to `<workdir>/summary.md`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Any

from absl import flags

from jaxscore.infra import entry, files

_CONFIG = flags.DEFINE_string("config", None, "configs/<file>.py[:arg]")
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent of the runs' workdirs.")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "tpu", "xpk"], "Where runs go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands only.")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_sweep(config: str) -> list[dict[str, Any]]:
  """The overrides of `get_sweep(arg)` in the config file `path[:arg]`."""
  path, _, arg = config.partition(":")
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise entry.UsageError(f"{path} defines no get_sweep()")
  sweep = list(module.get_sweep(arg) if arg else module.get_sweep())
  if not sweep:
    raise entry.UsageError(f"{path}: get_sweep() returned no runs")
  # Validate each key against the config now, not hours into the sweep.
  cfg = module.get_config(arg) if arg else module.get_config()
  for overrides in sweep:
    for key in overrides:
      node = cfg
      for part in key.split("."):
        if part not in node:
          raise entry.UsageError(f"{path}: sweep key {key!r} is not a config field")
        node = node[part]
  return sweep


def run_name(overrides: dict[str, Any]) -> str:
  return ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"


def commands(config: str, workdir: str, sweep: list[dict], launcher: str) -> list[list[str]]:
  out = []
  for i, overrides in enumerate(sweep):
    run_dir = f"{workdir.rstrip('/')}/{run_name(overrides)}"
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    if launcher == "local":
      out.append([sys.executable, "-m", "jaxscore.main", f"--config={config}",
                  f"--workdir={run_dir}", *args])
    elif launcher == "tpu":
      out.append(["env", f"CONFIG={config}", f"WORKDIR={run_dir}",
                  str(ROOT / "launch" / "tpu_vm.sh"), "run", "--", *args])
    else:
      out.append(["env", f"CONFIG={config}", f"WORKDIR={run_dir}",
                  f"WORKLOAD={workload_name(i, run_name(overrides))}",
                  str(ROOT / "launch" / "xpk.sh"), "run", "--", *args])
  return out


def workload_name(index: int, name: str) -> str:
  """A GKE workload name for run `index` of a sweep: lowercase letters, digits and '-',
  at most 40 characters, distinct per run even where the runs' names differ only in
  characters Kubernetes does not allow."""
  prefix = re.sub(r"[^a-z0-9-]+", "-", os.environ.get("WORKLOAD", "jaxscore").lower())
  digest = hashlib.sha1(name.encode()).hexdigest()[:6]
  return f"{prefix.strip('-')[:24] or 'jaxscore'}-{index}-{digest}"


def summary(workdir: str, sweep: list[dict]) -> str:
  """A markdown table of each run's last evaluation (or last training metrics)."""
  rows, keys = [], []
  for overrides in sweep:
    run_dir = files.path(workdir) / run_name(overrides)
    metrics: dict[str, Any] = {}
    report = run_dir / "report.json"
    if report.exists():
      results = json.loads(report.read_text())
      metrics = list(results.values())[-1] if results else {}
    elif (run_dir / "metrics.jsonl").exists():
      lines = (run_dir / "metrics.jsonl").read_text().splitlines()
      metrics = json.loads(lines[-1]) if lines else {}
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    keys += [k for k in metrics if k not in keys]
    rows.append((run_name(overrides), metrics))
  lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name, m in rows:
    lines.append(f"| {name} | " + " | ".join(
        f"{m[k]:.4g}" if k in m else "-" for k in keys) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  sweep = load_sweep(_CONFIG.value)
  cmds = commands(_CONFIG.value, _WORKDIR.value, sweep, _LAUNCHER.value)
  for cmd in cmds:
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    if not _DRY_RUN.value:
      subprocess.run(cmd, check=True, cwd=ROOT)
  if _LAUNCHER.value == "local" and not _DRY_RUN.value:
    table = summary(_WORKDIR.value, sweep)
    (files.path(_WORKDIR.value) / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  entry.run(main, "jaxscore.sweep")
