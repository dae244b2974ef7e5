"""Accounting for truncated Poisson sampling: the truncation probability enters delta.

:func:`fundp.sampling.truncated_poisson_batches` draws a Poisson batch each step and, when it holds
more than ``B_max`` examples, keeps a uniform ``B_max`` of them.  Coupled with the untruncated
run on the same randomness, the truncated run differs only if some step truncates: over ``T``
steps on any dataset of at most ``N + 1`` examples, the two output distributions are within total
variation ``P = T p``, ``p = P[Binomial(N + 1, q) > B_max]``.  So an ``(eps, delta)`` guarantee of
the untruncated ledger becomes, for the truncated run (derivation in
:func:`fundp.sampling.truncated_poisson_batches`)::

    delta_truncated(eps) = delta_ledger(eps) + (1 + e^eps) P.

Every function here takes the sampler (``batches``) and charges ``p`` for *every* step of the
ledger (also steps taken with other samplers: an over-charge, never an under-charge).  The
functions are exact reductions to the ledger's own accountant: :func:`epsilon` returns the least
``eps`` certified by ``epsilon_ledger(delta - (1 + e^eps) P) <= eps``; :func:`calibrate_noise`
calibrates at ``delta - (1 + e^target) P``; :func:`max_steps` searches the largest certified
``T``.

Example:
  >>> import fundp
  >>> from fundp.accounting import truncation
  >>> batches = fundp.sampling.truncated_poisson_batches(60000, 256 / 60000, fundp.random.key(0),
  ...                                                     max_batch_size=370, steps=1000)
  >>> ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.1, sample_rate=256 / 60000, steps=1000)
  >>> plain, truncated = fundp.epsilon(ledger, 1e-5), truncation.epsilon(ledger, 1e-5, batches)
  >>> plain < truncated < plain * 1.01  # p is about 1e-11 per step
  True
"""

from __future__ import annotations

import math
from typing import Any

from fundp.accounting import _checks
from fundp.accounting.accountants import delta as ledger_delta
from fundp.accounting.accountants import epsilon as ledger_epsilon
from fundp.accounting.calibrate import _bisect
from fundp.accounting.calibrate import calibrate_noise as ledger_calibrate_noise
from fundp.accounting.calibrate import max_steps as ledger_max_steps
from fundp.accounting.ledger import Ledger, accountant_step

__all__ = ["calibrate_noise", "delta", "epsilon", "max_steps", "truncation_total"]


def _per_step(batches: Any) -> float:
    probability = getattr(batches, "truncation_probability", None)
    if getattr(batches, "sampling", None) != "truncated_poisson" or probability is None:
        raise TypeError(
            f"batches must be a fundp.sampling.TruncatedPoissonBatches, got {type(batches).__name__}"
        )
    return float(probability)


def truncation_total(batches: Any, steps: int) -> float:
    """``P = steps * p``: the total-variation distance between the truncated and the untruncated
    run over ``steps`` steps (``p = batches.truncation_probability``)."""
    return _checks.steps(steps) * _per_step(batches)


def _unreachable(delta: float, total: float, epsilon: float) -> _checks.UnreachableTargetError:
    return _checks.UnreachableTargetError(
        f"the truncation term (1 + e^eps) * T * p = {(1.0 + math.exp(epsilon)) * total:.3g} at eps={epsilon:.4g} "
        f"leaves nothing of delta={delta}: raise max_batch_size (p = P[Binomial(N + 1, q) > max_batch_size])"
    )


def delta(ledger: Ledger, epsilon: float, batches: Any, *, accountant: str = "prv") -> float:
    """``delta_ledger(epsilon) + (1 + e^epsilon) T p``, capped at 1 (``T = ledger.steps``).

    Example:
      >>> import math, fundp
      >>> from fundp.accounting import truncation
      >>> batches = fundp.sampling.truncated_poisson_batches(10, 0.5, fundp.random.key(0), max_batch_size=9, steps=1)
      >>> ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=2.0, sample_rate=0.5)
      >>> extra = truncation.delta(ledger, 1.0, batches) - fundp.delta(ledger, 1.0)
      >>> round(extra / ((1 + math.e) * 12 / 2**11), 9)  # P[Binomial(11, 1/2) > 9] = 12 / 2**11
      1.0
    """
    epsilon = _checks.epsilon(epsilon)
    total = truncation_total(batches, ledger.steps)
    return min(1.0, ledger_delta(ledger, epsilon, accountant=accountant) + (1.0 + math.exp(epsilon)) * total)


