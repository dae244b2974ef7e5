"""Layout rules of loss functions (fundp/engines/ghost/_layout_losses.py): per-example losses
(``reduction="none"``) keep the rows, exactly; a reducing loss or the batch on the class dim is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ghost_helpers import D, assert_layout_exact, assert_layout_refused, assert_rule_used, rule_cases

pytestmark = pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py


def _logits(p, b):
    return F.linear(b["x"], p["w"])  # [B, T, 2]


EXACT = [
    ("mse_loss", "per_element", lambda p, b: F.mse_loss(_logits(p, b), b["t"], reduction="none").sum((1, 2)), D),
    ("huber_loss", "per_element", lambda p, b: F.huber_loss(_logits(p, b), b["t"], reduction="none", delta=0.5
                                                            ).sum((1, 2)), D),
    ("binary_cross_entropy_with_logits", "per_element", lambda p, b: F.binary_cross_entropy_with_logits(
        _logits(p, b), b["t"].sigmoid(), reduction="none").sum((1, 2)), D),
    ("cross_entropy", "classes_last_pooled", lambda p, b: F.cross_entropy(_logits(p, b).mean(1), b["y"],
                                                                          reduction="none"), D),
    ("cross_entropy", "per_token_class_dim_1", lambda p, b: F.cross_entropy(
        _logits(p, b).transpose(1, 2), b["ids"] % 2, reduction="none").sum(1), D),
    ("nll_loss", "log_softmax", lambda p, b: F.nll_loss(_logits(p, b).mean(1).log_softmax(-1), b["y"],
                                                        reduction="none"), D),
]

REFUSED = [
    ("mse_loss", "mean_over_the_batch", lambda p, b: F.mse_loss(_logits(p, b), b["t"]) * b["y"], D,
     "mse_loss with reduction='mean' reduces over the batch"),
    ("cross_entropy", "sum_over_the_batch", lambda p, b: F.cross_entropy(
        _logits(p, b).mean(1), b["y"], reduction="sum") * b["y"], D, "cross_entropy with reduction='sum'"),
    ("cross_entropy", "batch_as_classes", lambda p, b: F.cross_entropy(
        _logits(p, b).mean(1).T, torch.zeros(2, dtype=torch.long), reduction="none").sum() * b["y"], D,
     "cross_entropy normalises over the batch dimension"),
    # B classes and class weights from the batch: example i's loss reads example y_i's weight.
    ("cross_entropy", "weights_from_the_batch", lambda p, b: F.cross_entropy(
        _logits(p, b).mean(1).repeat(1, 3), b["ids"][:, 0] % 6, weight=b["x"][:, 0, 0].exp(), reduction="none"), D,
     "cross_entropy: the weights do not align with the rows"),
]


@pytest.mark.parametrize("op, loss_fn, width", rule_cases(EXACT))
def test_per_example_losses_keep_the_rows_exactly(monkeypatch, op, loss_fn, width):
    assert_rule_used(monkeypatch, op, lambda: assert_layout_exact(loss_fn, width))


@pytest.mark.parametrize("op, loss_fn, width, match", rule_cases(REFUSED))
def test_losses_that_reduce_over_the_batch_are_refused(monkeypatch, op, loss_fn, width, match):
    assert_rule_used(monkeypatch, op, lambda: assert_layout_refused(loss_fn, match, width))
