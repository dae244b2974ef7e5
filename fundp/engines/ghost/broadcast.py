"""Parameters broadcast over the batch: ``x + pos``, ``x * gamma``, ``torch.cat([cls.expand(B, 1, d), x], 1)``,
``x + F.embedding(arange(T), P)``, ``x + P[:T]``.

For an elementwise op (or a concatenation) of a batched ``x`` with a parameter-derived ``D`` that
does not depend on the batch, example ``i``'s gradient of ``D`` is the gradient of its own copy of
``D``.  The rule gives every example its own copy — ``D`` expanded along the batch plus a zero
probe of that shape — so the backward returns ``[B, *D.shape]`` per-example gradients directly
(autograd sums over the other broadcast dims).  They are mapped back to the parameters through the
parameter-only computation that made ``D`` (an ``expand``, a slice, a position-table lookup, ...)
by a batched vector-Jacobian product — exact, and cheap because ``D`` is small.
"""

from __future__ import annotations

from typing import Any

import torch

from fundp.engines.ghost._layout import Layout
from fundp.engines.ghost._uses import Ids, Rows
from fundp.engines.ghost.embedding import drop_padding

__all__ = ["broadcast_rule", "BROADCAST_OPS"]

BROADCAST_OPS = {"add", "sub", "mul", "div", "true_divide", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__",
                 "__rmul__", "__truediv__", "__rtruediv__", "cat", "concat", "concatenate", "where", "subtract",
                 "multiply", "divide", "addcmul", "lerp", "maximum", "minimum"}


def _unwrap(tracer, tensor: torch.Tensor) -> torch.Tensor:
    """Follows ``expand``-ed copies back to the tensor that was expanded."""
    origin = tracer.origin(tensor)
    while origin is not None and origin.base is not None:
        tensor = origin.base
        origin = tracer.origin(tensor)
    return tensor


def _replace(value: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    if value is old:
        return new
    if isinstance(value, (list, tuple)) and any(item is old for item in value):
        return type(value)(new if item is old else item for item in value)
    return value


def broadcast_rule(tracer, func, name: str, args, kwargs):
    """Handles ``func`` if it is an elementwise op or a concatenation; returns the output or ``None``."""
    if name not in BROADCAST_OPS:
        return None
    tensors = [t for t in list(args) + list(kwargs.values()) for t in (t if isinstance(t, (list, tuple)) else [t])
               if isinstance(t, torch.Tensor)]
    layouts = [tracer.trusted(t) for t in tensors if tracer.layout(t) is not None]
    if not layouts or any(layout is None for layout in layouts) or any(
            tracer.origin(t) is not None and tracer.layout(t) is not None for t in tensors):
        return None
    operands = [t for t in tensors if tracer.origin(t) is not None]
    # The output's shape and batch layout, from a dry run of the op on the same shapes.
    with torch.no_grad():
        plain_args = [_detach_all(a) for a in args]
        plain_kwargs = {k: _detach_all(v) for k, v in kwargs.items()}
        reference = func(*plain_args, **plain_kwargs)
    if not isinstance(reference, torch.Tensor):
        return None
    tracer.propagate(func, name, args, kwargs, reference)
    out_layout = tracer.trusted(reference)
    if out_layout is None:
        return None
    batch_dim = out_layout.dim
    new_args, new_kwargs = list(args), dict(kwargs)
    records = []
    for operand in operands:
        aligned_dims = reference.dim() - operand.dim()
        if aligned_dims < 0:
            return None
        source = _unwrap(tracer, operand)
        source_aligned = reference.dim() - source.dim()
        operand_shape = (1,) * aligned_dims + tuple(operand.shape)
        # Each example's own copy: the operand with its batch-aligned dim made the batch size.
        copy_shape = list(operand_shape)
        copy_shape[batch_dim] = reference.shape[batch_dim]
        origin = tracer.origin(operand)
        source_shape = (1,) * source_aligned + tuple(source.shape) if source_aligned >= 0 else None
        if tracer.batch_size == 1:
            # One example owns the whole output: its copy of the operand is the operand itself.
            kind, source, source_shape, copy_shape = "whole", operand, operand_shape, list(operand_shape)
        elif source_shape is not None and source_shape[batch_dim] == 1:
            kind = "broadcast"
        elif origin.ids is not None and operand_shape[batch_dim] == reference.shape[batch_dim] and operand.dim() >= 2:
            kind = "ids"
        else:
            return None
        copy = operand.detach().reshape(operand_shape).expand(copy_shape)
        copy, index = tracer.probe(copy)
        replacement = copy
        for position, value in enumerate(new_args):
            new_args[position] = _replace(value, operand, replacement)
        for key, value in new_kwargs.items():
            new_kwargs[key] = _replace(value, operand, replacement)
        records.append((operand, source, source_shape, kind, index))
    out = func(*new_args, **new_kwargs)
    tracer.set_layout(out, out_layout)
    for operand, source, source_shape, kind, index in records:
        _record(tracer, operand, source, source_shape, kind, index, out_layout, name)
    return out


def _detach_all(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach_all(item) for item in value)
    return value


def _per_example(grad: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``[.., rows at layout.dim, ..]`` -> ``[B, ..]`` with the batch's group summed (keepdim 1)."""
    if len(layout.group) > 1:
        grad = grad.unflatten(layout.dim, layout.group)
        batch = layout.dim + layout.pos
        others = [layout.dim + k for k in range(len(layout.group)) if k != layout.pos]
        grad = grad.sum(dim=others, keepdim=True).movedim(batch, 0)
        grad = grad.flatten(layout.dim + 1, layout.dim + len(layout.group) - 1)
    else:
        grad = grad.movedim(layout.dim, 0).unsqueeze(layout.dim + 1)
    if layout.order is not None:
        grad = grad.index_select(0, torch.argsort(layout.order))
    return grad


def _record(tracer, operand, source, source_shape, kind, index, layout: Layout, op: str) -> None:
    if kind == "ids":
        ids, padding_idx, table = tracer.origin(operand).ids

        def resolve_ids(grads):
            g = grads[index]
            g = g.movedim(layout.dim, 0)  # a single-dim batch group (checked below)
            flat_ids = ids.reshape((1,) * (g.dim() - 1 - ids.dim()) + tuple(ids.shape))
            flat_ids = flat_ids.expand(g.shape[:-1]).reshape(g.shape[0], -1)
            right = g.reshape(g.shape[0], -1, g.shape[-1])
            if layout.order is not None:
                order = torch.argsort(layout.order)
                flat_ids, right = flat_ids.index_select(0, order), right.index_select(0, order)
            return Ids(flat_ids, drop_padding(flat_ids, right, padding_idx), table.shape[0])

        if len(layout.group) != 1:
            tracer.report([operand], f"{op} of a table lookup with flattened rows")
            return
        tracer.record(table, resolve_ids, op)
        return

    if kind == "whole":
        tracer.record(source, lambda grads: Rows(grads[index].reshape((1,) + tuple(source.shape))), op)
        return

    def resolve(grads):
        rows = _per_example(grads[index], layout)  # [B, *copy_shape with batch dim 1]
        # Sum over the dims the source was broadcast along (e.g. an expanded cls token).
        target = (1,) + tuple(source_shape)
        dims = [d for d in range(1, rows.dim()) if target[d] == 1 and rows.shape[d] != 1]
        if dims:
            rows = rows.sum(dim=dims, keepdim=True)
        return Rows(rows.reshape((rows.shape[0],) + tuple(source.shape)))

    tracer.record(source, resolve, op)