def epsilon(ledger: Ledger, delta: float, batches: Any, *, accountant: str = "prv") -> float:
    """The least ``eps`` with ``delta_ledger(eps) + (1 + e^eps) T p <= delta`` (certified).

    ``eps`` is certified when ``epsilon_ledger(delta - (1 + e^eps) T p) <= eps``.  The map
    ``g(e) = epsilon_ledger(delta - (1 + e^e) T p)`` is increasing, so iterating it from
    ``epsilon_ledger(delta)`` (a lower bound) climbs to its least fixed point; the returned value
    is the first iterate, nudged up by a relative 1e-9, that passes the certificate.

    Raises :class:`~fundp.accounting.UnreachableTargetError` if the truncation term alone uses up
    ``delta``.
    """
    delta = _checks.delta(delta)
    total = truncation_total(batches, ledger.steps)
    if total == 0.0 or not ledger.segments:
        return ledger_epsilon(ledger, delta, accountant=accountant)
    current = ledger_epsilon(ledger, delta, accountant=accountant)
    for _ in range(100):
        remaining = delta - (1.0 + math.exp(min(current, 700.0))) * total
        if remaining <= 0.0:
            raise _unreachable(delta, total, current)
        following = ledger_epsilon(ledger, remaining, accountant=accountant)
        if following <= current:
            return current
        current = max(following, following * (1.0 + 1e-9) + 1e-12)
    raise _unreachable(delta, total, current)


def calibrate_noise(target_epsilon: float, delta: float, batches: Any, *, steps: int,
                    accountant: str = "prv", ledger: Ledger | None = None) -> float:
    """The smallest noise multiplier with :func:`epsilon` ``<= target_epsilon`` over ``steps``
    steps of ``batches`` (on top of ``ledger``): the ledger's calibration at
    ``delta - (1 + e^target) T p``, ``T`` counting the ledger's steps too."""
    target = _checks.epsilon(target_epsilon, "target_epsilon")
    delta = _checks.delta(delta)
    steps = _checks.steps(steps)
    prior = 0 if ledger is None else ledger.steps
    total = truncation_total(batches, prior + steps)
    remaining = delta - (1.0 + math.exp(min(target, 700.0))) * total
    if remaining <= 0.0:
        raise _unreachable(delta, total, target)
    return ledger_calibrate_noise(target, remaining, sample_rate=batches.sample_rate, steps=steps,
                                  accountant=accountant, ledger=ledger)


def max_steps(target_epsilon: float, delta: float, batches: Any, *, noise_multiplier: float,
              accountant: str = "prv", ledger: Ledger | None = None) -> int:
    """The largest ``T`` with :func:`epsilon` ``<= target_epsilon`` after ``T`` more steps of
    ``batches`` at ``noise_multiplier`` (on top of ``ledger``).

    ``T`` is certified when ``epsilon_ledger(delta - (1 + e^target) (T + T_0) p) <= target``, which
    gets harder as ``T`` grows: a binary search below the untruncated budget finds the largest.
    Raises :class:`~fundp.accounting.UnreachableTargetError` if not even one step fits.
    """
    target = _checks.epsilon(target_epsilon, "target_epsilon")
    delta = _checks.delta(delta)
    base = Ledger() if ledger is None else ledger
    per_step = _per_step(batches)
    factor = 1.0 + math.exp(min(target, 700.0))

    def certified(steps: int) -> bool:
        remaining = delta - factor * per_step * (base.steps + steps)
        if remaining <= 0.0:
            return False
        grown = accountant_step(base, noise_multiplier=noise_multiplier, sample_rate=batches.sample_rate, steps=steps)
        return ledger_epsilon(grown, remaining, accountant=accountant) <= target

    high = ledger_max_steps(target, delta, noise_multiplier=noise_multiplier, sample_rate=batches.sample_rate,
                            accountant=accountant, ledger=ledger) + 1
    if not certified(1):
        raise _unreachable(delta, per_step * (base.steps + 1), target)
    # 1 is certified; high is not (the untruncated budget is already exceeded there).
    return _bisect(certified, 1, high)
