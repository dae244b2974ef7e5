"""Privacy accounting for DP-SGD: the ledger of composed steps and the epsilon it has spent.

The mechanism is the Poisson-subsampled Gaussian (noise multiplier ``sigma``, sample rate ``q``)
under add/remove-one adjacency, composed over runs with any mix of settings.

* :class:`Ledger`, :func:`accountant_step` — the immutable, hashable, JSON-serialisable record,
  with its events (:class:`TruncatedPoisson`, :class:`CorrelatedNoiseSteps`,
  :class:`ScheduledCorrelatedNoiseStep`) accounted too;
* :func:`epsilon`, :func:`delta` — what it has spent.  ``accountant="prv"`` (default) composes
  privacy loss distributions by FFT and returns a rigorous upper bound within 0.1% of the exact
  value; ``"rdp"`` is the Rényi-DP bound; ``"gdp_approx"`` is a CLT estimate, *not* a bound;
* :func:`calibrate_noise`, :func:`max_steps` — the least noise / most steps for a target epsilon;
  :func:`calibrate_noise_schedule` — the least scale of a noise schedule's shape;
* :func:`combined_noise_multiplier` — several Gaussian queries on one sampled batch (e.g. adaptive
  clipping's gradient sum and unclipped count) as the one mechanism they are.

Ledgers with many distinct ``(sigma, q)`` segments (noise schedules) are accounted by vectorised
paths: see :mod:`~fundp.accounting.rdp` and :mod:`~fundp.accounting.prv`.

Example:
  >>> import fundp.accounting as acc
  >>> ledger = acc.accountant_step(acc.Ledger(), noise_multiplier=1.1, sample_rate=256 / 60000,
  ...                              steps=60 * 60000 // 256)
  >>> round(acc.epsilon(ledger, 1e-5), 3)  # Abadi et al.'s MNIST run; RDP says 2.597
  2.382
"""

from fundp.accounting._checks import ACCOUNTANTS, UnreachableTargetError
from fundp.accounting.accountants import delta, epsilon
from fundp.accounting.calibrate import calibrate_noise, calibrate_noise_schedule, max_steps
from fundp.accounting.combine import combined_noise_multiplier
from fundp.accounting.ledger import (CorrelatedNoiseSteps, Ledger, ScheduledCorrelatedNoiseStep, Segment, TruncatedPoisson,
                                    accountant_step)

__all__ = [
    "ACCOUNTANTS",
    "CorrelatedNoiseSteps",
    "Ledger",
    "ScheduledCorrelatedNoiseStep",
    "Segment",
    "TruncatedPoisson",
    "UnreachableTargetError",
    "accountant_step",
    "calibrate_noise",
    "calibrate_noise_schedule",
    "combined_noise_multiplier",
    "delta",
    "epsilon",
    "max_steps",
]
