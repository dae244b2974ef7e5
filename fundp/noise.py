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

    One stream of ``sum_l numel(leaf_l)`` standard normals is drawn from ``key`` and cut into the
    leaves in optree's leaf order, so distinct leaves take disjoint counters (never shared values)
    and the same key always gives the same noise.  One draw instead of one per leaf: the cost is
    that of the total size, not of the number of leaves.  Samples are computed in float64 and cast
    to each leaf's dtype and device.
    """
    stddev = check_number("stddev", stddev, positive=True)
    leaves, treedef = optree.tree_flatten(tree)
    if not leaves:
        return tree
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or not leaf.dtype.is_floating_point:
            raise TypeError(f"noise needs floating-point tensor leaves, got {getattr(leaf, 'dtype', type(leaf))}")
    device = leaves[0].device
    sizes = [leaf.numel() for leaf in leaves]
    standard = fundp_random.normal(key.to(device), (sum(sizes),), torch.float64)
    samples = [
        (chunk.reshape(leaf.shape) * stddev).to(device=leaf.device, dtype=leaf.dtype)
        for chunk, leaf in zip(torch.split(standard, sizes), leaves)
    ]
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
