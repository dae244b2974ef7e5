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

Non-finite examples: an example whose gradient has a NaN or Inf anywhere (or whose squared norm
overflows the accumulation dtype) is dropped — its clip factor is 0 and its clipped gradient is
exactly 0, selected with ``torch.where`` so the NaN cannot reach the sum.  Dropping an example
never increases the sensitivity, so the privacy guarantee is unchanged; ``dp_step`` counts the
dropped examples in ``num_nonfinite``.  Rows with ``mask == False`` are zeroed the same way.
"""

from __future__ import annotations

import math
from typing import Any

import optree
import torch

from fundp._validate import check_mask, check_number

__all__ = [
    "per_sample_norms",
    "per_sample_sq_norms",
    "clip_factors",
    "clip",
    "clip_sensitivity",
    "CLIP_STYLES",
]

CLIP_STYLES = ("flat", "per_layer", "automatic")


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms are accumulated in: float64 for float64 leaves, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _leaf_sq_norm(leaf: torch.Tensor) -> torch.Tensor:
    if leaf.dim() == 0:
        raise ValueError("per-example gradients need a leading batch dimension, got a scalar leaf")
    values = leaf.to(norm_dtype(leaf.dtype))
    if leaf.dim() == 1:
        return values.square()
    return values.square().sum(dim=tuple(range(1, leaf.dim())))


def per_sample_sq_norms(grads: Any) -> Any:
    """Returns a pytree like ``grads`` whose leaves are ``[B]`` squared norms ``||g_il||^2``."""
    return optree.tree_map(_leaf_sq_norm, grads)


def _total(sq_norms: Any) -> torch.Tensor:
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

    With ``per_layer=True`` returns a pytree of ``[B]`` norms, one per leaf.

    Example:
      >>> import torch, fundp
      >>> g = {"a": torch.tensor([[3.0], [0.0]]), "b": torch.tensor([[4.0, 0.0], [0.0, 1.0]])}
      >>> fundp.per_sample_norms(g)
      tensor([5., 1.])
    """
    sq_norms = per_sample_sq_norms(grads)
    if per_layer:
        return optree.tree_map(torch.sqrt, sq_norms)
    return torch.sqrt(_total(sq_norms))


def _check_style(style: str, gamma: float) -> float:
    if style not in CLIP_STYLES:
        raise ValueError(f"style must be one of {CLIP_STYLES}, got {style!r}")
    gamma = check_number("gamma", gamma, positive=True)
    if style == "automatic" and gamma <= 0:
        raise ValueError(f"gamma must be > 0 for automatic clipping, got {gamma}")
    return gamma


def _check_max_norm(max_norm: Any) -> float:
    value = check_number("max_norm", max_norm, positive=True)
    if value <= 0:
        raise ValueError(f"max_norm must be > 0, got {value}")
    return value


def clip_factors(norms: torch.Tensor, max_norm: float, *, style: str = "flat", gamma: float = 0.01) -> torch.Tensor:
    """Returns the ``[B]`` factors ``c_i`` that clipping multiplies each example's gradient by.

    ``"flat"``/``"per_layer"``: ``c_i = min(1, C / ||g_i||)`` (1 for a zero gradient);
    ``"automatic"``: ``c_i = C / (||g_i|| + gamma)``.  A non-finite norm gives ``c_i = 0``.
    """
    gamma = _check_style(style, gamma)
    max_norm = _check_max_norm(max_norm)
    finite = torch.isfinite(norms)
    safe = torch.where(finite, norms, torch.zeros_like(norms))
    if style == "automatic":
        factors = max_norm / (safe + gamma)
    else:
        # clamp_min keeps C / 0 finite; the min(1, .) then yields exactly 1 for a zero gradient.
        factors = torch.clamp(max_norm / torch.clamp_min(safe, 1e-30), max=1.0)
    return torch.where(finite, factors, torch.zeros_like(factors))


