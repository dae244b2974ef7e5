"""Layout rules of matrix products (fundp/engines/ghost/_layout_matmul.py): products of batch data
with itself or with frozen tensors keep the rows exactly; a contraction over the batch raises
ExamplesInteractError, the batch inside a per-matrix dim is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ghost_helpers import D, T, assert_layout_exact, assert_layout_refused, assert_rule_used, head, rule_cases

pytestmark = pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py

FROZEN = torch.linspace(-1, 1, D * D, dtype=torch.float64).reshape(D, D)  # not a parameter
BILINEAR = torch.linspace(-1, 1, 3 * D * D, dtype=torch.float64).reshape(3, D, D)

EXACT = [
    ("matmul", "gram_per_example", lambda p, b: head(b["x"] @ b["x"].mT, p), T),
    ("matmul", "frozen_right", lambda p, b: head(torch.matmul(b["x"], FROZEN), p), D),
    ("mm", "flat_rows", lambda p, b: head(torch.mm(b["x"].flatten(0, 1), FROZEN).view(len(b["x"]), T, D), p), D),
    ("bmm", "attention_scores", lambda p, b: head(torch.bmm(b["x"], b["x"].transpose(1, 2)), p), T),
    ("einsum", "pairwise_tokens", lambda p, b: head(torch.einsum("btd,bsd->bts", b["x"], b["x"]), p), T),
    ("cdist", "token_distances", lambda p, b: head(torch.cdist(b["x"], b["x"]), p), T),
    ("bilinear", "frozen_weight", lambda p, b: head(F.bilinear(b["x"], b["x"].flip(-1), BILINEAR), p), 3),
]

REFUSED = [
    ("matmul", "contracts_the_batch", lambda p, b: head(b["x"] * (b["x"].flatten(1).T @ b["x"].flatten(1)).sum(),
                                                          p), D, "matmul contracts over the batch dimension", True),
    ("einsum", "sums_the_batch", lambda p, b: head(b["x"] * torch.einsum("bi,bj->ij", b["x"][:, 0], b["x"][:, 1]).sum(),
                                                   p), D, "einsum sums over the batch dimension", True),
    ("einsum", "ellipsis", lambda p, b: head(torch.einsum("...d,de->...e", b["x"], FROZEN), p), D,
     "spell every dim out", False),
    ("cdist", "between_examples", lambda p, b: head(torch.cdist(b["x"][:, 0], b["x"][:, 1])[..., None], p), 1,
     "cdist combines rows of the batch dimension", False),
    ("bilinear", "batch_contracted", lambda p, b: head(b["x"] * F.bilinear(
        b["x"][:, 0].T, b["x"][:, 1].T, torch.ones(3, len(b["x"]), len(b["x"]))).sum(), p), D,
     "bilinear works across the batch dimension", False),
]


@pytest.mark.parametrize("op, loss_fn, width", rule_cases(EXACT))
def test_matrix_products_keep_the_rows_exactly(monkeypatch, op, loss_fn, width):
    assert_rule_used(monkeypatch, op, lambda: assert_layout_exact(loss_fn, width))


@pytest.mark.parametrize("op, loss_fn, width, match, interact", rule_cases(REFUSED))
def test_products_across_the_batch_are_refused(monkeypatch, op, loss_fn, width, match, interact):
    # (the matmul and einsum rules raise ExamplesInteractError themselves: asked in every case)
    assert_rule_used(monkeypatch, op, lambda: assert_layout_refused(loss_fn, match, width, interact=interact))
