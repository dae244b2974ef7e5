"""Rényi DP of the Poisson-subsampled Gaussian mechanism (``accountant="rdp"``).

With ``mu_0 = N(0, sigma^2)`` and ``mu_1 = (1 - q) mu_0 + q N(1, sigma^2)``, one step is
``(alpha, rdp(alpha))``-RDP for every order ``alpha > 1`` with (Mironov, Talwar & Zhang 2019)

    rdp(alpha) = log A_alpha / (alpha - 1),    A_alpha = E_{x ~ mu_0}[(mu_1(x) / mu_0(x))^alpha],

which also bounds the other direction ``D_alpha(mu_0 || mu_1)`` (their Theorem 5).  ``A_alpha`` is
computed exactly:

* integer ``alpha``: the binomial expansion
  ``A_alpha = sum_{k=0}^{alpha} C(alpha, k) q^k (1 - q)^{alpha - k} e^{(k^2 - k) / (2 sigma^2)}``;
* fractional ``alpha``: the series of their Section 3.3.  The integral is split at
  ``z_0 = sigma^2 log(1/q - 1) + 1/2``, where the two components ``(1 - q) mu_0`` and
  ``q N(1, sigma^2)`` of ``mu_1`` have equal density, so that on each side the generalised binomial
  expansion of ``((1 - q) + q e^{r(x)})^alpha`` converges; every term is a normal tail, summed in
  log space with a signed log-sum-exp.  Beyond ``i > alpha`` the terms alternate in sign with
  decreasing size, so stopping once the newest term is below ``1e-13`` of the sum bounds the
  truncation error by that term.

RDP composes by adding, per order.  The conversion to ``(eps, delta)`` is the improved one of
Balle, Barthe, Gaboardi, Hsu & Sato 2020 (Theorem 21; also Canonne, Kamath & Steinke 2020):

    eps = min_alpha  rdp(alpha) + log((alpha - 1)/alpha) - (log delta + log alpha)/(alpha - 1).

The orders grid is dense near 1 (fractional), every integer to 128, then geometric; if the optimum
sits at the top it is extended (to 2^20), and a ``UserWarning`` says so if it is still at an edge.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import numpy as np
from scipy import special

__all__ = ["DEFAULT_ORDERS", "rdp", "epsilon", "delta"]

DEFAULT_ORDERS = tuple(
    sorted(
        {1.01, 1.02, 1.05, *np.round(np.arange(1.1, 11.0, 0.1), 10).tolist()}
        | set(float(a) for a in range(11, 129))
        | set(float(a) for a in np.unique(np.round(np.geomspace(128, 2**14, 29))))
    )
)
_EXTENSION = tuple(float(a) for a in np.unique(np.round(np.geomspace(2**14, 2**20, 19)))[1:])


def _logsumexp(terms: np.ndarray, signs: np.ndarray | None = None) -> tuple[float, float]:
    """``log |sum_i signs_i e^{terms_i}|`` and the sum's sign (scipy's version is ~10x slower on small inputs)."""
    peak = float(np.max(terms))
    if peak == -math.inf:
        return -math.inf, 1.0
    scaled = np.exp(np.maximum(terms - peak, -700.0))
    total = float(np.sum(scaled if signs is None else signs * scaled))
    if total == 0:
        return -math.inf, 1.0
    return peak + math.log(abs(total)), math.copysign(1.0, total)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    k = np.arange(alpha + 1, dtype=float)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
    terms = log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
    return _logsumexp(terms)[0]


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    total_log, total_sign = -math.inf, 1.0
    start, chunk = 0, 256
    while True:
        i = np.arange(start, start + chunk, dtype=float)
        j = alpha - i
        # |C(alpha, i)| = |Gamma(alpha+1) / (Gamma(i+1) Gamma(alpha-i+1))|; its sign is that of
        # Gamma(alpha - i + 1), negative for every other i beyond alpha.
        log_coef = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(j + 1)
        sign = special.gammasgn(j + 1)
        log_s0 = log_coef + i * log_q + j * log_1mq + (i * i - i) / (2 * sigma**2) + special.log_ndtr((z0 - i) / sigma)
        log_s1 = log_coef + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma**2) + special.log_ndtr((j - z0) / sigma)
        terms = np.concatenate([log_s0, log_s1, [total_log]])
        signs = np.concatenate([sign, sign, [total_sign]])
        total_log, total_sign = _logsumexp(terms, signs)
        newest = np.logaddexp(log_s0[-1], log_s1[-1])
        shrinking = newest < np.logaddexp(log_s0[0], log_s1[0])
        # Past alpha the series alternates and the s1 terms shrink; the s0 terms, without their
        # normal-tail factor, follow the convex g(i) = i log q + (alpha - i) log(1-q) + (i^2-i)/(2 s^2)
        # up to z_0 and shrink after it, so max(g(now), g(z_0)) bounds every later one.  Once all
        # of that is below 1e-13 of the sum, the truncation error is too.
        nxt = start + chunk
        g = lambda x: x * log_q + (alpha - x) * log_1mq + (x * x - x) / (2 * sigma**2)  # noqa: E731
        later = log_coef[-1] + max(g(nxt), g(z0)) if nxt < z0 else -math.inf
        if start > alpha and shrinking and max(newest, later) < total_log - 30:
            break
        start += chunk
        chunk = min(chunk * 2, 1 << 20)
        if start > 1e8:  # pragma: no cover - never reached for sigma, q in range
            raise RuntimeError(f"RDP series for alpha={alpha} did not converge")
    if total_sign <= 0:  # pragma: no cover - A_alpha >= 1 mathematically
        raise FloatingPointError(f"RDP series for alpha={alpha} lost all precision")
    # Add the truncation error bound (the newest term, or the bound on later s0 terms) so the
    # result stays an upper bound.
    return float(np.logaddexp(total_log, max(newest, later)))


@functools.lru_cache(maxsize=256)
def _rdp_cached(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    out = np.empty(len(orders))
    for n, alpha in enumerate(orders):
        if q == 1:
            out[n] = alpha / (2 * sigma**2)
        elif float(alpha).is_integer():
            out[n] = _log_a_int(q, sigma, int(alpha)) / (alpha - 1)
        else:
            out[n] = _log_a_frac(q, sigma, alpha) / (alpha - 1)
    out.setflags(write=False)
    return out


def rdp(noise_multiplier: float, sample_rate: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """``rdp(alpha)`` of one Poisson-subsampled Gaussian step at each order (each > 1)."""
    orders = tuple(float(a) for a in orders)
    if any(not a > 1 for a in orders):
        raise ValueError(f"RDP orders must be > 1, got {min(orders)}")
    return _rdp_cached(float(noise_multiplier), float(sample_rate), orders)


def _total(segments, orders) -> np.ndarray:
    return sum(steps * rdp(sigma, q, orders) for sigma, q, steps in segments)


def _epsilons(total: np.ndarray, orders: np.ndarray, delta: float) -> np.ndarray:
    return total + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)


def _log_deltas(total: np.ndarray, orders: np.ndarray, epsilon: float) -> np.ndarray:
    return (orders - 1) * (total - epsilon + np.log1p(-1 / orders)) - np.log(orders)


def _optimise(segments, objective) -> float:
    orders = np.array(DEFAULT_ORDERS)
    values = objective(_total(segments, DEFAULT_ORDERS), orders)
    if np.argmin(values) == orders.size - 1:  # the optimum wants larger orders: extend the grid
        orders = np.concatenate([orders, _EXTENSION])
        values = np.concatenate([values, objective(_total(segments, _EXTENSION), np.array(_EXTENSION))])
    best = int(np.argmin(values))
    if best in (0, orders.size - 1) and np.isfinite(values[best]):
        warnings.warn(
            f"the RDP optimum is at the edge of the orders grid (alpha = {orders[best]:g}); the "
            "conversion may be loose (it is still a valid bound)",
            UserWarning,
            stacklevel=5,
        )
    return float(values[best])


def epsilon(segments: Sequence[tuple[float, float, int]], delta: float) -> float:
    """RDP upper bound on epsilon at ``delta`` for the composed ``segments`` ``(sigma, q, steps)``."""
    return max(0.0, _optimise(segments, lambda total, orders: _epsilons(total, orders, delta)))


def delta(segments: Sequence[tuple[float, float, int]], epsilon: float) -> float:
    """RDP upper bound on delta at ``epsilon`` for the composed ``segments``."""
    return min(1.0, math.exp(_optimise(segments, lambda total, orders: _log_deltas(total, orders, epsilon))))
