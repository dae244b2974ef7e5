"""``epsilon(ledger, delta)`` and ``delta(ledger, epsilon)``: one entry point over the accountants.

* ``"prv"`` (default): privacy-loss-distribution composition by FFT (:mod:`~fundp.accounting.prv`);
  a rigorous upper bound, within 0.1% of the exact value.
* ``"rdp"``: Rényi DP with the improved conversion (:mod:`~fundp.accounting.rdp`); a rigorous upper
  bound, typically 10-40% above ``"prv"``.
* ``"gdp_approx"``: the Gaussian-DP central limit estimate (:mod:`~fundp.accounting.gdp`); **not a
  bound** (it can be below the true epsilon).  For quick what-ifs only.

Both functions are pure and cached on ``(ledger, argument, accountant)``: ledgers are hashable.

They account every event the ledger records (:mod:`fundp.accounting.ledger`): the charged steps of
correlated-noise runs join the Poisson-subsampled Gaussian segments they are equivalent to, and
truncated Poisson steps add ``(1 + e^eps) P`` to delta, ``P = sum_events steps * p``
(:mod:`fundp.accounting.truncation`): ``delta(eps) = delta_segments(eps) + (1 + e^eps) P`` and
``epsilon(delta)`` is the least certified ``eps`` of that sum.

With ``bounds=True`` (``"prv"`` only) they return ``(lower, upper)``: a certified lower bound beside
the upper one, so the answer's tightness is visible (:func:`fundp.accounting.prv.epsilon_bounds`).
"""

from __future__ import annotations

import functools
import math
from typing import Literal, overload

from fundp.accounting import _checks, gdp, prv, rdp
from fundp.accounting.ledger import CorrelatedNoiseSteps, Ledger, ScheduledCorrelatedNoiseStep, Segment, TruncatedPoisson

__all__ = ["epsilon", "delta"]

_EPSILON = {"prv": prv.epsilon, "rdp": rdp.epsilon, "gdp_approx": gdp.epsilon}
_DELTA = {"prv": prv.delta, "rdp": rdp.delta, "gdp_approx": gdp.delta}


def _check_ledger(ledger) -> Ledger:
    if not isinstance(ledger, Ledger):
        raise TypeError(f"ledger must be a fundp.Ledger, got {type(ledger).__name__}")
    return ledger


def composition(ledger: Ledger) -> tuple[tuple[Segment, ...], float]:
    """``(segments, P)``: what ``ledger`` composes, as the Poisson-subsampled Gaussian segments
    (its own and its correlated-noise runs' charged steps, merged and sorted) and the total
    truncation probability ``P = sum steps * p`` of its :class:`TruncatedPoisson` events.

    Example:
      >>> import fundp
      >>> from fundp.accounting import CorrelatedNoiseSteps, accountants
      >>> ledger = fundp.Ledger([(1.0, 0.1, 3)], events=[CorrelatedNoiseSteps("cyclic_poisson", 1.0, 0.1, True, 2)])
      >>> accountants.composition(ledger)
      ((Segment(noise_multiplier=1.0, sample_rate=0.1, steps=5),), 0.0)
    """
    segments, events = ledger._materialise()
    if not events:
        return segments, 0.0
    counts = {(s.noise_multiplier, s.sample_rate): s.steps for s in segments}
    total = 0.0
    sigmas: dict[tuple[str, float], set[float]] = {}
    scheduled: dict[tuple[str, int, int], list] = {}
    for event in events:
        if isinstance(event, ScheduledCorrelatedNoiseStep):
            scheduled.setdefault((event.participation, event.min_sep, event.max_participations), []).append(event)
        elif isinstance(event, TruncatedPoisson):
            total += event.steps * event.truncation_probability
        elif isinstance(event, CorrelatedNoiseSteps):
            sigmas.setdefault((event.participation, event.sample_rate), set()).add(event.noise_multiplier)
            if event.charged:
                key = (event.noise_multiplier, event.sample_rate)
                counts[key] = counts.get(key, 0) + event.steps
    for (participation, q), values in sigmas.items():
        if len(values) > 1:
            # Uncharged steps are covered by their run's charged step only at that step's sigma:
            # refuse rather than guess which run a step at another sigma belongs to.
            raise ValueError(
                f"the ledger holds {participation} correlated-noise steps (sample rate {q}) at several noise "
                f"multipliers {sorted(values)}: a run's guarantee assumes one noise multiplier throughout, and "
                "steps of runs at different multipliers cannot be told apart; account such runs in separate ledgers")
    for (participation, min_sep, k), run in scheduled.items():
        if (participation, 1.0) in sigmas:
            raise ValueError(
                f"the ledger holds {participation} correlated-noise steps recorded both with a per-call noise_multiplier "
                "(a schedule) and without: they cannot be told apart as one run or two; pass the schedule at every "
                "step of a run (or none), and account other runs in separate ledgers")
        mu2 = _scheduled_mu2(run, min_sep, k)
        if mu2 > 0:  # each run: one Gaussian mechanism, i.e. one (1 / mu, 1) step
            sigma = 1.0 / math.sqrt(mu2)
            counts[(sigma, 1.0)] = counts.get((sigma, 1.0), 0) + 1
    return tuple(Segment(sigma, q, n) for (sigma, q), n in sorted(counts.items())), total


