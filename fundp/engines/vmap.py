"""The ``"vmap"`` engine: materialise per-example gradients with ``vmap(grad)``; works for any model."""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

from fundp.clipping import SUM_DTYPE, scaled_sq_norm, weighted_row_sum
from fundp.engines.base import EngineOutput
from fundp.grads import per_sample_grads_and_losses


def make_vmap_engine(loss_fn: Callable, *, has_aux: bool = False, randomness: str = "error") -> Callable:
    """Returns ``engine(params, batch, key) -> EngineOutput`` backed by materialised gradients.

    ``sq_norms`` are :class:`fundp.clipping.ScaledSqNorm` s (no overflow for huge finite
    gradients), accumulated in float64 so that ``c_i ||g_i|| <= C`` holds to ``~1e-15`` whatever
    the gradients' dtype; ``weighted_sum`` multiplies and sums in float64 and returns float64
    (:func:`fundp.clipping.weighted_row_sum`); ``aux`` is per-example, leaves ``[B, ...]``.

    Example:
      >>> import torch
      >>> from fundp.engines.vmap import make_vmap_engine
      >>> out = make_vmap_engine(lambda p, b: b @ p["w"])({"w": torch.zeros(2)}, torch.tensor([[3.0, 4.0]]))
      >>> out.sq_norms["w"].scale * out.sq_norms["w"].scaled.sqrt()
      tensor([5.], dtype=torch.float64)
    """
    grads_and_losses = per_sample_grads_and_losses(loss_fn, has_aux=has_aux, randomness=randomness)

    def engine(params: Any, batch: Any, key: torch.Tensor | None = None) -> EngineOutput:
        grads, losses, aux = grads_and_losses(params, batch, key)

        def weighted_sum(factors: Any) -> Any:
            return weighted_row_sum(grads, factors)

        sq_norms = optree.tree_map(lambda leaf: scaled_sq_norm(leaf, SUM_DTYPE), grads)
        return EngineOutput(sq_norms, losses, aux, weighted_sum)

    return engine
