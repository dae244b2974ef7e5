"""The layout-rule registry (fundp/engines/ghost/_layout_rules.py): default deny, untrusted inputs,
one rule per name, every rule documented and tested, and no import cycle inside engines/ghost."""

from __future__ import annotations

import ast
import graphlib
import inspect
import pathlib
import subprocess
import sys

import pytest
import torch

import fundp.engines.ghost._tracer as tracer_module
import test_ghost_layout_elementwise
import test_ghost_layout_indexing
import test_ghost_layout_layers
import test_ghost_layout_losses
import test_ghost_layout_matmul
import test_ghost_layout_reductions
import test_ghost_layout_views
from fundp.engines.ghost._layout_rules import LAYOUT_RULES, deny, layout_rule
from ghost_helpers import D, assert_exact, assert_layout_refused, covered, head, layout_batch, layout_params

pytestmark = pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py

GHOST = pathlib.Path(tracer_module.__file__).parent
FAMILIES = [test_ghost_layout_elementwise, test_ghost_layout_indexing, test_ghost_layout_layers,
            test_ghost_layout_losses, test_ghost_layout_matmul, test_ghost_layout_reductions, test_ghost_layout_views]


def test_every_layout_rule_is_documented_and_has_an_exact_case_and_a_refusal_or_none_to_make():
    rules = set(LAYOUT_RULES.values())
    assert all((rule.__doc__ or "").strip() for rule in rules)
    exact = covered(*(module.EXACT for module in FAMILIES))
    assert rules <= exact, f"layout rules without an exact case: {sorted(r.__name__ for r in rules - exact)}"
    refused = covered(*(module.REFUSED for module in FAMILIES))
    # Rules that cannot refuse: they only move a dim that stays whole (or say "no batch values").
    never = {"lookup", "transpose", "permute", "movedim", "data_free"}
    missing = {rule.__name__ for rule in rules - refused} - never
    assert not missing, f"layout rules without a refusal case: {sorted(missing)}"


def _fft_loss(p, b):
    return head(torch.fft.fft(b["x"], dim=-1).real, p)


def test_an_op_without_a_layout_rule_is_denied_and_auto_falls_back_to_vmap_exactly():
    assert "fft_fft" not in LAYOUT_RULES
    assert_layout_refused(_fft_loss, "fft_fft has no layout rule, so the rows of its output may mix examples")
    assert_exact(_fft_loss, layout_params(), layout_batch(), grad_method="auto", max_norm=0.5)


def test_untrusted_rows_stay_untrusted_through_a_rule_that_would_keep_them():
    unknown = torch.tensor([1, 0, 3, 2, 5, 4])
    assert_layout_refused(lambda p, b: head(b["x"][unknown[: len(b["x"])]].transpose(1, 2).mT.tanh(), p),
                          "indexing takes a subset or a reordering of the batch", D)


def test_a_name_has_one_layout_rule():
    with pytest.raises(ValueError, match="already has the layout rule"):
        layout_rule("view")(deny)
    assert LAYOUT_RULES["view"].__name__ == "reshape"


def test_layout_after_is_a_short_dispatch():
    lines = inspect.getsource(tracer_module.Tracer._layout_after).splitlines()
    assert len(lines) <= 30


def _ghost_imports() -> dict:
    """Module -> the modules of fundp/engines/ghost it imports (anywhere in its source)."""
    graph = {}
    for path in GHOST.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "fundp.engines.ghost":
                deps.update(alias.name for alias in node.names if (GHOST / f"{alias.name}.py").exists())
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fundp.engines.ghost."):
                deps.add(node.module.split(".")[3])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[3] for a in node.names if a.name.startswith("fundp.engines.ghost."))
        graph[path.stem] = deps - {path.stem}
    return graph


def test_no_import_cycle_inside_engines_ghost():
    graph = _ghost_imports()
    graph.pop("__init__")  # the package imports its modules; none imports the package's names
    assert all("__init__" not in deps for deps in graph.values())
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert "_tracer" not in graph["broadcast"] and "_engine" not in graph["_tracer"]


def test_broadcast_imports_first_in_a_fresh_interpreter():
    # (Importing any module of the package runs fundp.engines.ghost/__init__ first; the AST check
    # above covers every module's own imports.)
    run = subprocess.run([sys.executable, "-c", "import fundp.engines.ghost.broadcast"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
