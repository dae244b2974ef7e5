"""Secure-mode Gaussian noise for production runs.

The research-mode sampler (:func:`fundp.noise`) is fast and reproducible: its bits come from a
seeded Threefry stream and each draw is one float64 inverse-CDF evaluation.  Two weaknesses
matter when the output is released:

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
about 4x the random bits and inverse-CDF evaluations of research mode, plus reading
``8 * 4 * n`` bytes from ``os.urandom`` per ``n`` noise values (``benchmarks/secure_noise.py``).
"""

from __future__ import annotations

import os
from typing import Any

import optree
import torch

from fundp._validate import check_number

__all__ = ["secure_normal", "secure_noise"]

_DRAWS = 4  # (z1 + z2 + z3 + z4) / 2 has unit variance


def _os_uniform(count: int) -> torch.Tensor:
    """``count`` uniforms in (0, 1) from 53 bits of OS entropy each, as float64 ``(k + 0.5) / 2**53``."""
    words = torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int64)
    k = (words >> 11) & ((1 << 53) - 1)
    return (k.to(torch.float64) + 0.5) * 2.0**-53


@torch.compiler.disable
def secure_normal(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """Returns ``N(0, 1)`` samples of ``shape`` from OS entropy, each the halved sum of four draws."""
    count = 1
    for size in shape:
        count *= int(size)
    draws = torch.special.ndtri(_os_uniform(_DRAWS * count)).reshape(_DRAWS, count)
    return (draws.sum(dim=0) / 2).reshape(shape).to(device=device, dtype=dtype)


def secure_noise(tree: Any, stddev: float) -> Any:
    """Returns ``tree + N(0, stddev^2)`` elementwise with secure-mode samples (no key: OS entropy).

    Example:
      >>> import torch, fundp
      >>> out = fundp.secure.secure_noise({"w": torch.zeros(3)}, 1.0)
      >>> out["w"].shape
      torch.Size([3])
    """
    stddev = check_number("stddev", stddev, positive=True)

    def add(leaf: torch.Tensor) -> torch.Tensor:
        if not leaf.dtype.is_floating_point:
            raise TypeError(f"noise needs floating-point tensor leaves, got {leaf.dtype}")
        sample = secure_normal(leaf.shape, torch.float64, device=leaf.device) * stddev
        return (leaf.to(torch.float64) + sample).to(leaf.dtype)

    return optree.tree_map(add, tree)
