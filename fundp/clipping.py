"""Per-example norms and clipping of per-example gradient pytrees.

Every function here takes per-example gradients: a pytree whose leaves have shape
``[B, *param.shape]``.  Norms are accumulated in at least float32 (float64 for float64 leaves).

Clipping styles (``style=``):

* ``"flat"`` (default): ``g_i * min(1, C / ||g_i||)`` with ``||g_i||`` the L2 norm over all leaves.
  Sensitivity ``C``.
* ``"per_layer"``: every leaf ``l`` is clipped on its own, ``g_il * min(1, C_l / ||g_il||)``, with
  ``max_norm`` a pytree of thresholds matching the gradients (or one number for every leaf).
  Sensitivity ``sqrt(sum_l C_l^2)``.
* ``"automatic"`` (normalised clipping, Bu et al. 2022): ``g_i * C / (||g_i|| + gamma)``.  Every
  clipped norm is below ``C``, so the sensitivity is ``C``.

Huge but finite gradients: norms are computed with scaling (:class:`ScaledSqNorm`: the row's
largest entry is factored out before squaring), so a finite gradient whose squared norm would
overflow the accumulation dtype is still clipped exactly, never dropped.

Low precision (bfloat16, float16, autocast): clipping must keep its promise in the dtype the
rows are *stored* in, and the clipped sum must keep its sensitivity.  So

* the rows a clipped sum is formed from (:func:`weighted_row_sum`) are multiplied and summed in
  float64 (:data:`SUM_DTYPE`) and returned in float64: a bfloat16 accumulator rounds a sum of
  ``B`` terms to 8 bits (one example moved it by 2 C), and even float32 moves it by up to
  ``~B 2^-24`` of its size (measured 1.2e-4 C at B = 4096), while float64 keeps every difference
  within ``B^2 2^-53 C`` (2e-9 C at B = 4096).  Noise is then added to that sum, and the result
  rounded once to the parameter dtype (:func:`fundp.privatize`);
* :func:`clip` returns rows in the gradients' dtype whose stored values have norm ``<= C``: the
  norms behind the factors are taken in float64 (:func:`scaled_sq_norm` with ``dtype``), the
  product ``c_i g_i`` is formed in float64 and rounded *toward zero* to the stored dtype
  (:func:`round_toward_zero`), so no entry grows in magnitude.

Non-finite examples: an example whose gradient has a NaN or Inf anywhere is dropped — its clip factor is 0 and its clipped gradient is
exactly 0, selected with ``torch.where`` so the NaN cannot reach the sum.  Dropping an example
never increases the sensitivity, so the privacy guarantee is unchanged; ``dp_step`` counts the
dropped examples in ``num_nonfinite``.  Rows with ``mask == False`` are zeroed the same way.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import optree
import torch

from fundp._validate import check_mask, check_positive

__all__ = [
    "per_sample_norms",
    "per_sample_sq_norms",
    "clip_factors",
    "clip",
    "clip_sensitivity",
    "CLIP_STYLES",
    "ScaledSqNorm",
    "scaled_sq_norm",
    "usable_scales",
    "normalised_rows",
    "clip_factors_from_sq_norms",
    "SUM_DTYPE",
    "round_toward_zero",
    "weighted_row_sum",
    "check_clippable",
]

CLIP_STYLES = ("flat", "per_layer", "automatic")


SUM_DTYPE = torch.float64
"""The dtype clipped sums are accumulated and returned in, whatever the gradients' dtype (see the
module docstring: float32 cannot hold a sum of ``B`` clipped rows to ``1e-6 C``)."""


def check_clippable(leaf: Any, name: str = "grads") -> None:
    """Refuses what clipping cannot bound: complex leaves (the L2 norm of a complex gradient is
    the modulus norm; fundp clips real parameters only) and integer / bool leaves (a gradient is
    never integer, and scaling one by ``c < 1`` would truncate it to 0).

    Example:
      >>> import torch
      >>> from fundp.clipping import check_clippable
      >>> check_clippable(torch.tensor([[3, 4]]))
      Traceback (most recent call last):
      ...
      TypeError: grads must hold floating-point tensors; got a leaf of dtype torch.int64 ...
    """
    if not isinstance(leaf, torch.Tensor):
        raise TypeError(f"{name} must hold tensors, got a leaf of type {type(leaf).__name__}")
    if leaf.dtype.is_complex:
        raise TypeError(
            f"{name} has a complex leaf ({leaf.dtype}): fundp clips real gradients only (clipping by the "
            "real part's norm would break the sensitivity). Split complex parameters into real and "
            "imaginary parts (torch.view_as_real) before computing gradients"
        )
    if not leaf.dtype.is_floating_point:
        raise TypeError(
            f"{name} must hold floating-point tensors; got a leaf of dtype {leaf.dtype} (an integer "
            "gradient scaled by a clip factor < 1 would be truncated)"
        )


def round_toward_zero(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` rounded to ``dtype`` toward zero: ``|out_j| <= |values_j|`` for every entry, so a
    row's norm never grows when it is stored in a narrower dtype.

    Example:
      >>> import torch
      >>> from fundp.clipping import round_toward_zero
      >>> x = torch.tensor([1.0 - 2**-10, -(1.0 - 2**-10)], dtype=torch.float64)
      >>> x.to(torch.bfloat16), round_toward_zero(x, torch.bfloat16)  # nearest rounds up to 1
      (tensor([ 1., -1.], dtype=torch.bfloat16), tensor([ 0.9961, -0.9961], dtype=torch.bfloat16))
    """
    if values.dtype == dtype:
        return values
    nearest = values.to(dtype)
    grew = nearest.to(values.dtype).abs() > values.abs()
    return torch.where(grew, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms are accumulated in: float64 for float64 leaves, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _leaf_sq_norm(leaf: torch.Tensor) -> torch.Tensor:
    if leaf.dim() == 0:
        raise ValueError("per-example gradients need a leading batch dimension, got a scalar leaf")
    check_clippable(leaf)
    values = leaf.to(norm_dtype(leaf.dtype))
    if leaf.dim() == 1:
        return values.square()
    return values.square().sum(dim=tuple(range(1, leaf.dim())))


def per_sample_sq_norms(grads: Any) -> Any:
    """Returns a pytree like ``grads`` whose leaves are ``[B]`` squared norms ``||g_il||^2``.

    Example:
      >>> import torch
      >>> from fundp.clipping import per_sample_sq_norms
      >>> g = {"a": torch.tensor([[3.0], [0.0]]), "b": torch.tensor([[4.0, 0.0], [0.0, 1.0]])}
      >>> per_sample_sq_norms(g)
      {'a': tensor([9., 0.]), 'b': tensor([16.,  1.])}
    """
    return optree.tree_map(_leaf_sq_norm, grads)


class ScaledSqNorm(NamedTuple):
    """A squared norm that cannot overflow: ``||g||^2 = scale^2 * scaled`` per example.

    ``scale`` is ``max_j |g_j|`` of the row (``[B]``, 0 for a zero row; NaN/Inf when the row is
    not finite) and ``scaled = sum_j (g_j / scale)^2`` (``[B]``, in ``[1, numel]`` or 0), so a
    finite but huge gradient (``|g_j| = 1e30`` in float32, whose square overflows) keeps an
    exact, finite representation and is clipped instead of dropped.  Engines may return these
    leaves in ``EngineOutput.sq_norms`` instead of plain squared norms.

    Example:
      >>> import torch
      >>> from fundp.clipping import ScaledSqNorm
      >>> s = ScaledSqNorm(scale=torch.tensor([4.0]), scaled=torch.tensor([1.5625]))
      >>> s.scale**2 * s.scaled  # ||(3, 4)||^2
      tensor([25.])
    """

    scale: torch.Tensor
    scaled: torch.Tensor


def _is_scaled(node: Any) -> bool:
    return isinstance(node, ScaledSqNorm)


def usable_scales(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(usable, safe)`` for row scales ``[B]``: ``usable`` where the scale is finite and > 0,
    ``safe`` the scale there and 1 elsewhere (always safe to divide by).

    Example:
      >>> import torch
      >>> from fundp.clipping import usable_scales
      >>> usable_scales(torch.tensor([2.0, 0.0, float("inf")]))
      (tensor([ True, False, False]), tensor([2., 1., 1.]))
    """
    usable = torch.isfinite(scale) & (scale > 0)
    return usable, torch.where(usable, scale, torch.ones_like(scale))


def normalised_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, tensor / s)`` for ``tensor [B, ...]`` with ``s [B]`` each row's largest absolute entry
    (rows where ``s`` is 0 or not finite are divided by 1).

    Example:
      >>> import torch
      >>> from fundp.clipping import normalised_rows
      >>> normalised_rows(torch.tensor([[3.0, -4.0], [0.0, 0.0]]))
      (tensor([4., 0.]), tensor([[ 0.7500, -1.0000],
              [ 0.0000,  0.0000]]))
    """
    scale = tensor.abs().amax(dim=tuple(range(1, tensor.dim())))
    _, safe = usable_scales(scale)
    return scale, tensor / safe.reshape((-1,) + (1,) * (tensor.dim() - 1))


def scaled_sq_norm(leaf: torch.Tensor, dtype: torch.dtype | None = None) -> ScaledSqNorm:
    """Returns the :class:`ScaledSqNorm` of each row of ``leaf: [B, ...]`` (no overflow).

    Accumulated in ``dtype`` (default: float32, float64 for float64 leaves); materialised rows
    that are clipped here use float64, so the factor ``C / ||g_i||`` is exact to ``~1e-15``.

    Example:
      >>> import torch
      >>> from fundp.clipping import scaled_sq_norm
      >>> s = scaled_sq_norm(torch.tensor([[3e30, 4e30], [0.0, 0.0]]))
      >>> s.scale, s.scaled
      (tensor([4.0000e+30, 0.0000e+00]), tensor([1.5625, 0.0000]))
    """
    if leaf.dim() == 0:
        raise ValueError("per-example gradients need a leading batch dimension, got a scalar leaf")
    check_clippable(leaf)
    values = leaf.to(norm_dtype(leaf.dtype) if dtype is None else dtype)
    values = values.flatten(1) if values.dim() > 1 else values.unsqueeze(1)
    if values.shape[1] == 0:
        zeros = values.new_zeros(values.shape[0])
        return ScaledSqNorm(zeros, zeros)
    scale, normalised = normalised_rows(values)
    usable, _ = usable_scales(scale)
    scaled = normalised.square().sum(dim=1)
    return ScaledSqNorm(scale, torch.where(usable, scaled, torch.zeros_like(scaled)))


def _as_scaled(sq_norm: Any) -> ScaledSqNorm:
    """A plain squared norm ``s`` as ``(sqrt(s), 1)`` (``(0, 0)`` for 0): exact, never overflows."""
    if isinstance(sq_norm, ScaledSqNorm):
        return sq_norm
    scale = torch.sqrt(sq_norm)
    return ScaledSqNorm(scale, (sq_norm > 0).to(scale.dtype))


class _Norms(NamedTuple):
    max_scale: torch.Tensor  # [B] largest leaf scale M (1 where unusable)
    root: torch.Tensor  # [B] sqrt(sum_l (scale_l / M)^2 scaled_l): the norm is M * root
    finite: torch.Tensor  # [B] bool: every leaf of the row is finite
    norms: torch.Tensor  # [B] the global norm M * root (may be Inf for a norm beyond the dtype's range)


def _global_norms(sq_norms: Any) -> _Norms:
    leaves = [_as_scaled(leaf) for leaf in optree.tree_leaves(sq_norms, is_leaf=_is_scaled)]
    if not leaves:
        raise ValueError("grads must contain at least one tensor")
    dtype = torch.float64 if any(leaf.scale.dtype == torch.float64 for leaf in leaves) else torch.float32
    scales = torch.stack([leaf.scale.to(dtype) for leaf in leaves])
    scaled = torch.stack([leaf.scaled.to(dtype) for leaf in leaves])
    finite = torch.isfinite(scales).all(dim=0)
    top = scales.amax(dim=0)
    usable = finite & (top > 0)
    safe = torch.where(usable, top, torch.ones_like(top))
    ratios = torch.where(usable.unsqueeze(0), scales / safe, torch.zeros_like(scales))
    root = torch.sqrt((ratios.square() * scaled).sum(dim=0))
    root = torch.where(finite, root, torch.zeros_like(root))
    norms = torch.where(finite, safe * root, top.abs() if top.dtype.is_floating_point else top)
    return _Norms(safe, root, finite, norms)


def _total(sq_norms: Any) -> torch.Tensor:
    """``[B]`` sum of the leaves' plain squared norms (may overflow; see :class:`ScaledSqNorm`)."""
    leaves = optree.tree_leaves(sq_norms)
    if not leaves:
        raise ValueError("grads must contain at least one tensor")
    dtype = torch.float64 if any(leaf.dtype == torch.float64 for leaf in leaves) else torch.float32
    total = leaves[0].to(dtype)
    for leaf in leaves[1:]:
        total = total + leaf.to(dtype)
    return total


def per_sample_norms(grads: Any, *, per_layer: bool = False) -> Any:
    """Returns ``[B]`` global L2 norms ``||g_i|| = sqrt(sum_l ||g_il||^2)`` over all leaves.

    With ``per_layer=True`` returns a pytree of ``[B]`` norms, one per leaf.  Computed with
    scaling (:class:`ScaledSqNorm`), so a huge but finite gradient has a finite norm as long as
    the norm itself fits the dtype.

    Example:
      >>> import torch, fundp
      >>> g = {"a": torch.tensor([[3.0], [0.0]]), "b": torch.tensor([[4.0, 0.0], [0.0, 1.0]])}
      >>> fundp.per_sample_norms(g)
      tensor([5., 1.])
    """
    scaled = optree.tree_map(scaled_sq_norm, grads)
    if per_layer:
        return optree.tree_map(lambda s: s.scale * torch.sqrt(s.scaled), scaled, is_leaf=_is_scaled)
    return _global_norms(scaled).norms


def _check_style(style: str, gamma: Any) -> float:
    if style not in CLIP_STYLES:
        raise ValueError(f"style must be one of {CLIP_STYLES}, got {style!r}")
    return check_positive("gamma", gamma)


def is_threshold_tensor(value: Any) -> bool:
    """A 0-d floating tensor threshold: traced by ``torch.compile``, never read as a number."""
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype.is_floating_point


def check_max_norm(max_norm: Any, name: str = "max_norm") -> Any:
    """Returns ``max_norm`` as a float after checking ``0 < max_norm < inf``; a 0-d floating tensor
    is returned as is (its value is checked only when that costs no device sync: a CPU tensor,
    outside ``torch.compile``).

    Example:
      >>> import torch
      >>> from fundp.clipping import check_max_norm
      >>> check_max_norm(2), check_max_norm(torch.tensor(0.5))
      (2.0, tensor(0.5000))
    """
    if is_threshold_tensor(max_norm):
        if max_norm.device.type == "cpu" and not torch.compiler.is_compiling():
            check_positive(name, max_norm)
        return max_norm
    return check_positive(name, max_norm)


def clip_factors(norms: torch.Tensor, max_norm: Any, *, style: str = "flat", gamma: float = 0.01) -> torch.Tensor:
    """Returns the ``[B]`` factors ``c_i`` that clipping multiplies each example's gradient by.

    ``"flat"``/``"per_layer"``: ``c_i = min(1, C / ||g_i||)`` (1 for a zero gradient);
    ``"automatic"``: ``c_i = C / (||g_i|| + gamma)``.  A non-finite norm gives ``c_i = 0``.
    ``max_norm`` is a number or a 0-d tensor.

    Example:
      >>> import torch, fundp
      >>> fundp.clip_factors(torch.tensor([0.5, 4.0, float("nan")]), 2.0)
      tensor([1.0000, 0.5000, 0.0000])
    """
    gamma = _check_style(style, gamma)
    max_norm = check_max_norm(max_norm)
    finite = torch.isfinite(norms)
    safe = torch.where(finite, norms, torch.zeros_like(norms))
    if style == "automatic":
        factors = max_norm / (safe + gamma)
    else:
        # clamp_min keeps C / 0 finite; the min(1, .) then yields exactly 1 for a zero gradient.
        factors = torch.clamp(max_norm / torch.clamp_min(safe, 1e-30), max=1.0)
    return torch.where(finite, factors, torch.zeros_like(factors))


def _is_single_threshold(max_norm: Any) -> bool:
    return isinstance(max_norm, (int, float, torch.Tensor)) and not isinstance(max_norm, bool)


def clip_sensitivity(max_norm: Any, *, style: str = "flat", params: Any = None) -> Any:
    """Returns the L2 sensitivity of the clipped sum: ``C``, or ``sqrt(sum_l C_l^2)`` per layer.

    For ``style="per_layer"`` with one number ``C`` for every leaf, ``params`` (or per-example
    grads) is needed to count the leaves: the sensitivity is then ``C * sqrt(num_leaves)``.
    A float, or a 0-d tensor when a threshold is one.

    Example:
      >>> import torch, fundp
      >>> params = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1), "d": torch.zeros(1)}
      >>> fundp.clip_sensitivity(1.0, style="per_layer", params=params)
      2.0
    """
    _check_style(style, 0.01)
    if style != "per_layer":
        return check_max_norm(max_norm)
    if _is_single_threshold(max_norm):
        if params is None:
            raise ValueError("per_layer clipping with one max_norm needs params to count the layers")
        return check_max_norm(max_norm) * math.sqrt(len(optree.tree_leaves(params)))
    thresholds = [check_max_norm(c) for c in optree.tree_leaves(max_norm)]
    if not thresholds:
        raise ValueError("max_norm must hold at least one threshold")
    if any(isinstance(c, torch.Tensor) for c in thresholds):
        squares = [c * c for c in thresholds]
        total = squares[0]
        for square in squares[1:]:
            total = total + square
        return torch.sqrt(torch.as_tensor(total))
    return math.sqrt(sum(c * c for c in thresholds))


def _broadcast_rows(row_values: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    return row_values.reshape((-1,) + (1,) * (leaf.dim() - 1))


def per_layer_thresholds(max_norm: Any, grads: Any) -> Any:
    """Returns a pytree like ``grads`` holding each leaf's threshold (``max_norm`` broadcast)."""
    if _is_single_threshold(max_norm):
        value = check_max_norm(max_norm)
        return optree.tree_map(lambda _: value, grads, is_leaf=_is_scaled)
    try:
        return optree.tree_map(lambda _, c: check_max_norm(c), grads, max_norm, is_leaf=_is_scaled)
    except ValueError as error:
        if "must be" in str(error):
            raise
        raise ValueError(
            "max_norm for per_layer clipping must be one number or a pytree with the same "
            f"structure as params/grads: {error}"
        ) from None


def clip_factors_from_sq_norms(
    sq_norms: Any, max_norm: Any, *, style: str, gamma: float = 0.01
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Clip factors from per-leaf squared norms, without overflow.

    ``sq_norms`` is a pytree like params whose leaves are ``[B]`` squared norms or
    :class:`ScaledSqNorm` s (the engine contract, :mod:`fundp.engines.base`).  Returns
    ``(factors, norms, finite)``: ``factors`` a pytree like ``sq_norms`` of ``[B]`` factors (the
    same tensor for every leaf unless ``style="per_layer"``), ``norms`` the ``[B]`` global norms
    and ``finite`` the ``[B]`` rows whose every leaf is finite.  A row with any non-finite leaf
    gets factor 0 in every leaf.  Factors are computed from ``C / scale`` and the scaled norm,
    so a huge finite gradient is clipped (its factor is tiny but exact), never dropped.

    Example:
      >>> import torch
      >>> from fundp.clipping import clip_factors_from_sq_norms
      >>> factors, norms, finite = clip_factors_from_sq_norms({"w": torch.tensor([4.0, 0.25])}, 1.0, style="flat")
      >>> factors["w"], norms
      (tensor([0.5000, 1.0000]), tensor([2.0000, 0.5000]))
    """
    gamma = _check_style(style, gamma)
    total = _global_norms(sq_norms)
    finite = total.finite
    if style != "per_layer":
        max_norm = check_max_norm(max_norm)
        # Direct form C / ||g|| while the norm fits the dtype; for a norm beyond its range the
        # scaled form (C / M) / root, M the largest entry (both selected with where, no branch).
        fits = torch.isfinite(total.norms)
        norms = torch.where(fits, total.norms, torch.zeros_like(total.norms))
        relative = max_norm / total.max_scale
        if style == "automatic":
            factor = torch.where(fits, max_norm / (norms + gamma), relative / (total.root + gamma / total.max_scale))
        else:
            direct = max_norm / torch.clamp_min(norms, 1e-30)
            factor = torch.clamp(torch.where(fits, direct, relative / torch.clamp_min(total.root, 1e-30)), max=1.0)
        factor = torch.where(finite, factor, torch.zeros_like(factor))
        return optree.tree_map(lambda _: factor, sq_norms, is_leaf=_is_scaled), total.norms, finite
    thresholds = per_layer_thresholds(max_norm, sq_norms)

    def leaf_factor(sq_norm: Any, threshold: Any) -> torch.Tensor:
        scaled = _as_scaled(sq_norm)
        usable, safe = usable_scales(scaled.scale.to(total.norms.dtype))
        root = torch.sqrt(scaled.scaled.to(total.norms.dtype))
        norm = safe * root
        fits = torch.isfinite(norm)
        direct = threshold / torch.clamp_min(torch.where(fits, norm, torch.zeros_like(norm)), 1e-30)
        factor = torch.clamp(torch.where(fits, direct, (threshold / safe) / torch.clamp_min(root, 1e-30)), max=1.0)
        factor = torch.where(usable, factor, torch.ones_like(factor))
        return torch.where(finite, factor, torch.zeros_like(factor))

    factors = optree.tree_map(leaf_factor, sq_norms, thresholds, is_leaf=_is_scaled)
    return factors, total.norms, finite


def factors_for(sq_norms: Any, max_norm: Any, *, style: str, gamma: float) -> tuple[Any, torch.Tensor]:
    """``clip_factors_from_sq_norms`` without the ``finite`` mask (kept for existing callers)."""
    factors, norms, _ = clip_factors_from_sq_norms(sq_norms, max_norm, style=style, gamma=gamma)
    return factors, norms


def _scaled_rows(leaf: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``c_i * g_i`` in float64 (exact for 16-bit and float32 ``g``: at most 24 + 53 bits are
    rounded once to 53); rows with ``c_i == 0`` are exactly 0 even if ``g_i`` is NaN."""
    rows = _broadcast_rows(factor, leaf).to(SUM_DTYPE)
    scaled = leaf.to(SUM_DTYPE) * rows
    return torch.where(rows != 0, scaled, torch.zeros_like(scaled))


def scale_rows(grads: Any, factors: Any) -> Any:
    """Returns ``c_i * g_i`` per leaf in the leaf's dtype, rounded toward zero (no entry grows), so
    a clipped row stored in bfloat16 has norm ``<= c_i ||g_i||``; rows with ``c_i == 0`` are
    exactly 0 even if ``g_i`` is NaN."""
    return optree.tree_map(lambda leaf, factor: round_toward_zero(_scaled_rows(leaf, factor), leaf.dtype), grads, factors)


def weighted_row_sum(grads: Any, factors: Any) -> Any:
    """Returns ``sum_i c_i g_i`` per leaf, multiplied and accumulated in float64 (:data:`SUM_DTYPE`)
    and returned in float64: one example moves it by ``||c_i g_i||`` up to ``~B^2 2^-53`` relative.

    Example:
      >>> import torch
      >>> from fundp.clipping import weighted_row_sum
      >>> g = {"w": torch.ones(4096, 1, dtype=torch.bfloat16)}
      >>> weighted_row_sum(g, {"w": torch.ones(4096)})["w"]  # a bfloat16 sum would stall at 256
      tensor([4096.], dtype=torch.float64)
    """
    return optree.tree_map(lambda leaf, factor: _scaled_rows(leaf, factor).sum(dim=0), grads, factors)


def clip(
    grads: Any,
    max_norm: Any,
    *,
    style: str = "flat",
    gamma: float = 0.01,
    mask: torch.Tensor | None = None,
) -> Any:
    """Clips per-example gradients (leaves ``[B, ...]``) and returns a pytree of the same shapes.

    ``"flat"``: ``g_i * min(1, C / ||g_i||)``; ``"per_layer"``: ``g_il * min(1, C_l / ||g_il||)``;
    ``"automatic"``: ``g_i * C / (||g_i|| + gamma)``.  Examples with a non-finite gradient and rows
    with ``mask == False`` come back as exact zeros (see the module docstring).  Norms are
    computed with scaling: a huge but finite gradient is clipped, not dropped.  The rows come
    back in the gradients' dtype with norm ``<= C`` in that dtype (see the module docstring);
    complex and integer gradients are refused (``TypeError``).

    Example:
      >>> import torch, fundp
      >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
      >>> fundp.clip(g, 1.0)["w"]
      tensor([[0.6000, 0.8000],
              [0.3000, 0.4000]])
    """
    _check_style(style, gamma)
    sq_norms = optree.tree_map(lambda leaf: scaled_sq_norm(leaf, SUM_DTYPE), grads)
    factors, norms, _ = clip_factors_from_sq_norms(sq_norms, max_norm, style=style, gamma=gamma)
    if mask is not None:
        check_mask(mask, norms.shape[0])
        factors = optree.tree_map(lambda f: torch.where(mask, f, torch.zeros_like(f)), factors)
    return scale_rows(grads, factors)
