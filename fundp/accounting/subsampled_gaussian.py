"""The Poisson-subsampled Gaussian mechanism as a pair of distributions, and its privacy loss.

One DP-SGD step adds ``N(0, sigma^2)`` (in units of the clipping norm) to a sum over a Poisson(q)
sample.  Its worst case under add/remove-one adjacency reduces to one dimension (Mironov, Talwar
& Zhang 2019; Zhu, Dong & Wang 2022) with the two output distributions

    mu_0 = N(0, sigma^2)                              the differing example is absent,
    mu_1 = (1 - q) N(0, sigma^2) + q N(1, sigma^2)    the differing example is present.

"remove" compares ``P = mu_1`` against ``Q = mu_0``; "add" compares ``P = mu_0`` against
``Q = mu_1``.  For ``q < 1`` the two are not mirror images, so an accountant bounds both and
reports the worse.  With ``r(x) = (2x - 1) / (2 sigma^2)`` the privacy loss ``L = log(P/Q)`` is

    remove:  L(x) =  log(1 - q + q e^{r(x)}),  x ~ P = mu_1,   increasing in x, > log(1 - q);
    add:     L(x) = -log(1 - q + q e^{r(x)}),  x ~ P = mu_0,   decreasing in x, < -log(1 - q).

Because ``L`` is monotone in ``x``, the event ``{L <= t}`` is a half-line in ``x`` and every mass
below is a difference of normal CDFs.  Those differences are taken on the side of the normal where
they are small (``Phi`` left of 0, ``1 - Phi`` right of it), so tail masses keep their relative
precision down to ~1e-300.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

__all__ = ["ADD", "REMOVE", "DIRECTIONS", "privacy_loss", "loss_threshold", "loss_range", "interval_masses"]

REMOVE = "remove"
ADD = "add"
DIRECTIONS = (REMOVE, ADD)


def privacy_loss(x, sample_rate: float, noise_multiplier: float, direction: str):
    """``L(x)`` for the given direction (see the module docstring); stable for all ``x``."""
    q, s2 = sample_rate, noise_multiplier**2
    log_one_minus_q = math.log1p(-q) if q < 1 else -math.inf
    r = (2 * np.asarray(x, dtype=float) - 1) / (2 * s2)
    remove = np.logaddexp(log_one_minus_q, math.log(q) + r)  # log(1 - q + q e^r), no overflow
    return remove if direction == REMOVE else -remove


def loss_threshold(t, sample_rate: float, noise_multiplier: float, direction: str):
    """The ``x`` where the privacy loss crosses ``t``.

    remove: ``{L <= t} = {x <= x(t)}`` with ``x(t) = sigma^2 log(1 + expm1(t)/q) + 1/2``;
    add:    ``{L <= t} = {x >= x(t)}`` with ``x(t) = sigma^2 log(1 + expm1(-t)/q) + 1/2``.
    Outside the support of ``L`` the half-line is empty/everything and ``x(t) = -inf``.
    """
    q, s2 = sample_rate, noise_multiplier**2
    t = np.asarray(t, dtype=float)
    signed = t if direction == REMOVE else -t
    if q == 1:  # the Gaussian mechanism: L is linear in x
        return s2 * signed + 0.5
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = s2 * np.log1p(np.expm1(signed) / q) + 0.5
    return np.where(np.isnan(x), -np.inf, x)


def loss_range(sample_rate: float, noise_multiplier: float, direction: str, tail_mass: float) -> tuple[float, float]:
    """``(t_lo, t_hi)`` with ``P(L < t_lo) <= tail_mass`` and ``P(L > t_hi) <= tail_mass`` under ``P``.

    Uses ``(1 - q) Phi(a) + q Phi(a - 1/sigma) <= Phi(a)`` (and its mirror) to bound the mixture's
    tails by one normal's, so the range is slightly conservative and needs no root finding.
    """
    sigma = noise_multiplier
    z = -special.ndtri(tail_mass)  # Phi(-z) = tail_mass
    if direction == REMOVE:  # x ~ mu_1, L increasing in x
        x_lo, x_hi = -sigma * z, 1 + sigma * z
    else:  # x ~ mu_0, L decreasing in x
        x_lo, x_hi = sigma * z, -sigma * z
    loss = privacy_loss(np.array([x_lo, x_hi]), sample_rate, noise_multiplier, direction)
    return float(loss[0]), float(loss[1])


def _normal_masses(z):
    """Standard normal masses of ``(-inf, z_0]``, ``(z_i, z_{i+1}]`` and ``(z_n, inf)`` for increasing ``z``."""
    cdf, sf = special.ndtr(z), special.ndtr(-z)
    # Difference the CDF left of 0 and the survival function right of it: both are small there,
    # so the difference of two nearby tail values keeps its relative precision.
    between = np.where(z[:-1] >= 0, sf[:-1] - sf[1:], cdf[1:] - cdf[:-1])
    return cdf[0], np.maximum(between, 0.0), sf[-1]


def interval_masses(thresholds, sample_rate: float, noise_multiplier: float, direction: str):
    """Masses of the privacy loss on the cells cut by increasing ``thresholds`` ``t_0 < ... < t_n``.

    Returns ``(p_below, p_cells, q_cells, p_above)``: ``P(L <= t_0)``; the ``P``- and ``Q``-masses
    of each cell ``{t_i < L <= t_{i+1}}`` (arrays of length ``n``); and ``P(L > t_n)``.
    """
    q, sigma = sample_rate, noise_multiplier
    x = loss_threshold(thresholds, q, sigma, direction)
    if direction == REMOVE:  # cell i is x in (x_i, x_{i+1}], x increasing
        below0, cells0, above0 = _normal_masses(x / sigma)  # N(0, sigma^2): Q
        below1, cells1, above1 = _normal_masses((x - 1) / sigma)  # N(1, sigma^2)
        p_cells = (1 - q) * cells0 + q * cells1
        return (1 - q) * below0 + q * below1, p_cells, cells0, (1 - q) * above0 + q * above1
    # add: cell i is x in [x_{i+1}, x_i), x decreasing; flip to increasing order.
    below0, cells0, above0 = _normal_masses(x[::-1] / sigma)  # N(0, sigma^2): P
    _, cells1, _ = _normal_masses((x[::-1] - 1) / sigma)
    cells0, cells1 = cells0[::-1], cells1[::-1]
    # P(L <= t_0) = P(x >= x_0) is the upper normal tail beyond the largest x, and vice versa.
    return above0, cells0, (1 - q) * cells0 + q * cells1, below0
