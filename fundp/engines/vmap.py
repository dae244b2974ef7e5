"""The ``"vmap"`` engine: materialise per-example gradients with ``vmap(grad)``; works for any model."""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

from fundp.clipping import scale_rows, scaled_sq_norm
from fundp.engines.base import EngineOutput
from fundp.grads import per_sample_grads_and_losses


def _sum_rows(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.sum(dim=0)


def make_vmap_engine(loss_fn: Callable, *, has_aux: bool = False, randomness: str = "error") -> Callable:
    """Returns ``engine(params, batch, key) -> EngineOutput`` backed by materialised gradients.

    ``sq_norms`` are :class:`fundp.clipping.ScaledSqNorm` s (no overflow for huge finite
    gradients); ``aux`` is per-example, leaves ``[B, ...]``.

    Example:
      >>> import torch
      >>> from fundp.engines.vmap import make_vmap_engine
      >>> out = make_vmap_engine(lambda p, b: b @ p["w"])({"w": torch.zeros(2)}, torch.tensor([[3.0, 4.0]]))
      >>> out.sq_norms["w"].scale * out.sq_norms["w"].scaled.sqrt()
      tensor([5.])
    """
    grads_and_losses = per_sample_grads_and_losses(loss_fn, has_aux=has_aux, randomness=randomness)

    def engine(params: Any, batch: Any, key: torch.Tensor | None = None) -> EngineOutput:
        grads, losses, aux = grads_and_losses(params, batch, key)

        def weighted_sum(factors: Any) -> Any:
            return optree.tree_map(_sum_rows, scale_rows(grads, factors))

        return EngineOutput(optree.tree_map(scaled_sq_norm, grads), losses, aux, weighted_sum)

    return engine
