"""Keyed Gaussian noise for pytrees.

``stddev`` is the absolute standard deviation (``noise_multiplier * sensitivity`` for the Gaussian
mechanism): a Python number, or a 0-d tensor that ``torch.compile`` traces (a schedule then never
recompiles).  :func:`fundp.privatize` is the safe entry point, which derives the std from a
:class:`fundp.ClippedSum`'s sensitivity; :func:`add_gaussian_noise` is the low-level piece.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import optree
import torch

from fundp import random as fundp_random
from fundp._validate import check_nonnegative

__all__ = ["noise", "noise_like", "add_gaussian_noise", "snapped_sum", "float64_grid", "FLOAT64_GRID_BITS"]


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


def add_gaussian_noise(tree: Any, key: torch.Tensor, stddev: Any, *, snap_float64: bool = False, release_dtypes: Any = None) -> Any:
    """Returns ``tree + N(0, stddev^2)`` elementwise, the noise drawn from ``key``.

    Low level: ``stddev`` is absolute, so the caller must know the sensitivity of ``tree``.
    The noise is drawn and added in float64 and the sum rounded once to each leaf's dtype: noise
    rounded to bfloat16 *before* the addition would leave ``tree`` readable in the low bits.
    Prefer :func:`fundp.privatize`, which takes it from a :class:`fundp.ClippedSum`.

    ``snap_float64`` (default ``False``, research mode's behaviour so far): leaves released in
    float64 are returned as :func:`snapped_sum`, the exact ``tree + noise`` rounded to the
    power-of-two grid :func:`float64_grid` of ``stddev`` (about ``2^-20 stddev``), which removes
    the floating-point attack on float64 outputs (a float64 ``tree + noise`` keeps float64's
    grid near the result, which depends on ``tree``).  Other dtypes are unchanged bit for bit;
    ``stddev = 0`` is never snapped.  The snapping runs eagerly (a graph break under
    ``torch.compile``).  ``release_dtypes``: the dtype each leaf (in optree order) is finally
    rounded to by the caller, when it differs from the leaf's own (a float64 sum released as
    float32 parameters is not snapped); an entry ``None`` or ``release_dtypes=None``: the leaf's
    own dtype.

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
    # Added in float64 (snapped if asked and released in float64), rounded once to the leaf's dtype.
    dtypes = _release_dtypes(leaves, release_dtypes)
    chunks = _scaled_chunks(leaves, key, stddev)
    out = [_noisy_leaf(leaf, noise, stddev, dtype, snap_float64) for noise, leaf, dtype in zip(chunks, leaves, dtypes)]
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


# --------------------------------------------------------------------------- float64 snapping

#: The float64 release grid is ``2**(e - FLOAT64_GRID_BITS)`` for ``stddev = m 2**e``, ``m`` in [1/2, 1).
FLOAT64_GRID_BITS = 20


def float64_grid(stddev: float) -> float:
    """The grid ``Λ`` that float64 releases are snapped to: ``2**(e - 20)`` for ``stddev = m 2**e``.

    ``m`` in [1/2, 1) and ``e`` come from ``math.frexp`` (exact), so ``Λ`` is a power of two in
    ``(2**-20 stddev, 2**-19 stddev]`` that depends on ``stddev`` alone (a public number, never
    the data).  The rounding adds at most ``Λ / 2`` to each value (variance ``<= Λ^2 / 12``: a
    relative change of the noise's std below ``1e-12``).  ``stddev`` must be finite and > 0.
    """
    stddev = float(stddev)
    if not (math.isfinite(stddev) and stddev > 0):
        raise ValueError(f"stddev must be finite and > 0 for a float64 grid, got {stddev}")
    return math.ldexp(1.0, math.frexp(stddev)[1] - FLOAT64_GRID_BITS)


