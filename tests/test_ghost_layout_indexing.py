"""Layout rules of indexing (fundp/engines/ghost/_layout_indexing.py): basic and advanced indexing,
reorderings of the batch by a known permutation, the unsort idioms, gathers; exact against
micro-batching, and refused where the index is not known to be a permutation of the batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import GhostUnsupportedError, ghost_plan
from ghost_helpers import (
    B, D, T, assert_exact, assert_layout_exact, assert_layout_refused, assert_rule_used, features, head, rule_cases,
)

pytestmark = pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py


def _sorted_rows(b):
    """``(x[perm], perm)`` with ``perm`` the batch sorted by a data value (an argsort: a known permutation)."""
    perm = b["x"][:, 0, 0].argsort()
    return b["x"][perm], perm


def _unsorted(h, perm, op):
    """Rows of ``h`` (in the order ``perm``) put back in the batch's order by ``op``."""
    out = torch.zeros_like(h)
    return getattr(out, op)(0, perm, h)


EXACT = [
    ("__getitem__", "basic", lambda p, b: head(b["x"][:, 1:, None, :D], p), D),
    ("__getitem__", "ellipsis", lambda p, b: head(b["x"][..., 0, :], p), D),
    ("__getitem__", "argsort_then_inverse", lambda p, b: head(_sorted_rows(b)[0], p)[_sorted_rows(b)[1].argsort()], D),
    ("__getitem__", "arange_and_lengths", lambda p, b: head(
        b["x"][torch.arange(len(b["x"])), b["ids"][:, 0] % T], p), D),
    ("flip", "batch_flipped_twice", lambda p, b: head(b["x"].flip(0), p).flip(0), D),
    ("roll", "batch_rolled_back", lambda p, b: head(b["x"].roll(1, 0), p).roll(-1, 0), D),
    ("flip", "features", lambda p, b: head(b["x"].flip(-1), p), D),
    ("index_select", "permutation", lambda p, b: head(
        b["x"].index_select(0, b["x"][:, 0, 0].argsort()), p)[b["x"][:, 0, 0].argsort().argsort()], D),
    ("index_copy", "unsort", lambda p, b: head(_unsorted(_sorted_rows(b)[0].tanh(), _sorted_rows(b)[1],
                                                         "index_copy"), p), D),
    ("index_add_", "unsort_in_place", lambda p, b: head(_unsorted(_sorted_rows(b)[0].tanh(), _sorted_rows(b)[1],
                                                                  "index_add_"), p), D),
    ("tril", "per_example_matrix", lambda p, b: head(torch.tril(b["x"][:, :D, :]), p), D),
]

_FIXED = torch.tensor([1, 0, 3, 2, 5, 4])  # a permutation the tracer does not know as one

REFUSED = [
    ("__getitem__", "unknown_index", lambda p, b: head(b["x"][_FIXED[: len(b["x"])]], p), D,
     "indexing takes a subset or a reordering of the batch"),
    ("index_select", "unknown_index", lambda p, b: head(b["x"].index_select(0, _FIXED[: len(b["x"])]), p), D,
     "index_select picks rows of the batch by an index not known to be a permutation"),
    ("index_copy", "along_features", lambda p, b: head(torch.zeros_like(b["x"]).index_copy(
        2, torch.arange(D - 1, -1, -1), b["x"]), p), D, "index_copy writes rows in an order"),
    ("gather", "along_the_batch", lambda p, b: head(b["x"].gather(0, torch.zeros_like(b["ids"])[..., None].expand(
        -1, -1, D)), p), D, "gather moves values across the batch"),
    ("take_along_dim", "along_features", lambda p, b: head(torch.take_along_dim(
        b["x"], b["ids"][..., None] % D, dim=2).expand(-1, -1, D), p), D, "take_along_dim has no layout rule"),
    ("index_put", "a_row", lambda p, b: head(b["x"].index_put((torch.tensor([0]),), torch.zeros(T, D)), p), D,
     "index_put moves values across the batch"),
]


@pytest.mark.parametrize("op, loss_fn, width", rule_cases(EXACT))
def test_indexing_keeps_or_reorders_the_rows_exactly(monkeypatch, op, loss_fn, width):
    assert_rule_used(monkeypatch, op, lambda: assert_layout_exact(loss_fn, width))


