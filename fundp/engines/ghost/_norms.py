"""Per-parameter squared norms and book-keeping sums from all of a parameter's uses.

A parameter used several times (weight tying, a block in a loop, an embedding table that is also
the output layer) has its per-example contributions summed *before* the norm:

* only :class:`Factor` uses ``g_i = sum_u L_iu^T R_iu``: the factors are concatenated along ``T``
  and ``||g_i||^2`` is ``||a_i||^2 ||g_i||^2`` for ``T = 1``, else the ghost form
  ``sum_{s,t} (L_i L_i^T)_{st} (R_i R_i^T)_{st}`` (``O(T^2 (p + d))``) or the materialised
  ``||L_i^T R_i||^2`` (``O(T p d)``), whichever is cheaper (ghost if ``2 T^2 <= p d``);
* only :class:`Ids` uses: ``sum_v ||sum_{t: ids_it = v} R_it||^2`` by sorting each row's ids;
* :class:`Ids` and :class:`Factor` (a tied embedding and output layer):
  ``||S||^2 + ||H||^2 + 2 <S, H>`` with the cross term ``sum_{s,t} L_i[t, ids_is] <R_is, R'_it>``;
* anything with :class:`Rows`: every use materialised and summed.

Book-keeping: ``sum_i c_i g_i = sum_u (c ⊙ L_u)^T R_u`` (an ``index_add`` for ids).  Norms are
accumulated in float32 or better (float64 for float64 parameters).

Shared work: each factor tensor's row normalisation and Gram matrix are computed once per step
(:class:`Shared`): an attention block's q, k and v projections read the same activations, as do a
gated MLP's gate and up projections.
"""

from __future__ import annotations

from typing import Any

import torch

from fundp.clipping import ScaledSqNorm, norm_dtype, normalised_rows, scaled_sq_norm, usable_scales
from fundp.engines.ghost._index import IdentityMap
from fundp.engines.ghost._uses import Factor, Ids, Rows, materialise

__all__ = ["LeafGrads", "RowsLeaf", "Shared", "leaf_sq_norms"]


def _keep_rows(factors: torch.Tensor, tensor: torch.Tensor, scale: bool) -> torch.Tensor:
    """``c_i * t_i`` (or ``t_i``) for rows with ``c_i != 0``, exact zeros elsewhere (NaN-safe)."""
    rows = factors.reshape((-1,) + (1,) * (tensor.dim() - 1))
    kept = tensor * rows.to(tensor.dtype) if scale else tensor
    return torch.where(rows != 0, kept, torch.zeros((), dtype=kept.dtype, device=kept.device))


class Shared:
    """Per-tensor work of one step's norms, done once per tensor object and shared by the leaves.

    ``normalised(x)``: ``(s, x / s)`` with ``s [B]`` each row's largest absolute entry (see
    :class:`~fundp.clipping.ScaledSqNorm`); ``gram(x)``: the per-example Gram matrices
    ``x_i x_i^T`` (``[B, T, T]``) of ``x [B, T, d]``.

    Example:
      >>> import torch
      >>> from fundp.engines.ghost._norms import Shared
      >>> shared, x = Shared(), torch.full((2, 3, 4), 2.0)
      >>> scale, rows = shared.normalised(x)
      >>> shared.normalised(x)[1] is rows, scale.tolist(), shared.gram(rows)[0, 0, 0].item()
      (True, [2.0, 2.0], 4.0)
    """

    def __init__(self, handlers: Any = ()) -> None:
        self._normalised = IdentityMap()
        self._grams = IdentityMap()
        self._uses = IdentityMap()  # factor tensor -> how many leaves still need it
        for handler in handlers:
            for x in handler.factor_tensors() if handler is not None else ():
                self._uses.set(x, (self._uses.get(x) or 0) + 1)

    def release(self, *tensors: Any) -> None:
        """A leaf is done with ``tensors``: after a tensor's last use its normalised copy and Gram
        matrix are dropped (eagerly they would otherwise all live until the last norm)."""
        for x in tensors:
            if x is None:
                continue
            remaining = (self._uses.get(x) or 1) - 1
            self._uses.set(x, remaining)
            if remaining <= 0:
                found = self._normalised.get(x)
                if found is not None:
                    self._grams.set(found[1], None)
                self._normalised.set(x, None)

    def normalised(self, x: torch.Tensor) -> tuple:
        found = self._normalised.get(x)
        if found is None:
            found = normalised_rows(x)
            self._normalised.set(x, found)
        return found

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        found = self._grams.get(x)
        if found is None:
            found = torch.bmm(x, x.transpose(1, 2))
            self._grams.set(x, found)
        return found


