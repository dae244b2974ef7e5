"""Participation patterns of a correlated-noise run and the privacy they give.

A correlated-noise mechanism with strategy ``C`` adds, at step ``t``, the noise
``sigma * clip_norm * sens(C) * (C^{-1} Z)_t`` (see :class:`fundp.mf.CorrelatedNoise`).  Which
``sens(C)`` and which privacy analysis apply depends on how the batches are chosen:

* :func:`single_participation` — every example is used in at most one of the ``n`` steps (e.g.
  one pass over the data in a fixed order).  ``sens(C)`` = largest column norm.  The whole run is
  one Gaussian mechanism with noise multiplier ``sigma``: ``mu = 1 / sigma`` Gaussian DP,
  ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` (Balle & Wang 2018, Thm 8).
* :func:`min_separation` — every example is used in at most ``k`` steps, any two at least ``b``
  steps apart (e.g. ``k`` epochs over ``b`` fixed batches, or cyclic batches without sampling).
  ``sens(C)`` is the ``(k, b)`` sensitivity of :mod:`fundp.mf.sensitivity` (exact for banded
  ``C`` with at most ``b`` bands and for Toeplitz ``C`` with non-negative non-increasing
  coefficients, an upper bound otherwise).  Same Gaussian mechanism, ``mu = 1 / sigma``, no
  amplification.
* :func:`cyclic_poisson` — the data are split into ``b`` fixed partitions; step ``t`` Poisson
  samples partition ``t mod b`` with rate ``q`` (:func:`fundp.mf.cyclic_poisson_batches`).  For a
  ``C`` with at most ``b`` bands, ``sens(C)`` = largest column norm and the run is exactly as
  private as DP-SGD with noise multiplier ``sigma`` and sample rate ``q`` over ``ceil(n / b)``
  steps (Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization", Thm 4; as in
  JAX-Privacy's ``optimize_coefs_for_amplifications``), accounted by :mod:`fundp.accounting`.
  With ``b = 1`` this *is* DP-SGD.

All three are under add/remove-one adjacency, like :mod:`fundp.accounting`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from scipy import optimize, special  # type: ignore[import-untyped]

from fundp._validate import check_delta, check_int, check_nonnegative, check_sample_rate

__all__ = [
    "SingleParticipation",
    "MinSeparation",
    "CyclicPoisson",
    "Participation",
    "single_participation",
    "min_separation",
    "cyclic_poisson",
    "gaussian_delta",
    "gaussian_epsilon",
]


@dataclass(frozen=True)
class SingleParticipation:
    """Each example joins at most one step of the run.

    Example:
      >>> import fundp
      >>> isinstance(fundp.mf.single_participation(), fundp.mf.SingleParticipation)
      True
    """

    def __repr__(self) -> str:
        return "single_participation()"


@dataclass(frozen=True)
class MinSeparation:
    """Each example joins at most ``max_participations`` steps, pairwise ``>= min_sep`` apart.

    ``max_participations=None``: as many as fit in the run, ``ceil(n / min_sep)``.

    Example:
      >>> import fundp
      >>> p = fundp.mf.min_separation(10, max_participations=4)
      >>> p.min_sep, p.max_participations
      (10, 4)
    """

    min_sep: int
    max_participations: int | None = None

    def __repr__(self) -> str:
        return f"min_separation({self.min_sep}, max_participations={self.max_participations})"


@dataclass(frozen=True)
class CyclicPoisson:
    """``num_partitions`` fixed partitions; step ``t`` Poisson-samples partition ``t mod b`` at ``sample_rate``.

    Example:
      >>> import fundp
      >>> p = fundp.mf.cyclic_poisson(4, 0.1)
      >>> p.num_partitions, p.sample_rate
      (4, 0.1)
    """

    num_partitions: int
    sample_rate: float

    def __repr__(self) -> str:
        return f"cyclic_poisson({self.num_partitions}, sample_rate={self.sample_rate})"


Participation = Union[SingleParticipation, MinSeparation, CyclicPoisson]


def single_participation() -> SingleParticipation:
    """Every example is used at most once in the run.

    Example:
      >>> import fundp
      >>> fundp.mf.single_participation()
      single_participation()
    """
    return SingleParticipation()


def min_separation(min_sep: int, max_participations: int | None = None) -> MinSeparation:
    """At most ``max_participations`` uses per example, any two at least ``min_sep`` steps apart.

    Example:
      >>> import fundp
      >>> fundp.mf.min_separation(10, max_participations=4)
      min_separation(10, max_participations=4)
    """
    sep = check_int("min_sep", min_sep, minimum=1)
    k = None if max_participations is None else check_int("max_participations", max_participations, minimum=1)
    return MinSeparation(sep, k)


def cyclic_poisson(num_partitions: int, sample_rate: float) -> CyclicPoisson:
    """``num_partitions`` fixed partitions, partition ``t mod b`` Poisson-sampled at ``sample_rate`` at step ``t``.

    ``sample_rate`` is the probability that an example of the visited partition joins the batch
    (expected batch ``sample_rate * N / num_partitions``).

    Example:
      >>> import fundp
      >>> fundp.mf.cyclic_poisson(4, 0.1)
      cyclic_poisson(4, sample_rate=0.1)
    """
    return CyclicPoisson(check_int("num_partitions", num_partitions, minimum=1), check_sample_rate(sample_rate))


def check_participation(participation: Any) -> Participation:
    if not isinstance(participation, (SingleParticipation, MinSeparation, CyclicPoisson)):
        raise TypeError(
            "participation must be fundp.mf.single_participation(), min_separation(...) or cyclic_poisson(...), "
            f"got {type(participation).__name__}"
        )
    return participation


def gaussian_delta(mu: float, epsilon: float) -> float:
    """``delta(eps)`` of the Gaussian mechanism with sensitivity / noise std ``mu`` (Balle & Wang 2018).

    ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``, the second term in log space.

    Example:
      >>> import fundp
      >>> round(fundp.mf.gaussian_delta(1.0, 0.0), 6)  # 2 Phi(1/2) - 1
      0.382925
    """
    mu = check_nonnegative("mu", mu)
    epsilon = check_nonnegative("epsilon", epsilon)
    if mu == 0:
        return 0.0
    first = special.ndtr(-epsilon / mu + mu / 2)
    second = math.exp(min(epsilon + special.log_ndtr(-epsilon / mu - mu / 2), 0.0))
    return float(min(1.0, max(0.0, first - second)))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest ``eps >= 0`` with :func:`gaussian_delta` ``(mu, eps) <= delta`` (exact, by root finding).

    Example:
      >>> import fundp
      >>> round(fundp.mf.gaussian_epsilon(1.0, 1e-5), 4)
      4.3772
    """
    mu = check_nonnegative("mu", mu)
    delta = check_delta(delta)
    if mu == 0 or gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    high = mu * mu / 2 + 2 * mu + 1.0
    while gaussian_delta(mu, high) > delta:
        high *= 2
    return float(optimize.brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, high, xtol=1e-12, rtol=1e-12))


def _gaussian_mu_for(epsilon: float, delta: float) -> float:
    """Largest ``mu`` whose Gaussian mechanism meets ``(epsilon, delta)``."""
    high = 1.0
    while gaussian_delta(high, epsilon) <= delta:
        high *= 2
    return float(optimize.brentq(lambda m: gaussian_delta(m, epsilon) - delta, 0.0, high, xtol=1e-14, rtol=1e-12))
