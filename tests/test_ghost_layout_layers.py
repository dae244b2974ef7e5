"""Layout rules of frozen layer ops on batch data (fundp/engines/ghost/_layout_layers.py): rows kept
exactly when the layer works within each example; refused when it works across the batch dim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ghost_helpers import B, D, T, assert_layout_exact, assert_rule_refuses, assert_rule_used, head, rule_cases

pytestmark = pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py

KERNEL = torch.linspace(-1, 1, 3 * T * 2, dtype=torch.float64).reshape(3, T, 2)  # conv1d: T channels in, 3 out
FROZEN = torch.linspace(-1, 1, 3 * D, dtype=torch.float64).reshape(3, D)

EXACT = [
    ("linear", "frozen_weight", lambda p, b: head(F.linear(b["x"], FROZEN).tanh(), p), 3),
    ("layer_norm", "features", lambda p, b: head(F.layer_norm(b["x"], (D,)), p), D),
    ("conv1d", "channels_first", lambda p, b: head(F.conv1d(b["x"], KERNEL), p), D - 1),
    ("avg_pool1d", "channels_first", lambda p, b: head(F.avg_pool1d(b["x"], 2), p), D // 2),
    ("pad", "trailing", lambda p, b: head(F.pad(b["x"], (1, 1)), p), D + 2),
    ("interpolate", "channels_first", lambda p, b: head(F.interpolate(b["x"], scale_factor=2.0), p), 2 * D),
]

REFUSED = [
    ("conv1d", "batch_as_channels", lambda p, b: head(F.conv1d(b["x"].transpose(0, 1), torch.ones(len(b["x"]), len(b["x"]), 2)
                                                               ).transpose(0, 1), p), D - 1,
     "conv1d works across the batch dimension", False),
    ("pad", "the_batch_dim", lambda p, b: head(F.pad(b["x"].movedim(0, -1), (0, 1)).movedim(-1, 0)[:-1], p), D,
     "pad works across the batch dimension", False),
    ("linear", "batch_weights", lambda p, b: head(F.linear(b["x"], b["x"][:, 0]), p), B, "linear has no layout rule",
     False),
    ("layer_norm", "over_the_batch", lambda p, b: head(F.layer_norm(b["x"].movedim(0, -1), (B,)).movedim(-1, 0), p),
     D, "layer_norm normalises over the batch dimension", True),
]


@pytest.mark.parametrize("op, loss_fn, width", rule_cases(EXACT))
def test_frozen_layers_keep_the_rows_exactly(monkeypatch, op, loss_fn, width):
    assert_rule_used(monkeypatch, op, lambda: assert_layout_exact(loss_fn, width))


@pytest.mark.parametrize("op, loss_fn, width, match, interact", rule_cases(REFUSED))
def test_layers_across_the_batch_are_refused(monkeypatch, op, loss_fn, width, match, interact):
    assert_rule_refuses(monkeypatch, op, loss_fn, match, width, interact)
