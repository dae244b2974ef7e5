"""Layout rules of loss functions: per-example losses (``reduction="none"``) keep the rows."""

from __future__ import annotations

from typing import Any

import torch

from fundp.engines.ghost._layout import Layout, Untrusted
from fundp.engines.ghost._layout_rules import Call, arg, elementwise_layout, layout_rule, same_rows

__all__ = ["CLASS_LOSSES", "ELEMENTWISE_LOSSES"]

# The class dim of cross_entropy / nll_loss is 1.
CLASS_LOSSES = {"cross_entropy", "nll_loss", "multi_margin_loss", "multilabel_margin_loss"}
ELEMENTWISE_LOSSES = {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
                      "binary_cross_entropy_with_logits", "kl_div", "poisson_nll_loss", "soft_margin_loss",
                      "multilabel_soft_margin_loss"}
# Where a class loss's ``weight`` [C] sits when passed by position.
_WEIGHT_POSITION = {"cross_entropy": 2, "nll_loss": 2, "multi_margin_loss": 4}


def _reduction(name: str, args, kwargs) -> Any:
    """The ``reduction`` argument, by keyword or position (default ``"mean"``)."""
    position = {"kl_div": 5, "poisson_nll_loss": 7}.get(name, 4 if name in (
        "cross_entropy", "nll_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits") else 3)
    reduction = arg(args, kwargs, position, "reduction", "mean")
    if name == "huber_loss" or name == "smooth_l1_loss":
        reduction = kwargs.get("reduction", args[3] if len(args) > 3 and isinstance(args[3], str) else "mean")
    return reduction


@layout_rule(*sorted(ELEMENTWISE_LOSSES))
def elementwise_loss(tracer: Any, call: Call) -> Any:
    """``mse_loss(x, y, reduction="none")`` and other elementwise losses: rows follow the inputs as
    for an elementwise op.  Any other ``reduction`` (``"mean"``, ``"sum"``) sums over the batch ->
    untrusted, mixing."""
    reduction = _reduction(call.name, call.args, call.kwargs)
    if reduction != "none" or not isinstance(call.out, torch.Tensor):
        return Untrusted(f"{call.name} with reduction={reduction!r} reduces over the batch")
    return elementwise_layout(tracer, call.inputs, call.out, call.name)


@layout_rule(*sorted(CLASS_LOSSES))
def class_loss(tracer: Any, call: Call) -> Any:
    """``cross_entropy(scores [N, C, d1..], target [N, d1..], reduction="none") -> [N, d1..]``: the
    class dim (1) goes, rows of every input align with the output.  The batch on the class dim
    (normalised over) or a target/weights not aligned with the rows -> untrusted; any other
    ``reduction`` sums over the batch -> untrusted, mixing."""
    name, args, kwargs, out = call.name, call.args, call.kwargs, call.out
    reduction = _reduction(name, args, kwargs)
    if reduction != "none" or not isinstance(out, torch.Tensor):
        return Untrusted(f"{name} with reduction={reduction!r} reduces over the batch")
    scores = arg(args, kwargs, 0, "input")
    layout = tracer.layouts.get(scores)
    if isinstance(layout, Layout) and (scores.dim() < 2 or layout.dim == 1):
        return Untrusted(f"{name} normalises over the batch dimension (its class dim)")
    weight = arg(args, kwargs, _WEIGHT_POSITION.get(name, len(args)), "weight")
    if isinstance(weight, torch.Tensor) and tracer.layouts.get(weight) is not None:
        # Class weights are read at each row's target class (weight[y_i]), not at row i.
        return Untrusted(f"{name}: the weights do not align with the rows")
    # [N, C, d1, ...] -> [N, d1, ...]: the class dim goes; every input aligns with the output.
    found = None
    for tensor in call.inputs:
        layout = tracer.layouts.get(tensor)
        dim = layout.dim
        if tensor is scores and scores.dim() >= 2:
            dim = dim if dim == 0 else dim - 1
        elif tensor is not scores and (tensor.dim() != out.dim() or tensor.shape[dim] != out.shape[dim]):
            return Untrusted(f"{name}: the {'weights' if tensor.dim() == 1 else 'target'} do not align with the rows")
        candidate = layout._replace(dim=dim)
        if found is not None and not same_rows(found, candidate):
            return Untrusted(f"{name} combines rows of different examples")
        found = candidate
    return found
