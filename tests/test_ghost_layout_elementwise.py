"""Layout rules of elementwise ops, concatenation and data-free outputs
(fundp/engines/ghost/_layout_elementwise.py): exact against micro-batching, and refused where the
inputs hold different examples' rows at the same place or a concatenation joins along the batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ghost_helpers import D, assert_layout_exact, assert_layout_refused, assert_rule_used, head, rule_cases

pytestmark = pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py

EXACT = [
    ("tanh", "unary", lambda p, b: head(torch.tanh(b["x"]), p), D),
    ("mul", "broadcast_operand", lambda p, b: head(b["x"] * b["x"][:, :1, :].exp(), p), D),
    ("where", "three_operands", lambda p, b: head(torch.where(b["x"] > 0, b["x"], b["x"].square()), p), D),
    ("to", "cast", lambda p, b: head(b["x"].to(torch.float64) + 1, p), D),
    ("zeros_like", "data_free", lambda p, b: head(torch.cat([b["x"], torch.zeros_like(b["x"])], -1), p), 2 * D),
    ("new_ones", "data_free", lambda p, b: head(b["x"] + b["x"].new_ones(b["x"].shape[1:]), p), D),
    ("cat", "features", lambda p, b: head(torch.cat([b["x"], b["x"].square()], dim=-1), p), 2 * D),
    ("stack", "new_dim", lambda p, b: head(torch.stack([b["x"], b["x"].tanh()], dim=1), p), D),
]

REFUSED = [
    ("add", "different_orders", lambda p, b: head(b["x"] + b["x"].flip(0), p), D,
     "add combines rows of different examples"),
    ("cat", "along_the_batch", lambda p, b: head(torch.cat([b["x"], b["x"]], 0), p)[: len(b["x"])], D,
     "cat joins along the batch dimension"),
    ("stack", "different_orders", lambda p, b: head(torch.stack([b["x"], b["x"].flip(0)], dim=1), p), D,
     "stack combines rows of different examples"),
]


@pytest.mark.parametrize("op, loss_fn, width", rule_cases(EXACT))
def test_elementwise_ops_keep_the_rows_exactly(monkeypatch, op, loss_fn, width):
    assert_rule_used(monkeypatch, op, lambda: assert_layout_exact(loss_fn, width))


@pytest.mark.parametrize("op, loss_fn, width, match", rule_cases(REFUSED))
def test_rows_of_different_examples_combined_are_refused(monkeypatch, op, loss_fn, width, match):
    assert_rule_used(monkeypatch, op, lambda: assert_layout_refused(loss_fn, match, width))
