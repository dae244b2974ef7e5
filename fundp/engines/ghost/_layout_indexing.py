"""Layout rules of indexing: ``x[index]``, reorderings of the batch by a known permutation (a batch
sorted inside ``loss_fn`` and unsorted again), gathers and scatters.

The tracer knows which 1-D index tensors are permutations of ``range(B)`` (``argsort``, ``sort``'s
indices, ``randperm``, ``arange(B)``; ``tracer.permutations``), which are ``arange(B)`` viewed
along one dim (``tracer.batch_aranges``) and which permutation inverts which (``tracer.inverses``).
"""

from __future__ import annotations

from typing import Any

import torch

from fundp.engines.ghost._layout import Untrusted
from fundp.engines.ghost._layout_rules import Call, arg, deny, layout_rule, norm_dims

__all__ = ["compose", "permuted_rows"]


def compose(tracer: Any, order: Any, index: torch.Tensor) -> Any:
    """The order of rows ``index`` of a tensor whose rows are in ``order``: ``order[index]``, with
    ``None`` for the identity (a permutation followed by its inverse, ``h[perm][perm.argsort()]``)."""
    if tracer.batch_aranges.get(index) == 0 and index.dim() == 1:
        return order  # arange(B): the rows stay where they are
    if order is None:
        return index
    if tracer.inverses.get(index) is order or tracer.inverses.get(order) is index:
        return None
    return order.index_select(0, index)


def permuted_rows(tracer: Any, target: torch.Tensor, index: Any, source: Any) -> Any:
    """The layout of ``target`` (which held no batch data) after its rows ``index[r]`` receive
    ``source``'s rows ``r`` along dim 0, for a known permutation ``index`` (the unsort idiom), or None."""
    layout = tracer.trusted(source)
    if tracer.layouts.get(target) is not None or layout is None or tracer.permutations.get(index) is None:
        return None
    if layout.dim != 0 or len(layout.group) != 1 or source.dim() != target.dim() \
            or not (index.dim() == 1 and index.shape[0] == tracer.batch_size == target.shape[0] == source.shape[0]):
        return None
    inverse = index.argsort()
    tracer.inverses.set(inverse, index)
    # Row j of the target is source row argsort(index)[j], i.e. example order[argsort(index)[j]].
    return layout._replace(order=compose(tracer, layout.order, inverse))


@layout_rule("__getitem__", needs_first=True)
def getitem(tracer: Any, call: Call) -> Any:
    """``x[index]``: basic indexing (ints, slices, ``None``, ``...``) moves the batch dim as numpy
    does and keeps the rows when the batch dim is indexed whole (``x[:, 0]``, ``h[:, :T]``); a
    known permutation of the batch (``x[perm]``, ``x[x[:, 0].argsort()]``) reorders them (the
    layout's ``order``); ``arange(B)`` paired with per-example indices (``h[arange(B), lengths]``,
    a broadcast ``arange(B).view(B, 1, 1)``) keeps them.  Any other index along the batch (a
    subset, an unknown gather) -> untrusted, mixing."""
    layout, tensor, index = call.layout, call.first, call.args[1]
    items = list(index) if isinstance(index, tuple) else [index]
    # Expand the Ellipsis to full slices.
    consumed = sum(1 for item in items if item is not None and item is not Ellipsis and not (
        isinstance(item, torch.Tensor) and item.dtype == torch.bool and item.dim() > 1))
    expanded = []
    for item in items:
        if item is Ellipsis:
            expanded.extend([slice(None)] * (tensor.dim() - consumed))
        else:
            expanded.append(item)
    out_dim, in_dim = 0, 0
    advanced = False
    for item in expanded:
        if item is None:
            out_dim += 1
            continue
        if in_dim == layout.dim:
            if isinstance(item, slice) and item == slice(None):
                return layout._replace(dim=out_dim) if not advanced else Untrusted("advanced indexing moves the batch")
            if isinstance(item, torch.Tensor) and item.dim() == 1 and item.dtype != torch.bool \
                    and tracer.permutations.get(item) is not None:
                position = _advanced_position(tracer, expanded)
                if position is None:
                    return Untrusted("advanced indexing moves the batch")
                order = compose(tracer, layout.order, item)
                return layout._replace(dim=position, order=order)
            if isinstance(item, torch.Tensor) and tracer.batch_aranges.get(item) is not None and layout.order is None:
                position = _broadcast_arange_position(tracer, expanded, item)
                if position is not None:
                    return layout._replace(dim=position)
            if isinstance(item, slice) and item.step in (None, 1) and (item.start in (None, 0)) and \
                    (item.stop is None or (isinstance(item.stop, int) and item.stop >= tensor.shape[in_dim])):
                return layout._replace(dim=out_dim)
            return Untrusted("indexing takes a subset or a reordering of the batch", mixes=True)
        if isinstance(item, int):
            in_dim += 1
            continue
        if isinstance(item, torch.Tensor):
            advanced = True
        in_dim += 1
        out_dim += 1
    if in_dim <= layout.dim:
        return layout._replace(dim=out_dim + (layout.dim - in_dim)) if not advanced else Untrusted("advanced indexing moves the batch")
    return Untrusted("indexing moves the batch")


