"""Every notebook runs top to bottom (outputs stripped in git), and the example scripts run."""

import pathlib
import sys

import pytest

import nbclient  # the test extra installs the notebook tools: a missing one fails, never skips
import nbformat
import sklearn  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    names = [path.stem for path in NOTEBOOKS]
    for expected in ["01_quickstart", "02_build_dp_step_by_hand", "03_privacy_utility", "04_clipping_properties"]:
        assert expected in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_is_stripped(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs must be stripped"
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError on any error, including failed asserts


def test_digits_example_runs(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    import train_digits

    summary = train_digits.main(["--epochs", "1", "--quiet"])
    assert summary["epsilon"] <= 8.0 and summary["steps"] > 0
    assert "done: test accuracy" in capsys.readouterr().out
