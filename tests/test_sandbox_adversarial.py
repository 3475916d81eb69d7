"""Generated code tries, as a policy under RL would, to earn a reward it has not earned or
to reach the host. Every attempt must score 0 (or be contained), through the same path
training uses: `MBPPTask.score` with bubblewrap isolation."""

import os
import resource
import shutil
import subprocess
import threading
import time

import pytest

from jaxscore.tasks import make_task, sandbox
from jaxscore.tasks.base import Problem

# The bounds are checked against the host's task count, shared memory and `ps`.
pytestmark = pytest.mark.host_exclusive

LIMITS = sandbox.Limits(timeout_s=8.0, cpu_seconds=4, memory_bytes=512 << 20)
SECRET = "jaxscore-test-secret-4f1c"
PROBLEM = Problem(id="adv", question="", prompt="", tests=("assert f() == 1",),
                  metadata={"setup": "", "reference": "def f():\n  return 1\n"})


@pytest.fixture(scope="module", autouse=True)
def require_bwrap():
  if shutil.which("bwrap") is None:
    pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")


def score(code: str, problem: Problem = PROBLEM):
  task = make_task("mbpp", limits=LIMITS, workers=1)
  return task.score([problem], [f"```python\n{code}\n```"])[0]


def test_an_honest_solution_scores_one_and_a_wrong_one_zero():
  assert score("def f():\n  return 1").reward == 1.0
  s = score("def f():\n  return 2")
  assert s.reward == 0.0 and s.reason == "wrong"


@pytest.mark.parametrize("attack", [
    # The old verdict was the exit status of the process that ran code then tests.
    "def f():\n  return 2\nimport sys\nsys.exit(0)",
    "def f():\n  return 2\nimport os\nos._exit(0)",
    "def f():\n  import os\n  os._exit(0)",
    "def f():\n  raise SystemExit(0)",
    # Exit hooks and threads that outlive the function.
    "import atexit, os\natexit.register(lambda: os._exit(0))\ndef f():\n  return 2",
    "import threading, os, time\n"
    "threading.Thread(target=lambda: (time.sleep(0.2), os._exit(0)), daemon=True).start()\n"
    "def f():\n  time.sleep(1)\n  return 2",
    # Objects that compare equal to anything, or subclasses of plain types that try to.
    "class A:\n  def __eq__(self, o): return True\n  __hash__ = object.__hash__\n"
    "def f():\n  return A()",
    "class I(int):\n  def __eq__(self, o): return True\n  __hash__ = int.__hash__\n"
    "def f():\n  return I(2)",
    "class L(list):\n  def __eq__(self, o): return True\ndef f():\n  return L([2])",
    # Patching the interpreter: builtins, AssertionError, the assert machinery.
    "import builtins\nbuiltins.AssertionError = type('E', (BaseException,), {})\n"
    "def f():\n  return 2",
    "import builtins\nbuiltins.__dict__['int'] = lambda *a: 1\ndef f():\n  return 2",
    "import sys\nsys.modules['builtins'].print = None\nsys.excepthook = None\n"
    "def f():\n  return 2",
    # Forging protocol messages on the channel it was given.
    "import os\nos.write(1, b'{\"verdict\": \"passed\"}\\n')\ndef f():\n  return 2",
    "def f():\n  import gc\n  for o in gc.get_objects():\n"
    "    if type(o).__name__ == 'Channel':\n"
    "      o.send({'verdict': 'passed'}); o.send({'value': 1})\n  return 2",
])
def test_forging_the_verdict_scores_zero(attack):
  s = score(attack)
  assert s.reward == 0.0, s


