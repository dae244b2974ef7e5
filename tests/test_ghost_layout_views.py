"""Layout rules of views and reshapes (fundp/engines/ghost/_layout_views.py): one exact case per op
family against micro-batching, and the refusals (a split, a repeat or a part of the batch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ghost_helpers import B, D, T, V, assert_layout_exact, assert_layout_refused, assert_rule_used, head, rule_cases

pytestmark = pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py

TABLE = torch.linspace(-1, 1, V * D, dtype=torch.float64).reshape(V, D)  # a frozen lookup table

EXACT = [
    ("embedding", "frozen_table", lambda p, b: head(F.embedding(b["ids"], TABLE) * b["x"], p), D),
    ("one_hot", "ids", lambda p, b: head(F.one_hot(b["ids"], V).double() * b["x"].sum(-1, keepdim=True), p), V),
    ("view", "gpt2_flat_rows", lambda p, b: torch.tanh(F.linear(b["x"].view(-1, D), p["w"])).view(len(b["x"]), -1).sum(1), D),
    ("flatten", "features", lambda p, b: head(b["x"].flatten(1), p), T * D),
    ("unsqueeze", "new_dim", lambda p, b: head(b["x"].unsqueeze(1), p), D),
    ("transpose", "sequence_first", lambda p, b: torch.tanh(F.linear(b["x"].transpose(0, 1), p["w"])).sum((0, 2)), D),
    ("mT", "property", lambda p, b: head(b["x"].mT, p), T),
    ("permute", "sequence_first", lambda p, b: torch.tanh(F.linear(b["x"].permute(1, 0, 2), p["w"])).sum((0, 2)), D),
    ("movedim", "batch_last", lambda p, b: torch.tanh(F.linear(b["x"].movedim(0, 1), p["w"])).sum((0, 2)), D),
    ("expand", "broadcast_copy", lambda p, b: head(b["x"].unsqueeze(1).expand(-1, 2, -1, -1), p), D),
    ("repeat", "feature_repeat", lambda p, b: head(b["x"].repeat(1, 1, 2), p), 2 * D),
    ("select", "first_token", lambda p, b: head(b["x"].select(1, 0), p), D),
    ("chunk", "features", lambda p, b: head(b["x"].chunk(2, dim=1)[0], p), D),
    ("unbind", "tokens", lambda p, b: head(b["x"].unbind(1)[1], p), D),
]

REFUSED = [
    ("reshape", "splits_the_batch", lambda p, b: head(b["x"].reshape(2, -1, D), p).repeat_interleave(3), D,
     "reshape splits the batch dimension"),
    ("repeat", "repeats_the_batch", lambda p, b: head(b["x"].repeat(2, 1, 1), p)[:B], D, "repeat repeats the batch"),
    ("narrow", "part_of_the_batch", lambda p, b: torch.cat([head(b["x"].narrow(0, 0, 3), p),
                                                            head(b["x"].narrow(0, 3, 3), p)]), D,
     "narrow takes part of the batch"),
    ("embedding", "batch_as_the_table", lambda p, b: head(F.embedding(torch.arange(B), b["x"].flatten(1)), p), T * D,
     "embedding has no layout rule"),
]


@pytest.mark.parametrize("op, loss_fn, width", rule_cases(EXACT))
def test_views_keep_the_rows_exactly(monkeypatch, op, loss_fn, width):
    assert_rule_used(monkeypatch, op, lambda: assert_layout_exact(loss_fn, width))


@pytest.mark.parametrize("op, loss_fn, width, match", rule_cases(REFUSED))
def test_views_that_move_the_batch_are_refused(monkeypatch, op, loss_fn, width, match):
    assert_rule_used(monkeypatch, op, lambda: assert_layout_refused(loss_fn, match, width))