def snapped_sum(total: torch.Tensor, noise: torch.Tensor, grid: float) -> torch.Tensor:
    """Returns ``fl64(S(total + noise))``: the exact real sum rounded to the nearest multiple of ``grid``.

    ``total``, ``noise``: float64 tensors of one shape, finite; ``grid``: a power of two
    (:func:`float64_grid`).  ``S(v) = grid * k`` for the integer ``k`` nearest to ``v / grid``
    (a tie, ``v`` exactly halfway, goes to the even ``k``), applied to the *real* number
    ``v = total + noise``, not to its float64 rounding; ``fl64`` is float64's round to nearest.

    Why (the floating-point attack): ``fl64(total + noise)`` lies on float64's grid near the
    result, whose spacing depends on ``total`` (near 0.3 the grid is 2^-54 when ``total = 0`` but
    is reached through 2^-53 steps when ``total = 1``), so a released float64 value can be
    impossible in the neighbouring world (Mironov 2012).  ``S`` releases multiples of ``grid``
    only, every one of them reachable from any ``total``.

    The privacy argument: the output is a deterministic function of the exact real ``v``
    (shown below), so the float64 addition adds no leak of its own: ``S(total + sigma Z)`` for
    a continuous ``Z ~ N(0, 1)`` is post-processing of the Gaussian mechanism, at no privacy
    cost (same sigma, no delta term).  What remains is the sampler's own distance from
    ``N(0, 1)`` on intervals of width ``grid``, unchanged by this function (see
    :mod:`fundp.secure`).  Rounding the float64 sum instead (``S(fl64(v))``) would not be a
    function of ``v``: where ``fl64(v)`` falls exactly on a midpoint ``(k + 1/2) grid``, the
    side ``v`` was on is lost, and which ``v`` round there depends on ``total``.

    Exactness, case by case (IEEE float64, round to nearest even; each step is one operation):

    * ``s = fl64(total + noise)`` and ``e = (total + noise) - s`` exactly (Knuth's TwoSum:
      six operations, no branch, exact unless an intermediate overflows).
    * ``q = s / grid`` is exact (a power of two; an underflowing ``q`` has ``|v| << grid / 2``
      and snaps to 0 as it must).  ``k = round(q)`` (half to even) is exact, and so is
      ``r = q - k`` in [-1/2, 1/2] (Sterbenz: ``k / 2 <= q <= 2 k`` whenever ``k != 0``).
    * ``|q| < 2^52``: the spacing ``u`` of float64 at ``q`` is <= 1/2, ``r`` and 1/2 are
      multiples of ``u`` and ``|e / grid| <= u / 2``.  If ``|r| < 1/2`` then ``|r| <= 1/2 - u``
      and ``|r + e / grid| < 1/2``: the nearest multiple is ``k``.  If ``r = +-1/2``, ``v`` is
      above the midpoint when ``e > 0`` (``k + 1`` for ``r = 1/2``), below it when ``e < 0``
      (``k - 1`` for ``r = -1/2``), and exactly on it when ``e = 0`` (``k``, even).  The result
      ``k grid`` is a float64 number (``|k| <= 2^52``).
    * ``|q| >= 2^52``: ``q`` is an integer, so ``s`` is a multiple of ``grid`` and the nearest
      multiple to ``v`` is ``s + round(e / grid) grid`` (both terms exact); its float64 rounding
      is one correctly rounded addition.  (Reached only for ``|v| >= 2^52 grid``, above
      ``2^32 stddev`` with :func:`float64_grid`.)

    Hence every step depends on ``v`` only through ``(s, e)``, which ``v`` determines.  Runs
    eagerly (``torch.compiler.disable``): a compiler that fused or reassociated the TwoSum would
    lose ``e``.

    Example:
      >>> import torch
      >>> from fundp.noise import snapped_sum
      >>> total = torch.tensor([0.0, 1.0], dtype=torch.float64)
      >>> snapped_sum(total, torch.tensor([0.3, 0.3], dtype=torch.float64), 2.0**-4)
      tensor([0.3125, 1.3125], dtype=torch.float64)
    """
    return _snapped_sum(total, noise, grid)


@torch.compiler.disable
def _snapped_sum(total: torch.Tensor, noise: torch.Tensor, grid: float) -> torch.Tensor:
    if total.dtype != torch.float64 or noise.dtype != torch.float64:
        raise TypeError(f"snapped_sum needs float64 tensors, got {total.dtype} and {noise.dtype}")
    mantissa, _ = math.frexp(grid)
    if not (math.isfinite(grid) and mantissa == 0.5):
        raise ValueError(f"grid must be a power of two, got {grid}")
    s = total + noise
    noise_part = s - total  # TwoSum (Knuth): e = (total + noise) - s, exactly
    total_part = s - noise_part
    e = (total - total_part) + (noise - noise_part)
    q = s / grid
    k = torch.round(q)
    r = q - k
    k = k + ((r == 0.5) & (e > 0)).to(k.dtype) - ((r == -0.5) & (e < 0)).to(k.dtype)
    return torch.where(q.abs() < 2.0**52, k * grid, s + torch.round(e / grid) * grid)


def _release_dtypes(leaves: list, release_dtypes: Any) -> list:
    """The dtype each leaf is finally released in: ``release_dtypes`` (one per leaf, ``None``: the
    leaf's own, as in :func:`fundp.privatize`'s ``dtypes``) or, when ``None``, every leaf's own."""
    if release_dtypes is None:
        return [leaf.dtype for leaf in leaves]
    dtypes = list(release_dtypes)
    if len(dtypes) != len(leaves) or not all(d is None or isinstance(d, torch.dtype) for d in dtypes):
        raise TypeError(f"release_dtypes must hold one torch.dtype (or None) per leaf ({len(leaves)}), got {release_dtypes!r}")
    return [leaf.dtype if d is None else d for leaf, d in zip(leaves, dtypes)]


def _noisy_leaf(leaf: torch.Tensor, noise: torch.Tensor, stddev: float, release_dtype: torch.dtype, snap: bool) -> torch.Tensor:
    """``leaf + noise`` (``noise``: float64) in float64, snapped when released in float64, in ``leaf.dtype``.

    Snapped (:func:`snapped_sum` on :func:`float64_grid` of ``stddev``) iff ``snap``,
    ``release_dtype`` is float64 and ``stddev > 0``; otherwise added in float64 and rounded once
    to ``leaf.dtype``, as before.
    """
    wide = leaf.to(torch.float64)
    if snap and release_dtype == torch.float64 and float(stddev) > 0:
        return snapped_sum(wide, noise, float64_grid(stddev)).to(leaf.dtype)
    return (wide + noise).to(leaf.dtype)
