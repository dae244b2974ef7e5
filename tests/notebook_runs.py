"""Each notebook executed at most once per test session, shared by the notebook and docs tests.

``tests/test_notebooks.py`` checks what an executed notebook shows (every plotting cell renders a
figure, every figure is labelled and uncluttered); ``tests/test_docs.py`` renders the same
executed notebooks in the documentation site.  Both call :func:`executed`, which runs a notebook
(nbclient, a real ipykernel, the figure checks below injected around its cells) only the first
time it is asked for in the process, caches the result (or the error, re-raised to every later
caller), and writes the executed copy -- the notebook's own cells with their outputs, and the
SHA-256 of the source notebook in ``metadata.fundp.source_sha256`` -- to :func:`executed_dir`,
where the docs build (``docs/conf.py``) picks it up instead of executing the notebook again.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pathlib
import re

import nbclient  # the test extra installs the notebook tools: a missing one fails, never skips
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# A cell that calls plt.<x>(, ax.<x>( / axes[i].<x>( / ax_loss.<x>(, or <anything>.plot(.
PLOTTING_CALL = re.compile(r"\b(?:plt|ax\w*(?:\[[^\]]*\])?)\.\w+\(|\.plot\(")

# Runs in the kernel before the notebook's first cell.  It wraps the canvas's print_figure (which
# the inline backend calls to make each PNG) with a check of the drawn figure, and records what
# it finds; the last injected cell asserts that nothing was found.
FIGURE_CHECK_SETUP = r'''
import matplotlib.backend_bases as _fundp_bb
from matplotlib.transforms import Bbox as _FundpBbox

_fundp_figure_problems = []

def _fundp_overlap_area(a, b):
    inter = _FundpBbox.intersection(a, b)
    return 0.0 if inter is None else max(inter.width, 0.0) * max(inter.height, 0.0)

def _fundp_check_figure(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    where = f"cell [{get_ipython().execution_count}]"
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison and not hasattr(ax, "_colorbar")]
    for ax in axes:
        name = f"{where} axes {ax.get_title()!r}"
        if not ax.get_xlabel().strip():
            _fundp_figure_problems.append(f"{name}: no x label")
        if not ax.get_ylabel().strip():
            _fundp_figure_problems.append(f"{name}: no y label")
        for axis_name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text().strip()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    if _fundp_overlap_area(boxes[i], boxes[j]) > 1.0:  # square pixels
                        _fundp_figure_problems.append(
                            f"{name}: {axis_name} tick labels {labels[i].get_text()!r} and {labels[j].get_text()!r} overlap")
    for i in range(len(axes)):
        for j in range(i + 1, len(axes)):
            if axes[i].get_position().bounds == axes[j].get_position().bounds:
                continue  # twin axes share their box on purpose
            area = _fundp_overlap_area(axes[i].get_tightbbox(renderer), axes[j].get_tightbbox(renderer))
            if area > 4.0:
                _fundp_figure_problems.append(
                    f"{where}: axes {axes[i].get_title()!r} and {axes[j].get_title()!r} overlap ({area:.0f} px^2): "
                    "call fig.tight_layout()")

_fundp_print_figure = _fundp_bb.FigureCanvasBase.print_figure

def _fundp_checked_print_figure(self, *args, **kwargs):
    _fundp_check_figure(self.figure)
    return _fundp_print_figure(self, *args, **kwargs)

_fundp_bb.FigureCanvasBase.print_figure = _fundp_checked_print_figure
'''

FIGURE_CHECK_TEARDOWN = "assert not _fundp_figure_problems, '\\n'.join(_fundp_figure_problems)"



_RUNS: dict[pathlib.Path, tuple[object | None, BaseException | None]] = {}


def executed_dir() -> pathlib.Path:
    """Where executed copies go: ``$FUNDP_EXECUTED_NOTEBOOKS``, else ``build/notebooks`` (what ``docs/conf.py`` reads)."""
    return pathlib.Path(os.environ.get("FUNDP_EXECUTED_NOTEBOOKS", ROOT / "build" / "notebooks"))


def source_sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _run(path: pathlib.Path):
    notebook = nbformat.read(path, as_version=4)
    cells = list(notebook.cells)
    notebook.cells = [nbformat.v4.new_code_cell(FIGURE_CHECK_SETUP), *cells, nbformat.v4.new_code_cell(FIGURE_CHECK_TEARDOWN)]
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()  # raises CellExecutionError on any error, including failed asserts and figure problems
    finally:
        if os.environ.get("FUNDP_NOTEBOOK_OUTPUT_DIR"):  # keep the executed notebook (e.g. as a CI artifact)
            out_dir = pathlib.Path(os.environ["FUNDP_NOTEBOOK_OUTPUT_DIR"])
            out_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(notebook, out_dir / path.name)
    executed = copy.deepcopy(notebook)
    executed.cells = cells  # the notebook's own cells, now with their outputs
    executed.metadata.setdefault("fundp", {})["source_sha256"] = source_sha256(path)
    out = executed_dir()
    out.mkdir(parents=True, exist_ok=True)
    nbformat.write(executed, out / path.name)
    return executed


def executed(path: pathlib.Path):
    """The notebook at ``path`` executed (its own cells, with outputs); runs it only once per process."""
    path = pathlib.Path(path).resolve()
    if path not in _RUNS:
        try:
            _RUNS[path] = (_run(path), None)
        except BaseException as error:  # noqa: BLE001  (cached, re-raised to every caller)
            _RUNS[path] = (None, error)
    notebook, error = _RUNS[path]
    if error is not None:
        raise error
    return copy.deepcopy(notebook)
