"""Layout rules of views and reshapes (fundp/engines/ghost/_layout_views.py): one exact case per op
family against micro-batching, and the refusals (a split, a repeat or a part of the batch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import ghost_plan
from fundp.testing import reference_step
from ghost_helpers import (
    B, D, T, V, assert_exact, assert_layout_exact, assert_layout_refused, assert_rule_used, head, rule_cases,
)

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


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.parametrize("style", ["flat", "per_layer", "automatic"])
def test_sequence_first_activations_with_t_equal_b_are_exact(style):
    g = torch.Generator().manual_seed(5)
    params = {"emb": torch.randn(V, D, generator=g), "w": torch.randn(D, D, generator=g),
              "ln_w": 1 + 0.1 * torch.randn(D, generator=g), "ln_b": 0.1 * torch.randn(D, generator=g),
              "head": torch.randn(3, D, generator=g)}
    batch = {"ids": torch.randint(0, V, (B, B), generator=g), "y": torch.randint(0, 3, (B,), generator=g)}  # T == B

    def loss_fn(p, b):
        h = F.embedding(b["ids"].T, p["emb"])  # [T, B, d]
        h = F.layer_norm(torch.tanh(F.linear(h, p["w"])), (D,), p["ln_w"], p["ln_b"])
        return F.cross_entropy(F.linear(h.mean(0), p["head"]), b["y"], reduction="none")

    assert set(ghost_plan(loss_fn, params, batch).values()) == {"ghost"}
    assert_exact(loss_fn, params, batch, style)


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.parametrize("style", ["flat", "per_layer", "automatic"])
def test_gpt2_conv1d_flattened_rows_are_exact(style):
    g = torch.Generator().manual_seed(6)
    params = {"w": torch.randn(D, 3 * D, generator=g) * 0.5, "b": torch.randn(3 * D, generator=g) * 0.1,
              "head": torch.randn(3, 3 * D, generator=g)}

    def loss_fn(p, b):
        x = b["x"]  # [B, T, d]
        size = x.shape[:-1] + (3 * D,)
        h = torch.addmm(p["b"], x.view(-1, x.size(-1)), p["w"]).view(size)  # HF Conv1D
        return F.cross_entropy(F.linear(torch.tanh(h).mean(1), p["head"]), b["y"], reduction="none")

    batch = {"x": torch.randn(B, T, D, generator=g), "y": torch.randint(0, 3, (B,), generator=g)}
    assert set(ghost_plan(loss_fn, params, batch).values()) == {"ghost"}
    assert_exact(loss_fn, params, batch, style)


# (moved from tests/test_ghost_exactness.py)
def test_a_frozen_table_lookup_with_t_equal_b_keeps_the_batch_dimension():
    # A frozen embedding (not in params) is an op without a rule: its output [B, T, d] must keep
    # the batch in dim 0 even when T == B (right-aligned broadcasting would put it in dim 1).
    g = torch.Generator().manual_seed(13)
    table = torch.randn(V, D, generator=g)
    params = {"w": torch.randn(D, D, generator=g), "head": torch.randn(3, D, generator=g)}
    batch = {"ids": torch.randint(0, V, (B, B), generator=g), "y": torch.randint(0, 3, (B,), generator=g)}

    def loss_fn(p, b):
        h = torch.tanh(F.linear(F.embedding(b["ids"], table), p["w"]))  # [B, T, d], T == B
        scores = torch.softmax(h @ h.transpose(-1, -2), dim=-1)  # attention within each example
        return F.cross_entropy(F.linear((scores @ h).mean(1), p["head"]), b["y"], reduction="none")

    assert set(ghost_plan(loss_fn, params, batch).values()) == {"ghost"}
    assert_exact(loss_fn, params, batch, "flat")


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.parametrize("style", ["flat", "per_layer"])
def test_a_batch_of_one_whose_batch_dim_is_squeezed_away_is_exact(style):
    # B = 1: every row belongs to the one example, whatever dims the model squeezes or broadcasts.
    g = torch.Generator().manual_seed(19)
    params = {"w": torch.randn(3, D, generator=g), "pos": torch.randn(T, 3, generator=g),
              "gain": torch.randn(3, generator=g), "v": torch.randn(2, 3, generator=g)}
    batch = {"x": torch.randn(1, T, D, generator=g), "y": torch.tensor([1])}

    def loss_fn(p, b):
        h = torch.tanh(F.linear(b["x"].squeeze(0), p["w"]) + p["pos"]) * p["gain"]  # [T, 3]
        return F.cross_entropy(F.linear(h.mean(0, keepdim=True), p["v"]), b["y"], reduction="none")

    assert set(ghost_plan(loss_fn, params, batch).values()) == {"ghost"}
    step = fundp.dp_step(loss_fn, max_norm=0.1, noise_multiplier=0.0, expected_batch_size=1, grad_method="ghost",
                         clip_style=style)
    out = step(params, batch, fundp.random.key(0))
    ref = reference_step(loss_fn, params, batch, max_norm=0.1, expected_batch_size=1, clip_style=style)
    torch.testing.assert_close(out.norms, ref.norms, rtol=1e-10, atol=0)
    for k in params:
        torch.testing.assert_close(out.grads[k], ref.grads[k], rtol=1e-10, atol=1e-14)
