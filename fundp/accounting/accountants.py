"""``epsilon(ledger, delta)`` and ``delta(ledger, epsilon)``: one entry point over the accountants.

* ``"prv"`` (default): privacy-loss-distribution composition by FFT (:mod:`~fundp.accounting.prv`);
  a rigorous upper bound, within 0.1% of the exact value.
* ``"rdp"``: Rényi DP with the improved conversion (:mod:`~fundp.accounting.rdp`); a rigorous upper
  bound, typically 10-40% above ``"prv"``.
* ``"gdp_approx"``: the Gaussian-DP central limit estimate (:mod:`~fundp.accounting.gdp`); **not a
  bound** (it can be below the true epsilon).  For quick what-ifs only.

Both functions are pure and cached on ``(ledger, argument, accountant)``: ledgers are hashable.
With ``bounds=True`` (``"prv"`` only) they return ``(lower, upper)``: a certified lower bound beside
the upper one, so the answer's tightness is visible (:func:`fundp.accounting.prv.epsilon_bounds`).
"""

from __future__ import annotations

import functools
from typing import Literal, overload

from fundp.accounting import _checks, gdp, prv, rdp
from fundp.accounting.ledger import Ledger

__all__ = ["epsilon", "delta"]

_EPSILON = {"prv": prv.epsilon, "rdp": rdp.epsilon, "gdp_approx": gdp.epsilon}
_DELTA = {"prv": prv.delta, "rdp": rdp.delta, "gdp_approx": gdp.delta}


def _check_ledger(ledger) -> Ledger:
    if not isinstance(ledger, Ledger):
        raise TypeError(f"ledger must be a fundp.Ledger, got {type(ledger).__name__}")
    return ledger


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
    if _check_bounds(bounds, accountant):
        return _epsilon_bounds(ledger.segments, delta) if ledger.segments else (0.0, 0.0)
    if not ledger.segments:
        return 0.0
    return _epsilon(ledger.segments, delta, accountant)


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
    if _check_bounds(bounds, accountant):
        return _delta_bounds(ledger.segments, epsilon) if ledger.segments else (0.0, 0.0)
    if not ledger.segments:
        return 0.0
    return _delta(ledger.segments, epsilon, accountant)