def _advanced_position(tracer: Any, items: list) -> int | None:
    """Where the rows land for ``x[..., perm, idx, ...]`` (numpy's advanced-indexing rule), or None.

    Every other tensor index must be 1-D of the batch size or 0-d (paired row by row with the
    permutation, e.g. ``logits[arange(B), lengths]``); the advanced block stays in place when
    its items are adjacent and goes first otherwise.
    """
    advanced = []
    for position, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            if item.dtype == torch.bool or item.dim() > 1 or (item.dim() == 1 and item.shape[0] != tracer.batch_size):
                return None
            advanced.append(position)
        elif isinstance(item, int):
            advanced.append(position)
        elif not (item is None or isinstance(item, slice)):
            return None
    if advanced != list(range(advanced[0], advanced[-1] + 1)):
        return 0
    return sum(1 for item in items[: advanced[0]] if item is None or isinstance(item, slice))


def _broadcast_arange_position(tracer: Any, items: list, batch_index: torch.Tensor) -> int | None:
    """Where the rows land for ``x[arange(B).view(B, 1, 1, 1), j]`` (broadcast index tensors), or None.

    The other tensor indices must have size 1 where ``batch_index`` has the batch, so that
    result row ``i`` along that dim reads row ``i`` of ``x`` (HuggingFace's padding masks).
    """
    tensors = [item for item in items if isinstance(item, torch.Tensor)]
    if any(t.dtype == torch.bool for t in tensors) or any(
            not (item is None or isinstance(item, (slice, torch.Tensor))) for item in items):
        return None
    rank = max(t.dim() for t in tensors)
    axis = tracer.batch_aranges.get(batch_index) + rank - batch_index.dim()
    for t in tensors:
        if t is batch_index:
            continue
        local = axis - (rank - t.dim())
        if 0 <= local < t.dim() and t.shape[local] != 1:
            return None
    positions = [i for i, item in enumerate(items) if isinstance(item, torch.Tensor)]
    if positions != list(range(positions[0], positions[-1] + 1)):
        return axis
    return sum(1 for item in items[: positions[0]] if item is None or isinstance(item, slice)) + axis


