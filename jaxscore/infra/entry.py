"""How the command-line entry points report a user's mistake: one line that names it and
the fix, exit status 2, no traceback.

User errors are those a command line causes: flags or a config that do not parse (a
wrong variant, an unknown `--config.*` key, a config file that is not there), and, once
running, a missing file, a malformed data or weights file, a mesh that does not divide
the model, a missing optional dependency. Anything else is a bug and keeps its
traceback; `JAXSCORE_TRACEBACK=1` keeps it for user errors too.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable

from absl import app, flags

from jaxscore import errors

_HINT = "(--help lists the flags)"


UsageError = errors.UsageError


def config_help(example: str) -> str:
  """The --config flag's help: which file and variant, and how to override fields."""
  return (f"configs/<file>.py:<variant>[,runlocal], e.g. configs/{example} (runlocal: smoke "
          f"sizes); override any field with --config.<key>=<value>")


def user_errors() -> tuple[type[BaseException], ...]:
  return (errors.UserError, FileNotFoundError, ModuleNotFoundError)


def describe(e: BaseException) -> str:
  """The one line that says what is wrong (and, for a missing module, how to get it)."""
  if isinstance(e, ModuleNotFoundError) and e.name:
    package = {"tensorflow_datasets": "tensorflow-datasets", "math_verify": "math-verify"}
    return (f"the optional dependency {e.name!r} is not installed: "
            f"pip install {package.get(e.name, e.name)}")
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return " ".join(lines) if lines else type(e).__name__


def _config_error(e: BaseException) -> str:
  """absl and ml_collections wrap a config file's error (with its traceback, as text);
  the original error is the text's last line."""
  if isinstance(e, (KeyError, AttributeError)):
    # A --config.* override: ml_collections names the key and may suggest a close one.
    text = str(e.args[0] if e.args else e)
    key = re.search(r"[A-Za-z_][A-Za-z0-9_]*", text)
    guess = re.search(r'Did you mean \W*"([^"\\]+)', text)
    return (f"{key.group(0) if key else text!r} is not a config field"
            + (f" (did you mean {guess.group(1)!r}?)" if guess else "")
            + ": check the --config.* overrides")
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


def fail(prog: str, e: BaseException) -> None:
  if os.environ.get("JAXSCORE_TRACEBACK"):
    raise e
  print(f"{prog}: error: {describe(e)}", file=sys.stderr)
  sys.exit(2)


def _parse(prog: str, argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
    for name in flags.FLAGS:  # Config files load lazily; load them now, as flags.
      getattr(flags.FLAGS[name].value, "to_dict", None)
  except SystemExit as e:
    # absl prints --help and exits with status 1; asking for help is not a failure.
    if e.code == 1 and any(a.lstrip("-") in ("help", "helpshort", "helpfull", "h", "?")
                           for a in argv[1:]):
      sys.exit(0)
    raise
  except Exception as e:  # pylint: disable=broad-except  (all from the command line)
    if os.environ.get("JAXSCORE_TRACEBACK"):
      raise
    hint = f" {_HINT}" if isinstance(e, flags.Error) and "--help" not in str(e) else ""
    fail(prog, UsageError(_config_error(e) + hint))
  return rest


def _guarded(main: Callable, prog: str, argv: list[str]):
  try:
    return main(argv)
  except user_errors() as e:
    fail(prog, e)


def run(main: Callable, prog: str) -> None:
  """`absl.app.run(main)` with user errors as one line (see the module docstring)."""
  app.run(functools.partial(_guarded, main, prog),
          flags_parser=functools.partial(_parse, prog))