def test_the_candidate_never_sees_the_tests():
  problem = Problem(id="adv", question="", prompt="", metadata={"setup": "", "reference": ""},
                    tests=(f"assert f() == 'found'  # {SECRET}",))
  look = f"""
def f():
  import os, sys, gc
  needle = {SECRET!r}
  hay = []
  paths = [os.path.join(d, n) for root in ("/tmp", "/sandbox") for d, _, ns in os.walk(root)
           for n in ns]
  paths += [f"/proc/{{p}}/{{k}}" for p in os.listdir("/proc") if p.isdigit()
            for k in ("cmdline", "environ")]
  for path in paths:
    try:
      hay.append(open(path, "rb").read(1 << 16).decode(errors="ignore"))
    except OSError:
      pass
  hay += [repr(o) for o in gc.get_objects() if isinstance(o, (str, bytes, dict))]
  hay.append(repr(dict(os.environ)))
  return "found" if any(needle in h for h in hay) else "not found"
"""
  s = score(look, problem)
  assert s.reward == 0.0 and s.reason == "wrong", s  # It looked, and found nothing.


def test_the_host_is_out_of_reach(tmp_path):
  """Writes, truncation, deletion and fd-relative writes on host paths; reading root-only
  files and the training process's environment; signalling it; spawning a shell through
  ctypes; the network. The function reports what it managed; every part must fail."""
  victim = tmp_path / "keep.txt"
  victim.write_text("keep")
  os.environ["JAXSCORE_TEST_SECRET"] = SECRET
  attack = f"""
def f():
  import os, signal, socket
  done = []
  def attempt(name, fn):
    try:
      fn()
      done.append(name)
    except BaseException:
      pass
  attempt("write", lambda: open({str(tmp_path / 'new.txt')!r}, "w").write("x"))
  attempt("truncate", lambda: os.truncate({str(victim)!r}, 0))
  attempt("o_trunc", lambda: os.close(os.open({str(victim)!r}, os.O_WRONLY | os.O_TRUNC)))
  attempt("unlink", lambda: os.unlink({str(victim)!r}))
  def dir_fd_write():
    d = os.open({str(tmp_path)!r}, os.O_RDONLY)
    os.close(os.open("dirfd.txt", os.O_WRONLY | os.O_CREAT, dir_fd=d))
  attempt("dir_fd", dir_fd_write)
  attempt("shadow", lambda: open("/etc/shadow").read())
  def environ():
    for pid in os.listdir("/proc"):
      if pid.isdigit() and {SECRET!r} in open(f"/proc/{{pid}}/environ").read():
        return
    raise OSError
  attempt("environ", environ)
  attempt("kill_parent", lambda: os.kill({os.getpid()}, signal.SIGKILL))
  attempt("pidfd", lambda: signal.pidfd_send_signal(os.pidfd_open({os.getpid()}), signal.SIGKILL))
  def shell():
    import ctypes
    ctypes.CDLL(None).system(b"touch {tmp_path / 'pwned'}")
  attempt("ctypes", shell)
  attempt("net", lambda: socket.create_connection(("127.0.0.1", 22), timeout=1))
  attempt("uid0", lambda: os.getuid() == 0 or (_ for _ in ()).throw(OSError()))
  return done
"""
  problem = Problem(id="adv", question="", prompt="", tests=("assert f() == []",),
                    metadata={"setup": "", "reference": ""})
  job = make_task("mbpp").job(problem, attack)
  result = sandbox.run_tests(**job, limits=LIMITS)
  # The tests pass exactly when the function ran every attempt and none succeeded.
  assert result.status == "ok", result
  assert victim.read_text() == "keep"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
  del os.environ["JAXSCORE_TEST_SECRET"]


@pytest.mark.parametrize("attack,reason", [
    ("import os\ndef f():\n  while True:\n    os.fork()", "error"),
    ("def f():\n  x = bytearray(8 << 30)\n  return 1", "error"),
    ("def f():\n  while True: pass", "timeout"),
    ("def f():\n  import time\n  time.sleep(600)", "timeout"),
])
def test_resource_attacks_are_contained(attack, reason):
  s = score(attack)
  assert s.reward == 0.0 and s.reason == reason, s


