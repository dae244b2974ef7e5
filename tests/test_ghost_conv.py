"""The convolution rule (fundp/engines/ghost/conv.py): transposed convolutions exact against micro-batching.

Moved from tests/test_ghost.py / tests/test_ghost_exactness.py (one file per rule family).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fundp.engines.ghost import ghost_plan

from ghost_helpers import B, assert_exact


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
@pytest.mark.parametrize("spatial", [1, 2])
@pytest.mark.parametrize("style", ["flat", "per_layer"])
def test_conv_transpose_is_exact(spatial, style):
    torch.manual_seed(16)
    conv = (nn.ConvTranspose1d if spatial == 1 else nn.ConvTranspose2d)(2, 3, 3, stride=2, padding=1, output_padding=1, groups=1)
    head = nn.Linear(3, 3)
    model = nn.ModuleDict({"conv": conv, "head": head}).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(17)
    shape = (B, 2, 5) if spatial == 1 else (B, 2, 4, 4)
    batch = {"x": torch.randn(*shape, generator=g), "y": torch.randint(0, 3, (B,), generator=g)}

    def loss_fn(p, b):
        h = torch.func.functional_call(conv, {k[5:]: v for k, v in p.items() if k.startswith("conv.")}, (b["x"],))
        h = torch.tanh(h).flatten(2).mean(2)
        logits = torch.func.functional_call(head, {k[5:]: v for k, v in p.items() if k.startswith("head.")}, (h,))
        return F.cross_entropy(logits, b["y"], reduction="none")

    assert set(ghost_plan(loss_fn, params, batch).values()) == {"ghost"}
    assert_exact(loss_fn, params, batch, style, max_norm=0.2)
