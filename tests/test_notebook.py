"""The quickstart notebook runs top to bottom, headless, as a user's runtime runs it."""

import pathlib

import pytest
from conftest import require_embedded

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _outputs(nb, kind: str) -> str:
  return "".join(o.get("text", "") if kind == "stream" else str(o.get("data", {}))
                 for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []) if o.output_type.startswith(kind))


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path):
  require_embedded()
  import nbclient
  import nbformat

  nb = nbformat.read(NOTEBOOK, as_version=4)
  setup = nb.cells[1]
  assert 'ACCELERATOR = "cpu"' in setup.source  # The one line to change on TPU/GPU.
  # The run writes under the test's directory instead of the checkout's runs/.
  setup.source = setup.source.replace('WORKDIR = "runs/quickstart"',
                                      f'WORKDIR = "{tmp_path / "quickstart"}"')
  assert str(tmp_path) in setup.source
  # A cell that raises fails the test (CellExecutionError); each has 5 minutes.
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  streams, rich = _outputs(nb, "stream"), _outputs(nb, "display_data")
  assert "[attempt 2]" in streams
  assert "SCoRe: 100%" in streams  # The live progress bar reached the last step.
  assert "| after SCoRe |" in rich and "image/png" in rich
  run = tmp_path / "quickstart"
  assert (run / "eval" / "accuracy.png").exists() and (run / "eval" / "after.json").exists()
  steps = [l for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
  assert len(steps) == 2  # Stage I and Stage II, one step each at smoke sizes.
