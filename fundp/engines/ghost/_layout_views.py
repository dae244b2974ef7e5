"""Layout rules of views and reshapes: the rows move with the dim that holds them.

Every rule here needs the op's first argument to be batch data with trusted rows (else: deny).
"""

from __future__ import annotations

from typing import Any

from fundp.engines.ghost._layout import UNTRUSTED, Untrusted, move_dims, reshape_layout
from fundp.engines.ghost._layout_rules import Call, arg, layout_rule, norm_dims

__all__ = ["RESHAPES", "TRANSPOSES", "EXPANDS"]

RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "ravel", "squeeze", "unsqueeze"}
TRANSPOSES = {"t", "T", "mT", "H", "mH", "adjoint", "transpose", "swapaxes", "swapdims"}
EXPANDS = {"expand", "expand_as", "broadcast_to"}


@layout_rule("embedding", "one_hot", needs_first=True)
def lookup(tracer: Any, call: Call) -> Any:
    """``F.embedding(ids, W)``, ``F.one_hot(ids)`` with batch ids: trailing feature dims are appended,
    the ids' dims (and so the rows) keep their places."""
    return call.layout


@layout_rule(*sorted(RESHAPES), needs_first=True)
def reshape(tracer: Any, call: Call) -> Any:
    """Row-major reshapes (``view``, ``flatten``, ``squeeze``, GPT-2's ``x.view(-1, d)``): the batch
    dim may be merged with neighbours (a flattened group that remembers where the examples are) or
    moved; a reshape that splits the batch dim across dims -> untrusted."""
    found = reshape_layout(call.layout, tuple(call.first.shape), tuple(call.out.shape))
    return Untrusted(f"{call.name} splits the batch dimension") if found == UNTRUSTED else found


@layout_rule(*sorted(TRANSPOSES), needs_first=True)
def transpose(tracer: Any, call: Call) -> Any:
    """``transpose(a, b)``, ``.T``, ``.mT``, ``.t()``: the rows follow the swapped dims (``.T`` of an
    N-D tensor reverses all dims; ``.mT``/``.H`` swap the last two)."""
    args, kwargs, ndim, name = call.args, call.kwargs, call.first.dim(), call.name
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = norm_dims([arg(args, kwargs, 1, "dim0")], ndim)[0], norm_dims([arg(args, kwargs, 2, "dim1")], ndim)[0]
    else:
        a, b = (0, 1) if ndim < 2 or name in ("t", "T") and ndim == 2 else (ndim - 2, ndim - 1)
        if name == "T" and ndim > 2:
            return move_dims(call.layout, ndim, list(range(ndim))[::-1])
    permutation = list(range(ndim))
    permutation[a], permutation[b] = permutation[b], permutation[a]
    return move_dims(call.layout, ndim, permutation)


@layout_rule("permute", needs_first=True)
def permute(tracer: Any, call: Call) -> Any:
    """``permute(dims)``: output dim ``j`` is input dim ``dims[j]``; the rows go where the batch dim goes."""
    args, kwargs = call.args, call.kwargs
    dims = args[1:] if len(args) > 2 or not isinstance(arg(args, kwargs, 1, "dims"), (list, tuple)) \
        else arg(args, kwargs, 1, "dims")
    return move_dims(call.layout, call.first.dim(), list(dims))


@layout_rule("movedim", "moveaxis", needs_first=True)
def movedim(tracer: Any, call: Call) -> Any:
    """``movedim(source, destination)``: the permutation it makes, applied to the batch dim."""
    ndim = call.first.dim()
    source = norm_dims(arg(call.args, call.kwargs, 1, "source"), ndim)
    destination = norm_dims(arg(call.args, call.kwargs, 2, "destination"), ndim)
    order = [d for d in range(ndim) if d not in source]
    slots: list[Any] = [None] * ndim
    for s, d in zip(source, destination):
        slots[d] = s
    rest = iter(order)
    return move_dims(call.layout, ndim, [p if p is not None else next(rest) for p in slots])


@layout_rule(*sorted(EXPANDS | {"repeat"}), needs_first=True)
def expand(tracer: Any, call: Call) -> Any:
    """``expand``/``repeat`` along other dims (new leading dims shift the batch dim): rows kept.
    Repeating the batch dim itself (its size changes) duplicates examples -> untrusted, mixing."""
    layout, first, out = call.layout, call.first, call.out
    offset = out.dim() - first.dim()
    if out.shape[layout.dim + offset] != first.shape[layout.dim]:
        return Untrusted(f"{call.name} repeats the batch dimension", mixes=True)
    return layout._replace(dim=layout.dim + offset)


@layout_rule("select", "narrow", "split", "chunk", "unbind", "tensor_split", "split_with_sizes", needs_first=True)
def select(tracer: Any, call: Call) -> Any:
    """``select``/``narrow``/``split``/``chunk``/``unbind`` along another dim: rows kept (a removed
    dim before the batch shifts it).  Along the batch dim they take part of the batch -> untrusted,
    mixing."""
    name, layout = call.name, call.layout
    position = 2 if name in ("split", "chunk", "tensor_split", "split_with_sizes") else 1
    dim = norm_dims(arg(call.args, call.kwargs, position, "dim", 0), call.first.dim())[0]
    if dim == layout.dim:
        return Untrusted(f"{name} takes part of the batch", mixes=True)
    if name in ("select", "unbind") and dim < layout.dim:
        return layout._replace(dim=layout.dim - 1)
    return layout
