"""Shared fixtures: tiny Hugging Face checkpoints and a parity report."""

import atexit
import contextlib
import fcntl
import importlib.util
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

# Many tests build samplers and train steps of the same shapes (every study arm, every
# Self-Explore stage, each a fresh jit): XLA's persistent cache compiles each program
# once per run. pytest-xdist's workers and subprocess tests inherit the directory the
# first process made through the environment, so all of them share one cache.
if "JAXSCORE_TEST_DIR" not in os.environ:
  os.environ["JAXSCORE_TEST_DIR"] = tempfile.mkdtemp(prefix="jaxscore-test-")
  atexit.register(shutil.rmtree, os.environ["JAXSCORE_TEST_DIR"], ignore_errors=True)
_XLA_CACHE = os.path.join(os.environ["JAXSCORE_TEST_DIR"], "xla-cache")
os.makedirs(_XLA_CACHE, exist_ok=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)



@contextlib.contextmanager
def _flock(name: str, mode: int):
  with open(os.path.join(os.environ["JAXSCORE_TEST_DIR"], name), "a") as f:
    fcntl.flock(f, mode)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """Under pytest-xdist, a `host_exclusive` test (one that watches host-wide quantities:
  every process's task count, shared memory, `ps`) runs while no other worker is inside a
  test: it takes a lock that every other test holds shared. Waiting exclusive tests go
  first through a turnstile, so a busy worker cannot starve them."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    yield
    return
  mode = fcntl.LOCK_EX if item.get_closest_marker("host_exclusive") else fcntl.LOCK_SH
  with contextlib.ExitStack() as held:
    with _flock("turnstile", fcntl.LOCK_EX):
      held.enter_context(_flock("host", mode))
    yield


SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
_PARITY: list[tuple[str, float, float]] = []


def report_parity(name: str, max_abs_diff: float, tolerance: float) -> None:
  """Records a parity number; all of them are printed at the end of the run."""
  _PARITY.append((name, float(max_abs_diff), tolerance))


def pytest_terminal_summary(terminalreporter):
  if not _PARITY:
    return
  terminalreporter.section("parity (max abs diff vs reference)")
  for name, diff, tol in _PARITY:
    terminalreporter.write_line(f"{name:<60s} {diff:.3e}  (tolerance {tol:.0e})")


def require_torch():
  if importlib.util.find_spec("torch") is None:
    pytest.skip("PyTorch is not installed: parity tests against transformers need "
                "`pip install torch==2.13.0 accelerate`")
  import torch

  return torch


def require_embedded():
  from jaxscore.models import pretrained

  try:
    return pretrained.resolve(pretrained.DEFAULT_MODEL)
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="session")
def embedded_model():
  from jaxscore.models import pretrained

  require_embedded()
  return pretrained.load(pretrained.DEFAULT_MODEL)


def shared_data(*parts: str) -> pathlib.Path:
  path = SHARED_DATA.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"{path} is absent (benchmark data lives beside the repository)")
  return path
