"""Accounting for truncated Poisson sampling: the truncation probability enters delta.

:func:`fundp.sampling.truncated_poisson_batches` draws a Poisson batch each step and, when it holds
more than ``B_max`` examples, keeps a uniform ``B_max`` of them.  Coupled with the untruncated
run on the same randomness, the truncated run differs only if some step truncates: over ``T``
steps on any dataset of at most ``N + 1`` examples, the two output distributions are within total
variation ``P = T p``, ``p = P[Binomial(N + 1, q) > B_max]``.  So an ``(eps, delta)`` guarantee of
the untruncated ledger becomes, for the truncated run (derivation in
:func:`fundp.sampling.truncated_poisson_batches`)::

    delta_truncated(eps) = delta_ledger(eps) + (1 + e^eps) P.

A step built with a truncated Poisson sampler (``fundp.dp_step(..., sampler=batches)``) records
each step's truncation in its ledger (a :class:`~fundp.accounting.TruncatedPoisson` event), and
:func:`fundp.epsilon` / :func:`fundp.delta` on that ledger include the term: use them.

The functions here take the sampler (``batches``) for a ledger recorded *without* those events
(e.g. by hand with :func:`~fundp.accountant_step`): they charge ``p`` for every step of the
ledger that no event already charges (also steps taken with other samplers: an over-charge, never
an under-charge).  On a ledger recorded by the step they agree with :func:`fundp.epsilon`.  They
are exact reductions to the ledger's own accountant: :func:`epsilon` returns the least ``eps``
certified by ``epsilon_ledger(delta - (1 + e^eps) P) <= eps``; :func:`calibrate_noise` calibrates
at ``delta - (1 + e^target) P``; :func:`max_steps` searches the largest certified ``T``.

Example:
  >>> import fundp
  >>> from fundp.accounting import truncation
  >>> batches = fundp.sampling.truncated_poisson_batches(60000, 256 / 60000, fundp.random.key(0),
  ...                                                     max_batch_size=370, steps=1000)
  >>> ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.1, sample_rate=256 / 60000, steps=1000)
  >>> plain, truncated = fundp.epsilon(ledger, 1e-5), truncation.epsilon(ledger, 1e-5, batches)
  >>> plain < truncated < plain * 1.01  # p is about 1e-11 per step
  True
  >>> recorded = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.1, sample_rate=256 / 60000, steps=1000,
  ...                                  truncation=batches)
  >>> fundp.epsilon(recorded, 1e-5) == truncated
  True
"""

from __future__ import annotations

import math
from typing import Any

from fundp.accounting import _checks
from fundp.accounting.accountants import composition, delta_of, epsilon_of, unreachable
from fundp.accounting.accountants import epsilon as ledger_epsilon
from fundp.accounting.calibrate import _bisect
from fundp.accounting.calibrate import calibrate_noise as ledger_calibrate_noise
from fundp.accounting.calibrate import max_steps as ledger_max_steps
from fundp.accounting.ledger import Ledger, TruncatedPoisson, accountant_step

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


def _without_truncation(ledger: Ledger) -> tuple[Ledger, float, int]:
    """``(ledger without its truncation events, their P, their steps)``."""
    if not isinstance(ledger, Ledger):
        raise TypeError(f"ledger must be a fundp.Ledger, got {type(ledger).__name__}")
    truncated = [event for event in ledger.events if isinstance(event, TruncatedPoisson)]
    if not truncated:
        return ledger, 0.0, 0
    rest = Ledger(ledger.segments, [event for event in ledger.events if not isinstance(event, TruncatedPoisson)])
    return rest, sum(e.steps * e.truncation_probability for e in truncated), sum(e.steps for e in truncated)


def _total(ledger: Ledger, batches: Any, more_steps: int = 0) -> tuple[Ledger, float]:
    """``(ledger without truncation events, P)``: the recorded events' ``P`` plus ``p`` for every other step."""
    rest, recorded, charged = _without_truncation(ledger)
    return rest, recorded + truncation_total(batches, max(0, ledger.steps - charged) + more_steps)


def delta(ledger: Ledger, epsilon: float, batches: Any, *, accountant: str = "prv") -> float:
    """``delta_ledger(epsilon) + (1 + e^epsilon) P``, capped at 1: ``P`` = the ledger's recorded
    truncation events' plus ``p`` for each of its other steps.

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
    accountant = _checks.accountant(accountant)
    rest, total = _total(ledger, batches)
    segments, other = composition(rest)
    return delta_of(segments, total + other, epsilon, accountant)


def epsilon(ledger: Ledger, delta: float, batches: Any, *, accountant: str = "prv") -> float:
    """The least ``eps`` with ``delta_ledger(eps) + (1 + e^eps) P <= delta`` (certified; ``P`` as
    in :func:`delta`), computed by :func:`fundp.accounting.accountants.epsilon_of`.

    Raises :class:`~fundp.accounting.UnreachableTargetError` if the truncation term alone uses up
    ``delta``.
    """
    delta = _checks.delta(delta)
    accountant = _checks.accountant(accountant)
    rest, total = _total(ledger, batches)
    segments, other = composition(rest)
    return epsilon_of(segments, total + other, delta, accountant)


def calibrate_noise(target_epsilon: float, delta: float, batches: Any, *, steps: int,
                    accountant: str = "prv", ledger: Ledger | None = None) -> float:
    """The smallest noise multiplier with :func:`epsilon` ``<= target_epsilon`` over ``steps``
    steps of ``batches`` (on top of ``ledger``): the ledger's calibration at
    ``delta - (1 + e^target) T p``, ``T`` counting the ledger's steps too."""
    target = _checks.epsilon(target_epsilon, "target_epsilon")
    delta = _checks.delta(delta)
    steps = _checks.steps(steps)
    rest, total = _total(Ledger() if ledger is None else ledger, batches, steps)
    remaining = delta - (1.0 + math.exp(min(target, 700.0))) * total
    if remaining <= 0.0:
        raise unreachable(delta, total, target)
    return ledger_calibrate_noise(target, remaining, sample_rate=batches.sample_rate, steps=steps,
                                  accountant=accountant, ledger=rest)


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
    base, prior = _total(Ledger() if ledger is None else ledger, batches)
    per_step = _per_step(batches)
    factor = 1.0 + math.exp(min(target, 700.0))

    def certified(steps: int) -> bool:
        remaining = delta - factor * (prior + per_step * steps)
        if remaining <= 0.0:
            return False
        grown = accountant_step(base, noise_multiplier=noise_multiplier, sample_rate=batches.sample_rate, steps=steps)
        return ledger_epsilon(grown, remaining, accountant=accountant) <= target

    high = ledger_max_steps(target, delta, noise_multiplier=noise_multiplier, sample_rate=batches.sample_rate,
                            accountant=accountant, ledger=base) + 1
    if not certified(1):
        raise unreachable(delta, prior + per_step, target)
    # 1 is certified; high is not (the untruncated budget is already exceeded there).
    return _bisect(certified, 1, high)