def _factor_sq_norm(left: torch.Tensor, right: torch.Tensor, shared: Shared | None = None) -> torch.Tensor:
    """``||left_i^T right_i||^2`` per example: ghost form if ``2 T^2 <= p d``, else materialised."""
    steps, height, width = left.shape[1], left.shape[2], right.shape[2]
    if steps == 1:
        return left.square().sum(dim=(1, 2)) * right.square().sum(dim=(1, 2))
    if 2 * steps * steps <= width * height:
        shared = shared or Shared()
        return (shared.gram(left) * shared.gram(right)).sum(dim=(1, 2))
    return torch.bmm(left.transpose(1, 2), right).square().sum(dim=(1, 2))


def _cross_term(left: torch.Tensor, right: torch.Tensor, ids: torch.Tensor, id_rows: torch.Tensor) -> torch.Tensor:
    """``2 <S_i, H_i>`` with ``S_i = sum_s onehot(ids_s)^T id_rows_s`` and ``H_i = left_i^T right_i``."""
    index = ids.unsqueeze(1).expand(-1, left.shape[1], -1)
    gathered = left.gather(2, index)  # [B, T_f, T_ids]: left_i[t, ids_s]
    inner = torch.bmm(right, id_rows.transpose(1, 2))  # [B, T_f, T_ids]
    return 2 * (gathered * inner).sum(dim=(1, 2))


