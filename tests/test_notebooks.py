"""Every notebook runs top to bottom and shows its figures; the digits loader; the example script.

Notebooks are kept stripped of outputs in git.  Executing one here (nbclient, a real ipykernel)
also checks that:

* every *plotting cell* (its source calls ``plt.<x>(``, ``ax<...>.<x>(`` or ``.plot(``) displays
  at least one ``image/png`` (an inline figure), never only a ``<Figure size ...>`` text;
* every figure it renders has labelled axes, no overlapping tick labels and no two axes
  overlapping each other (checked on the drawn figure, just before the PNG is made);
* nothing is imported from outside the installed package (no ``sys.path`` edits, no
  ``examples``), and no notebook forces a headless backend.

Each notebook is executed once per session (``tests/notebook_runs.py``); the executed copies are
also what ``tests/test_docs.py`` renders in the documentation site.
"""

import math
import re
import sys

import pytest
import torch

import nbclient  # the test extra installs the notebook tools: a missing one fails, never skips
import nbformat
import sklearn  # noqa: F401

import fundp.datasets
from notebook_runs import FIGURE_CHECK_SETUP, NOTEBOOKS, PLOTTING_CALL, ROOT, executed

EXPECTED = [
    "01_quickstart",
    "02_build_dp_step_by_hand",
    "03_privacy_utility",
    "04_clipping_properties",
    "05_beyond_dp_sgd",
    "06_user_level_and_auditing",
]

def test_the_notebooks_exist():
    names = [path.stem for path in NOTEBOOKS]
    for expected in EXPECTED:
        assert expected in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped_and_self_contained(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs must be stripped"
            assert "sys.path" not in cell.source, f"{path.name}: import from the installed package only"
            assert not re.search(r"^\s*(from|import)\s+(examples|train_digits)\b", cell.source, re.M), path.name
            assert "matplotlib.use(" not in cell.source, f"{path.name}: figures must render inline"


def test_plotting_cell_pattern():
    assert PLOTTING_CALL.search("fig, ax = plt.subplots()")
    assert PLOTTING_CALL.search("axes[0].errorbar(x, y, yerr=s)")
    assert PLOTTING_CALL.search("ax_acc.set_xlabel('epoch')")
    assert PLOTTING_CALL.search("df.plot(x='a')")
    assert not PLOTTING_CALL.search("import matplotlib.pyplot as plt\nx = torch.max(y, axis=0)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_shows_its_figures(path):
    cells = executed(path).cells  # executed once per session, shared with tests/test_docs.py
    plotting = [i for i, cell in enumerate(cells) if cell.cell_type == "code" and PLOTTING_CALL.search(cell.source)]
    for i in plotting:
        outputs = cells[i].outputs
        images = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
        assert images, f"{path.name}: plotting cell {i} shows no figure:\n{cells[i].source[:300]}"
        bare = [o for o in outputs if o.get("data", {}).get("text/plain", "").startswith("<Figure") and "image/png" not in o.get("data", {})]
        assert not bare, f"{path.name}: plotting cell {i} printed a figure without rendering it"


def test_figure_check_catches_bad_figures():
    """The layout check fails on an unlabelled axis and on crowded tick labels (so it can fail)."""
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(FIGURE_CHECK_SETUP),
        nbformat.v4.new_code_cell(
            "%matplotlib inline\nimport matplotlib.pyplot as plt\n"
            "fig, ax = plt.subplots(figsize=(2, 2))\n"
            "ax.plot(range(40)); ax.set_xticks(range(40)); ax.set_xticklabels([f'label {i}' for i in range(40)])\n"
            "ax.set_xlabel('x')\nplt.show()"
        ),
        nbformat.v4.new_code_cell("print('\\n'.join(_fundp_figure_problems))"),
    ])
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    text = "".join(o.get("text", "") for o in notebook.cells[2].outputs)
    assert "no y label" in text and "x tick labels" in text and "overlap" in text, text
    assert "no x label" not in text, text
    assert any("image/png" in o.get("data", {}) for o in notebook.cells[1].outputs)


def test_load_digits_split_matches_sklearn():
    from sklearn.datasets import load_digits

    data = load_digits()
    (x_train, y_train), (x_test, y_test) = fundp.datasets.load_digits_split(test_fraction=0.25, seed=3, dtype=torch.float64)
    assert x_train.shape == (int(0.75 * 1797), 64) and x_test.shape == (1797 - int(0.75 * 1797), 64)
    assert x_train.dtype == torch.float64 and y_train.dtype == torch.long
    # The two parts are a permutation of sklearn's images and labels, pixels scaled by 1/16.
    x = torch.cat([x_train, x_test]) * 16
    y = torch.cat([y_train, y_test])
    reference = torch.as_tensor(data.data, dtype=torch.float64)
    rows = {tuple(row.tolist()) + (int(label),) for row, label in zip(reference, data.target)}
    assert {tuple(row.tolist()) + (int(label),) for row, label in zip(x, y)} <= rows
    assert torch.equal(torch.sort(y).values, torch.sort(torch.as_tensor(data.target)).values)
    assert torch.equal(torch.sort(x.sum(1)).values, torch.sort(reference.sum(1)).values)


def test_load_digits_split_is_keyed_by_seed():
    a = fundp.datasets.load_digits_split(seed=0)
    b = fundp.datasets.load_digits_split(seed=0)
    c = fundp.datasets.load_digits_split(seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a.train + a.test, b.train + b.test))
    assert not torch.equal(a.train[1], c.train[1])
    state = torch.random.get_rng_state()
    fundp.datasets.load_digits_split(seed=5)
    assert torch.equal(state, torch.random.get_rng_state()), "torch's global RNG must be untouched"


@pytest.mark.parametrize("kwargs, match", [
    ({"test_fraction": 0.0}, "test_fraction"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"test_fraction": math.nan}, "test_fraction"),
    ({"test_fraction": 0.9999}, "test_fraction"),  # no training image left
    ({"seed": 1.5}, "seed"),
    ({"dtype": torch.long}, "dtype"),
])
def test_load_digits_split_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fundp.datasets.load_digits_split(**kwargs)


def test_load_digits_split_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="scikit-learn"):
        fundp.datasets.load_digits_split()


def test_digits_example_runs(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    import train_digits

    summary = train_digits.main(["--epochs", "1", "--quiet"])
    assert summary["epsilon"] <= 8.0 and summary["steps"] > 0
    assert "done: test accuracy" in capsys.readouterr().out
