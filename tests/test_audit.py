"""Empirical audit: below the accountant's epsilon for a correct step, far above it when broken."""

import math

import pytest
import torch
from scipy import stats

import fundp
from fundp.audit import clopper_pearson_upper, epsilon_lower_bound

SIGMA, DELTA, TRIALS = 2.0, 1e-5, 600  # one step at sigma 2: epsilon ~ 2; 300 clean trials cap the bound near 4.4


def _problem():
    torch.manual_seed(0)
    params = {"w": torch.zeros(6, dtype=torch.float64)}
    batch = {"x": torch.randn(8, 6, dtype=torch.float64), "y": torch.randn(8, dtype=torch.float64)}
    canary = {"x": torch.zeros(1, 6, dtype=torch.float64), "y": torch.tensor([50.0], dtype=torch.float64)}
    canary["x"][0, 0] = 1.0  # gradient 2 * (0 - 50) * e_0: norm 100, far above C = 1

    def loss_fn(p, b):
        return (b["x"] @ p["w"] - b["y"]) ** 2

    return params, batch, canary, loss_fn


def _audit(max_norm, noise_multiplier):
    params, batch, canary, loss_fn = _problem()
    step = fundp.dp_step(loss_fn, max_norm=max_norm, noise_multiplier=noise_multiplier, expected_batch_size=9, grad_method="vmap")
    return fundp.audit.audit_dp_step(step, loss_fn, params, batch, canary, trials=TRIALS, key=fundp.random.key(1), delta=DELTA)


def _claimed_epsilon():
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=SIGMA, sample_rate=1.0)
    return fundp.epsilon(ledger, DELTA)


def test_correct_step_audits_below_the_accountant():
    result = _audit(max_norm=1.0, noise_multiplier=SIGMA)
    assert result.epsilon_lower_bound < _claimed_epsilon()
    assert result.confidence == 0.95 and result.trials == 2 * TRIALS


def test_broken_clipping_is_caught():
    # Clipping off (C = 1e4) with the same absolute noise std 1.0 the accountant assumes for C = 1.
    result = _audit(max_norm=1e4, noise_multiplier=SIGMA / 1e4)
    assert result.epsilon_lower_bound > _claimed_epsilon()


def test_broken_noise_is_caught():
    result = _audit(max_norm=1.0, noise_multiplier=SIGMA / 20)
    assert result.epsilon_lower_bound > _claimed_epsilon()


def test_lower_bound_on_gaussian_scores_is_sound_and_informative():
    # Scores from the Gaussian mechanism itself: N(mu, 1) vs N(0, 1), whose exact epsilon at
    # delta is known; the audit's bound must stay below it and be non-trivial.
    g = torch.Generator().manual_seed(0)
    mu = 4.0
    scores_in = torch.randn(4000, generator=g, dtype=torch.float64) + mu
    scores_out = torch.randn(4000, generator=g, dtype=torch.float64)
    result = epsilon_lower_bound(scores_in, scores_out, delta=DELTA)
    # exact epsilon of the Gaussian mechanism with sensitivity/sigma = mu (Balle & Wang 2018)
    def profile(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - DELTA
    from scipy.optimize import brentq

    exact = brentq(profile, 0, 100)
    assert 1.5 < result.epsilon_lower_bound < exact


def test_clopper_pearson_matches_closed_form():
    # Zero failures: the upper bound solves (1 - p)^n = alpha.
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100))


def test_bad_input():
    with pytest.raises(ValueError, match="delta"):
        epsilon_lower_bound([1.0] * 8, [0.0] * 8, delta=1.0)
    with pytest.raises(ValueError, match="at least 4"):
        epsilon_lower_bound([1.0], [0.0], delta=1e-5)
    with pytest.raises(ValueError, match="finite"):
        epsilon_lower_bound([float("nan")] * 8, [0.0] * 8, delta=1e-5)
