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
  bits computed in float64, and the final value is rounded once to the parameter's dtype.

What this is not: a proof that the floating-point output is exactly DP.  No vectorised sampler
in PyTorch offers that today; it is the same mitigation Opacus ships, plus OS entropy.  Cost:
about 4x the random bits of research mode and an inverse-CDF evaluation per draw, plus reading
``8 * 4 * n`` bytes from ``os.urandom`` per ``n`` noise values (``benchmarks/secure_noise.py``).
"""

from __future__ import annotations

import os
from typing import Any

import optree
import torch

from fundp._validate import check_nonnegative
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


def secure_noise(tree: Any, stddev: float) -> Any:
    """Returns ``tree + N(0, stddev^2)`` elementwise with secure-mode samples (no key: OS entropy).

    ``stddev >= 0`` is the absolute noise standard deviation.  Leaves must be floating-point
    tensors; leaves with no elements come back unchanged.

    Example:
      >>> import torch, fundp
      >>> out = fundp.secure.secure_noise({"w": torch.zeros(3), "empty": torch.zeros(0, 4)}, 1.0)
      >>> out["w"].shape, out["empty"].shape
      (torch.Size([3]), torch.Size([0, 4]))
    """
    stddev = check_nonnegative("stddev", stddev)

    def add(leaf: torch.Tensor) -> torch.Tensor:
        if not isinstance(leaf, torch.Tensor) or not leaf.dtype.is_floating_point:
            raise TypeError(f"noise needs floating-point tensor leaves, got {getattr(leaf, 'dtype', type(leaf).__name__)}")
        if leaf.numel() == 0:
            return leaf.clone()
        sample = secure_normal(leaf.shape, torch.float64, device=leaf.device) * stddev
        return (leaf.to(torch.float64) + sample).to(leaf.dtype)

    return optree.tree_map(add, tree)
