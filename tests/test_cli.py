"""Every command-line entry point: --help explains its flags, and a user's mistake is one
line on stderr that names it, with exit status 2 and no traceback."""

import pathlib
import subprocess
import sys

import pytest
from conftest import require_embedded

from jaxscore.infra import entry

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

ABSL_PROGRAMS = {
    "jaxscore.main": CONFIGS / "score.py",
    "jaxscore.self_explore": CONFIGS / "self_explore.py",
    "jaxscore.study": CONFIGS / "study.py",
}


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=300)


def _one_line_error(out: subprocess.CompletedProcess, prog: str, *expected: str) -> str:
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith(f"{prog}: error: "), lines[0]
  for text in expected:
    assert text in lines[0], lines[0]
  return lines[0]


@pytest.mark.parametrize("module", [*ABSL_PROGRAMS, "jaxscore.sweep"])
def test_help_explains_every_flag(module):
  out = _run(module, "--help")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "--config:" in out.stdout and "--workdir:" in out.stdout
  assert "configs/" in out.stdout  # Which file to pass, not only the flag's name.


@pytest.mark.parametrize("module", ABSL_PROGRAMS)
def test_config_mistakes_are_one_line(module, tmp_path):
  config = ABSL_PROGRAMS[module]
  workdir = f"--workdir={tmp_path}"
  _one_line_error(_run(module, f"--config={config}:nope", workdir), module,
                  "unknown variant 'nope'")
  _one_line_error(_run(module, f"--config={CONFIGS / 'missing.py'}:cpu", workdir), module,
                  "No such file", "missing.py")
  _one_line_error(_run(module, f"--config={config}:cpu", workdir, "--config.seeed=1"),
                  module, "'seeed' is not a config field")
  _one_line_error(_run(module, f"--config={config}:cpu"), module, "--workdir")
  assert not any(tmp_path.iterdir())  # Nothing ran.


def test_sweep_mistakes_are_one_line(tmp_path):
  bad = tmp_path / "sweep.py"
  bad.write_text("def get_config(arg='cpu'):\n  return None\n")
  _one_line_error(_run("jaxscore.sweep", f"--config={bad}:cpu", f"--workdir={tmp_path}",
                       "--dry_run"), "jaxscore.sweep", "defines no get_sweep()")
  _one_line_error(_run("jaxscore.sweep", f"--config={tmp_path / 'no.py'}",
                       f"--workdir={tmp_path}"), "jaxscore.sweep", "no such config file")


def test_jaxscore_command_help_and_user_errors(tmp_path):
  out = _run("jaxscore.cli", "--help")
  assert out.returncode == 0 and all(c in out.stdout for c in ("chat", "export", "evaluate"))
  for command in ("export", "evaluate", "chat"):
    out = _run("jaxscore.cli", command, "--help")
    assert out.returncode == 0 and "--" in out.stdout
  assert "--step" in _run("jaxscore.cli", "evaluate", "--help").stdout
  _one_line_error(_run("jaxscore.cli", "evaluate", f"--workdir={tmp_path}"),
                  "jaxscore evaluate", "config.json does not exist")


def test_a_missing_optional_dependency_names_the_install():
  e = ModuleNotFoundError("No module named 'tensorflow_datasets'", name="tensorflow_datasets")
  assert entry.describe(e) == ("the optional dependency 'tensorflow_datasets' is not "
                               "installed: pip install tensorflow-datasets")


def test_a_missing_data_file_set_from_the_command_line_is_one_line(tmp_path):
  """The gsm8k variant declares its sources, so the command line can point them at
  files; a file that is not there is named before the model loads."""
  require_embedded()  # The variant names the embedded model.
  missing = tmp_path / "gsm8k_test.jsonl"
  out = _run("jaxscore.main", f"--config={CONFIGS / 'score.py'}:gsm8k,runlocal",
             f"--workdir={tmp_path / 'run'}", "--mode=evaluate",
             f"--config.task.kwargs.sources.test={missing}")
  _one_line_error(out, "jaxscore.main", f"{missing}: no such file")


@pytest.mark.parametrize("module, arg, override, expected", [
    ("jaxscore.self_explore", "self_explore.py:gsm8k", "--config.rationales.batch_size=64",
     ("rationales.batch_size=64", "rationales.group_size=100")),
    ("jaxscore.main", "score.py:cpu", "--config.rollout.feedback=unary",
     ("rollout.feedback=instruction",)),
    ("jaxscore.study", "study.py:cpu", "--config.grpo.minibatches=3",
     ("arms.single_turn_grpo", "grpo.minibatches=3")),
])
def test_contradictory_config_fields_are_one_line_before_the_model_loads(
    module, arg, override, expected, tmp_path):
  out = _run(module, f"--config={CONFIGS / arg}", f"--workdir={tmp_path / 'run'}", override)
  _one_line_error(out, module, *expected)
  assert not (tmp_path / "run" / "checkpoints").exists()
