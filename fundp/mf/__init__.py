"""Correlated-noise (matrix factorization, DP-FTRL) mechanisms, as pure functions and values.

DP-SGD adds independent noise ``N(0, (sigma C)^2)`` to every clipped gradient sum.  A matrix
mechanism with a lower-triangular strategy ``C`` instead adds ``sigma C sens(C) (C^{-1} Z)_t``
at step ``t``: noise correlated across steps so that much of it cancels in the running sums SGD
follows (Kairouz et al. 2021; Denisov et al. 2022; Choquette-Choo et al. 2023; Dvijotham, McKenna
et al. 2024).

* strategies: :func:`identity` (DP-SGD), :func:`tree` (binary-tree DP-FTRL, ``O(log n)`` state),
  :func:`banded_toeplitz` / :func:`banded` (banded MF, ``b - 1`` buffers), :func:`blt`
  (buffered linear Toeplitz, a few buffers); :func:`optimize_banded_toeplitz`,
  :func:`optimize_blt` minimise the prefix-sum error (:func:`prefix_loss`);
* participation: :func:`single_participation`, :func:`min_separation`, :func:`cyclic_poisson`
  (with :func:`cyclic_poisson_batches` for the data side);
* sensitivity: :func:`sensitivity`, :func:`toeplitz_sensitivity`, :func:`sensitivity_brute_force`;
* the mechanism: :func:`mechanism` -> :class:`CorrelatedNoise` with ``init(params)`` and
  ``sample(state, key, stddev, like)``, the state a :class:`NoiseState` pytree; :func:`mf_noise`
  for hand-written loops; :func:`mechanism_epsilon`, :func:`calibrate_mechanism_noise` (the old names
  ``epsilon`` / ``calibrate_noise`` are deprecated aliases: ``fundp.epsilon`` takes a ledger).

Example:
  >>> import torch, fundp
  >>> n = 32
  >>> mech = fundp.mf.mechanism(fundp.mf.optimize_banded_toeplitz(n, 4), fundp.mf.cyclic_poisson(4, 0.05))
  >>> params = {"w": torch.zeros(3)}
  >>> state = mech.init(params)
  >>> noise, state = mech.sample(state, fundp.random.key(1), 1.0 * 1.0, params)  # sigma * clip norm
  >>> round(fundp.mf.mechanism_epsilon(mech, noise_multiplier=1.0, delta=1e-5), 3) == round(
  ...     fundp.epsilon(fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.05, steps=8), 1e-5), 3)
  True
"""

from fundp.mf.accounting import (
    CyclicPoisson,
    MinSeparation,
    Participation,
    SingleParticipation,
    cyclic_poisson,
    gaussian_delta,
    gaussian_epsilon,
    min_separation,
    single_participation,
)
from fundp.mf.mechanism import (
    AmplifiedBanded,
    CorrelatedNoise,
    NoiseState,
    amplified_banded,
    calibrate_mechanism_noise,
    calibrate_noise,
    epsilon,
    mechanism,
    mechanism_epsilon,
    mf_noise,
)
from fundp.mf.optimize import optimize_banded_toeplitz, optimize_blt, prefix_error, prefix_loss, sqrt_toeplitz_coefs
from fundp.mf.sampling import CyclicPoissonBatches, check_batches_match, cyclic_poisson_batches, partitions
from fundp.mf.sensitivity import (
    column_norms,
    max_participation_sum,
    max_participations,
    sensitivity,
    sensitivity_brute_force,
    toeplitz_sensitivity,
)
from fundp.mf.strategies import (
    BandedMatrix,
    BandedToeplitz,
    BufferedToeplitz,
    Strategy,
    TreeAggregation,
    banded,
    banded_toeplitz,
    blt,
    identity,
    tree,
)

__all__ = [
    "AmplifiedBanded",
    "BandedMatrix",
    "BandedToeplitz",
    "BufferedToeplitz",
    "CorrelatedNoise",
    "CyclicPoisson",
    "CyclicPoissonBatches",
    "MinSeparation",
    "NoiseState",
    "Participation",
    "SingleParticipation",
    "Strategy",
    "TreeAggregation",
    "amplified_banded",
    "banded",
    "banded_toeplitz",
    "blt",
    "calibrate_mechanism_noise",
    "check_batches_match",
    "column_norms",
    "cyclic_poisson",
    "cyclic_poisson_batches",
    "gaussian_delta",
    "gaussian_epsilon",
    "identity",
    "max_participation_sum",
    "max_participations",
    "mechanism",
    "mechanism_epsilon",
    "mf_noise",
    "min_separation",
    "optimize_banded_toeplitz",
    "optimize_blt",
    "partitions",
    "prefix_error",
    "prefix_loss",
    "sensitivity",
    "sensitivity_brute_force",
    "single_participation",
    "sqrt_toeplitz_coefs",
    "toeplitz_sensitivity",
    "tree",
]
