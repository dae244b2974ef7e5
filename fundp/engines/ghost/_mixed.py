"""The mixed plan: leaves the ghost path cannot handle get per-example gradients from ``vmap(grad)``."""

from __future__ import annotations

from typing import Any, Callable

import optree

from fundp.grads import per_sample_grads_and_losses

__all__ = ["vmap_rows"]


def vmap_rows(loss_fn: Callable, leaves: list, treespec: Any, indices: list, batch: Any, has_aux: bool) -> dict:
    """Per-example gradients ``[B, *shape]`` of the leaves at ``indices`` by ``vmap(grad)``."""

    def subset_loss(subset, example_batch):
        merged = list(leaves)
        for index, leaf in zip(indices, subset):
            merged[index] = leaf
        return loss_fn(optree.tree_unflatten(treespec, merged), example_batch)

    grads, _, _ = per_sample_grads_and_losses(subset_loss, has_aux=has_aux)([leaves[i] for i in indices], batch)
    return dict(zip(indices, grads))