def _scheduled_mu2(run: list, min_sep: int, k: int) -> float:
    """``mu^2`` of one scheduled correlated-noise run (:class:`ScheduledCorrelatedNoiseStep` events).

    The run releases ``C D^{-1} X + Z`` (``D = diag(sigma_t)``, see
    :meth:`fundp.mf.CorrelatedNoise.account`); for a strategy whose columns ``min_sep`` or more apart
    are orthogonal, the squared sensitivity (over the noise's ``sens(C)``) is
    ``max_S sum_{t in S} x_t``, ``x_t = (column_norm_t / sigma_t)^2`` (``+ sigma_b^-2`` with a count),
    over the recorded steps ``S``: at most ``k``, pairwise ``>= min_sep`` apart
    (:func:`fundp.mf.max_participation_sum`, Choquette-Choo et al. 2023, Alg. 3).
    """
    from fundp.mf.sensitivity import max_participation_sum

    length = 1 + max(event.step for event in run)
    x = [0.0] * length
    seen = set()
    for event in run:
        if event.step in seen or event.steps != 1:
            raise ValueError(
                f"the ledger holds step {event.step} of a scheduled {event.participation} correlated-noise run more than "
                "once: one run records each step once; account other runs in separate ledgers")
        seen.add(event.step)
        x[event.step] = (event.column_norm / event.noise_multiplier) ** 2 + (
            event.count_noise_multiplier ** -2 if event.count_noise_multiplier > 0 else 0.0)
    return max_participation_sum(x, min_sep, k)


@functools.lru_cache(maxsize=512)
def _epsilon(segments: tuple, delta: float, accountant: str) -> float:
    return float(_EPSILON[accountant](segments, delta))


@functools.lru_cache(maxsize=512)
def _delta(segments: tuple, epsilon: float, accountant: str) -> float:
    return float(_DELTA[accountant](segments, epsilon))


@functools.lru_cache(maxsize=128)
def _epsilon_bounds(segments: tuple, delta: float) -> tuple[float, float]:
    lower, upper = prv.epsilon_bounds(segments, delta)
    return float(lower), float(upper)


@functools.lru_cache(maxsize=128)
def _delta_bounds(segments: tuple, epsilon: float) -> tuple[float, float]:
    lower, upper = prv.delta_bounds(segments, epsilon)
    return float(lower), float(upper)


def _check_bounds(bounds, accountant: str) -> bool:
    if not isinstance(bounds, bool):
        raise TypeError(f"bounds must be a bool, got {type(bounds).__name__}")
    if bounds and accountant != "prv":
        raise ValueError(f"bounds=True needs accountant='prv' (the only one with a certified lower bound), got {accountant!r}")
    return bounds


@overload
def epsilon(ledger: Ledger, delta: float, *, accountant: str = ..., bounds: Literal[False] = ...) -> float: ...
@overload
def epsilon(ledger: Ledger, delta: float, *, accountant: str = ..., bounds: Literal[True]) -> tuple[float, float]: ...
@overload
def epsilon(ledger: Ledger, delta: float, *, accountant: str = ..., bounds: bool = ...) -> float | tuple[float, float]: ...


def epsilon(ledger: Ledger, delta: float, *, accountant: str = "prv", bounds: bool = False) -> float | tuple[float, float]:
    """The epsilon spent by ``ledger`` at ``delta``, under add/remove-one adjacency.

    For ``"prv"`` and ``"rdp"`` the result is a rigorous upper bound: the composed mechanism is
    ``(epsilon, delta)``-DP.  ``math.inf`` if no finite epsilon reaches ``delta``; 0 for an empty
    ledger.

    Args:
      ledger: a :class:`~fundp.accounting.Ledger`.
      delta: in (0, 1).
      accountant: ``"prv"`` (default), ``"rdp"`` or ``"gdp_approx"`` (an approximation, not a bound).
      bounds: if ``True`` (``"prv"`` only), return ``(lower, upper)``: ``upper`` is the usual answer
        and ``lower`` a certified lower bound on the exact epsilon (the mechanism is *not*
        ``(eps, delta)``-DP for any ``eps < lower``), computed from dominated (optimistic)
        discretisations; ``(upper - lower) / upper`` shows how tight ``upper`` is.

    Example:
      >>> import fundp
      >>> ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, steps=100)
      >>> round(fundp.epsilon(ledger, 1e-5), 2)
      0.72
      >>> fundp.epsilon(fundp.Ledger(), 1e-5)
      0.0
      >>> lower, upper = fundp.epsilon(ledger, 1e-5, bounds=True)
      >>> lower <= upper < lower * 1.001
      True
    """
    ledger = _check_ledger(ledger)
    delta = _checks.delta(delta)
    accountant = _checks.accountant(accountant)
    segments, total = composition(ledger)
    if _check_bounds(bounds, accountant):
        _no_bounds_with_truncation(total)
        return _epsilon_bounds(segments, delta) if segments else (0.0, 0.0)
    return epsilon_of(segments, total, delta, accountant)


