"""The code passes the linter the project declares ([tool.ruff] in pyproject.toml)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
  ruff = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent)) or \
      shutil.which("ruff")
  if ruff is None:
    pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
  out = subprocess.run([ruff, "check", "jaxscore", "configs", "tests", "benchmarks"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