def _ids_sq_norm(ids: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    sorted_ids, order = ids.sort(dim=1)
    grads = right.gather(1, order.unsqueeze(-1).expand_as(right))
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    segment = (starts.cumsum(dim=1) - 1).unsqueeze(-1).expand_as(grads)
    sums = torch.zeros_like(grads).scatter_add_(1, segment, grads)
    return sums.square().sum(dim=(1, 2))


def _joined(tensors: list) -> Any:
    """The uses' tensors concatenated along ``T`` (``None`` for none, the tensor itself for one)."""
    if not tensors:
        return None
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


class LeafGrads:
    """All uses of one parameter after the backward: its ``[B]`` squared norms and weighted sum."""

    def __init__(self, leaf: torch.Tensor, forms: list):
        self.leaf = leaf
        self.dtype = norm_dtype(leaf.dtype)
        kinds = {type(form) for form in forms}
        factors = [form for form in forms if isinstance(form, Factor)]
        if Rows in kinds or (factors and (leaf.dim() != 2 or any(
                (f.left.shape[2], f.right.shape[2]) != tuple(leaf.shape) for f in factors))):
            self.kind = "rows"
            rows = [materialise(form, tuple(leaf.shape)).to(self.dtype) for form in forms]
            self.rows = rows[0] if len(rows) == 1 else torch.stack(rows).sum(dim=0)
            return
        self.kind = "factored"
        ids = [form for form in forms if isinstance(form, Ids)]
        # One use keeps its tensors as they are (no copy: layers reading the same activations share work).
        self.left: Any = _joined([f.left.to(self.dtype) for f in factors])
        self.right: Any = _joined([f.right.to(self.dtype) for f in factors])
        self.ids: Any = _joined([form.ids for form in ids])
        self.id_rows: Any = _joined([form.right.to(self.dtype) for form in ids])

    def factor_tensors(self) -> list:
        """The tensors the norms normalise (shared with other leaves that read the same activations)."""
        if self.kind == "rows":
            return []
        return [x for x in (self.left, self.right, self.id_rows) if x is not None]

    def sq_norms(self, shared: Shared | None = None) -> ScaledSqNorm:
        """``||g_i||^2 = scale_i^2 * scaled_i``: every factor is divided by its row's largest entry
        first, so a huge but finite gradient has a finite representation (clipped, not dropped)."""
        if self.kind == "rows":
            return scaled_sq_norm(self.rows)
        shared = shared or Shared()
        scales = []
        left: Any = None
        right: Any = None
        id_rows: Any = None
        if self.left is not None:
            scale_left, left = shared.normalised(self.left)
            scale_right, right = shared.normalised(self.right)
            scales.append(scale_left * scale_right)
        if self.ids is not None:
            scale_ids, id_rows = shared.normalised(self.id_rows)
            scales.append(scale_ids)
        scale = scales[0] if len(scales) == 1 else torch.maximum(scales[0], scales[1])
        usable, safe = usable_scales(scale)
        total: Any = None
        if left is not None:
            if id_rows is not None:  # both parts on the common scale
                right = right * (scales[0] / safe).reshape(-1, 1, 1)
            total = _factor_sq_norm(left, right, shared)
        if id_rows is not None:
            id_rows = id_rows * (scales[-1] / safe).reshape(-1, 1, 1)
            part = _ids_sq_norm(self.ids, id_rows)
            total = part if total is None else total + part
            if left is not None:
                total = total + _cross_term(left, right, self.ids, id_rows)
        total = torch.where(usable, total.clamp_min(0), torch.zeros_like(total))
        shared.release(*self.factor_tensors())
        return ScaledSqNorm(scale, total)

    def weighted_sum(self, factors: torch.Tensor) -> torch.Tensor:
        dtype = self.leaf.dtype
        if self.kind == "rows":
            kept = _keep_rows(factors, self.rows, scale=True)
            return kept.sum(dim=0).to(dtype)
        total = torch.zeros(self.leaf.shape, dtype=self.dtype, device=self.leaf.device)
        if self.left is not None:
            left = _keep_rows(factors, self.left, scale=True)
            right = _keep_rows(factors, self.right, scale=False)
            total = total + left.reshape(-1, left.shape[-1]).T @ right.reshape(-1, right.shape[-1])
        if self.ids is not None:
            rows = _keep_rows(factors, self.id_rows, scale=True)
            total = total.index_add(0, self.ids.reshape(-1), rows.reshape(-1, rows.shape[-1]))
        return total.to(dtype)


class RowsLeaf:
    """A leaf whose per-example gradients come from ``vmap(grad)`` (the mixed plan)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def factor_tensors(self) -> list:
        return []

    def sq_norms(self, shared: Shared | None = None) -> ScaledSqNorm:
        return scaled_sq_norm(self.rows)

    def weighted_sum(self, factors: torch.Tensor) -> torch.Tensor:
        return _keep_rows(factors, self.rows, scale=True).sum(dim=0)


def leaf_sq_norms(handlers: list) -> list:
    """Each handler's ``[B]`` squared norms (:class:`ScaledSqNorm`; ``None`` for a ``None`` handler),
    with the per-tensor work shared (:class:`Shared`) and freed on return.

    Example:
      >>> import torch
      >>> from fundp.engines.ghost._norms import LeafGrads, leaf_sq_norms
      >>> from fundp.engines.ghost._uses import Factor
      >>> x = torch.tensor([[[3.0, 4.0]], [[1e30, 0.0]]])  # [B=2, T=1, d=2]
      >>> leaf = LeafGrads(torch.zeros(1, 2), [Factor(torch.ones(2, 1, 1), x)])
      >>> s = leaf_sq_norms([leaf])[0]  # 1e30^2 overflows float32: the scaled form keeps it
      >>> s.scale * s.scaled.sqrt()
      tensor([5.0000e+00, 1.0000e+30])
    """
    shared = Shared(handlers)
    return [None if handler is None else handler.sq_norms(shared) for handler in handlers]
