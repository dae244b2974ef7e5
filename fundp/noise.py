"""Keyed Gaussian noise for pytrees.

``stddev`` is the absolute standard deviation (``noise_multiplier * sensitivity`` for the Gaussian
mechanism): a Python number, or a 0-d tensor that ``torch.compile`` traces (a schedule then never
recompiles).  :func:`fundp.privatize` is the safe entry point, which derives the std from a
:class:`fundp.ClippedSum`'s sensitivity; :func:`add_gaussian_noise` is the low-level piece.
"""

from __future__ import annotations

from typing import Any, Iterator

import optree
import torch

from fundp import random as fundp_random
from fundp._validate import check_nonnegative

__all__ = ["noise", "noise_like", "add_gaussian_noise"]


def _check_stddev(stddev: Any) -> Any:
    """Python numbers are checked (finite, >= 0); a 0-d tensor is kept as is, so that it stays a
    traced graph input under ``torch.compile`` (its value is not read)."""
    if isinstance(stddev, torch.Tensor) and stddev.dim() == 0 and stddev.dtype.is_floating_point:
        return stddev
    return check_nonnegative("stddev", stddev)


def standard_normal_chunks(leaves: list, key: torch.Tensor) -> list:
    """One keyed stream of float64 ``N(0, 1)`` draws for all ``leaves``, cut into their shapes.

    The one place the noise of fundp (DP-SGD and the correlated mechanisms of :mod:`fundp.mf`)
    gets its standard normals: leaf ``l`` takes the counters after those of leaves ``< l``.
    """
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or not leaf.dtype.is_floating_point:
            raise TypeError(f"noise needs floating-point tensor leaves, got {getattr(leaf, 'dtype', type(leaf))}")
    if any(type(leaf).__name__ == "DTensor" for leaf in leaves):  # sharded: each rank draws its coordinates only
        from fundp.sharding import standard_normal_shards

        return standard_normal_shards(leaves, key)
    device = leaves[0].device
    sizes = [leaf.numel() for leaf in leaves]
    standard = fundp_random.normal(key.to(device), (sum(sizes),), torch.float64)
    return [chunk.reshape(leaf.shape) for chunk, leaf in zip(torch.split(standard, sizes), leaves)]


def noise_like(tree: Any, key: torch.Tensor, stddev: Any) -> Any:
    """Returns a pytree like ``tree`` of ``N(0, stddev^2)`` samples drawn from ``key``.

    One stream of ``sum_l numel(leaf_l)`` standard normals is drawn from ``key`` and cut into the
    leaves in optree's leaf order, so distinct leaves take disjoint counters (never shared values)
    and the same key always gives the same noise.  One draw instead of one per leaf: the cost is
    that of the total size, not of the number of leaves.  Samples are computed in float64 and cast
    to each leaf's dtype and device.  ``stddev``: a number >= 0 or a 0-d floating tensor.

    Example:
      >>> import torch, fundp
      >>> from fundp.noise import noise_like
      >>> z = noise_like({"w": torch.zeros(2)}, fundp.random.key(0), 0.0)
      >>> z["w"]
      tensor([0., 0.])
    """
    stddev = _check_stddev(stddev)
    leaves, treedef = optree.tree_flatten(tree)
    if not leaves:
        return tree
    samples = [noise.to(dtype=leaf.dtype) for noise, leaf in zip(_scaled_chunks(leaves, key, stddev), leaves)]
    return optree.tree_unflatten(treedef, samples)


def _scaled_chunks(leaves: list, key: torch.Tensor, stddev: Any) -> Iterator[torch.Tensor]:
    """``stddev * z`` per leaf, float64, on the leaf's device (``z``: :func:`standard_normal_chunks`)."""
    for chunk, leaf in zip(standard_normal_chunks(leaves, key), leaves):
        scale = stddev.to(device=chunk.device, dtype=torch.float64) if isinstance(stddev, torch.Tensor) else stddev
        yield (chunk * scale).to(leaf.device)


def add_gaussian_noise(tree: Any, key: torch.Tensor, stddev: Any) -> Any:
    """Returns ``tree + N(0, stddev^2)`` elementwise, the noise drawn from ``key``.

    Low level: ``stddev`` is absolute, so the caller must know the sensitivity of ``tree``.
    The noise is drawn and added in float64 and the sum rounded once to each leaf's dtype: noise
    rounded to bfloat16 *before* the addition would leave ``tree`` readable in the low bits.
    Prefer :func:`fundp.privatize`, which takes it from a :class:`fundp.ClippedSum`.

    Example:
      >>> import torch, fundp
      >>> key = fundp.random.key(0)
      >>> g = {"w": torch.zeros(3)}
      >>> from fundp.noise import add_gaussian_noise
      >>> bool(torch.equal(add_gaussian_noise(g, key, 1.0)["w"], fundp.noise(g, key, 1.0)["w"]))
      True
    """
    stddev = _check_stddev(stddev)
    leaves, treedef = optree.tree_flatten(tree)
    if not leaves:
        return tree
    # Added in float64, rounded once to the leaf's dtype.
    out = [(leaf.to(torch.float64) + noise).to(leaf.dtype) for noise, leaf in zip(_scaled_chunks(leaves, key, stddev), leaves)]
    return optree.tree_unflatten(treedef, out)


def noise(tree: Any, key: torch.Tensor, stddev: Any) -> Any:
    """Returns ``tree + N(0, stddev^2)`` elementwise, the noise drawn from ``key``.

    ``stddev`` is the absolute standard deviation (``noise_multiplier * sensitivity`` for the
    Gaussian mechanism): a finite number >= 0, or a 0-d tensor.  Same as
    :func:`add_gaussian_noise`.

    Example:
      >>> import torch, fundp
      >>> key = fundp.random.key(0)
      >>> g = {"w": torch.zeros(3)}
      >>> bool(torch.equal(fundp.noise(g, key, 1.0)["w"], fundp.noise(g, key, 1.0)["w"]))
      True
      >>> fundp.noise(g, key, 0.0)["w"]
      tensor([0., 0., 0.])
    """
    return add_gaussian_noise(tree, key, stddev)
