"""Runs one untrusted program inside the sandbox process (see sandbox.py).

Invoked as `python -I -B sandbox_child.py LIMITS_JSON` with the working directory set to a
fresh temporary directory holding `program.py`. Before the program runs, this process:
  1. moves into a new network namespace with no interfaces, where the kernel allows;
  2. sets resource limits (CPU seconds, address space, file size, process count),
     inherited by anything it starts;
  3. drops root to `nobody` when that user can read the standard library, so the
     process-count limit applies;
  4. installs a PEP 578 audit hook, which cannot be removed, refusing process creation,
     sockets, ctypes, and writes or deletions outside the working directory.
Uses only the standard library and imports nothing from jaxscore.
"""

import json
import os
import resource
import sys

BLOCKED_EVENTS = {
    "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
    "os.kill", "os.killpg", "subprocess.Popen", "pty.spawn", "ctypes.dlopen",
    "ctypes.dlsym", "ctypes.cdata", "socket.__new__", "socket.connect", "socket.bind",
    "socket.getaddrinfo", "socket.gethostbyname", "os.setuid", "os.chroot",
}
PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown",
               "os.symlink", "os.link", "os.truncate", "shutil.rmtree", "os.utime"}
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000


class SandboxViolation(Exception):
  pass


def _unshare_network() -> bool:
  try:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) == 0:
      return True
    # Unprivileged: a user namespace lets us own a network namespace.
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
      for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                         ("gid_map", f"{gid} {gid} 1")):
        try:
          with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
        except OSError:
          pass
      return True
  except Exception:  # pylint: disable=broad-except
    pass
  return False


def _set_limits(limits):
  mem = int(limits["memory_bytes"])
  resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1))
  resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
  resource.setrlimit(resource.RLIMIT_DATA, (mem, mem))
  resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
  resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _world_readable(path):
  """Whether `nobody` could read `path` (every ancestor searchable, itself readable)."""
  import stat

  path = os.path.realpath(path)
  parts = [path] + [os.path.dirname(path)]
  while parts[-1] != os.path.dirname(parts[-1]):
    parts.append(os.path.dirname(parts[-1]))
  try:
    return (os.stat(path).st_mode & stat.S_IROTH
            and all(os.stat(p).st_mode & stat.S_IXOTH for p in parts[1:]))
  except OSError:
    return False


def _drop_root(workdir):
  # An interpreter whose standard library `nobody` cannot read (e.g. under /root)
  # would fail every import: stay root then; the audit hook still refuses forks.
  if os.getuid() != 0 or not _world_readable(os.path.dirname(os.__file__)):
    return
  uid = gid = 65534  # nobody / nogroup
  os.chown(workdir, uid, gid)
  os.setgroups([])
  os.setgid(gid)
  os.setuid(uid)


def _inside(path, root):
  try:
    real = os.path.realpath(os.fspath(path) if not isinstance(path, int) else "")
  except (TypeError, ValueError):
    return False
  return real == root or real.startswith(root + os.sep)


BLOCKED_MODULES = {"_posixsubprocess", "_winapi"}  # Spawn without an audit event.


def _hook(root):
  def audit(event, args):
    if event in BLOCKED_EVENTS:
      raise SandboxViolation(f"blocked by the sandbox: {event}")
    if event == "import" and args[0] in BLOCKED_MODULES:
      raise SandboxViolation(f"blocked by the sandbox: import {args[0]}")
    if event == "open":
      path, mode, flags = args
      writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
          isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
      if writing and not isinstance(path, int) and not _inside(path, root):
        raise SandboxViolation(f"blocked by the sandbox: writing {path!r}")
    elif event in PATH_EVENTS:
      for path in args[:2]:
        if isinstance(path, (str, bytes, os.PathLike)) and not _inside(path, root):
          raise SandboxViolation(f"blocked by the sandbox: {event} {path!r}")
  return audit


def main():
  limits = json.loads(sys.argv[1])
  root = os.path.realpath(os.getcwd())
  with open("program.py", encoding="utf-8") as f:
    source = f.read()
  if limits.get("deny_network", True):
    _unshare_network()  # Best effort; the audit hook refuses sockets regardless.
  _set_limits(limits)
  _drop_root(root)
  sys.dont_write_bytecode = True
  for name in BLOCKED_MODULES:
    sys.modules.pop(name, None)
  sys.addaudithook(_hook(root))
  code = compile(source, "program.py", "exec")
  exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # pylint: disable=exec-used


if __name__ == "__main__":
  main()