@overload
def delta(ledger: Ledger, epsilon: float, *, accountant: str = ..., bounds: Literal[False] = ...) -> float: ...
@overload
def delta(ledger: Ledger, epsilon: float, *, accountant: str = ..., bounds: Literal[True]) -> tuple[float, float]: ...
@overload
def delta(ledger: Ledger, epsilon: float, *, accountant: str = ..., bounds: bool = ...) -> float | tuple[float, float]: ...


def delta(ledger: Ledger, epsilon: float, *, accountant: str = "prv", bounds: bool = False) -> float | tuple[float, float]:
    """The delta spent by ``ledger`` at ``epsilon`` (> 0); an upper bound for ``"prv"`` and ``"rdp"``.

    Args:
      ledger: a :class:`~fundp.accounting.Ledger`.
      epsilon: > 0 and finite.
      accountant: ``"prv"`` (default), ``"rdp"`` or ``"gdp_approx"`` (an approximation, not a bound).
      bounds: if ``True`` (``"prv"`` only), return ``(lower, upper)`` with a certified lower bound
        on the exact delta beside the usual upper bound (see :func:`epsilon`).

    Example:
      >>> import fundp
      >>> ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, steps=100)
      >>> d = fundp.delta(ledger, 0.72)
      >>> 1e-6 < d < 1e-4
      True
    """
    ledger = _check_ledger(ledger)
    epsilon = _checks.epsilon(epsilon)
    accountant = _checks.accountant(accountant)
    segments, total = composition(ledger)
    if _check_bounds(bounds, accountant):
        _no_bounds_with_truncation(total)
        return _delta_bounds(segments, epsilon) if segments else (0.0, 0.0)
    return delta_of(segments, total, epsilon, accountant)


def _no_bounds_with_truncation(total: float) -> None:
    if total > 0.0:
        raise ValueError(
            "bounds=True is not available for a ledger with truncated Poisson steps: the truncation term is an "
            "upper bound only (no certified lower bound of the truncated run); use bounds=False")


def _segments_epsilon(segments: tuple, delta: float, accountant: str) -> float:
    return _epsilon(segments, delta, accountant) if segments else 0.0


def delta_of(segments: tuple, total: float, epsilon: float, accountant: str) -> float:
    """``delta_segments(epsilon) + (1 + e^epsilon) total``, capped at 1 (validated arguments)."""
    spent = _delta(segments, epsilon, accountant) if segments else 0.0
    if total == 0.0:
        return spent
    return min(1.0, spent + (1.0 + math.exp(min(epsilon, 700.0))) * total)


def unreachable(delta: float, total: float, epsilon: float) -> _checks.UnreachableTargetError:
    """The error when the truncation term ``(1 + e^eps) total`` alone uses up ``delta``."""
    return _checks.UnreachableTargetError(
        f"the truncation term (1 + e^eps) * T * p = {(1.0 + math.exp(min(epsilon, 700.0))) * total:.3g} at "
        f"eps={epsilon:.4g} leaves nothing of delta={delta}: raise max_batch_size "
        "(p = P[Binomial(N + 1, q) > max_batch_size])"
    )


def epsilon_of(segments: tuple, total: float, delta: float, accountant: str) -> float:
    """The least ``eps`` with ``delta_segments(eps) + (1 + e^eps) total <= delta`` (certified).

    ``eps`` is certified when ``epsilon_segments(delta - (1 + e^eps) total) <= eps``.  The map
    ``g(e) = epsilon_segments(delta - (1 + e^e) total)`` is increasing, so iterating it from
    ``epsilon_segments(delta)`` (a lower bound) climbs to its least fixed point; the returned value
    is the first iterate, nudged up by a relative 1e-9, that passes the certificate.  ``total = 0``:
    ``epsilon_segments(delta)``.  Raises :class:`~fundp.accounting.UnreachableTargetError` if the
    truncation term alone uses up ``delta``.
    """
    current = _segments_epsilon(segments, delta, accountant)
    if total == 0.0:
        return current
    for _ in range(100):
        remaining = delta - (1.0 + math.exp(min(current, 700.0))) * total
        if remaining <= 0.0:
            raise unreachable(delta, total, current)
        following = _segments_epsilon(segments, remaining, accountant)
        if following <= current:
            return current
        current = max(following, following * (1.0 + 1e-9) + 1e-12)
    raise unreachable(delta, total, current)

