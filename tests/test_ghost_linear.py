"""The Linear / matmul parameter rule (fundp/engines/ghost/linear.py) and its norms: both norm branches,
tied heads through transposed views, shared activations.

Moved from tests/test_ghost.py / tests/test_ghost_exactness.py (one file per rule family).
"""

from __future__ import annotations

from hypothesis import given, strategies as st
import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import ghost_plan
from fundp.engines.ghost._norms import _factor_sq_norm

from ghost_helpers import T, V, assert_exact, tied_params, tokens


# (moved from tests/test_ghost.py)
@given(batch=st.integers(1, 4), steps=st.integers(1, 6), width=st.integers(1, 7), height=st.integers(1, 7),
       seed=st.integers(0, 2**16))
def test_linear_sq_norm_both_branches_equal_materialised(batch, steps, width, height, seed):
    g = torch.Generator().manual_seed(seed)
    activations = torch.randn(batch, steps, width, generator=g, dtype=torch.float64)
    output_grad = torch.randn(batch, steps, height, generator=g, dtype=torch.float64)
    expected = torch.einsum("btp,btd->bpd", output_grad, activations).square().sum(dim=(1, 2))
    torch.testing.assert_close(_factor_sq_norm(output_grad, activations), expected, rtol=1e-10, atol=1e-12)
    ghost_form = (activations @ activations.transpose(1, 2) * (output_grad @ output_grad.transpose(1, 2))).sum((1, 2))
    torch.testing.assert_close(ghost_form, expected, rtol=1e-10, atol=1e-12)


# (moved from tests/test_ghost.py)
def test_norms_share_work_between_leaves_reading_the_same_activations_and_free_it_after_the_last():
    # q, k and v read one activation tensor: its normalised copy and Gram are made once, and dropped
    # (eagerly) after the last leaf that needs it, not kept until every norm is done.
    import weakref

    from fundp.engines.ghost._norms import LeafGrads, Shared
    from fundp.engines.ghost._uses import Factor

    g = torch.Generator().manual_seed(0)
    activations = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    leaves = [LeafGrads(torch.zeros(2, 5, dtype=torch.float64),
                        [Factor(torch.randn(3, 4, 2, generator=g, dtype=torch.float64), activations)]) for _ in range(3)]
    shared = Shared(leaves)
    first = leaves[0].sq_norms(shared)
    copy = weakref.ref(shared.normalised(activations)[1])  # a lookup, not a use
    leaves[1].sq_norms(shared)
    assert shared.normalised(activations)[1] is copy()  # kept: the third leaf still needs it
    leaves[2].sq_norms(shared)
    assert copy() is None  # freed after the last leaf
    expected = torch.einsum("btp,btd->bpd", leaves[0].left, activations).square().sum(dim=(1, 2))
    torch.testing.assert_close(first.scale.square() * first.scaled, expected, rtol=1e-12, atol=0)


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
@pytest.mark.parametrize("spelling", ["T", "mT", "H", "t", "transpose", "linear"])
@pytest.mark.parametrize("style", ["flat", "per_layer", "automatic"])
def test_tied_head_written_with_a_transposed_view_is_exact(spelling, style):
    def head(h, emb):
        if spelling == "T":
            return h @ emb.T
        if spelling == "mT":
            return h @ emb.mT
        if spelling == "H":
            return h @ emb.H
        if spelling == "t":
            return torch.matmul(h, emb.t())
        if spelling == "transpose":
            return h @ emb.transpose(0, 1)
        return F.linear(h, emb)

    def loss_fn(p, b):
        h = torch.tanh(F.embedding(b["ids"], p["emb"]) @ p["w"])
        logits = head(h, p["emb"])
        return F.cross_entropy(logits.reshape(-1, V), b["y"].reshape(-1), reduction="none").reshape(-1, T).mean(1)

    params, batch = tied_params(), tokens()
    assert set(ghost_plan(loss_fn, params, batch).values()) == {"ghost"}
    assert_exact(loss_fn, params, batch, style)
