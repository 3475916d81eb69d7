"""Bounds the kernel holds a whole sandbox to: how many processes, how much memory, how
much CPU, for every process the candidate starts, by any route.

Python-level hooks see `os.fork` and `subprocess`, not a C extension loaded by path, and
per-process rlimits bound one process, not the tree it starts. As root, RLIMIT_NPROC does
not bind at all and a pid namespace caps nothing (its processes are host processes). So
each sandbox is started inside one of:
  * a cgroup of its own (v2, or v1's pids, memory and cpu hierarchies), created beside
    the scorer's own: `pids.max`, a memory limit (which tmpfs pages count against) and a
    CPU quota for the whole tree; its processes are killed and the group removed when the
    sandbox ends. Needs a writable cgroup hierarchy: root on a VM, or a delegated group.
  * else, as root, an unprivileged host uid of its own (`setpriv`), under which the
    worker's RLIMIT_NPROC binds; memory and CPU stay per process.
  * else, as root without unprivileged user namespaces, a seccomp filter (bwrap
    `--seccomp`) that refuses fork, vfork and clone without CLONE_THREAD: no new
    processes at all; threads stay, bounded by the address space;
  * else (not root): the caller's uid, whose RLIMIT_NPROC binds already, but counts the
    trainer's own threads and processes too.
`probe()` picks the first available once per process and says which in one line.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import platform
import shutil
import signal
import struct
import threading
import time

CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("pids", "memory", "cpu")
UID_BASE = 1_900_000_000  # Unprivileged host uids, one per sandbox (no file is theirs).
_counter = itertools.count()
_lock = threading.Lock()
_probed: Mode | None = None


class BoundsUnavailable(RuntimeError):
  """No kernel bound on the sandbox's process tree can be had here."""


@dataclasses.dataclass(frozen=True)
class Mode:
  kind: str  # "cgroup2" | "cgroup1" | "uid" | "user"
  detail: str  # What is bounded and by what, for the scorer's start-up log.


@dataclasses.dataclass
class Group:
  """The bounds of one sandbox: a command prefix that enters them, bwrap options (and
  the descriptors they name), and `close`."""

  prefix: list[str]
  env: dict[str, str]
  dirs: list[pathlib.Path]
  kind: str
  uid: int | None = None
  bwrap_args: list[str] = dataclasses.field(default_factory=list)
  pass_fds: tuple[int, ...] = ()

  def close(self) -> None:
    """Kills whatever is left in the group's cgroups and removes them."""
    for fd in self.pass_fds:
      try:
        os.close(fd)
      except OSError:
        pass
    self.pass_fds = ()
    for d in self.dirs:
      _kill_all(d)
    for d in reversed(self.dirs):
      for _ in range(50):
        try:
          d.rmdir()
          break
        except FileNotFoundError:
          break
        except OSError:  # Busy while its last processes exit.
          _kill_all(d)
          time.sleep(0.02)


def _own_path(controller: str | None) -> str:
  """This process's cgroup path in a v1 `controller` hierarchy, or in v2 (None)."""
  for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
    _, controllers, path = line.split(":", 2)
    if (controller is None and controllers == "") or controller in controllers.split(","):
      return path.lstrip("/")
  raise FileNotFoundError(controller)


def _parents() -> tuple[str, list[pathlib.Path]]:
  """("cgroup2" | "cgroup1", the directories new groups are made in)."""
  if (CGROUP_ROOT / "cgroup.controllers").exists():  # A pure v2 mount.
    parent = CGROUP_ROOT / _own_path(None)
    needed = {"pids", "memory", "cpu"}
    if not needed <= set((parent / "cgroup.subtree_control").read_text().split()):
      raise PermissionError(f"{parent}: pids, memory and cpu are not delegated to children")
    return "cgroup2", [parent]
  return "cgroup1", [CGROUP_ROOT / c / _own_path(c) for c in V1_CONTROLLERS]


