"""A noise schedule with a correlated-noise mechanism (issue 20): accounted exactly or refused.

``sample`` scales the draw after the recurrence, so the run releases ``Y = X + D C^{-1} Z``
(``D = diag(sigma_t)``, units of clip norm x sens(C)), a post-processing of the Gaussian mechanism
``C D^{-1} X + Z``.  The independent reference here: materialise ``C`` (``strategy.matrix()``),
scale its columns by ``1 / sigma_t``, take the largest ``||C D^{-1} u||`` over every allowed 0/1
participation vector ``u`` (enumerated; exact for these non-negative strategies), divide by the
mechanism's sensitivity recomputed the same way at ``D = I``, add ``|S| / sigma_b^2`` for an
adaptive-clipping count, and solve the Gaussian mechanism's closed form (Balle & Wang 2018,
Thm 8) by bisection with scipy's normal CDF.
"""

import itertools
import math

import numpy as np
import pytest
import torch

import fundp
import fundp.mf as mf
from fundp import adaptive
from fundp.accounting import Ledger, ScheduledCorrelatedNoiseStep
from fundp.guards import UNSUPPORTED, UnsupportedCombination
from test_ledger_kinds import gaussian_mechanism_epsilon as gaussian_epsilon  # Balle & Wang, scipy + bisection

DELTA = 1e-5


def allowed_sets(n, min_sep, k):
    for size in range(1, k + 1):
        for steps in itertools.combinations(range(n), size):
            if all(later - earlier >= min_sep for earlier, later in zip(steps, steps[1:])):
                yield steps


def reference_mu(matrix, sigmas, min_sep, k, sigma_b=None):
    """max over allowed S of ||sum_{t in S} C[:, t] / sigma_t||^2 / sens(C)^2 (+ |S| / sigma_b^2), square-rooted;
    the recorded steps are the first len(sigmas)."""
    n = matrix.shape[0]
    sens2 = max(np.sum(matrix[:, list(s)].sum(axis=1) ** 2) for s in allowed_sets(n, min_sep, k))
    scaled = matrix[:, : len(sigmas)] / np.asarray(sigmas)
    best = 0.0
    for s in allowed_sets(len(sigmas), min_sep, k):
        value = np.sum(scaled[:, list(s)].sum(axis=1) ** 2) / sens2
        if sigma_b is not None:
            value += len(s) / sigma_b**2
        best = max(best, value)
    return math.sqrt(best)


def recorded(mech, sigmas, cfg=None):
    ledger = Ledger()
    for t, sigma in enumerate(sigmas):
        ledger = mech.account(ledger, noise_multiplier=sigma, step=t, adaptive_clipping=cfg, scheduled=True)
    return ledger


MECHANISMS = {
    # name: (strategy, participation, (min_sep, k) of the reference)
    "single tree": (mf.tree(4), mf.single_participation(), (1, 1)),
    "single blt": (mf.blt([0.8, 0.3], [0.4, 0.2], 5), mf.single_participation(), (1, 1)),
    "single banded": (mf.banded_toeplitz([1.0, 0.6, 0.2], 5), mf.single_participation(), (1, 1)),
    "minsep banded toeplitz": (mf.banded_toeplitz([1.0, 0.5], 5), mf.min_separation(2), (2, 3)),
    "minsep banded, capped": (mf.banded_toeplitz([1.0, 0.7], 5), mf.min_separation(2, max_participations=2), (2, 2)),
    "minsep banded matrix": (mf.banded(np.diag([1.0, 1.2, 0.7, 1.5, 0.9]) + np.diag([0.9, 1.3, 0.6, 1.1], -1)),
                             mf.min_separation(2), (2, 3)),
}
SCHEDULES = {"decaying": [2.0, 1.5, 1.1, 0.9, 0.8], "rising": [0.7, 0.9, 1.4, 2.0, 3.0], "bumpy": [1.0, 3.0, 0.6, 2.5, 1.2]}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(MECHANISMS))
def test_the_epsilon_of_a_schedule_is_the_gaussian_mechanism_of_the_column_scaled_strategy(name, schedule):
    strategy, participation, (min_sep, k) = MECHANISMS[name]
    mech = mf.mechanism(strategy, participation)
    sigmas = SCHEDULES[schedule][: strategy.n]
    ledger = recorded(mech, sigmas)
    assert ledger.steps == len(sigmas) and all(isinstance(e, ScheduledCorrelatedNoiseStep) for e in ledger.events)
    mu = reference_mu(strategy.matrix(), sigmas, min_sep, k)
    assert fundp.epsilon(ledger, DELTA) == pytest.approx(gaussian_epsilon(mu, DELTA), rel=1e-7)
    # a prefix of the run: its own (smaller or equal) mechanism
    prefix = recorded(mech, sigmas[:2])
    assert fundp.epsilon(prefix, DELTA) == pytest.approx(
        gaussian_epsilon(reference_mu(strategy.matrix(), sigmas[:2], min_sep, k), DELTA), rel=1e-7)
    assert Ledger.from_json(ledger.to_json()) == ledger


