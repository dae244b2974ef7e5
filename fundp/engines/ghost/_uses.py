"""What a rule records for one use of a parameter-derived tensor ``D``, and its three exact forms.

After the single backward each use resolves, from the probes' gradients, to one of:

* :class:`Factor` ``(left [B, T, p], right [B, T, d])``: example ``i``'s gradient of ``D`` (viewed
  as ``[p, d]``) is ``left_i^T right_i`` — a Linear weight (``left = G``, ``right = A``), ``x @ W``
  (``left = A``, ``right = G``);
* :class:`Ids` ``(ids [B, T], right [B, T, d])``: ``sum_t onehot(ids_it)^T right_it`` — an embedding
  table ``[V, d]`` read at ``ids``;
* :class:`Rows` ``[B, *D.shape]``: the per-example gradients themselves (small tensors, conv weights).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

__all__ = ["Factor", "Ids", "Rows", "Use"]


class Factor(NamedTuple):
    """Example ``i``'s gradient of ``D`` (viewed as ``[p, d]``) is ``left_i^T right_i``.

    Example:
      >>> import torch
      >>> from fundp.engines.ghost import Factor
      >>> from fundp.engines.ghost._uses import materialise
      >>> f = Factor(left=torch.ones(1, 2, 1), right=torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))
      >>> materialise(f, (1, 2))  # sum over the T=2 positions
      tensor([[[4., 6.]]])
    """

    left: torch.Tensor  # [B, T, p]
    right: torch.Tensor  # [B, T, d]


class Ids(NamedTuple):
    """Example ``i``'s gradient of a ``[num_rows, d]`` table read at ``ids``: ``sum_t onehot(ids_it)^T right_it``.

    Example:
      >>> import torch
      >>> from fundp.engines.ghost import Ids
      >>> from fundp.engines.ghost._uses import materialise
      >>> u = Ids(ids=torch.tensor([[2, 0, 2]]), right=torch.ones(1, 3, 2), num_rows=3)
      >>> materialise(u, (3, 2))  # row 2 was read twice
      tensor([[[1., 1.],
               [0., 0.],
               [2., 2.]]])
    """

    ids: torch.Tensor  # [B, T] int64
    right: torch.Tensor  # [B, T, d]
    num_rows: int


class Rows(NamedTuple):
    """The per-example gradients themselves, ``[B, *D.shape]`` (small tensors, conv weights).

    Example:
      >>> import torch
      >>> from fundp.engines.ghost import Rows
      >>> Rows(torch.zeros(4, 3)).rows.shape
      torch.Size([4, 3])
    """

    rows: torch.Tensor  # [B, *D.shape]


class Use(NamedTuple):
    """One use of the parameter-derived tensor ``target``; ``resolve(probe_grads)`` gives its form."""

    target: torch.Tensor
    resolve: Callable[[list], Any]
    op: str


def materialise(form: Any, shape: tuple) -> torch.Tensor:
    """The per-example gradients ``[B, *shape]`` of one resolved use."""
    if isinstance(form, Rows):
        return form.rows.reshape((form.rows.shape[0],) + tuple(shape))
    if isinstance(form, Factor):
        dtype = torch.promote_types(form.left.dtype, form.right.dtype)
        rows = torch.bmm(form.left.transpose(1, 2).to(dtype), form.right.to(dtype))
        return rows.reshape((rows.shape[0],) + tuple(shape))
    right = form.right
    rows = torch.zeros((right.shape[0], form.num_rows, right.shape[2]), dtype=right.dtype, device=right.device)
    rows = rows.scatter_add(1, form.ids.unsqueeze(-1).expand_as(right), right)
    return rows.reshape((rows.shape[0],) + tuple(shape))


def transpose_form(form: Any, shape: tuple) -> Any:
    """The form of ``D^T`` given that of a 2-D ``D`` (``shape`` is ``D^T``'s shape)."""
    if isinstance(form, Factor):
        return Factor(form.right, form.left)
    rows = materialise(form, (shape[1], shape[0]))
    return Rows(rows.transpose(1, 2))
