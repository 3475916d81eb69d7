"""One side of a function-level test, run inside the sandbox with the standard library only.

  python -I -S -B sandbox_worker.py candidate LIMITS   # serves calls to the candidate's code
  python -I -S -B sandbox_worker.py tests LIMITS       # runs the task's tests against proxies

The two roles run in separate processes, and the scorer relays between them: the tests
call the candidate's functions through proxies, and only plain data (None, bool, int,
float, str, bytes, and lists, tuples, dicts, sets and frozensets of them, checked by
exact type) crosses, so nothing the candidate defines (an object with a custom
`__eq__`, a patched builtin, an exit hook) exists in the process that decides the
verdict, and the candidate never sees the tests. Messages are JSON lines on
stdin/stdout; the candidate's own prints go to /dev/null.
"""

import builtins
import importlib
import json
import math
import os
import sys

MAX_DEPTH = 100


class NotPlain(TypeError):
  """A value that may not cross between the candidate and the tests."""


class CandidateFailed(Exception):
  """The candidate raised, returned something that is not plain data, exited or hung."""


# Builtin types that may themselves cross (e.g. `remove_datatype(xs, int)`).
TYPES = {t.__name__: t for t in (int, float, complex, str, bytes, bool, list, tuple, dict,
                                 set, frozenset, type(None))}


def encode(x, depth=0):
  """Plain data -> JSON-compatible values, tagged so that types survive exactly.

  A subclass of a plain type (Counter, OrderedDict, a namedtuple, an IntEnum, or one the
  code defines) becomes its base type through the base type's own methods, so none of
  its overrides (`__eq__`, `__iter__`, ...) run or cross.
  """
  if depth > MAX_DEPTH:
    raise NotPlain("nested too deeply")
  if x is None or type(x) is bool:
    return x
  if isinstance(x, int):
    return int.__int__(x)
  if isinstance(x, str):
    return {"u": str.__str__(x)} if type(x) is not str else x
  if isinstance(x, float):
    x = float.__float__(x)
    return x if math.isfinite(x) else {"f": repr(x)}
  if isinstance(x, complex):
    x = complex.__complex__(x) if hasattr(complex, "__complex__") else complex(x.real, x.imag)
    return {"c": [encode(float.__float__(x.real)), encode(float.__float__(x.imag))]}
  if isinstance(x, bytes):
    return {"b": bytes.hex(x)}
  if isinstance(x, list):
    return [encode(v, depth + 1) for v in list.__iter__(x)]
  if isinstance(x, tuple):
    return {"t": [encode(v, depth + 1) for v in tuple.__iter__(x)]}
  if isinstance(x, frozenset):
    return {"z": [encode(v, depth + 1) for v in frozenset.__iter__(x)]}
  if isinstance(x, set):
    return {"s": [encode(v, depth + 1) for v in set.__iter__(x)]}
  if isinstance(x, dict):
    return {"d": [[encode(k, depth + 1), encode(v, depth + 1)]
                  for k, v in dict.items(x).__iter__()]}
  if type(x) is type and TYPES.get(getattr(x, "__name__", None)) is x:
    return {"y": x.__name__}
  raise NotPlain(f"a {type(x).__name__} is not plain data")


def decode(x, depth=0):
  """The inverse of `encode`; anything else raises NotPlain."""
  if depth > MAX_DEPTH:
    raise NotPlain("nested too deeply")
  t = type(x)
  if x is None or t in (bool, int, str, float):
    return x
  if t is list:
    return [decode(v, depth + 1) for v in x]
  if t is dict and len(x) == 1:
    (tag, v), = x.items()
    if tag == "f" and v in ("nan", "inf", "-inf"):
      return float(v)
    if tag == "u" and type(v) is str:
      return v
    if tag == "b" and type(v) is str:
      return bytes.fromhex(v)
    if tag == "y" and v in TYPES:
      return TYPES[v]
    if tag == "c" and type(v) is list and len(v) == 2:
      real, imag = (decode(p, depth + 1) for p in v)
      if type(real) is float and type(imag) is float:
        return complex(real, imag)
    if type(v) is list:
      items = [decode(i, depth + 1) for i in v]
      try:
        if tag == "t":
          return tuple(items)
        if tag == "s":
          return set(items)
        if tag == "z":
          return frozenset(items)
        if tag == "d" and all(type(p) is list and len(p) == 2 for p in items):
          return {k: val for k, val in items}
      except TypeError as e:  # Unhashable items in a set or as keys.
        raise NotPlain(str(e)) from None
  raise NotPlain("not an encoded plain value")


