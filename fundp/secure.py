"""Secure-mode Gaussian noise for production runs.

The research-mode sampler (:func:`fundp.noise`) is fast and reproducible: its bits come from a
keyed Threefry stream and each pair of draws is one Box–Muller transform of two uniforms.  Two
weaknesses matter when the output is released:

* a seed in code is a secret an attacker may guess; here every bit comes from the operating
  system's CSPRNG (``os.urandom``), so there is nothing to reproduce;
* floating-point samplers do not draw from the continuous Gaussian: the set of floats they can
  produce is sparse and lattice-like, and ``x + noise`` can reveal ``x`` from the low bits of the
  result (Mironov 2012 for Laplace; Jin et al. 2022 for Gaussian samplers).  Following Holohan &
  Braghin (2021) and Opacus's secure mode, each noise value is the sum of four independent
  draws, halved: ``(z_1 + z_2 + z_3 + z_4) / 2 ~ N(0, 1)``.  The sum's support is dense, which
  defeats the published low-bit attacks.  Each ``z_j`` is an inverse-CDF draw from 53 random
  bits computed in float64, and the final value is rounded once to the parameter's dtype;
* a float64 release would keep float64's grid near ``x + noise``, whose spacing depends on
  ``x``; it is snapped to a power-of-two grid of about ``2^-20 stddev`` instead
  (:func:`fundp.noise.snapped_sum`: the exact real sum, rounded, so the rounding is
  post-processing and costs no privacy).

What this is not: a proof that the floating-point output is exactly DP.  No vectorised sampler
in PyTorch offers that today; it is the same mitigation Opacus ships, plus OS entropy.  After
the snapping, what separates a float64 release from the exact Gaussian mechanism followed by
the same rounding is only how far the sampler's probability of each grid interval (width
``2^-20 stddev``) is from the Gaussian's.  A first-order estimate, not a proof: given three of
the four draws, the event is an interval of the fourth, whose probability is off by at most
``2^-52`` (the uniforms' grid) plus the effect of moving its ends by the float64 rounding of
the sum (a few ``2^-52`` relative): about ``2^-26 / phi(z)`` relative at ``z`` standard
deviations, ``3e-8`` at the centre, ``3e-6`` at 3, ``1e-2`` at 5; beyond about 5 the sampler's
tails (each draw within 8.2 of 0) differ from the Gaussian's anyway.  Cost:
about 4x the random bits of research mode and an inverse-CDF evaluation per draw, plus reading
``8 * 4 * n`` bytes from ``os.urandom`` per ``n`` noise values (``benchmarks/secure_noise.py``).
"""

from __future__ import annotations

import os
from typing import Any

import optree
import torch

from fundp._validate import check_nonnegative
from fundp.noise import _noisy_leaf, _release_dtypes
from fundp.random import _count, _uniform_from_bits

__all__ = ["secure_normal", "secure_noise"]

_DRAWS = 4  # (z1 + z2 + z3 + z4) / 2 has unit variance


def _os_uniform(count: int) -> torch.Tensor:
    """``count`` float64 uniforms in ``[2**-53, 1 - 2**-53]`` from 64 bits of OS entropy each.

    The same map as :func:`fundp.random.uniform`: ``(k + 1/2) 2**-52`` for the top 52 bits ``k``,
    exact in float64, so the inverse CDF is always finite.
    """
    if count == 0:
        return torch.empty(0, dtype=torch.float64)
    words = torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int64)
    return _uniform_from_bits((words >> 32) & 0xFFFFFFFF, words & 0xFFFFFFFF, torch.float64)


@torch.compiler.disable
def secure_normal(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """Returns ``N(0, 1)`` samples of ``shape`` from OS entropy, each the halved sum of four draws.

    Any shape, including ones with no elements (an empty tensor, no entropy read).

    Example:
      >>> import torch, fundp
      >>> fundp.secure.secure_normal((2, 3), torch.float64).shape
      torch.Size([2, 3])
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    count = _count(shape)
    draws = torch.special.ndtri(_os_uniform(_DRAWS * count)).reshape(_DRAWS, count)
    return (draws.sum(dim=0) / 2).reshape(tuple(shape)).to(device=device, dtype=dtype)


def secure_noise(tree: Any, stddev: float, *, release_dtypes: Any = None) -> Any:
    """Returns ``tree + N(0, stddev^2)`` elementwise with secure-mode samples (no key: OS entropy).

    ``stddev >= 0`` is the absolute noise standard deviation.  Leaves must be floating-point
    tensors; leaves with no elements come back unchanged.  The sum is formed in float64 and
    rounded once to each leaf's dtype.

    Float64 releases are snapped: a leaf released in float64 comes back as
    :func:`fundp.noise.snapped_sum`, the *exact* real ``leaf + noise`` rounded to the nearest
    multiple of the power of two :func:`fundp.noise.float64_grid` ``(stddev)`` (in
    ``(2^-20, 2^-19] stddev``).  A float64 ``leaf + noise`` would keep float64's grid near the
    result, which depends on ``leaf``: 32% of outputs were impossible in the neighbouring world
    (``benchmarks/secure_noise.py --attack``), 0% snapped.  The snap is a function of the exact
    sum, so it is post-processing of ``leaf + noise`` and costs no privacy (no larger std, no
    delta); its only effect on the noise is a rounding of at most ``2^-20 stddev``.  Float32 and
    16-bit releases are not snapped (their final rounding is already coarse), nor is
    ``stddev = 0``.

    ``release_dtypes``: the dtype each leaf (in optree order) is finally rounded to, for a
    caller that adds the noise to a float64 copy and rounds later; passing it keeps float32
    and 16-bit parameters' outputs unsnapped, bit for bit as before.  An entry ``None``, and the
    default ``None``: the leaf's own dtype (such a caller's float32 outputs are then snapped
    too: still private, on the grid).

    Example:
      >>> import torch, fundp
      >>> out = fundp.secure.secure_noise({"w": torch.zeros(3), "empty": torch.zeros(0, 4)}, 1.0)
      >>> out["w"].shape, out["empty"].shape
      (torch.Size([3]), torch.Size([0, 4]))
    """
    stddev = check_nonnegative("stddev", stddev)
    leaves, treedef = optree.tree_flatten(tree)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or not leaf.dtype.is_floating_point:
            raise TypeError(f"noise needs floating-point tensor leaves, got {getattr(leaf, 'dtype', type(leaf).__name__)}")
    dtypes = _release_dtypes(leaves, release_dtypes)

    def add(leaf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if leaf.numel() == 0:
            return leaf.clone()
        sample = secure_normal(leaf.shape, torch.float64, device=leaf.device) * stddev
        return _noisy_leaf(leaf, sample, stddev, dtype, snap=True)

    return optree.tree_unflatten(treedef, [add(leaf, dtype) for leaf, dtype in zip(leaves, dtypes)])
