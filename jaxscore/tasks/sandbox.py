"""A sandbox for untrusted generated code: a separate, limited process per program.

Each program runs in `python -I -B` in a fresh temporary directory, in its own process
group, with an empty environment (no inherited secrets) and:
  * a wall-clock timeout, after which the whole process group is killed;
  * resource limits: CPU seconds, address space, file size, process count;
  * no network: a new network namespace where the kernel allows it (root, or
    unprivileged user namespaces), and in any case an audit hook refusing sockets;
  * an audit hook (PEP 578, irremovable) refusing process creation, ctypes, and
    writes, renames or deletions outside its directory;
  * when started as root, the program runs as `nobody`.
Not isolated: reading world-readable files, and CPU time of the host (use fewer
workers). Code that defeats the interpreter itself (e.g. a crafted C extension already
on the path) is beyond a Python-level hook: run training hosts without secrets on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent import futures

CHILD = pathlib.Path(__file__).with_name("sandbox_child.py")


@dataclasses.dataclass(frozen=True)
class Limits:
  timeout_s: float = 20.0  # Wall clock; generous, since CPU seconds bound busy loops.
  cpu_seconds: int = 10
  memory_bytes: int = 1 << 30
  file_bytes: int = 16 << 20
  processes: int = 16  # Counted per user; effective when not running as root.
  deny_network: bool = True


@dataclasses.dataclass(frozen=True)
class Result:
  status: str  # "ok", "failed" (assertion), "error" (other exception), "timeout"
  returncode: int | None
  stdout: str
  stderr: str
  seconds: float

  @property
  def passed(self) -> bool:
    return self.status == "ok"


def _classify(returncode: int | None, stderr: str, timed_out: bool) -> str:
  if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
    return "timeout"
  if returncode == 0:
    return "ok"
  last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
  return "failed" if last.startswith("AssertionError") else "error"


def run(program: str, limits: Limits = Limits()) -> Result:
  """Runs `program` (Python source) in the sandbox."""
  with tempfile.TemporaryDirectory(prefix="jaxscore-sandbox-") as workdir:
    os.chmod(workdir, 0o755)
    pathlib.Path(workdir, "program.py").write_text(program, encoding="utf-8")
    limits_json = json.dumps(dataclasses.asdict(limits))
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-B", str(CHILD), limits_json], cwd=workdir, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    timed_out = False
    try:
      stdout, stderr = proc.communicate(timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
      timed_out = True
      _kill_group(proc.pid)
      stdout, stderr = proc.communicate()
    # Anything the program left behind in its group goes too.
    _kill_group(proc.pid)
    seconds = time.monotonic() - start
  out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
  return Result(status=_classify(proc.returncode, err, timed_out),
                returncode=proc.returncode, stdout=out[-10_000:], stderr=err[-10_000:],
                seconds=seconds)


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def run_many(programs: Sequence[str], limits: Limits = Limits(), workers: int = 2) -> list[Result]:
  """Runs programs in parallel, each in its own sandbox process; results in order.

  The pool's threads only wait on the sandbox processes, which do the work.
  """
  with futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    return list(pool.map(lambda p: run(p, limits), programs))
