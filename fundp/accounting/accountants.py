"""``epsilon(ledger, delta)`` and ``delta(ledger, epsilon)``: one entry point over the accountants.

* ``"prv"`` (default): privacy-loss-distribution composition by FFT (:mod:`~fundp.accounting.prv`);
  a rigorous upper bound, within 0.1% of the exact value.
* ``"rdp"``: Rényi DP with the improved conversion (:mod:`~fundp.accounting.rdp`); a rigorous upper
  bound, typically 10-40% above ``"prv"``.
* ``"gdp_approx"``: the Gaussian-DP central limit estimate (:mod:`~fundp.accounting.gdp`); **not a
  bound** (it can be below the true epsilon).  For quick what-ifs only.

Both functions are pure and cached on ``(ledger, argument, accountant)``: ledgers are hashable.
"""

from __future__ import annotations

import functools

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


def epsilon(ledger: Ledger, delta: float, *, accountant: str = "prv") -> float:
    """The epsilon spent by ``ledger`` at ``delta``, under add/remove-one adjacency.

    For ``"prv"`` and ``"rdp"`` the result is a rigorous upper bound: the composed mechanism is
    ``(epsilon, delta)``-DP.  ``math.inf`` if no finite epsilon reaches ``delta``; 0 for an empty
    ledger.

    Args:
      ledger: a :class:`~fundp.accounting.Ledger`.
      delta: in (0, 1).
      accountant: ``"prv"`` (default), ``"rdp"`` or ``"gdp_approx"`` (an approximation, not a bound).

    Example:
      >>> import fundp
      >>> ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, steps=100)
      >>> round(fundp.epsilon(ledger, 1e-5), 2)
      0.72
      >>> fundp.epsilon(fundp.Ledger(), 1e-5)
      0.0
    """
    ledger = _check_ledger(ledger)
    delta = _checks.delta(delta)
    accountant = _checks.accountant(accountant)
    if not ledger.segments:
        return 0.0
    return _epsilon(ledger.segments, delta, accountant)


def delta(ledger: Ledger, epsilon: float, *, accountant: str = "prv") -> float:
    """The delta spent by ``ledger`` at ``epsilon`` (> 0); an upper bound for ``"prv"`` and ``"rdp"``.

    Args:
      ledger: a :class:`~fundp.accounting.Ledger`.
      epsilon: > 0 and finite.
      accountant: ``"prv"`` (default), ``"rdp"`` or ``"gdp_approx"`` (an approximation, not a bound).

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
    if not ledger.segments:
        return 0.0
    return _delta(ledger.segments, epsilon, accountant)

