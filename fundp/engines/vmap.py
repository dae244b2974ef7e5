"""The ``"vmap"`` engine: materialise per-example gradients with ``vmap(grad)``; works for any model."""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

from fundp.clipping import per_sample_sq_norms, scale_rows
from fundp.engines.base import EngineOutput
from fundp.grads import per_sample_grads_and_losses


def _sum_rows(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.sum(dim=0)


def make_vmap_engine(loss_fn: Callable, *, has_aux: bool = False, randomness: str = "error") -> Callable:
    """Returns ``engine(params, batch, key) -> EngineOutput`` backed by materialised gradients."""
    grads_and_losses = per_sample_grads_and_losses(loss_fn, has_aux=has_aux, randomness=randomness)

    def engine(params: Any, batch: Any, key: torch.Tensor | None = None) -> EngineOutput:
        grads, losses, aux = grads_and_losses(params, batch, key)

        def weighted_sum(factors: Any) -> Any:
            return optree.tree_map(_sum_rows, scale_rows(grads, factors))

        return EngineOutput(per_sample_sq_norms(grads), losses, aux, weighted_sum)

    return engine
