"""Runs the Self-Explore pipeline and prints the table.

  python -m jaxscore.self_explore --config=configs/self_explore.py:cpu --workdir=runs/se

Rerunning the same command skips finished stages and resumes an unfinished one.
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from jaxscore.infra import entry

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, entry.config_help("self_explore.py:cpu"), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Stages' data, checkpoints and reports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from jaxscore.self_explore import pipeline

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  p = pipeline.Pipeline(_CONFIG.value, _WORKDIR.value)
  results = p.run()
  print("\n" + pipeline.format_table(results))
  print(f"\nreport: {p.workdir / 'eval' / 'results.md'}")


if __name__ == "__main__":
  entry.run(main, "jaxscore.self_explore")
