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

from fundp.clipping import SUM_DTYPE, ScaledSqNorm, norm_dtype, normalised_rows, scaled_sq_norm, usable_scales
from fundp.engines.ghost._index import IdentityMap, is_compiling
from fundp.engines.ghost._uses import Factor, Ids, Rows, materialise

__all__ = ["LeafGrads", "RowsLeaf", "Shared", "full_precision", "leaf_sq_norms", "sum_dtype"]


def sum_dtype(dtype: torch.dtype, *inputs: torch.dtype) -> torch.dtype:
    """The dtype a leaf's book-keeping sum ``sum_i c_i g_i`` is multiplied and accumulated in,
    from the parameter's ``dtype`` and the dtypes of the tensors its gradients come from.

    float32 where the parameter and every input are float32 (the fast path); float64
    (:data:`~fundp.clipping.SUM_DTYPE`) otherwise: float64 parameters, and 16-bit parameters or
    activations (bfloat16 / float16, autocast).  Not float32 for those: float32 rounds a sum of
    ``B`` rows of norm ``C`` to about ``B C 2^-24``, so one example moved it by up to
    ``C (1 + 7.6e-5)`` at B = 4096 (measured, ``benchmarks/low_precision.py --ghost-sum float32``)
    against the ``C (1 + 1e-6)`` claimed for 16-bit training (issue 25); float64 keeps every
    difference within ``B^2 2^-53 C`` (2e-9 C at B = 4096).

    Example:
      >>> import torch
      >>> from fundp.engines.ghost._norms import sum_dtype
      >>> sum_dtype(torch.bfloat16), sum_dtype(torch.float32), sum_dtype(torch.float32, torch.bfloat16)
      (torch.float64, torch.float32, torch.float64)
    """
    if dtype == torch.float32 and all(d == torch.float32 for d in inputs):
        return torch.float32
    return SUM_DTYPE