def clip_sensitivity(max_norm: Any, *, style: str = "flat", params: Any = None) -> float:
    """Returns the L2 sensitivity of the clipped sum: ``C``, or ``sqrt(sum_l C_l^2)`` per layer.

    For ``style="per_layer"`` with one number ``C`` for every leaf, ``params`` (or per-example
    grads) is needed to count the leaves: the sensitivity is then ``C * sqrt(num_leaves)``.
    """
    _check_style(style, 0.01)
    if style != "per_layer":
        return _check_max_norm(max_norm)
    if isinstance(max_norm, (int, float, torch.Tensor)) and not isinstance(max_norm, bool):
        if params is None:
            raise ValueError("per_layer clipping with one max_norm needs params to count the layers")
        return _check_max_norm(max_norm) * math.sqrt(len(optree.tree_leaves(params)))
    thresholds = [_check_max_norm(c) for c in optree.tree_leaves(max_norm)]
    if not thresholds:
        raise ValueError("max_norm must hold at least one threshold")
    return math.sqrt(sum(c * c for c in thresholds))


def _broadcast_rows(row_values: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    return row_values.reshape((-1,) + (1,) * (leaf.dim() - 1))


def per_layer_thresholds(max_norm: Any, grads: Any) -> Any:
    """Returns a pytree like ``grads`` holding each leaf's threshold (``max_norm`` broadcast)."""
    if isinstance(max_norm, (int, float, torch.Tensor)) and not isinstance(max_norm, bool):
        value = _check_max_norm(max_norm)
        return optree.tree_map(lambda _: value, grads)
    try:
        return optree.tree_map(lambda _, c: _check_max_norm(c), grads, max_norm)
    except ValueError as error:
        if "must be" in str(error):
            raise
        raise ValueError(
            "max_norm for per_layer clipping must be one number or a pytree with the same "
            f"structure as params/grads: {error}"
        ) from None


def factors_for(sq_norms: Any, max_norm: Any, *, style: str, gamma: float) -> tuple[Any, torch.Tensor]:
    """Clip factors from per-leaf squared norms.

    Returns ``(factors, global_norms)``: ``factors`` is a pytree like ``sq_norms`` of ``[B]``
    factors (the same tensor for every leaf unless ``style="per_layer"``).  An example with any
    non-finite leaf norm gets factor 0 in every leaf.
    """
    norms = torch.sqrt(_total(sq_norms))
    if style != "per_layer":
        factors = clip_factors(norms, max_norm, style=style, gamma=gamma)
        return optree.tree_map(lambda _: factors, sq_norms), norms
    finite = torch.isfinite(norms)
    thresholds = per_layer_thresholds(max_norm, sq_norms)

    def leaf_factor(sq_norm, threshold):
        factor = clip_factors(torch.sqrt(sq_norm).to(norms.dtype), threshold, style="flat")
        return torch.where(finite, factor, torch.zeros_like(factor))

    return optree.tree_map(leaf_factor, sq_norms, thresholds), norms


def scale_rows(grads: Any, factors: Any) -> Any:
    """Returns ``c_i * g_i`` per leaf; rows with ``c_i == 0`` are exactly 0 even if ``g_i`` is NaN."""

    def scale(leaf, factor):
        rows = _broadcast_rows(factor, leaf)
        scaled = leaf * rows.to(leaf.dtype)
        return torch.where(rows != 0, scaled, torch.zeros_like(scaled))

    return optree.tree_map(scale, grads, factors)


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
    with ``mask == False`` come back as exact zeros (see the module docstring).

    Example:
      >>> import torch, fundp
      >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
      >>> fundp.clip(g, 1.0)["w"]
      tensor([[0.6000, 0.8000],
              [0.3000, 0.4000]])
    """
    _check_style(style, gamma)
    sq_norms = per_sample_sq_norms(grads)
    factors, norms = factors_for(sq_norms, max_norm, style=style, gamma=gamma)
    if mask is not None:
        check_mask(mask, norms.shape[0])
        factors = optree.tree_map(lambda f: torch.where(mask, f, torch.zeros_like(f)), factors)
    return scale_rows(grads, factors)
