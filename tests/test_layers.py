"""The package's layering: seven floors, every import on its own floor or below, no
circle, and no function longer than a screen."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxscore"

# Floor of each part of the package (a subpackage or a top-level module); everything not
# named is the top floor: the experiment layer and the drivers (experiment, config,
# config_checks, study, self_explore, main, plan, export, sweep, cli).
FLOORS = {
    "errors": 1,
    "models": 2, "tasks": 2,
    "infra": 3,
    "sampling": 4,
    "objectives": 5, "evaluate": 5,
    "loops": 6,
}
TOP = 7
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imports(path: pathlib.Path, modules) -> set[str]:
  """The package's modules that `path` imports, at its top or inside functions."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxscore"):
      # `from pkg import module` imports the module; `from module import name`, the module.
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
               else node.module for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names if a.name.startswith("jaxscore")]
    for name in names:
      while name and name not in modules:
        name = name.rpartition(".")[0]
      if name:
        out.add(name)
  return out


def _floor(module: str) -> int:
  parts = module.split(".")
  return FLOORS.get(parts[1], TOP) if len(parts) > 1 else TOP


def _graph():
  modules = _modules()
  return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _upward(graph) -> list[str]:
  return [f"{m} (floor {_floor(m)}) imports {d} (floor {_floor(d)})"
          for m, deps in graph.items() for d in sorted(deps) if _floor(d) > _floor(m)]


def _circle(graph) -> list[str] | None:
  """An import circle of `graph`, if any (a package importing its own modules from its
  __init__ is how Python loads it, not a circle)."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == "open":
        cycle = stack[stack.index(d):] + [d]
        if not all(x == cycle[0] or x.startswith(cycle[0] + ".") for x in cycle):
          return cycle
      elif d not in state:
        found = visit(d)
        if found:
          return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_every_import_runs_down_or_along_a_floor():
  up = _upward(_graph())
  assert not up, "\n".join(up)
  assert max(FLOORS.values()) < TOP == 7


def test_no_import_circle():
  circle = _circle(_graph())
  assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_checks_find_what_they_look_for():
  """Planted: an upward import and a circle; a package's own __init__ is neither."""
  assert _upward({"jaxscore.models.model": {"jaxscore.study"}}) == [
      "jaxscore.models.model (floor 2) imports jaxscore.study (floor 7)"]
  assert _upward({"jaxscore.study": {"jaxscore.models.model"}}) == []
  assert _circle({"jaxscore.a": {"jaxscore.b"}, "jaxscore.b": {"jaxscore.c"},
                  "jaxscore.c": {"jaxscore.a"}}) == ["jaxscore.a", "jaxscore.b", "jaxscore.c",
                                                     "jaxscore.a"]
  assert _circle({"jaxscore.objectives": {"jaxscore.objectives.sft"},
                  "jaxscore.objectives.sft": {"jaxscore.objectives"}}) is None
  modules = _modules()
  assert "jaxscore.loops.online" in _imports(modules["jaxscore.experiment"], modules)


def test_no_function_is_longer_than_a_screen():
  long = []
  for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
  assert not long, "\n".join(long)