@pytest.mark.parametrize("op, loss_fn, width, match", rule_cases(REFUSED))
def test_indexing_by_an_unknown_index_is_refused(monkeypatch, op, loss_fn, width, match):
    assert_rule_used(monkeypatch, op, lambda: assert_layout_refused(loss_fn, match, width))


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.parametrize("reorder", ["argsort_index", "index_select", "flip", "sort_indices"])
def test_a_batch_reordered_inside_loss_fn_is_mapped_back_exactly(reorder):
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(3, D, generator=g), "b": torch.randn(3, generator=g), "v": torch.randn(3, 3, generator=g)}

    def loss_fn(p, b):
        x = b["x"]
        if reorder == "flip":
            moved, perm = x.flip(0), None
        else:
            perm = x[:, 0].argsort() if reorder != "sort_indices" else torch.sort(x[:, 1]).indices
            moved = x.index_select(0, perm) if reorder == "index_select" else x[perm]
        h = torch.tanh(F.linear(moved, p["w"], p["b"]))
        h = h.flip(0) if perm is None else h[perm.argsort()]  # the original order restored
        return F.cross_entropy(h @ p["v"], b["y"], reduction="none")

    params_batch = features()
    assert set(ghost_plan(loss_fn, params, params_batch).values()) == {"ghost"}
    for style in ("flat", "per_layer", "automatic"):
        assert_exact(loss_fn, params, params_batch, style)


# (moved from tests/test_ghost_exactness.py)
def test_rows_picked_by_an_unknown_index_are_not_trusted():
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(3, D, generator=g), "v": torch.randn(3, 3, generator=g)}
    picks = torch.tensor([1, 0, 3, 2, 5, 4])  # a permutation the tracer cannot know is one

    def loss_fn(p, b):
        h = torch.tanh(F.linear(b["x"][picks[: b["x"].shape[0]] % b["x"].shape[0]], p["w"]))
        return F.cross_entropy(h @ p["v"], b["y"], reduction="none")

    plan = ghost_plan(loss_fn, params, features())
    # Row i's loss pairs x[picks[i]] with y[i]: examples are mixed, so no parameter stays on ghost.
    assert all(why.startswith("vmap") and "reordering of the batch" in why for why in plan.values())
    with pytest.raises(GhostUnsupportedError, match=r"params\['w'\]"):
        fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B, grad_method="ghost")(
            params, features(), fundp.random.key(0))


# (moved from tests/test_ghost_exactness.py)
def test_pooling_by_arange_and_lengths_keeps_the_rows():
    # GPT2ForSequenceClassification pools with logits[torch.arange(B), last_positions].
    g = torch.Generator().manual_seed(14)
    params = {"w": torch.randn(D, D, generator=g), "head": torch.randn(3, D, generator=g)}
    batch = {"x": torch.randn(B, T, D, generator=g), "y": torch.randint(0, 3, (B,), generator=g),
             "last": torch.randint(0, T, (B,), generator=g)}

    def loss_fn(p, b):
        h = torch.tanh(F.linear(b["x"], p["w"]))
        pooled = h[torch.arange(b["x"].shape[0]), b["last"]]
        return F.cross_entropy(F.linear(pooled, p["head"]), b["y"], reduction="none")

    assert set(ghost_plan(loss_fn, params, batch).values()) == {"ghost"}
    assert_exact(loss_fn, params, batch, "flat")


# (moved from tests/test_ghost_exactness.py)
def test_padding_mask_gathered_with_a_broadcast_arange_keeps_the_rows():
    # HuggingFace's mask code: padding_mask[arange(B)[:, None, None, None], kv_idx[None, None, None, :]].
    g = torch.Generator().manual_seed(18)
    params = {"w": torch.randn(D, D, generator=g), "head": torch.randn(3, D, generator=g)}
    batch = {"x": torch.randn(B, T, D, generator=g), "y": torch.randint(0, 3, (B,), generator=g),
             "keep": torch.rand(B, T, generator=g) > 0.3}
    batch["keep"][:, 0] = True

    def loss_fn(p, b):
        size = b["x"].shape[0]
        rows = torch.arange(size).view(-1, 1, 1, 1)
        columns = torch.arange(T).view(1, 1, 1, -1)
        allowed = b["keep"][rows, columns]  # [B, 1, 1, T]
        h = torch.tanh(F.linear(b["x"], p["w"])).unsqueeze(1)  # [B, 1, T, d]
        scores = (h @ h.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
        mixed = (torch.softmax(scores, dim=-1) @ h).squeeze(1)
        return F.cross_entropy(F.linear(mixed.mean(1), p["head"]), b["y"], reduction="none")

    assert set(ghost_plan(loss_fn, params, batch).values()) == {"ghost"}
    assert_exact(loss_fn, params, batch, "flat")
