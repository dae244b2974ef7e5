"""Several Gaussian queries released on the same Poisson-sampled batch, accounted as ONE mechanism.

A DP-SGD step sometimes releases more than the noisy gradient sum: adaptive clipping (Andrew,
Thakkar, McMahan & Ramaswamy 2021) also releases a noisy count of the examples whose gradient norm
was below the clipping threshold.  Both queries read the *same* sampled batch, so the example that
differs between neighbouring datasets is either in both or in neither.  That joint release is
exactly one Poisson-subsampled Gaussian mechanism:

Convention: query ``j`` has L2 sensitivity ``Delta_j`` under adding or removing one example (the
clipped gradient sum: ``Delta = C``; a count of examples: ``Delta = 1``) and is released with
Gaussian noise of standard deviation ``z_j Delta_j``; ``z_j`` is its *noise multiplier*.  Dividing
each released vector by its own noise std turns the release into ``(f_j / (z_j Delta_j) + N(0, I))_j``:
one Gaussian mechanism with unit noise whose stacked query has sensitivity
``sqrt(sum_j (Delta_j / (z_j Delta_j))^2) = sqrt(sum_j z_j^-2)``.  So the pair of output
distributions is ``N(0, I)`` against ``(1 - q) N(0, I) + q N(v, I)`` with ``||v|| = sqrt(sum_j z_j^-2)``,
which (rotating ``v`` onto the first axis) is the one-dimensional subsampled Gaussian with

    z_eff = (sum_j z_j^-2)^(-1/2).

Record it with ``accountant_step(ledger, noise_multiplier=z_eff, sample_rate=q)``: one step, not
one per query.  Two separate ``accountant_step`` calls describe a *different* mechanism (each query
with its own, independent Poisson sample), which is more private than the real one, so they report
an epsilon that is too small - not a bound.  At ``q = 1`` the two coincide (Gaussian mechanisms
compose by adding ``mu^2``).
"""

from __future__ import annotations

import math

from fundp._validate import check_positive

__all__ = ["combined_noise_multiplier"]


def combined_noise_multiplier(*noise_multipliers: float) -> float:
    """The noise multiplier of several Gaussian queries on one sampled batch, as one mechanism.

    ``z_eff = (sum_j z_j^-2)^(-1/2)``, where ``z_j`` is query ``j``'s noise std divided by its L2
    sensitivity (add/remove one example): for adaptive clipping, the gradient sum's
    ``noise_multiplier`` (std ``z_g C``, sensitivity ``C``) and the unclipped-count's ``z_b``
    (std ``z_b``, sensitivity 1).  Pass ``z_eff`` to :func:`~fundp.accounting.accountant_step`
    once per step.  ``z_eff < min_j z_j``: every extra query costs privacy.

    Args:
      *noise_multipliers: one or more ``z_j > 0``.

    Example:
      >>> from fundp.accounting import combined_noise_multiplier
      >>> round(combined_noise_multiplier(1.0, 1.0), 6)  # two equal queries: z / sqrt(2)
      0.707107
      >>> round(combined_noise_multiplier(1.1, 10.0), 4)  # a gradient sum and a noisy count
      1.0934
    """
    if not noise_multipliers:
        raise ValueError("combined_noise_multiplier needs at least one noise multiplier")
    values = [check_positive(f"noise_multipliers[{j}]", z) for j, z in enumerate(noise_multipliers)]
    # Scale by the smallest z so that z^-2 neither overflows nor underflows.
    smallest = min(values)
    return smallest / math.sqrt(math.fsum((smallest / z) ** 2 for z in values))
