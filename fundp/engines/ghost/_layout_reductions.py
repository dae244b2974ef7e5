"""Layout rules of reductions and scans (``sum``, ``mean``, ``softmax``, ``cumsum``, ``argmax``, ``sort``).

A reduction over other dims keeps the rows.  One over the batch dim mixes them: a *float* one
raises :class:`~._layout.ExamplesInteractError` before the call (``Tracer._check_interaction``,
with :func:`reduction_dims`); any other (``argmax``, ``sort``, ``any`` over the batch) makes the
output untrusted and mixing here.
"""

from __future__ import annotations

from typing import Any

import torch

from fundp.engines.ghost._layout import Untrusted
from fundp.engines.ghost._layout_rules import Call, layout_rule, norm_dims

__all__ = ["FLOAT_REDUCTIONS", "OTHER_REDUCTIONS", "reduction_dims"]

FLOAT_REDUCTIONS = {"sum", "mean", "nansum", "nanmean", "prod", "std", "var", "std_mean", "var_mean", "norm",
                    "amax", "amin", "logsumexp", "median", "nanmedian", "max", "min", "aminmax", "quantile",
                    "nanquantile", "linalg_vector_norm", "vector_norm", "cumsum", "cumprod", "logcumsumexp",
                    "cummax", "cummin", "softmax", "log_softmax", "softmin", "normalize", "trapz", "trapezoid",
                    "diff"}
OTHER_REDUCTIONS = {"argmax", "argmin", "all", "any", "count_nonzero", "sort", "argsort", "topk", "kthvalue",
                    "msort", "unique", "unique_consecutive", "mode"}
# Where the ``dim`` argument sits when passed by position.
_DIM_POSITION = {"norm": 2, "normalize": 2, "quantile": 2, "nanquantile": 2, "topk": 2, "kthvalue": 2,
                 "linalg_vector_norm": 2, "vector_norm": 2, "softmax": 1, "log_softmax": 1, "softmin": 1}
_DIM_DEFAULT = {"normalize": 1, "softmax": None, "log_softmax": None, "sort": -1, "argsort": -1, "topk": -1,
                "kthvalue": -1, "msort": 0, "cumsum": None, "logcumsumexp": None}
_SCANS = ("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin")


def reduction_dims(name: str, args, kwargs, tensor) -> tuple:
    """``(dims or None for all, full)`` that a reduction/scan ``name`` works along."""
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return [], False  # elementwise maximum/minimum
    position = _DIM_POSITION.get(name, 1)
    dim = kwargs.get("dim", kwargs.get("axis", args[position] if len(args) > position else _DIM_DEFAULT.get(name)))
    if name in ("std", "var", "std_mean", "var_mean") and isinstance(dim, bool):
        dim = None
    if name in ("softmax", "log_softmax", "softmin") and dim is None:
        dim = -1 if tensor.dim() in (0, 1, 3) else 1  # torch's legacy implicit dim
    if name == "diff" and dim is None:
        dim = -1
    if isinstance(dim, (list, tuple)) and len(dim) == 0:
        return None, True
    dims = norm_dims(dim, tensor.dim())
    if dims is None:
        return None, name not in _SCANS
    return dims, False


@layout_rule(*sorted(FLOAT_REDUCTIONS | OTHER_REDUCTIONS), needs_first=True)
def reduction(tracer: Any, call: Call) -> Any:
    """``x.sum(dim)``, ``softmax(x, -1)``, ``x.argmax(-1)``, ``x.sort(-1)`` over dims other than the batch:
    rows kept (a removed dim before the batch shifts it; ``keepdim`` keeps it).  Over the batch dim
    (or over all dims) every output value depends on all examples -> untrusted, mixing."""
    layout, first, out = call.layout, call.first, call.out
    dims, _ = reduction_dims(call.name, call.args, call.kwargs, first)
    if dims is None or layout.dim in dims:
        return Untrusted(f"{call.name} over the batch dimension", mixes=True)
    if out.dim() == first.dim():
        return layout
    return layout._replace(dim=layout.dim - sum(1 for d in dims if d < layout.dim))
