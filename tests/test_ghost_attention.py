"""The attention rule (fundp/engines/ghost/attention.py): nn.TransformerEncoderLayer in training mode.

Moved from tests/test_ghost.py / tests/test_ghost_exactness.py (one file per rule family).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fundp.engines.ghost import ghost_plan

from ghost_helpers import B, D, T, assert_exact


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("style", ["flat", "per_layer"])
def test_transformer_encoder_layer_in_training_mode_with_t_equal_b_is_exact(batch_first, style):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=8, dropout=0.0, batch_first=batch_first).double().train()
    head = nn.Linear(D, 3).double()
    model = nn.ModuleDict({"layer": layer, "head": head})
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p, b):
        x = b["x"] if batch_first else b["x"].transpose(0, 1)
        h = torch.func.functional_call(layer, {k[6:]: v for k, v in p.items() if k.startswith("layer.")}, (x,))
        h = h.mean(1 if batch_first else 0)
        logits = torch.func.functional_call(head, {k[5:]: v for k, v in p.items() if k.startswith("head.")}, (h,))
        return F.cross_entropy(logits, b["y"], reduction="none")

    g = torch.Generator().manual_seed(7)
    batch = {"x": torch.randn(B, B, D, generator=g), "y": torch.randint(0, 3, (B,), generator=g)}  # T == B
    assert set(ghost_plan(loss_fn, params, batch).values()) == {"ghost"}
    assert_exact(loss_fn, params, batch, style, max_norm=0.5)
