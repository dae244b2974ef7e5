"""The broadcast parameter rule (fundp/engines/ghost/broadcast.py): position tables, scales and a class
token broadcast over the batch, exact against micro-batching.

Moved from tests/test_ghost.py / tests/test_ghost_exactness.py (one file per rule family).
"""

from __future__ import annotations

import pytest
import torch

import fundp
from fundp.engines.ghost import ghost_plan

from ghost_helpers import PositionalModel, WithAttention, assert_close_global, batch_for, model_reference_step
from models import classification_loss, make, params_of


# (moved from tests/test_ghost.py)
@pytest.mark.parametrize("model_cls", [PositionalModel, WithAttention])
@pytest.mark.parametrize("clip_style", ["flat", "per_layer", "automatic"])
def test_position_tables_scales_and_attention_are_on_the_ghost_path_and_exact(model_cls, clip_style):
    model = make(model_cls)
    params, batch = params_of(model), batch_for(model, 6)
    loss = classification_loss(model)
    assert set(ghost_plan(loss, params, batch).values()) == {"ghost"}
    step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=0.0, expected_batch_size=6, grad_method="ghost",
                         clip_style=clip_style)
    out = step(params, batch, fundp.random.key(0))
    expected, norms = model_reference_step(model, params, batch, 0.05, clip_style)
    torch.testing.assert_close(out.norms, norms, rtol=1e-10, atol=0)
    assert_close_global(out.grads, expected, 1e-10)
