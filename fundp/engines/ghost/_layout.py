"""Which rows of a traced tensor belong to which example: batch layouts and how ops move them.

A tensor computed from the batch carries a :class:`Layout`: its dimension ``dim`` is the row-major
flattening of the sizes ``group`` with the examples at ``group[pos]`` (``[B, T, d]``: ``dim=0,
group=(B,), pos=0``; GPT-2's ``x.view(-1, d)``: ``dim=0, group=(B, T), pos=0``; sequence-first
``[T, B, d]``: ``dim=1``), and ``order``: ``None`` when example ``i`` is at batch index ``i``, else
a tensor with ``order[r]`` the example at batch index ``r`` (a batch sorted inside ``loss_fn``).

Ops move layouts exactly when the tracer has a layout rule for them (:mod:`._layout_rules`: views,
reshapes, transposes, indexing, concatenation, reductions over other dims, elementwise ops,
per-example losses, frozen layers).
Default deny: any other op makes its output untrusted *and* mixing, so the step leaves the ghost
path (``"auto"``: vmap) unless the losses never depend on it.  An op that mixes examples raises
:class:`ExamplesInteractError` (a float reduction over the batch, batch norm with batch statistics)
or makes the rows untrusted (:data:`UNTRUSTED`: a gather along the batch whose result is not known
to be a permutation).  A supported layer whose input is untrusted is not handled by the ghost path.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

__all__ = ["Layout", "Untrusted", "UNTRUSTED", "ExamplesInteractError", "standard", "to_examples", "reshape_layout"]


class ExamplesInteractError(ValueError):
    """``loss_fn`` mixes examples (batch statistics, a reduction over the batch): per-example
    gradients are not defined, so no DP guarantee can be given for it.

    Example:
      >>> import torch
      >>> from fundp.engines.ghost import ExamplesInteractError, make_ghost_engine
      >>> loss_fn = lambda p, b: torch.nn.functional.linear(b - b.mean(0), p["w"]).sum(dim=1)
      >>> try:
      ...     make_ghost_engine(loss_fn)({"w": torch.ones(1, 2)}, torch.ones(2, 2), None)
      ... except ExamplesInteractError as error:
      ...     print(str(error)[:74])
      loss_fn mixes examples: mean reduces over the batch dimension. Per-example
    """


class Layout(NamedTuple):
    dim: int
    group: tuple
    pos: int
    order: Any = None  # None or a LongTensor [B]: order[r] is the example at batch index r

    @property
    def batch_size(self) -> int:
        return int(self.group[self.pos])


class Untrusted(NamedTuple):
    """Rows of a batch-derived tensor whose owners the tracer cannot prove (default deny).

    ``mixes``: losses computed from such rows may mix examples, so the whole step leaves the ghost
    path.  Every untrusted tensor mixes until proven otherwise: an op the tracer has no layout rule
    for may move values across the batch (a loss function, a scan, a gather, a reshape that splits
    the batch), and nothing downstream can tell.
    """

    reason: str
    mixes: bool = True


UNTRUSTED = "untrusted"


def standard(batch_size: int) -> Layout:
    return Layout(0, (batch_size,), 0, None)


def to_examples(tensor: torch.Tensor, layout: Layout, keep_last: int) -> torch.Tensor:
    """Returns ``tensor`` as ``[B, T, *last]``: row ``i`` holds example ``i``'s ``T`` positions.

    ``keep_last`` trailing dims are kept (features); every other non-batch dim is flattened into ``T``.

    Example:
      >>> import torch
      >>> from fundp.engines.ghost import to_examples
      >>> from fundp.engines.ghost._layout import Layout
      >>> t = torch.arange(12.0).reshape(3, 2, 2)  # sequence-first: [T=3, B=2, d=2]
      >>> x = to_examples(t, Layout(dim=1, group=(2,), pos=0), keep_last=1)
      >>> x.shape, torch.equal(x[1], t[:, 1])
      (torch.Size([2, 3, 2]), True)
    """
    if layout.batch_size == 1:
        # One example owns every row (the tracer does not follow dims for a batch of one).
        last = tuple(tensor.shape[tensor.dim() - keep_last:]) if keep_last else ()
        return tensor.reshape((1, -1) + last)
    t = tensor.unflatten(layout.dim, layout.group) if len(layout.group) > 1 else tensor
    t = t.movedim(layout.dim + layout.pos, 0)
    last = tuple(t.shape[t.dim() - keep_last:]) if keep_last else ()
    t = t.reshape((t.shape[0], -1) + last)
    if layout.order is not None:
        # Row r belongs to example order[r]: put it back at r' = order[r].
        t = t.index_select(0, torch.argsort(layout.order))
    return t


def reshape_layout(layout: Layout, in_shape: tuple, out_shape: tuple) -> Layout | str:
    """The layout after a row-major reshape ``in_shape -> out_shape`` (``UNTRUSTED`` if the batch is split)."""
    atoms = list(in_shape[: layout.dim]) + list(layout.group) + list(in_shape[layout.dim + 1:])
    k = layout.dim + layout.pos
    batch = atoms[k]
    stride = math.prod(atoms[k + 1:])  # elements after one step of the batch index
    inner = 1
    for j in range(len(out_shape) - 1, -1, -1):
        outer = inner * out_shape[j]
        if stride % inner == 0 and outer % (stride * batch) == 0:
            before = outer // (stride * batch)
            after = stride // inner
            group = tuple(s for s in (before, batch, after) if s != 1) or (batch,)
            if batch == 1:
                return UNTRUSTED
            pos = 1 if before != 1 else 0
            return Layout(j, group, pos, layout.order)
        inner = outer
    return UNTRUSTED


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def move_dims(layout: Layout, ndim_in: int, permutation: list) -> Layout:
    """Layout after ``permute(permutation)`` (output dim j is input dim permutation[j])."""
    perm = [_norm_dim(p, ndim_in) for p in permutation]
    return layout._replace(dim=perm.index(layout.dim))