@pytest.mark.parametrize("name", ["single tree", "minsep banded toeplitz", "minsep banded, capped"])
def test_adaptive_clipping_counts_compose_with_the_scheduled_gradient_mechanism(name):
    """The counts (sensitivity 1, std sigma_b, one per participation) join the same Gaussian mechanism."""
    strategy, participation, (min_sep, k) = MECHANISMS[name]
    mech = mf.mechanism(strategy, participation)
    cfg = adaptive.quantile_clipping(count_noise_multiplier=3.0)
    sigmas = SCHEDULES["bumpy"][: strategy.n]
    mu = reference_mu(strategy.matrix(), sigmas, min_sep, k, sigma_b=3.0)
    assert fundp.epsilon(recorded(mech, sigmas, cfg), DELTA) == pytest.approx(gaussian_epsilon(mu, DELTA), rel=1e-7)
    # never above today's accounting of a constant sigma at the schedule's smallest value
    constant = mech.account(Ledger(), noise_multiplier=min(sigmas), steps=strategy.n, adaptive_clipping=cfg)
    assert fundp.epsilon(recorded(mech, sigmas, cfg), DELTA) <= fundp.epsilon(constant, DELTA) * (1 + 1e-12)


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_a_constant_schedule_gives_the_constant_sigma_accounting(name):
    strategy, participation, _ = MECHANISMS[name]
    mech = mf.mechanism(strategy, participation)
    ledger = recorded(mech, [1.3] * strategy.n)
    assert fundp.epsilon(ledger, DELTA) == pytest.approx(fundp.epsilon(mech.ledger(1.3), DELTA), rel=1e-12)
    assert fundp.epsilon(ledger, DELTA) == pytest.approx(mf.mechanism_epsilon(mech, noise_multiplier=1.3, delta=DELTA), rel=1e-8)
    assert fundp.epsilon(ledger, DELTA, accountant="rdp") == pytest.approx(
        fundp.epsilon(mech.ledger(1.3), DELTA, accountant="rdp"), rel=1e-12)


@pytest.mark.parametrize("strategy,participation", [
    (mf.tree(8), mf.min_separation(2)),
    (mf.blt([0.8], [0.3], 8), mf.min_separation(3)),
    (mf.banded_toeplitz([1.0, 0.5], 8), mf.cyclic_poisson(2, 0.5)),
])
def test_a_schedule_is_refused_where_it_is_not_accounted(strategy, participation):
    mech = mf.mechanism(strategy, participation)
    assert mech.schedule_refusal() is not None
    with pytest.raises(UnsupportedCombination) as caught:
        mech.account(Ledger(), noise_multiplier=1.0, step=0, scheduled=True)
    assert caught.value.pair == ("noise_mechanism", "noise_multiplier (per call)")
    assert str(caught.value).startswith(UNSUPPORTED[caught.value.pair][1])


def test_a_run_recorded_with_and_without_the_schedule_or_a_step_twice_is_refused():
    mech = mf.mechanism(mf.banded_toeplitz([1.0, 0.5], 4), mf.min_separation(2))
    mixed = mech.account(recorded(mech, [1.0, 1.2]), noise_multiplier=1.0, step=2)
    with pytest.raises(ValueError, match="both with a per-call noise_multiplier"):
        fundp.epsilon(mixed, DELTA)
    twice = mech.account(recorded(mech, [1.0, 1.2]), noise_multiplier=0.9, step=1, scheduled=True)
    with pytest.raises(ValueError, match="more than once"):
        fundp.epsilon(twice, DELTA)


def test_dp_step_records_the_schedule_and_its_epsilon_is_the_reference():
    """Through dp_step: one event per step, the per-call sigma recorded, epsilon = the closed form."""
    mech = mf.mechanism(mf.banded_toeplitz([1.0, 0.5], 4), mf.min_separation(2))
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    step = fundp.dp_step(lambda p, b: (b @ p["w"] - 1.0) ** 2, max_norm=1.0, noise_multiplier=1.0,
                         expected_batch_size=2.0, grad_method="vmap", noise_mechanism=mech)
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    sigmas, ledger, state = [1.5, 0.8, 1.1, 2.0], Ledger(), mech.init(params)
    for t, sigma in enumerate(sigmas):
        out = step(params, rows, fundp.random.fold_in(fundp.random.key(31), t), ledger=ledger, noise_state=state,
                   noise_multiplier=sigma)
        ledger, state = out.ledger, out.noise_state
    assert [e.noise_multiplier for e in ledger.events] == sigmas and ledger.steps == 4
    mu = reference_mu(mech.strategy.matrix(), sigmas, 2, 2)
    assert fundp.epsilon(ledger, DELTA) == pytest.approx(gaussian_epsilon(mu, DELTA), rel=1e-7)
