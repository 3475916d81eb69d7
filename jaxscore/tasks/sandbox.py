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
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent import futures

from jaxscore.tasks import bounds

CHILD = pathlib.Path(__file__).with_name("sandbox_child.py")


@dataclasses.dataclass(frozen=True)
class Limits:
  timeout_s: float = 20.0  # Wall clock; generous, since CPU seconds bound busy loops.
  cpu_seconds: int = 10
  memory_bytes: int = 1 << 30
  file_bytes: int = 16 << 20
  # Processes (and threads) of the whole sandbox, however started: a cgroup's pids.max,
  # else RLIMIT_NPROC of a uid of its own (jaxscore.tasks.bounds).
  processes: int = 16
  deny_network: bool = True
  # Size of each writable filesystem of a bwrap sandbox (/tmp, /dev/shm): tmpfs pages
  # are host memory that no address-space limit counts.
  tmpfs_bytes: int = 32 << 20
  # CPUs the whole sandbox may use at once (a cgroup CPU quota): with several scoring
  # workers beside a trainer, each takes at most this share of the host.
  cpus: float = 1.0

  @property
  def group_memory_bytes(self) -> int:
    """The whole sandbox's memory limit (a cgroup's): the process's address space, its
    two tmpfs and the interpreter and bwrap around it."""
    return self.memory_bytes + 2 * self.tmpfs_bytes + (64 << 20)


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


# ----------------------------------------------------------------------------
# Function-level tests: candidate and tests in separate, OS-isolated processes.

WORKER = pathlib.Path(__file__).with_name("sandbox_worker.py")
MAX_MESSAGE_BYTES = 1 << 20  # A longer reply (or output flood) is an error.
ISOLATION_MODES = ("bwrap", "process")


class SandboxUnavailable(RuntimeError):
  """The isolation a task asks for cannot be had on this machine."""


def isolated_command(role: str, isolation: str = "bwrap",
                     tmpfs_bytes: int = Limits.tmpfs_bytes,
                     bwrap_args: Sequence[str] = ()) -> list[str]:
  """The command that runs `sandbox_worker.py role`.

  bwrap: new user, pid, network, mount, IPC, UTS and cgroup namespaces; uid 65534; no
  capabilities; read-only binds of the interpreter and system libraries only; a fresh
  tmpfs of `tmpfs_bytes` as the working directory (/tmp) and another as /dev/shm, every
  other path read-only (/dev and the sandbox's root included, which bwrap would leave
  writable and unbounded); its own /proc; an empty environment; killed with its parent
  and in a session of its own. process: the same worker as a plain child process
  (weaker: it shares the host's files, network and process table).
  """
  exe = os.path.realpath(sys.executable)
  args = ["-I", "-S", "-B"]
  if isolation == "process":
    return [exe, *args, str(WORKER), role]
  if isolation != "bwrap":
    raise ValueError(f"isolation={isolation!r}: expected one of {', '.join(ISOLATION_MODES)}")
  bwrap = shutil.which("bwrap")
  if bwrap is None:
    raise SandboxUnavailable(
        "code tasks run generated code under bubblewrap, which is not installed: "
        "`apt-get install bubblewrap` (or set the task's isolation='process' to accept "
        "weaker, process-only isolation)")
  binds = ["--ro-bind", "/usr", "/usr"]
  for path in ("/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache"):
    if os.path.exists(path):
      binds += ["--ro-bind", path, path]
  prefix = os.path.realpath(sys.base_prefix)
  if not prefix.startswith("/usr/"):
    binds += ["--ro-bind", prefix, prefix]
  return [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
          "--uid", "65534", "--gid", "65534", "--clearenv", "--setenv", "LANG", "C.UTF-8",
          "--proc", "/proc", "--dev", "/dev",
          "--size", str(tmpfs_bytes), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
          "--size", str(tmpfs_bytes), "--tmpfs", "/tmp", "--chdir", "/tmp", *binds,
          "--ro-bind", str(WORKER), "/sandbox/worker.py", "--remount-ro", "/", *bwrap_args,
          exe, *args, "/sandbox/worker.py", role]


class _Peer:
  """A worker process and the JSON lines it writes, read with a deadline and a cap."""

  def __init__(self, role: str, limits: Limits, isolation: str):
    # No preexec_fn: without one the child is started with vfork, which stays cheap when
    # the scorer is a large training process. The worker lowers its own limits first.
    limits_arg = json.dumps({"cpu_seconds": limits.cpu_seconds,
                             "memory_bytes": limits.memory_bytes,
                             "file_bytes": limits.file_bytes,
                             "processes": limits.processes})
    self.group = (_bounds(limits) if isolation == "bwrap" else
                  bounds.Group([], {}, [], "none"))
    command = isolated_command(role, isolation, limits.tmpfs_bytes, self.group.bwrap_args)
    try:
      self.proc = subprocess.Popen(
          [*self.group.prefix, *command, limits_arg], stdin=subprocess.PIPE,
          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
          env={"LANG": "C.UTF-8", "PATH": "/usr/bin:/bin", **self.group.env},
          pass_fds=self.group.pass_fds)
    except BaseException:
      self.group.close()
      raise
    for fd in self.group.pass_fds:  # bwrap has its own copy now.
      os.close(fd)
    self.group.pass_fds = ()
    self.buffer = b""
    self.failure: str | None = None  # "timeout" | "error" once the peer is unusable.

  def send(self, message: dict) -> bool:
    try:
      self.proc.stdin.write(json.dumps(message).encode() + b"\n")
      self.proc.stdin.flush()
      return True
    except (BrokenPipeError, OSError):
      self.failure = self.failure or "error"
      return False

  def receive(self, deadline: float) -> dict | None:
    """The next message, or None (with `failure` set) on exit, timeout or flood."""
    fd = self.proc.stdout.fileno()
    while b"\n" not in self.buffer:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        self.failure = "timeout"
        return None
      ready, _, _ = select.select([fd], [], [], remaining)
      if not ready:
        continue
      chunk = os.read(fd, 1 << 16)
      if not chunk:
        self.failure = self.failure or self._exit_reason()
        return None
      self.buffer += chunk
      if len(self.buffer) > MAX_MESSAGE_BYTES:
        self.failure = "error"
        return None
    line, self.buffer = self.buffer.split(b"\n", 1)
    try:
      message = json.loads(line)
    except (ValueError, RecursionError):
      self.failure = "error"
      return None
    if type(message) is not dict:
      self.failure = "error"
      return None
    return message

  def _exit_reason(self) -> str:
    """`timeout` if the worker ran out of CPU time (or was killed), else `error`."""
    try:
      rc = self.proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
      return "error"
    # bwrap reports a child killed by signal s as 128 + s.
    out_of_time = {signal.SIGXCPU, signal.SIGKILL}
    return "timeout" if -rc in out_of_time or rc - 128 in out_of_time else "error"

  def kill(self) -> None:
    _kill_group(self.proc.pid)
    self.proc.kill()
    self.proc.wait()
    self.group.close()
    for f in (self.proc.stdin, self.proc.stdout):
      try:
        f.close()
      except OSError:
        pass