def _keep_rows(factors: torch.Tensor, tensor: torch.Tensor, scale: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``c_i * t_i`` (or ``t_i``) for rows with ``c_i != 0``, exact zeros elsewhere (NaN-safe), in
    ``dtype`` (default ``tensor``'s): the upcast comes before the product, so ``c_i t_i`` is
    rounded once, in ``dtype``."""
    dtype = tensor.dtype if dtype is None else dtype
    rows = factors.reshape((-1,) + (1,) * (tensor.dim() - 1))
    values = tensor.to(dtype)
    kept = values * rows.to(dtype) if scale else values
    return torch.where(rows != 0, kept, torch.zeros((), dtype=dtype, device=kept.device))


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


# --------------------------------------------------------------------------- rounding-error bounds
#
# The ghost form ``N = sum_{s,t} P_st Q_st`` (``P = L L^T``, ``Q = R R^T`` of one example's
# ``L [T, p]``, ``R [T, d]``) cancels catastrophically when the gradient ``L^T R`` is small next to
# its terms (tokens ``+-M v``: ``P_st ~ M^2``, ``N ~ 1``).  Every ghost-form norm therefore carries
# a bound ``E`` with ``|N_computed - N| <= E`` computed from the same Grams; an example whose
# ``N_computed <= MARGIN * E`` (near zero, negative, or not known to ``1 / MARGIN``) is recomputed
# in the materialised form ``||L^T R||^2`` (:func:`_materialised_sq_norm`), which has no such
# cancellation (its error is that of the per-example gradient itself, as in micro-batching).
#
# The bound (standard error analysis, Higham, *Accuracy and Stability*, 2nd ed., §3.1): with ``u``
# the unit round-off of the accumulation dtype, a computed dot product of length ``n`` has error
# ``<= gamma_n sum_k |x_k y_k|``, ``gamma_n = n u / (1 - n u)``, in any summation order (BLAS
# blocking included).  With ``l_s = ||L_s||``, ``r_s = ||R_s||`` (the Grams' diagonals):
#
#   |P^_st - P_st| <= e_p l_s l_t,   |Q^_st - Q_st| <= e_d r_s r_t    (Cauchy-Schwarz),
#   |sum P^Q^ - sum PQ| <= e_p sum l_s l_t |Q^_st| + e_d sum |P^_st| r_s r_t + e_p e_d (sum_s l_s r_s)^2,
#
# and the final sum (products, ``T`` additions per row in the dtype, the rows added in float64,
# one rounding back) adds ``<= (2 T + 2) u sum |P^_st Q^_st|``.  ``e_n = n u + 2 u_in`` where
# ``u_in`` is the rounding of a matmul's inputs (TF32 / bf16 matmuls of float32 on CUDA, else 0).
# The factor ``SLACK = 2`` covers ``gamma_n <= 1.07 n u`` (for ``n u <= 1/16``, which
# :func:`_bound_is_useful` requires or the norm is materialised), the Grams' diagonals being
# computed rather than exact, and the rounding of the bound itself.  Cost: ``O(B T^2)``
# element-wise work on Grams already computed, ``O(B)`` reductions.
#
# Guarantee: an example that is not recomputed has ``E < N_computed / MARGIN``, so its true
# squared norm is at most ``(1 + 1 / MARGIN)`` times the computed one: clipped to ``C``, it
# contributes at most ``sqrt(1 + 1 / MARGIN) C = 1.03 C`` in the worst case allowed by
# floating point (in practice ``C (1 + O(u))``: the bound is a worst case, typically 10^2-10^4
# times the actual error).

SLACK = 2.0
MARGIN = 16.0


def _round_offs(x: torch.Tensor) -> tuple[float, float]:
    """``(u, u_in)``: unit round-off of ``x``'s dtype and of the inputs of a matmul on ``x``.

    Example:
      >>> import torch
      >>> from fundp.engines.ghost._norms import _round_offs
      >>> _round_offs(torch.zeros(1, dtype=torch.float64))
      (1.1102230246251565e-16, 0.0)
    """
    u = torch.finfo(x.dtype).eps / 2
    u_in = 0.0
    if x.dtype == torch.float32 and x.device.type == "cuda":
        precision = torch.get_float32_matmul_precision()
        if precision == "medium":
            u_in = 2.0**-8  # bfloat16 inputs
        elif precision == "high" or torch.backends.cuda.matmul.allow_tf32:
            u_in = 2.0**-11  # TF32 inputs (bf16x3 is finer)
    return u, u_in


def _bound_is_useful(*lengths: int, dtype: torch.dtype) -> bool:
    """The bound's first-order analysis needs ``n u <= 1/16`` for every dot-product length ``n``."""
    return max(lengths) * (torch.finfo(dtype).eps / 2) <= 1 / 16


def _rows_sum(prod: torch.Tensor) -> torch.Tensor:
    """``sum_{s,t} prod[b, s, t]``: rows summed in ``prod``'s dtype, then across rows in float64."""
    return prod.sum(dim=2).sum(dim=1, dtype=torch.float64).to(prod.dtype)


def _ghost_sq_norm(left: torch.Tensor, right: torch.Tensor, shared: "Shared") -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, E)``: the ghost form ``N_i = sum_{s,t} (L_i L_i^T)_st (R_i R_i^T)_st`` and its error bound.

    Example:
      >>> import torch
      >>> from fundp.engines.ghost._norms import Shared, _ghost_sq_norm
      >>> left, right = torch.ones(1, 2, 3), torch.tensor([[[1.0, 0.0], [-1.0, 1e-4]]])
      >>> n, e = _ghost_sq_norm(left, right, Shared())  # ||L^T R||^2 = 3e-8: lost in float32
      >>> bool(n <= e)
      True
    """
    steps, height, width = left.shape[1], left.shape[2], right.shape[2]
    gram_left, gram_right = shared.gram(left), shared.gram(right)
    prod = gram_left * gram_right
    total = _rows_sum(prod)
    u, u_in = _round_offs(left)
    e_left, e_right = height * u + 2 * u_in, width * u + 2 * u_in
    norm_left = gram_left.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # [B, T]: l_s
    norm_right = gram_right.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    ll_q = torch.einsum("bs,bst,bt->b", norm_left, gram_right.abs(), norm_left)
    p_rr = torch.einsum("bs,bst,bt->b", norm_right, gram_left.abs(), norm_right)
    cross = (norm_left * norm_right).sum(dim=1)
    bound = SLACK * (e_left * ll_q + e_right * p_rr + e_left * e_right * cross.square()
                     + (2 * steps + 2) * u * prod.abs().sum(dim=(1, 2)))
    return total, bound


def _factor_sq_norm(left: torch.Tensor, right: torch.Tensor, shared: Shared | None = None) -> torch.Tensor:
    """``||left_i^T right_i||^2`` per example, flagged examples recomputed (see :func:`_factor_sq_norm_bounded`)."""
    total, bound = _factor_sq_norm_bounded(left, right, shared)
    if bound is None:
        return total
    return _recompute_flagged(total, ~(total > MARGIN * bound), (left, right, None, None), left.shape[2])


def _factor_sq_norm_bounded(left: torch.Tensor, right: torch.Tensor, shared: Shared | None = None) -> tuple[torch.Tensor, Any]:
    """``(||left_i^T right_i||^2, E)`` per example: ghost form (with its error bound ``E``) if
    ``2 T^2 <= p d``, else materialised (``E = None``: no cancellation beyond the gradient's own)."""
    steps, height, width = left.shape[1], left.shape[2], right.shape[2]
    if steps == 1:
        return left.square().sum(dim=(1, 2)) * right.square().sum(dim=(1, 2)), None
    if 2 * steps * steps <= width * height and _bound_is_useful(height, width, 2 * steps + 2, dtype=left.dtype):
        return _ghost_sq_norm(left, right, shared or Shared())
    return _materialised_sq_norm(left, right), None


def _materialised_sq_norm(left: Any, right: Any, ids: Any = None, id_rows: Any = None, num_rows: int = 0) -> torch.Tensor:
    """``||left_i^T right_i + sum_s onehot(ids_is)^T id_rows_is||^2`` per example, the gradient
    materialised (``[chunk, p, d]`` at a time, at most ``2^24`` entries beyond one example)."""
    source = left if left is not None else id_rows
    size = source.shape[0]
    height = left.shape[2] if left is not None else num_rows
    width = right.shape[2] if right is not None else id_rows.shape[2]
    chunk = max(1, (1 << 24) // max(1, height * width))
    norms = []
    for start in range(0, size, chunk):
        stop = min(size, start + chunk)
        if left is not None:
            grads = torch.bmm(left[start:stop].transpose(1, 2), right[start:stop])
        else:
            grads = torch.zeros((stop - start, height, width), dtype=source.dtype, device=source.device)
        if ids is not None:
            rows = ids[start:stop] + height * torch.arange(stop - start, device=ids.device).unsqueeze(1)
            grads = grads.reshape(-1, width).index_add(0, rows.reshape(-1), id_rows[start:stop].reshape(-1, width))
            grads = grads.reshape(stop - start, height, width)
        norms.append(_rows_sum(grads.square()))
    return norms[0] if len(norms) == 1 else torch.cat(norms)


def _recompute_flagged(total: torch.Tensor, flagged: torch.Tensor, parts: tuple, num_rows: int) -> torch.Tensor:
    """``total`` with the ``flagged`` examples' squared norms recomputed materialised (only those).

    ``parts``: ``(left, right, ids, id_rows)`` of :func:`_materialised_sq_norm` (``None`` where
    absent).  Eagerly the flagged rows are picked out.  Under ``torch.compile`` (no data-dependent
    shapes in a graph) the same code runs as the opaque op ``fundp::recompute_flagged``, eagerly
    each time the graph runs: one node, whose inputs are tensors the norms computed anyway.  (A
    ``torch.cond`` here cost the compiled transformer step 13-57%: its operands left the fused
    kernels; see benchmarks/RESULTS.md.)  On an accelerator the op reads ``flagged.any()`` on the
    host, one small synchronisation per ghost-form layer, as the ``torch.cond`` did.
    """
    if is_compiling():
        return _recompute_flagged_op(total, flagged, *parts, num_rows)
    return _recompute_flagged_eagerly(total, flagged, parts, num_rows)


def _recompute_flagged_eagerly(total: torch.Tensor, flagged: torch.Tensor, parts: tuple, num_rows: int) -> torch.Tensor:
    index = flagged.nonzero().squeeze(1)
    if index.numel() == 0:
        return total
    picked: list[Any] = [None if t is None else t.index_select(0, index) for t in parts]
    return total.index_put((index,), _materialised_sq_norm(*picked, num_rows=num_rows))  # type: ignore[misc]


@torch.library.custom_op("fundp::recompute_flagged", mutates_args=())
def _recompute_flagged_op(total: torch.Tensor, flagged: torch.Tensor, left: torch.Tensor | None,
                          right: torch.Tensor | None, ids: torch.Tensor | None, id_rows: torch.Tensor | None,
                          num_rows: int) -> torch.Tensor:
    return _recompute_flagged_eagerly(total, flagged, (left, right, ids, id_rows), num_rows).clone()


@_recompute_flagged_op.register_fake
def _(total, flagged, left, right, ids, id_rows, num_rows):
    return torch.empty_like(total)


def _cross_term(left: torch.Tensor, right: torch.Tensor, ids: torch.Tensor, id_rows: torch.Tensor) -> tuple:
    """``(2 <S_i, H_i>, sum_{t,s} |left_i[t, ids_s]| ||right_it|| ||id_rows_is||)`` with
    ``S_i = sum_s onehot(ids_s)^T id_rows_s`` and ``H_i = left_i^T right_i`` (the second: the
    cross term's size, for its error bound)."""
    index = ids.unsqueeze(1).expand(-1, left.shape[1], -1)
    gathered = left.gather(2, index)  # [B, T_f, T_ids]: left_i[t, ids_s]
    inner = torch.bmm(right, id_rows.transpose(1, 2))  # [B, T_f, T_ids]
    size = torch.einsum("bts,bt,bs->b", gathered.abs(), right.norm(dim=2), id_rows.norm(dim=2))
    return 2 * _rows_sum(gathered * inner), size


def _tied_bound(left: torch.Tensor, right: torch.Tensor, ids: torch.Tensor, id_rows: torch.Tensor,
                cross_size: torch.Tensor) -> torch.Tensor:
    """Error bound of ``||H||^2 + ||S||^2 + 2 <S, H>`` (a tied table: ``H = L^T R``, ``S`` the
    lookups), which cancels when ``S ~ -H``.  Every part's error is bounded by the worst case
    (Higham §3.1, ``e_n = n u + 2 u_in``) over its own size: ``||H||^2`` in any of its forms by
    ``e_{2T + p + d + 4} (sum_t l_t r_t)^2`` (``||H^ - H|| <= gamma_T sum_t l_t r_t``, then the
    squares summed per row and across rows in float64), ``||S||^2`` by
    ``e_{2T' + d + 4} (sum_s rho_s)^2`` (``rho_s = ||id_rows_s||``), and the cross term by
    ``2 e_{d + T + T' + 4} sum |L[t, ids_s]| r_t rho_s``; times ``SLACK`` as in the ghost bound."""
    u, u_in = _round_offs(left)
    steps, height, width, lookups = left.shape[1], left.shape[2], right.shape[2], ids.shape[1]
    factor_size = (left.norm(dim=2) * right.norm(dim=2)).sum(dim=1).square()
    ids_size = id_rows.norm(dim=2).sum(dim=1).square()
    return SLACK * ((2 * steps + height + width + 4) * u * factor_size + (2 * lookups + width + 4) * u * ids_size
                    + 2 * (width + steps + lookups + 4) * u * cross_size
                    + 2 * u_in * (factor_size + ids_size + 2 * cross_size))


def _ids_sq_norm(ids: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    sorted_ids, order = ids.sort(dim=1)
    grads = right.gather(1, order.unsqueeze(-1).expand_as(right))
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    segment = (starts.cumsum(dim=1) - 1).unsqueeze(-1).expand_as(grads)
    sums = torch.zeros_like(grads).scatter_add_(1, segment, grads)
    return _rows_sum(sums.square())


def _joined(tensors: list) -> Any:
    """The uses' tensors concatenated along ``T`` (``None`` for none, the tensor itself for one)."""
    if not tensors:
        return None
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


def _form_tensors(form: Any) -> list:
    """The floating-point tensors a use's per-example gradients are formed from."""
    return [t for t in form if isinstance(t, torch.Tensor) and t.is_floating_point()]


class LeafGrads:
    """All uses of one parameter after the backward: its ``[B]`` squared norms and weighted sum."""

    def __init__(self, leaf: torch.Tensor, forms: list):
        self.leaf = leaf
        self.dtype = norm_dtype(leaf.dtype)
        self.sum_dtype = sum_dtype(leaf.dtype, *(t.dtype for form in forms for t in _form_tensors(form)))
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
        bound: Any = None
        if left is not None:
            if id_rows is not None:  # both parts on the common scale
                right = right * (scales[0] / safe).reshape(-1, 1, 1)
            total, bound = _factor_sq_norm_bounded(left, right, shared)
        if id_rows is not None:
            id_rows = id_rows * (scales[-1] / safe).reshape(-1, 1, 1)
            part = _ids_sq_norm(self.ids, id_rows)
            total = part if total is None else total + part
            if left is not None:
                cross, size = _cross_term(left, right, self.ids, id_rows)
                total = total + cross
                bound = _tied_bound(left, right, self.ids, id_rows, size)
        if bound is not None:
            # Within the error bound of zero, negative, or not known to 1 / MARGIN: materialised.
            flagged = usable & ~(total > MARGIN * bound)
            total = _recompute_flagged(total, flagged, (left, right, self.ids, id_rows), self.leaf.shape[0])
        total = torch.where(usable, total, torch.zeros_like(total))
        shared.release(*self.factor_tensors())
        return ScaledSqNorm(scale, total)

    def weighted_sum(self, factors: torch.Tensor) -> torch.Tensor:
        with full_precision(self.leaf.device):
            return self._weighted_sum(factors)

    def _weighted_sum(self, factors: torch.Tensor) -> torch.Tensor:
        """``sum_i c_i g_i`` in :func:`sum_dtype` (not rounded to the parameter dtype: the step
        adds the noise to it and rounds once, at the end)."""
        dtype = self.sum_dtype
        if self.kind == "rows":
            return _keep_rows(factors, self.rows, scale=True, dtype=dtype).sum(dim=0)
        total = torch.zeros(self.leaf.shape, dtype=dtype, device=self.leaf.device)
        if self.left is not None:
            left = _keep_rows(factors, self.left, scale=True, dtype=dtype)
            right = _keep_rows(factors, self.right, scale=False, dtype=dtype)
            total = total + left.reshape(-1, left.shape[-1]).T @ right.reshape(-1, right.shape[-1])
        if self.ids is not None:
            rows = _keep_rows(factors, self.id_rows, scale=True, dtype=dtype)
            total = total.index_add(0, self.ids.reshape(-1), rows.reshape(-1, rows.shape[-1]))
        return total


class RowsLeaf:
    """A leaf whose per-example gradients come from ``vmap(grad)`` (the mixed plan)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def factor_tensors(self) -> list:
        return []

    def sq_norms(self, shared: Shared | None = None) -> ScaledSqNorm:
        return scaled_sq_norm(self.rows)

    def weighted_sum(self, factors: torch.Tensor) -> torch.Tensor:
        """``sum_i c_i g_i`` multiplied and accumulated in :func:`sum_dtype` (at least float32)."""
        return _keep_rows(factors, self.rows, scale=True, dtype=sum_dtype(self.rows.dtype)).sum(dim=0)


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
    devices = [h.leaf.device for h in handlers if isinstance(h, LeafGrads)]
    with full_precision(devices[0] if devices else torch.device("cpu")):
        return [None if handler is None else handler.sq_norms(shared) for handler in handlers]


def full_precision(device: torch.device) -> Any:
    """A context with autocast off on ``device``'s type: the norms and sums run in their own dtype
    (float32 or float64, see :func:`~fundp.clipping.norm_dtype`), not in the user's autocast dtype,
    so their error bounds hold with that dtype's unit round-off.

    Example:
      >>> import torch
      >>> from fundp.engines.ghost._norms import full_precision
      >>> with torch.autocast("cpu", dtype=torch.bfloat16), full_precision(torch.device("cpu")):
      ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
      torch.float32
    """
    return torch.autocast(device.type, enabled=False)