class Channel:
  """JSON lines over this process's original stdin and stdout."""

  def __init__(self):
    self.inp = os.fdopen(os.dup(0), "rb")
    self.out = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
      os.dup2(null, fd)
    sys.stdin = open(os.devnull)
    sys.stdout = open(os.devnull, "w")

  def send(self, message):
    self.out.write(json.dumps(message).encode() + b"\n")
    self.out.flush()

  def receive(self):
    line = self.inp.readline()
    if not line:
      raise SystemExit(0)
    return json.loads(line)


def _refuse(event, args):
  """A second layer under the OS sandbox: no new processes, sockets or native code."""
  del args
  if event in ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn",
               "os.spawn", "subprocess.Popen", "pty.spawn", "socket.__new__",
               "socket.connect", "ctypes.dlopen", "ctypes.dlsym", "os.kill", "os.killpg"):
    raise PermissionError(f"sandbox: {event} is not allowed")


def serve_candidate(channel):
  program = channel.receive()["program"]
  namespace = {"__name__": "__candidate__", "__builtins__": builtins}
  sys.addaudithook(_refuse)
  try:
    exec(compile(program, "<candidate>", "exec"), namespace)  # noqa: S102  (sandboxed)
  except BaseException as e:  # pylint: disable=broad-except  (SystemExit too)
    channel.send({"error": f"{type(e).__name__}: {e}"[:2000]})
    return
  names = sorted(k for k, v in namespace.items()
                 if callable(v) and not k.startswith("__") and type(k) is str)
  # Standard-library modules the code imported, by name only: the tests' process imports
  # its own copies (MBPP tests may use the solution's `import sys`).
  modules = {k: v.__name__ for k, v in namespace.items()
             if type(k) is str and type(v).__name__ == "module"
             and type(getattr(v, "__name__", None)) is str}
  channel.send({"ready": names, "modules": modules})
  while True:
    request = channel.receive()
    try:
      fn = namespace[request["call"]]
      result = fn(*decode(request["args"]), **decode(request["kwargs"]))
      reply = {"value": encode(result)}
    except BaseException as e:  # pylint: disable=broad-except
      reply = {"raised": f"{type(e).__name__}: {e}"[:2000]}
    channel.send(reply)


def _proxy(channel, name):
  def call(*args, **kwargs):
    try:
      request = {"call": name, "args": encode(list(args)), "kwargs": encode(kwargs)}
    except NotPlain as e:
      raise CandidateFailed(f"{name}: argument {e}") from None
    channel.send(request)
    reply = channel.receive()
    if "value" not in reply:
      raise CandidateFailed(f"{name}: {reply.get('failed', 'no value')}")
    return decode(reply["value"])

  call.__name__ = name
  return call


def run_tests(channel):
  job = channel.receive()
  namespace = {"__name__": "__main__"}
  try:
    for alias, module in job.get("modules", {}).items():
      if (type(alias) is str and alias.isidentifier() and type(module) is str
          and module.split(".")[0] in sys.stdlib_module_names):
        namespace[alias] = importlib.import_module(module)
    exec(compile(job["setup"], "<setup>", "exec"), namespace)  # noqa: S102
    for name in job["names"]:
      # Names the tests already have (their own helpers, builtins such as `abs`) are
      # not replaced by the candidate's, unless the task's reference solution defines
      # that name itself (MBPP's `sum`).
      shadows = hasattr(builtins, name) and name not in job.get("builtin_names", ())
      if name not in namespace and not shadows:
        namespace[name] = _proxy(channel, name)
    exec(compile(job["tests"], "<tests>", "exec"), namespace)  # noqa: S102
    if job.get("entry_point"):
      namespace["check"](_proxy(channel, job["entry_point"]))
  except AssertionError as e:
    channel.send({"verdict": "failed", "detail": f"AssertionError: {e}"[:2000]})
  except CandidateFailed as e:
    channel.send({"verdict": "error", "detail": f"candidate: {e}"[:2000]})
  except BaseException as e:  # pylint: disable=broad-except
    channel.send({"verdict": "error", "detail": f"{type(e).__name__}: {e}"[:2000]})
  else:
    channel.send({"verdict": "passed"})


def set_limits(limits):
  """CPU seconds, address space, file size, processes of this uid; no core files.
  Lowered before any untrusted code runs, and (without capabilities) never raised
  again."""
  import resource

  if "processes" in limits:
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)
  cpu = limits["cpu_seconds"]
  resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
  resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main():
  if len(sys.argv) > 2:
    set_limits(json.loads(sys.argv[2]))
  channel = Channel()
  if sys.argv[1] == "candidate":
    serve_candidate(channel)
  else:
    run_tests(channel)


if __name__ == "__main__":
  main()