def run_tests(candidate: str, tests: str, setup: str = "", entry_point: str | None = None,
              builtin_names: Sequence[str] = (), limits: Limits = Limits(),
              isolation: str = "bwrap") -> Result:
  """Runs `tests` against the functions `candidate` defines, each in its own sandbox.

  The tests see the candidate's functions through proxies that pass plain data only
  (see sandbox_worker.py). With `entry_point`, the tests define `check(candidate)` and it
  is called with that function (HumanEval). A function named like a builtin reaches the
  tests only if `builtin_names` (the reference solution's own names) lists it. The verdict
  comes from the tests' process: `ok` when every test passed, `failed` on an assertion,
  `timeout` when the candidate or the tests ran out of time, `error` otherwise (the
  candidate does not load, raises, returns something that is not plain data, exits,
  crashes or floods its output).
  """
  start = time.monotonic()
  deadline = start + limits.timeout_s
  peers = []

  def result(status: str, detail: str = "") -> Result:
    for p in peers:
      p.kill()
    return Result(status=status, returncode=None, stdout="", stderr=detail[-10_000:],
                  seconds=time.monotonic() - start)

  candidate_peer = _Peer("candidate", limits, isolation)
  peers.append(candidate_peer)
  candidate_peer.send({"program": candidate})
  ready = candidate_peer.receive(deadline)
  if ready is None:
    return result(candidate_peer.failure, "the candidate did not start")
  if "ready" not in ready or type(ready["ready"]) is not list:
    return result("error", f"the candidate does not load: {str(ready.get('error'))[:2000]}")
  names = [n for n in ready["ready"] if type(n) is str and n.isidentifier()]
  modules = ready.get("modules") if type(ready.get("modules")) is dict else {}
  tests_peer = _Peer("tests", limits, isolation)
  peers.append(tests_peer)
  tests_peer.send({"setup": setup, "tests": tests, "names": names, "entry_point": entry_point,
                   "builtin_names": list(builtin_names), "modules": modules})
  while True:
    message = tests_peer.receive(deadline)
    if message is None:
      return result(tests_peer.failure, "the tests did not finish")
    if "verdict" in message:
      verdict = {"passed": "ok", "failed": "failed"}.get(message["verdict"], "error")
      if verdict == "error" and candidate_peer.failure == "timeout":
        verdict = "timeout"
      return result(verdict, str(message.get("detail", "")))
    tests_peer.send(_call_candidate(candidate_peer, message, deadline))


def _call_candidate(candidate_peer: _Peer, call: dict, deadline: float) -> dict:
  """Relays one call from the tests to the candidate; the reply the tests get."""
  from jaxscore.tasks import sandbox_worker

  if candidate_peer.failure is not None or not candidate_peer.send(call):
    return {"failed": "the candidate is gone"}
  answer = candidate_peer.receive(deadline)
  if answer is None:
    candidate_peer.kill()
    return {"failed": f"the candidate {candidate_peer.failure}"}
  if "value" not in answer:
    return {"failed": f"raised {str(answer.get('raised'))[:500]}"}
  try:  # Re-encoded here, so only plain data reaches the tests.
    return {"value": sandbox_worker.encode(sandbox_worker.decode(answer["value"]))}
  except (sandbox_worker.NotPlain, RecursionError) as e:
    return {"failed": f"returned {e}"}


def _bounds(limits: Limits) -> bounds.Group:
  """The kernel bounds of one new sandbox; the first one says which are in force."""
  try:
    mode = bounds.probe()
  except bounds.BoundsUnavailable as e:
    raise SandboxUnavailable(str(e)) from None
  global _announced
  if not _announced:
    _announced = True
    print(f"sandbox bounds: {mode.detail}", file=sys.stderr, flush=True)
  return bounds.enter(limits.processes, limits.group_memory_bytes, limits.cpus)


_announced = False


def run_tests_many(jobs: Sequence[dict], limits: Limits = Limits(), workers: int = 2,
                   isolation: str = "bwrap") -> list[Result]:
  """`run_tests(**job)` for every job, in parallel; results in order."""
  isolated_command("candidate", isolation)  # Fails at once if the isolation is missing.
  if isolation == "bwrap":
    _bounds(limits).close()  # ... and if no kernel bound on its processes can be had.
  with futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    return list(pool.map(lambda job: run_tests(**job, limits=limits, isolation=isolation),
                         jobs))
