"""Keyed Gaussian noise for pytrees."""

from __future__ import annotations

from typing import Any

import optree
import torch

from fundp import random as fundp_random
from fundp._validate import check_number

__all__ = ["noise", "noise_like"]


def noise_like(tree: Any, key: torch.Tensor, stddev: float) -> Any:
    """Returns a pytree like ``tree`` of ``N(0, stddev^2)`` samples drawn from ``key``.

    Leaf ``l`` (in optree's leaf order) draws from ``split(key, num_leaves)[l]``, so distinct
    leaves never share a stream and the same key always gives the same noise.  Samples are
    computed in float64 and cast to each leaf's dtype and device.
    """
    stddev = check_number("stddev", stddev, positive=True)
    leaves, treedef = optree.tree_flatten(tree)
    if not leaves:
        return tree
    keys = fundp_random.split(key, len(leaves))
    samples = []
    for leaf, leaf_key in zip(leaves, keys):
        if not isinstance(leaf, torch.Tensor) or not leaf.dtype.is_floating_point:
            raise TypeError(f"noise needs floating-point tensor leaves, got {getattr(leaf, 'dtype', type(leaf))}")
        standard = fundp_random.normal(leaf_key.to(leaf.device), leaf.shape, torch.float64)
        samples.append((standard * stddev).to(leaf.dtype))
    return optree.tree_unflatten(treedef, samples)


def noise(tree: Any, key: torch.Tensor, stddev: float) -> Any:
    """Returns ``tree + N(0, stddev^2)`` elementwise, the noise drawn from ``key``.

    ``stddev`` is the absolute standard deviation (``noise_multiplier * sensitivity`` for the
    Gaussian mechanism); it must be a finite number >= 0.

    Example:
      >>> import torch, fundp
      >>> key = fundp.random.key(0)
      >>> g = {"w": torch.zeros(3)}
      >>> bool(torch.equal(fundp.noise(g, key, 1.0)["w"], fundp.noise(g, key, 1.0)["w"]))
      True
      >>> fundp.noise(g, key, 0.0)["w"]
      tensor([0., 0., 0.])
    """
    return optree.tree_map(torch.add, tree, noise_like(tree, key, stddev))
