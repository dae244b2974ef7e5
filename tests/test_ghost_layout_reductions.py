"""Layout rules of reductions and scans (fundp/engines/ghost/_layout_reductions.py): over other dims
the rows stay, exactly; over the batch a float reduction raises ExamplesInteractError and any other
makes the rows untrusted (refused)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import ExamplesInteractError
from ghost_helpers import (
    B, D, T, assert_layout_exact, assert_rule_refuses, assert_rule_used, features, head, rule_cases,
)

pytestmark = pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py

EXACT = [
    ("sum", "keepdim", lambda p, b: head(b["x"] * b["x"].sum(-1, keepdim=True), p), D),
    ("mean", "tokens", lambda p, b: head(b["x"].mean(1), p), D),
    ("softmax", "features", lambda p, b: head(torch.softmax(b["x"], dim=-1), p), D),
    ("cumsum", "tokens", lambda p, b: head(b["x"].cumsum(1), p), D),
    ("amax", "two_dims", lambda p, b: head(b["x"].amax(dim=(1,)), p), D),
    ("sort", "features", lambda p, b: head(b["x"].sort(-1).values, p), D),
    ("max", "elementwise_maximum", lambda p, b: head(torch.max(b["x"], b["x"].flip(-1)), p), D),
]

REFUSED = [
    ("sort", "over_the_batch", lambda p, b: head(b["x"].sort(0).values, p), D, "sort over the batch dimension", False),
    ("argsort", "over_the_batch", lambda p, b: head(b["x"] * b["x"].argsort(0), p), D,
     "argsort over the batch dimension", False),
    ("mean", "centred_by_the_batch", lambda p, b: head(b["x"] - b["x"].mean(0), p), D,
     "mean reduces over the batch dimension", True),
    ("softmax", "over_the_batch", lambda p, b: head(torch.softmax(b["x"], dim=0), p), D,
     "softmax reduces over the batch dimension", True),
]


@pytest.mark.parametrize("op, loss_fn, width", rule_cases(EXACT))
def test_reductions_over_other_dims_keep_the_rows_exactly(monkeypatch, op, loss_fn, width):
    assert_rule_used(monkeypatch, op, lambda: assert_layout_exact(loss_fn, width))


@pytest.mark.parametrize("op, loss_fn, width, match, interact", rule_cases(REFUSED))
def test_reductions_over_the_batch_are_refused(monkeypatch, op, loss_fn, width, match, interact):
    assert_rule_refuses(monkeypatch, op, loss_fn, match, width, interact)


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.parametrize("mixing", ["centre", "softmax_over_batch", "matmul_over_batch"])
def test_statistics_over_the_batch_inside_loss_fn_are_refused(mixing):
    g = torch.Generator().manual_seed(9)
    params = {"w": torch.randn(3, D, generator=g)}

    def loss_fn(p, b):
        h = F.linear(b["x"], p["w"])
        if mixing == "centre":
            h = h - h.mean(0)
        elif mixing == "softmax_over_batch":
            h = torch.softmax(h, dim=0)
        else:
            h = h @ (h.T @ h)
        return F.cross_entropy(h, b["y"], reduction="none")

    with pytest.raises(ExamplesInteractError, match="mixes examples"):
        fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B)(params, features(), fundp.random.key(0))