def _make(kind: str, parents: list[pathlib.Path], processes: int, memory_bytes: int,
          cpus: float) -> list[pathlib.Path]:
  name = f"jaxscore-sandbox-{os.getpid()}-{next(_counter)}"
  dirs = []
  try:
    for parent in parents:
      d = parent / name
      d.mkdir()
      dirs.append(d)
    period = 100_000
    quota = str(max(int(cpus * period), 1000))
    if kind == "cgroup2":
      (d / "pids.max").write_text(str(processes))
      (d / "memory.max").write_text(str(memory_bytes))
      if (d / "memory.swap.max").exists():
        (d / "memory.swap.max").write_text("0")
      (d / "cpu.max").write_text(f"{quota} {period}")
    else:
      pids, memory, cpu = dirs
      (pids / "pids.max").write_text(str(processes))
      (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
      (cpu / "cpu.cfs_period_us").write_text(str(period))
      (cpu / "cpu.cfs_quota_us").write_text(quota)
  except OSError:
    for d in reversed(dirs):
      d.rmdir()
    raise
  return dirs


def _kill_all(d: pathlib.Path) -> None:
  kill = d / "cgroup.kill"
  if kill.exists():
    try:
      kill.write_text("1")
      return
    except OSError:
      pass
  for _ in range(20):
    try:
      pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
    except OSError:
      return
    if not pids:
      return
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    time.sleep(0.01)


def probe() -> Mode:
  """The bounds this process can put on sandboxes (checked once: a group is made and
  removed, or an unprivileged user namespace started)."""
  global _probed
  with _lock:
    if _probed is None:
      _probed = _probe()
  return _probed


def _probe() -> Mode:
  if os.geteuid() == 0:
    try:
      kind, parents = _parents()
      for d in reversed(_make(kind, parents, 8, 64 << 20, 1.0)):
        d.rmdir()
      return Mode(kind, f"{kind}: a group per sandbox beside {parents[0]}, with pids.max, "
                  "a memory limit (tmpfs pages included) and a CPU quota for the whole tree")
    except (OSError, FileNotFoundError) as e:
      reason = f"no writable cgroup ({type(e).__name__}: {e})"
    setpriv, bwrap = shutil.which("setpriv"), shutil.which("bwrap")
    if setpriv and bwrap:
      import subprocess

      probe_cmd = [setpriv, f"--reuid={UID_BASE}", f"--regid={UID_BASE}", "--clear-groups",
                   bwrap, "--unshare-all", "--ro-bind", "/", "/", "true"]
      if subprocess.run(probe_cmd, capture_output=True, timeout=30).returncode == 0:
        return Mode("uid", f"uid: {reason}; each sandbox runs as an unprivileged host uid "
                    "of its own, where RLIMIT_NPROC binds (memory and CPU per process)")
      reason += "; unprivileged user namespaces are refused"
    else:
      reason += "; setpriv (util-linux) is not installed"
    if bwrap and platform.machine() in _SYSCALLS:
      return Mode("seccomp", f"seccomp: {reason}; a seccomp filter refuses fork, vfork and "
                  "clone without CLONE_THREAD, so a sandbox starts no process (threads "
                  "stay, bounded by its address space); memory and CPU per process")
    raise BoundsUnavailable(
        f"the sandbox cannot bound the processes a candidate starts as root: {reason}. Run "
        "the scorer with a writable or delegated cgroup (e.g. `systemd-run --scope -p "
        "Delegate=yes`), allow unprivileged user namespaces, or set the task's "
        "isolation='process' to accept weaker isolation")
  return Mode("user", f"user: uid {os.getuid()}'s RLIMIT_NPROC binds (counting this "
              "process's own threads and children too); memory and CPU per process")


def enter(processes: int, memory_bytes: int, cpus: float) -> Group:
  """Bounds for one new sandbox: prefix its command with `group.prefix` (and add
  `group.env`), and `close()` the group when the sandbox is done."""
  mode = probe()
  if mode.kind in ("cgroup1", "cgroup2"):
    kind, parents = _parents()
    dirs = _make(kind, parents, processes, memory_bytes, cpus)
    procs = " ".join(str(d / "cgroup.procs") for d in dirs)
    # The shell joins every group, then becomes the sandbox: nothing it starts escapes.
    prefix = ["/bin/sh", "-c", 'for p in $JAXSCORE_CGROUP_PROCS; do echo $$ > "$p" || '
              'exit 125; done; exec "$@"', "sh"]
    return Group(prefix, {"JAXSCORE_CGROUP_PROCS": procs}, dirs, mode.kind)
  if mode.kind == "seccomp":
    fd = os.memfd_create("jaxscore-seccomp")
    os.write(fd, seccomp_filter())
    os.lseek(fd, 0, os.SEEK_SET)
    return Group([], {}, [], "seccomp", bwrap_args=["--seccomp", str(fd)], pass_fds=(fd,))
  if mode.kind == "uid":
    uid = UID_BASE + next(_counter) % 100_000
    return Group([shutil.which("setpriv"), f"--reuid={uid}", f"--regid={uid}",
                  "--clear-groups"], {}, [], "uid", uid)
  return Group([], {}, [], "user")


# ----------------------------------------------------------------------------
# The seccomp filter: classic BPF over `struct seccomp_data` (nr at 0, arch at 4, the
# first argument's low word at 16 on these little-endian machines).

_SYSCALLS = {  # AUDIT_ARCH, then syscall numbers (aarch64 has no fork or vfork).
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435}),
}
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _ERRNO, _KILL = 0x7FFF0000, 0x00050000, 0x80000000
_EPERM, _ENOSYS = 1, 38  # clone3 -> ENOSYS: the C library falls back to clone.
_CLONE_THREAD = 0x00010000


def seccomp_filter(machine: str | None = None) -> bytes:
  """The filter bwrap installs before the worker starts: another architecture (or
  x86-64's x32 calls) is killed, clone3 answers ENOSYS, fork and vfork EPERM, clone
  EPERM unless it makes a thread; everything else is allowed."""
  arch, nr = _SYSCALLS[machine or platform.machine()]
  # (code, jump-if-true label, jump-if-false label, k); labels resolve to offsets.
  prog = [("ld", None, None, 4), (_JEQ, None, "kill", arch), ("ld", None, None, 0)]
  if "fork" in nr:
    prog.append((_JGE, "kill", None, 0x40000000))
    prog += [(_JEQ, "eperm", None, nr["fork"]), (_JEQ, "eperm", None, nr["vfork"])]
  prog += [(_JEQ, "enosys", None, nr["clone3"]), (_JEQ, None, "allow", nr["clone"]),
           ("ld", None, None, 16), (_JSET, "allow", "eperm", _CLONE_THREAD)]
  labels = {"allow": len(prog), "eperm": len(prog) + 1, "enosys": len(prog) + 2,
            "kill": len(prog) + 3}
  prog += [(_RET, None, None, _ALLOW), (_RET, None, None, _ERRNO | _EPERM),
           (_RET, None, None, _ERRNO | _ENOSYS), (_RET, None, None, _KILL)]
  out = b""
  for i, (code, jt, jf, k) in enumerate(prog):
    if code == "ld":
      out += struct.pack("<HBBI", _LD_W_ABS, 0, 0, k)
      continue
    offset = lambda label: 0 if label is None else labels[label] - i - 1
    out += struct.pack("<HBBI", code, offset(jt), offset(jf), k)
  return out
