"""The sandbox contains hostile programs and leaves the host untouched."""

import os
import pathlib
import time

import pytest

from jaxscore.tasks import make_task, sandbox
from jaxscore.tasks.base import Problem

LIMITS = sandbox.Limits(timeout_s=4.0, cpu_seconds=2, memory_bytes=512 << 20)
# Stopped means well before the 60 s the hostile programs below would run; the bound is
# loose because CI machines are shared and start processes slowly under load.
STOPPED_S = 30


def _run(program):
  t0 = time.monotonic()
  result = sandbox.run(program, LIMITS)
  return result, time.monotonic() - t0


def test_passing_and_failing_programs():
  assert _run("assert sum(range(5)) == 10")[0].status == "ok"
  assert _run("assert 1 == 2")[0].status == "failed"
  assert _run("def f(:\n")[0].status == "error"


def test_infinite_loop_is_stopped_by_the_cpu_limit():
  result, seconds = _run("while True:\n  pass")
  assert result.status == "timeout" and seconds < STOPPED_S


def test_sleeping_program_is_stopped_by_the_wall_clock():
  result, seconds = _run("import time\ntime.sleep(60)")
  assert result.status == "timeout" and seconds < STOPPED_S


def test_fork_bomb_is_refused():
  result, seconds = _run("import os\nwhile True:\n  os.fork()")
  assert result.status == "error" and "os.fork" in result.stderr and seconds < STOPPED_S


def test_huge_allocation_fails_with_memory_error():
  result, _ = _run("x = bytearray(10 * 1024**3)")
  assert result.status == "error" and "MemoryError" in result.stderr


def test_writing_outside_the_working_directory_is_refused(tmp_path):
  target = tmp_path / "escaped.txt"
  result, _ = _run(f"open({str(target)!r}, 'w').write('x')")
  assert result.status == "error" and not target.exists()
  victim = tmp_path / "keep.txt"
  victim.write_text("keep")
  result, _ = _run(f"import os\nos.remove({str(victim)!r})")
  assert result.status == "error" and victim.read_text() == "keep"
  # Its own directory is writable.
  assert _run("open('f.txt', 'w').write('x')\nassert open('f.txt').read() == 'x'")[0].passed


def test_environment_holds_no_secrets(monkeypatch):
  monkeypatch.setenv("JAXSCORE_TEST_SECRET", "hunter2")
  result, _ = _run("import os\nprint(sorted(os.environ))\n"
                   "assert os.environ.get('JAXSCORE_TEST_SECRET') == 'hunter2'")
  assert result.status == "failed" and "JAXSCORE_TEST_SECRET" not in result.stdout


@pytest.mark.parametrize("program", [
    "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned'])",
    "import os\nos.system('echo pwned')",
    "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo pwned'])",
    "import pty\npty.spawn('/bin/sh')",
    "import ctypes\nctypes.CDLL(None).system(b'echo pwned')",
])
def test_spawning_a_shell_is_refused(program):
  result, _ = _run(program)
  assert result.status == "error" and "pwned" not in result.stdout


def test_sockets_are_refused():
  result, _ = _run("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))")
  assert result.status == "error" and "blocked by the sandbox" in result.stderr


def test_host_process_is_unaffected():
  before = os.getcwd(), dict(os.environ)
  _run("import os\nos.chdir('/')\nos.environ['X'] = '1'")
  assert (os.getcwd(), dict(os.environ)) == before


def test_hostile_programs_score_zero_with_reasons():
  task = make_task("mbpp", workers=2, limits=LIMITS)
  problem = Problem(id="t", question="", prompt="", tests=("assert f() == 1",),
                    metadata={"setup": ""})
  responses = [
      "```python\ndef f():\n  return 1\n```",
      "```python\ndef f():\n  while True: pass\n```",
      "```python\nimport os\ndef f():\n  os.fork()\n```",
      "```python\ndef f():\n  return 2\n```",
      "no code here",
  ]
  scores = task.score([problem] * len(responses), responses)
  assert [s.reason for s in scores] == ["correct", "timeout", "error", "wrong", "no_answer"]
  assert [s.reward for s in scores] == [1.0, 0, 0, 0, 0]


def test_runs_in_parallel_workers():
  # Each program reports when it started, then sleeps until a shared deadline 8 s away.
  # Run one after the other, the second would start after the first ended; with two
  # workers both start before the deadline, however slowly a loaded machine starts them
  # (up to 8 s), so the runs overlap.
  deadline = time.time() + 8
  program = (f"import time\nt = time.time()\ntime.sleep(max(0.0, {deadline} - t))\n"
             "print(t, time.time())")
  limits = sandbox.Limits(timeout_s=60.0, cpu_seconds=2, memory_bytes=512 << 20)
  results = sandbox.run_many([program] * 2, limits, workers=2)
  assert all(r.passed for r in results)
  (start_a, end_a), (start_b, end_b) = (map(float, r.stdout.split()) for r in results)
  assert max(start_a, start_b) < min(end_a, end_b)


def test_temporary_directory_is_removed():
  result, _ = _run("import os\nprint(os.getcwd())")
  assert not pathlib.Path(result.stdout.strip()).exists()
