"""notebooks/*.ipynb: stored executed and small, and they still run top to bottom.

Execution uses nbclient with the installed ipykernel (jupyter_client starts it with this
interpreter) on a copy of notebooks/ in a tmp dir, so the committed notebooks are never modified.
The kernel is a separate process: it does not inherit conftest's JAX setup, so XLA_FLAGS is
removed from its environment and each notebook must set up its own devices.
"""

import glob
import os
import shutil

import nbformat
import pytest

NOTEBOOK_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
MAX_BYTES = 1_000_000  # outputs are kept; inline figures at low dpi keep a notebook well below
CELL_TIMEOUT_S = 600  # the walkthrough's training cell takes ~2-3 min on 2 busy cores
SLOW = {"demo_walkthrough.ipynb"}  # trains three stages: ~3 min; the others take seconds
NO_OUTPUT_TAG = "no-output"  # a code cell tagged so may legitimately print nothing


def _read(name: str):
  return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def test_the_notebooks_exist():
  assert set(NOTEBOOKS) >= {"rope_scaling.ipynb", "needle_heatmap.ipynb",
                            "demo_walkthrough.ipynb"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_executed_and_small(name):
  path = os.path.join(NOTEBOOK_DIR, name)
  assert os.path.getsize(path) < MAX_BYTES, f"{name} is {os.path.getsize(path):,} bytes"
  nb = _read(name)
  nbformat.validate(nb)
  cells = _code_cells(nb)
  counts = [c.execution_count for c in cells]
  # One top-to-bottom run in one kernel: 1, 2, ..., n (re-execute with `jupyter execute --inplace`).
  assert counts == list(range(1, len(cells) + 1)), f"{name}: execution counts {counts}"
  for i, cell in enumerate(cells):
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{name} code cell {i} stored an error: {errors[0].get('ename')}"
    if NO_OUTPUT_TAG not in cell.metadata.get("tags", []):
      assert cell.outputs, f"{name} code cell {i} has no stored output:\n{cell.source[:200]}"
  images = sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs)
  assert images >= 1, f"{name} stores no figure"


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in NOTEBOOKS])
def test_executes_without_errors(name, tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  work = tmp_path / "notebooks"
  shutil.copytree(NOTEBOOK_DIR, work,
                  ignore=shutil.ignore_patterns("figures", ".ipynb_checkpoints"))
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # the notebook must ask for its devices itself
  monkeypatch.setenv("ULTRALONG_WALKTHROUGH_DIR", str(tmp_path / "walkthrough"))
  nb = nbformat.read(work / name, as_version=4)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(work)}})
  client.execute()  # raises CellExecutionError, naming the cell, on the first error
  for i, cell in enumerate(_code_cells(nb)):
    assert cell.execution_count is not None, f"{name} code cell {i} did not run"
    if NO_OUTPUT_TAG not in cell.metadata.get("tags", []):
      assert cell.outputs, f"{name} code cell {i} produced no output"