def test_flooding_output_keeps_the_host_memory_bounded():
  floods = [
      "def f():\n  print('x' * (1 << 20) * 4000)\n  return 2",  # 4 GB to stdout.
      "import os\ndef f():\n  while True:\n    os.write(1, b'x' * (1 << 20))",
      "def f():\n  return 'x' * (300 << 20)",  # A 300 MB return value.
  ]
  peak = [0]
  stop = threading.Event()

  def watch():
    while not stop.is_set():
      peak[0] = max(peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
      time.sleep(0.05)

  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t = threading.Thread(target=watch)
  t.start()
  try:
    for attack in floods:
      s = score(attack)
      assert s.reward == 0.0, s
  finally:
    stop.set()
    t.join()
  assert peak[0] - before < 200 << 10, (before, peak[0])  # KiB: under 200 MiB.


def _peak_while(sample, fn):
  """(fn(), sample() before, the largest sample() taken every 10 ms while fn ran)."""
  peak, stop = [0], threading.Event()
  before = sample()

  def watch():
    while not stop.is_set():
      peak[0] = max(peak[0], sample())
      time.sleep(0.01)

  t = threading.Thread(target=watch)
  t.start()
  try:
    result = fn()
  finally:
    stop.set()
    t.join()
  return result, before, max(peak[0], before)


def _shmem_kib() -> int:
  """The host's shared memory (tmpfs pages), /proc/meminfo's Shmem."""
  for line in open("/proc/meminfo"):
    if line.startswith("Shmem:"):
      return int(line.split()[1])
  raise AssertionError("no Shmem line in /proc/meminfo")


def test_filling_every_writable_path_takes_at_most_its_tmpfs_cap():
  """The candidate writes 4 MiB files into /tmp, /dev/shm, /dev, / and its working
  directory until each refuses, and reports how much each took; the tests only pass if
  it returns, so a reward of 1 means every fill ended. Each writable path holds at most
  `tmpfs_bytes` (2 MiB here), the rest are read-only, and the host's shared memory
  grows by no more than the caps while the candidate runs."""
  limits = sandbox.Limits(timeout_s=20.0, cpu_seconds=10, memory_bytes=512 << 20,
                          tmpfs_bytes=2 << 20)
  attack = """
import os
def f():
  took = {}
  for d in ("/tmp", "/dev/shm", "/dev", "/", "."):
    n = 0
    for i in range(400):
      try:
        with open(os.path.join(d, f"fill{i}"), "wb") as out:
          for _ in range(4):
            out.write(b"x" * (1 << 20))
            out.flush()
            n += 1 << 20
      except OSError:
        break
    took[d] = n
  return took
"""
  problem = Problem(id="fill", question="", prompt="", tests=("r = f()",),
                    metadata={"setup": "", "reference": ""})
  result, before, peak = _peak_while(
      _shmem_kib, lambda: sandbox.run_tests(**make_task("mbpp").job(problem, attack),
                                            limits=limits))
  assert result.status == "ok", result  # Every fill ended with an error, none ran on.
  # Two 2 MiB tmpfs (/tmp is also the working directory): at most 4 MiB, plus noise
  # from the rest of the host.
  assert (peak - before) < 4096 + 8192, (before, peak)
  probe = make_task("mbpp").job(problem, attack.replace("return took", "assert took["
                                "'/tmp'] <= 2 << 20 and took['/dev/shm'] <= 2 << 20 and "
                                "took['/dev'] == took['/'] == 0, took\n  return took"))
  assert sandbox.run_tests(**probe, limits=limits).status == "ok"


SPAWN_BY_PATH = """
import glob, importlib.machinery, importlib.util, os, sys
def f():
  path = glob.glob(sys.base_prefix + "/lib/python3*/lib-dynload/_posixsubprocess*.so")[0]
  loader = importlib.machinery.ExtensionFileLoader("_posixsubprocess", path)
  spec = importlib.util.spec_from_file_location("_posixsubprocess", path, loader=loader)
  fork_exec = importlib.util.module_from_spec(spec).fork_exec
  args = [sys.executable.encode(), b"-c", b"import time; time.sleep(30)"]
  started = 0
  for _ in range(200):
    try:
      fork_exec(args, [args[0]], True, (), None, None, -1, -1, -1, -1, -1, -1, *os.pipe(),
                False, False, -1, None, None, None, -1, None, True)
      started += 1
    except Exception:
      pass
  return started
"""
THREADS = """
import threading, time
def f():
  started = 0
  for _ in range(500):
    try:
      threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
      started += 1
    except Exception:
      pass
  return started
"""


def _host_tasks() -> int:
  """Processes and threads on the host (what a pid cap protects)."""
  return sum(len(os.listdir(f"/proc/{p}/task")) for p in os.listdir("/proc")
             if p.isdigit() and os.path.exists(f"/proc/{p}/task"))


@pytest.mark.parametrize("attack", [SPAWN_BY_PATH, THREADS], ids=["fork_exec_by_path",
                                                                  "threads"])
def test_spawning_by_any_route_stays_within_the_process_cap(attack):
  """Processes started through the C extension loaded by file path (the audit hook sees
  no `os.fork`), or threads: the candidate's whole sandbox holds at most
  `Limits.processes` tasks, the reward is 0, and none is left afterwards."""
  if sandbox.bounds.probe().kind not in ("cgroup1", "cgroup2", "uid"):
    pytest.skip(f"no per-sandbox process bound here: {sandbox.bounds.probe().detail}")
  limits = sandbox.Limits(timeout_s=10.0, cpu_seconds=5, memory_bytes=512 << 20,
                          processes=16)
  problem = Problem(id="spawn", question="", prompt="", tests=("assert f() >= 200",),
                    metadata={"setup": "", "reference": ""})
  result, before, peak = _peak_while(
      _host_tasks, lambda: sandbox.run_tests(**make_task("mbpp").job(problem, attack),
                                             limits=limits))
  assert result.status != "ok", result
  # Two sandboxes (candidate and tests) of at most 16 tasks each, and the watcher.
  assert peak - before <= 2 * 16 + 4, (before, peak)
  time.sleep(0.3)
  assert _host_tasks() - before <= 4, (before, _host_tasks())


@pytest.fixture
def no_cgroups(monkeypatch):
  """As if the host had no writable cgroup hierarchy (probed afresh, then restored)."""
  def refuse():
    raise PermissionError("read-only cgroup hierarchy (test)")

  monkeypatch.setattr(sandbox.bounds, "_parents", refuse)
  monkeypatch.setattr(sandbox.bounds, "_probed", None)
  yield
  sandbox.bounds._probed = None


def test_without_cgroups_root_runs_each_sandbox_as_its_own_uid(no_cgroups):
  """The fallback as root: an unprivileged host uid per sandbox, where RLIMIT_NPROC
  binds: spawning through the extension loaded by path stays within the cap."""
  if os.geteuid() != 0:
    pytest.skip("the uid fallback is for a scorer running as root")
  mode = sandbox.bounds.probe()
  if mode.kind != "uid":
    pytest.skip(mode.detail)
  limits = sandbox.Limits(timeout_s=10.0, cpu_seconds=5, memory_bytes=512 << 20,
                          processes=16)
  problem = Problem(id="spawn", question="", prompt="", tests=("assert f() >= 200",),
                    metadata={"setup": "", "reference": ""})
  before = _host_tasks()
  result = sandbox.run_tests(**make_task("mbpp").job(problem, SPAWN_BY_PATH), limits=limits)
  assert result.status != "ok", result
  time.sleep(0.3)
  assert _host_tasks() - before <= 4


@pytest.fixture
def no_user_namespaces(no_cgroups, monkeypatch):
  """... and no way to run a sandbox as an unprivileged uid (setpriv hidden)."""
  if os.geteuid() != 0:
    pytest.skip("the bounds an unprivileged scorer has are its own uid's")
  which = shutil.which
  monkeypatch.setattr(shutil, "which", lambda name: None if name == "setpriv" else which(name))


def test_without_cgroups_or_a_uid_a_seccomp_filter_starts_no_process(no_user_namespaces):
  """The last fallback as root: bwrap's seccomp filter refuses fork, vfork and non-thread
  clone, so spawning through the extension loaded by path starts nothing, while threads
  and honest code still run."""
  assert sandbox.bounds.probe().kind == "seccomp"
  spawned = Problem(id="spawn", question="", prompt="", tests=("assert f() >= 1",),
                    metadata={"setup": "", "reference": ""})
  before = _host_tasks()
  result = sandbox.run_tests(**make_task("mbpp").job(spawned, SPAWN_BY_PATH), limits=LIMITS)
  assert result.status == "failed", result  # f() ran and started no process.
  assert _host_tasks() - before <= 4
  threads = Problem(id="threads", question="", prompt="", tests=("assert f() >= 10",),
                    metadata={"setup": "", "reference": ""})
  assert sandbox.run_tests(**make_task("mbpp").job(threads, THREADS), limits=LIMITS).passed
  assert score("def f():\n  return 1").reward == 1.0


def test_seccomp_filter_program_by_hand():
  """The BPF words for x86-64, written out: arch check, x32 guard, clone3 -> ENOSYS,
  fork and vfork -> EPERM, clone allowed only with CLONE_THREAD."""
  import struct

  words = [struct.unpack("<HBBI", sandbox.bounds.seccomp_filter("x86_64")[i:i + 8])
           for i in range(0, len(sandbox.bounds.seccomp_filter("x86_64")), 8)]
  assert words == [
      (0x20, 0, 0, 4), (0x15, 0, 11, 0xC000003E), (0x20, 0, 0, 0),
      (0x35, 9, 0, 0x40000000), (0x15, 6, 0, 57), (0x15, 5, 0, 58), (0x15, 5, 0, 435),
      (0x15, 0, 2, 56), (0x20, 0, 0, 16), (0x45, 0, 1, 0x10000),
      (0x06, 0, 0, 0x7FFF0000), (0x06, 0, 0, 0x00050001), (0x06, 0, 0, 0x00050026),
      (0x06, 0, 0, 0x80000000)]


def test_no_bound_on_processes_is_a_clear_error_not_a_weaker_sandbox(no_user_namespaces,
                                                                     monkeypatch):
  monkeypatch.setattr(sandbox.bounds, "_SYSCALLS", {})  # No filter for this machine.
  with pytest.raises(sandbox.SandboxUnavailable, match="no writable cgroup.*setpriv"):
    sandbox.run_tests_many([make_task("mbpp").job(PROBLEM, "def f():\n  return 1")])


def test_the_whole_sandbox_gets_at_most_its_cpu_share():
  """With `cpus=0.25` a busy loop gets about a quarter of each second of wall time (the
  cgroup quota binds the sandbox as a whole), far below the full second it takes
  unbounded."""
  if sandbox.bounds.probe().kind not in ("cgroup1", "cgroup2"):
    pytest.skip(f"no cgroup CPU quota here: {sandbox.bounds.probe().detail}")
  busy = """
import time
def f():
  start = time.monotonic()
  while time.monotonic() - start < 2.0:
    pass
  return time.process_time()
"""
  problem = Problem(id="cpu", question="", prompt="", tests=("assert f() < 1.0",),
                    metadata={"setup": "", "reference": ""})
  limits = sandbox.Limits(timeout_s=10.0, cpus=0.25)
  assert sandbox.run_tests(**make_task("mbpp").job(problem, busy), limits=limits).passed


def test_no_process_survives_the_run():
  marker = "jaxscore-survivor-7b"
  attack = f"""
import os, threading, time
def f():
  try:
    os.setsid()
  except OSError:
    pass
  for _ in range(3):
    try:
      if os.fork() == 0:
        os.setsid()
        while True:
          time.sleep(1)  # {marker}
    except OSError:
      pass
  return 2
"""
  assert score(attack).reward == 0.0
  time.sleep(0.5)
  ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
  assert "sandbox/worker.py" not in ps and marker not in ps


def test_missing_bubblewrap_is_a_one_line_error(monkeypatch):
  monkeypatch.setattr(shutil, "which", lambda name: None)
  with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
    score("def f():\n  return 1")
  # Opting into the weaker mode works without it, and still cannot be forged.
  task = make_task("mbpp", limits=LIMITS, workers=1, isolation="process")
  good, forged = task.score([PROBLEM] * 2, ["```python\ndef f():\n  return 1\n```",
                                            "```python\ndef f():\n  return 2\nimport sys\n"
                                            "sys.exit(0)\n```"])
  assert good.reward == 1.0 and forged.reward == 0.0
