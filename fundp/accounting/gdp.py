"""Gaussian-DP central-limit *approximation* (``accountant="gdp_approx"``).  Not a bound.

A ``mu``-GDP mechanism (Dong, Roth & Su 2019) is exactly as private as one Gaussian mechanism with
sensitivity/noise ratio ``mu``; its privacy profile is (Balle & Wang 2018)

    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).

By the central limit theorem for privacy loss (Bu, Dong, Long & Su 2020), ``T`` Poisson-subsampled
Gaussian steps approach ``mu``-GDP with ``mu = q sqrt(T (e^{1/sigma^2} - 1))`` (for ``q = 1`` the
exact ``sqrt(T)/sigma``); heterogeneous runs add the ``mu^2``.  The limit is reached from below for small ``T q`` and can *understate* epsilon badly
(the subsampled loss is heavy-tailed), so this module is only a quick estimate: fundp uses it to size
grids and brackets, and offers it as ``accountant="gdp_approx"`` with that caveat.  Use ``"prv"``
(default) or ``"rdp"`` for anything you report.
"""

from __future__ import annotations

import math
from typing import Sequence

from scipy import optimize, special

__all__ = ["clt_mu", "gaussian_delta", "gaussian_epsilon", "epsilon", "delta"]


def clt_mu(segments: Sequence[tuple[float, float, int]]) -> float:
    """``mu = sqrt(sum_s mu_s^2)`` with ``mu_s^2 = T_s q_s^2 (e^{1/sigma_s^2} - 1)`` (Bu et al. 2020,
    Poisson subsampling CLT) for ``q < 1``, and the exact ``mu_s^2 = T_s / sigma_s^2`` of the
    Gaussian mechanism for ``q = 1``."""
    total = 0.0
    for sigma, q, steps in segments:
        if q == 1:
            total += steps / sigma**2
            continue
        exponent = 1.0 / sigma**2
        if exponent > 700:
            return math.inf
        total += steps * q * q * math.expm1(exponent)
    return math.sqrt(total)


def gaussian_delta(mu: float, epsilon: float) -> float:
    """``delta(eps)`` of ``mu``-GDP (Balle & Wang 2018, Theorem 8), in log space where it matters."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    first = special.ndtr(-epsilon / mu + mu / 2)
    # e^eps Phi(-eps/mu - mu/2) <= Phi(-eps/mu + mu/2) <= 1: clip the exponent against round-off.
    second = math.exp(min(epsilon + special.log_ndtr(-epsilon / mu - mu / 2), 0.0))
    return float(min(1.0, max(0.0, first - second)))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest ``eps >= 0`` with ``gaussian_delta(mu, eps) <= delta`` (root of a decreasing function)."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    high = mu * mu / 2 + mu * 2 + 1.0
    while gaussian_delta(mu, high) > delta:
        high *= 2
    return float(optimize.brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, high, xtol=1e-12, rtol=1e-12))


def epsilon(segments: Sequence[tuple[float, float, int]], delta: float) -> float:
    """CLT estimate of epsilon (an approximation, possibly *below* the true epsilon)."""
    return gaussian_epsilon(clt_mu(segments), delta)


def delta(segments: Sequence[tuple[float, float, int]], epsilon: float) -> float:
    """CLT estimate of delta (an approximation, possibly *below* the true delta)."""
    return gaussian_delta(clt_mu(segments), epsilon)
