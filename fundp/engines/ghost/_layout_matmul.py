"""Layout rules of matrix products: ``@``/``matmul``/``bmm``/``addmm``, ``einsum``, batched matrix ops
(``cdist``, ``scaled_dot_product_attention``) and ``bilinear`` with batch data on either side.

A product keeps the rows when the batch dim is a batch (broadcast) dim or the free row/column dim
of its side; contracting over it mixes examples and raises
:class:`~._layout.ExamplesInteractError` (``x.T @ x`` over the batch).
"""

from __future__ import annotations

from typing import Any

import torch

from fundp.engines.ghost._layout import Layout, Untrusted
from fundp.engines.ghost._layout_rules import Call, deny, elementwise_layout, layout_rule, same_rows

__all__: list = []


@layout_rule("matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm")
def matmul(tracer: Any, call: Call) -> Any:
    """``a @ b`` (and ``mm``, ``bmm``, ``addmm(c, a, b)``): rows of ``a`` stay rows of the output (its
    dim ``-2``), columns of ``b`` its dim ``-1``, broadcast batch dims keep their place (aligned
    from the right); a matrix-vector product drops a dim.  The batch on a contracted dim (``a``'s
    last, ``b``'s second to last, or a 1-D operand) raises ``ExamplesInteractError``; operands
    with their rows at different output places also do."""
    name, args, out = call.name, call.args, call.out
    if name in ("addmm", "baddbmm", "addbmm"):
        a, b, extra = args[1], args[2], args[0]
    elif name == "__rmatmul__":
        a, b, extra = args[1], args[0], None
    else:
        a, b, extra = args[0], args[1], None
    found = []
    for tensor, side in ((a, "left"), (b, "right")):
        layout = tracer.layouts.get(tensor)
        if not isinstance(layout, Layout):
            continue
        ndim = tensor.dim()
        if ndim == 1:
            tracer.interact(f"{name} contracts over the batch")
        contracted = ndim - 1 if side == "left" else ndim - 2
        if layout.dim == contracted:
            tracer.interact(f"{name} contracts over the batch dimension")
        other = b if side == "left" else a
        if isinstance(other, torch.Tensor) and other.dim() == 1:  # a matrix-vector product drops one dim
            found.append(layout if side == "left" or layout.dim < ndim - 2 else layout._replace(dim=out.dim() - 1))
        elif side == "left" and layout.dim == ndim - 2:
            found.append(layout._replace(dim=out.dim() - 2))
        elif side == "right" and layout.dim == ndim - 1:
            found.append(layout._replace(dim=out.dim() - 1))
        else:
            found.append(layout._replace(dim=layout.dim + out.dim() - ndim))
    if isinstance(tracer.layouts.get(extra), Layout):
        layout = tracer.layouts.get(extra)
        found.append(layout._replace(dim=layout.dim + out.dim() - extra.dim()))
    if not found:
        return None
    first = found[0]
    for other_layout in found[1:]:
        if other_layout.dim != first.dim or other_layout.group != first.group or other_layout.order is not first.order:
            tracer.interact(f"{name} combines rows of different examples")
    return first


@layout_rule("einsum")
def einsum(tracer: Any, call: Call) -> Any:
    """``einsum('bti,ij->btj', x, W)``: the rows follow the batch dim's letter to its output place; a
    letter missing from the output (summed over the batch) or operands that put their rows at
    different places raise ``ExamplesInteractError``.  ``...`` or an implicit output -> untrusted."""
    args = call.args
    equation = args[0]
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if "..." in equation or "->" not in equation:
        return Untrusted(f"einsum({equation!r}) with '...' or an implicit output, whose batch dim the tracer does "
                         "not follow; spell every dim out, e.g. 'bti,ij->btj'")
    inputs, output = equation.replace(" ", "").split("->")
    found = None
    for subscripts, tensor in zip(inputs.split(","), operands):
        layout = tracer.layouts.get(tensor)
        if not isinstance(layout, Layout):
            continue
        letter = subscripts[layout.dim]
        if letter not in output:
            tracer.interact("einsum sums over the batch dimension")
        candidate = layout._replace(dim=output.index(letter))
        if found is not None and (found.dim != candidate.dim or found.order is not candidate.order):
            tracer.interact("einsum combines rows of different examples")
        found = candidate
    return found


@layout_rule("cdist", "scaled_dot_product_attention")
def batched_matrix(tracer: Any, call: Call) -> Any:
    """``cdist(x, y)``, ``scaled_dot_product_attention(q, k, v)``: the leading dims are batch dims
    (elementwise, rows kept), the last two are per-matrix: the batch there combines rows -> untrusted."""
    for tensor in call.inputs:
        if tracer.layouts.get(tensor).dim >= tensor.dim() - 2:
            return Untrusted(f"{call.name} combines rows of the batch dimension")
    return elementwise_layout(tracer, call.inputs, call.out, call.name)


@layout_rule("bilinear")
def bilinear(tracer: Any, call: Call) -> Any:
    """``bilinear(x1 [.., n1], x2 [.., n2], W) -> [.., out]``: the last dims are contracted, the leading
    ones kept: every batched input with its rows at the same leading dim keeps them, else untrusted."""
    inputs, out = call.inputs, call.out
    if not isinstance(out, torch.Tensor):
        return deny(tracer, call)
    layouts = [tracer.layouts.get(t) for t in inputs]
    if inputs and all(t.dim() == out.dim() and lay.dim < t.dim() - 1 and same_rows(lay, layouts[0])
                      for t, lay in zip(inputs, layouts)):
        return layouts[0]
    return Untrusted("bilinear works across the batch dimension")