@layout_rule("flip", "fliplr", "flipud", "roll", "index_select", needs_first=True)
def reorder(tracer: Any, call: Call) -> Any:
    """``flip``/``roll``/``index_select`` along another dim: rows kept.  Along the batch dim: the
    rows are reordered and the layout records the new ``order`` (flipped twice is the identity; an
    ``index_select`` index must be a known permutation of ``range(B)``, else untrusted, mixing)."""
    name, layout, tensor, args, kwargs = call.name, call.layout, call.first, call.args, call.kwargs
    ndim = tensor.dim()
    dims: Any
    if name == "fliplr":
        dims = [1]
    elif name == "flipud":
        dims = [0]
    elif name == "flip":
        dims = norm_dims(arg(args, kwargs, 1, "dims"), ndim) if len(args) <= 2 else norm_dims(list(args[1:]), ndim)
    elif name == "roll":
        dims = norm_dims(arg(args, kwargs, 2, "dims"), ndim)
    else:
        dims = norm_dims(arg(args, kwargs, 1, "dim"), ndim)
    if dims is None or layout.dim in dims:
        if len(layout.group) != 1 or (name == "roll" and (dims is None or len(dims) != 1)):
            return Untrusted(f"{name} reorders the batch", mixes=True)
        if name in ("flip", "fliplr", "flipud"):
            if layout.order is not None and tracer.flipped.get(layout.order) is not None:
                return layout._replace(order=None)  # flipped twice: the examples in order
            flipped = (layout.order if layout.order is not None else torch.arange(tracer.batch_size, device=tensor.device)).flip(0)
            if layout.order is None:
                tracer.flipped.set(flipped, True)
            return layout._replace(order=flipped)
        current = layout.order if layout.order is not None else torch.arange(tracer.batch_size, device=tensor.device)
        if name == "roll":
            return layout._replace(order=current.roll(arg(args, kwargs, 1, "shifts"), 0))
        index = arg(args, kwargs, 2, "index")
        if tracer.permutations.get(index) is None:
            return Untrusted("index_select picks rows of the batch by an index not known to be a permutation", mixes=True)
        return layout._replace(order=compose(tracer, layout.order, index))
    return layout


@layout_rule("index_add", "index_copy", "index_add_", "index_copy_")
def unsort(tracer: Any, call: Call) -> Any:
    """The unsort idiom ``out.index_copy_(0, perm, h)`` (``index_add``) into a tensor that held no batch
    data, with ``perm`` a known permutation: out row ``perm[r]`` is ``h`` row ``r``, so the layout's
    ``order`` composes with ``argsort(perm)``.  Any other dim, target or index -> untrusted."""
    name, args, kwargs = call.name, call.args, call.kwargs
    target, dim = args[0], arg(args, kwargs, 1, "dim")
    index, source = arg(args, kwargs, 2, "index"), arg(args, kwargs, 3, "source")
    if isinstance(dim, int) and norm_dims(dim, target.dim())[0] == 0:
        found = permuted_rows(tracer, target, index, source)
        if found is not None:
            return found
    return Untrusted(f"{name} writes rows in an order the tracer does not follow")


_MOVES = ("gather", "take_along_dim", "scatter", "scatter_add", "index_fill", "scatter_reduce", "index_put", "put",
          "take", "masked_select", "nonzero", "diagonal", "diag", "tril", "triu")


@layout_rule(*_MOVES, needs_first=True)
def gather(tracer: Any, call: Call) -> Any:
    """Gathers and scatters (``gather``, ``scatter_add``, ``index_put``, ``take``, ``masked_select``)
    move values between positions picked by data: along the batch dim (or over a flattened tensor)
    -> untrusted, mixing.  ``tril``/``triu``/``diagonal`` of the last two dims keep the batch.  Along
    another dim no rule proves the rows either: default deny."""
    name, layout, ndim = call.name, call.layout, call.first.dim()
    flat = ("take", "put", "masked_select", "nonzero", "diagonal", "diag", "tril", "triu", "index_put")
    if name == "take_along_dim":  # take_along_dim(input, indices, dim=None): None flattens
        dim = arg(call.args, call.kwargs, 2, "dim")
    else:
        dim = arg(call.args, call.kwargs, 1, "dim", 0) if name not in flat else None
    dim = norm_dims(dim, ndim)[0] if dim is not None else None
    if dim is None or dim == layout.dim:
        if name in ("tril", "triu", "diagonal") and layout.dim < ndim - 2:
            return layout
        return Untrusted(f"{name} moves values across the batch", mixes=True)
    return deny(tracer, call)
