"""Layout rules of elementwise ops, concatenation and outputs that hold no batch values."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fundp.engines.ghost._layout import Untrusted
from fundp.engines.ghost._layout_rules import Call, arg, elementwise_layout, layout_rule, norm_dims

__all__ = ["POINTWISE", "CASTS", "DATA_FREE"]

# Casts and copies: elementwise, and (in :mod:`._tracer`) a parameter cast stays that parameter.
CASTS = {"to", "float", "double", "half", "bfloat16", "type", "type_as", "contiguous", "clone", "__get__", "cpu",
         "cuda", "requires_grad_", "as_subclass"}
# Ops whose output holds no value of their input (only its shape): not batch data.
DATA_FREE = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full",
             "rand_like", "randn_like", "randint_like"}


def _pointwise_names() -> frozenset:
    """Names of torch functions and methods whose aten ops are all elementwise (tagged pointwise).

    Only these (and the explicit extras below) keep the layout of their batch-derived inputs by the
    elementwise rule: default deny, every other op without a layout rule makes its output untrusted.
    """
    candidates = set(dir(torch)) | set(dir(torch.Tensor)) | set(dir(F)) | set(dir(torch.special))
    found = set()
    for name in candidates:
        if name.startswith("_"):
            continue
        packet = getattr(torch.ops.aten, name.rstrip("_"), None)
        try:
            if packet is not None and any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads()):
                found.add(name)
        except (AttributeError, RuntimeError):
            continue
    return frozenset(found - {"max", "min", "equal"})


# Dunder spellings of elementwise operators (reflected and in-place included).
_DUNDER_POINTWISE = {f"__{prefix}{op}__" for op in ("add", "sub", "mul", "truediv", "div", "floordiv", "mod", "pow",
                                                      "and", "or", "xor", "lshift", "rshift")
                     for prefix in ("", "r", "i")} | {
    "__neg__", "__pos__", "__abs__", "__invert__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__"}
# Elementwise in the rows although aten does not tag them so: random masks drawn per element, casts,
# tensors of the same shape whose values do not depend on the data.
_EXTRA_POINTWISE = {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d",
                    "detach", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                    "randint_like", "fill_", "zero_", "copy_", "floor_divide", "floor_divide_", "logsigmoid",
                    "log_sigmoid", "hardswish", "softsign", "tanhshrink", "subtract", "multiply", "divide",
                    "bernoulli", "bernoulli_", "masked_fill", "masked_fill_", "clamp", "clip", "polar", "complex",
                    "real", "imag", "view_as_real", "conj", "resolve_conj", "resolve_neg"}
POINTWISE = _pointwise_names() | _DUNDER_POINTWISE | _EXTRA_POINTWISE | CASTS


@layout_rule(*sorted(POINTWISE - DATA_FREE))
def elementwise(tracer: Any, call: Call) -> Any:
    """Elementwise (``x + y``, ``torch.tanh``, ``dropout``, casts): output element ``[.., j, ..]``
    depends on input elements at the same broadcast position, so rows follow each input's batch dim
    aligned from the right; inputs with the batch at different places (or in different orders)
    combine rows of different examples -> untrusted."""
    return elementwise_layout(tracer, call.inputs, call.out, call.name)


@layout_rule(*sorted(DATA_FREE))
def data_free(tracer: Any, call: Call) -> None:
    """``zeros_like(x)``, ``x.new_zeros(...)``, ``rand_like(x)``: only the shape comes from the batch,
    no value does -> the output is not batch data (``None``)."""
    return None


@layout_rule("cat", "concat", "concatenate", "stack")
def concatenate(tracer: Any, call: Call) -> Any:
    """``cat``/``stack`` along a dim other than the batch: rows keep their dim (``stack`` inserts one
    before it when stacking at or before it); every batched input must agree on the rows.  Joining
    along the batch dim (``cat([x, y], 0)``) appends other rows to the batch -> untrusted, mixing."""
    tensors = arg(call.args, call.kwargs, 0, "tensors")
    dim = arg(call.args, call.kwargs, 1, "dim", 0)
    found = None
    for tensor in tensors:
        layout = tracer.layouts.get(tensor)
        if layout is None:
            continue
        cat_dim = norm_dims(dim, call.out.dim() if call.name == "stack" else tensor.dim())[0]
        if call.name == "stack":
            candidate = layout._replace(dim=layout.dim + (1 if cat_dim <= layout.dim else 0))
        else:
            if cat_dim == layout.dim:
                return Untrusted("cat joins along the batch dimension", mixes=True)
            candidate = layout
        if found is None:
            found = candidate
        elif found.dim != candidate.dim or found.group != candidate.group or found.order is not candidate.order:
            return Untrusted(f"{call.name} combines rows of different examples")
    return found
