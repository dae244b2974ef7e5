"""Empirical audit: below the accountant's epsilon for a correct step, far above it when broken."""

import math

import pytest
import torch
from scipy import stats

import fundp
from fundp.audit import clopper_pearson_upper, epsilon_lower_bound, max_detectable_epsilon, trials_needed

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
    # The audit is big enough to mean something: a perfect attack could show more than the claim.
    assert result.max_detectable_epsilon == pytest.approx(_perfect_attack_epsilon(TRIALS // 2, TRIALS // 2, DELTA, 0.95), rel=1e-12)
    assert result.max_detectable_epsilon > _claimed_epsilon()


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


def _perfect_attack_epsilon(n_in, n_out, delta, confidence):
    # Closed form: Clopper-Pearson upper bound with 0 failures in n trials at alpha/2 is
    # 1 - (alpha/2)^(1/n); the Kairouz et al. bound of these rates, both directions.
    half_alpha = (1 - confidence) / 2
    p_in, p_out = 1 - half_alpha ** (1 / n_in), 1 - half_alpha ** (1 / n_out)
    return max(0.0, math.log((1 - delta - p_in) / p_out), math.log((1 - delta - p_out) / p_in))


@pytest.mark.parametrize("n_in, n_out, delta, confidence", [(300, 300, 1e-5, 0.95), (50, 80, 1e-3, 0.9), (1000, 7, 0.0, 0.99), (2, 2, 1e-5, 0.95)])
def test_max_detectable_epsilon_matches_the_closed_form(n_in, n_out, delta, confidence):
    expected = _perfect_attack_epsilon(n_in, n_out, delta, confidence)
    assert max_detectable_epsilon(n_in, n_out, delta=delta, confidence=confidence) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_perfectly_separated_scores_reach_exactly_the_largest_detectable_epsilon():
    # 9 runs with, 13 without: the measured halves are the last 5 and the last 7.
    result = epsilon_lower_bound([3.0] * 9, [-3.0] * 13, delta=1e-5, confidence=0.9)
    expected = _perfect_attack_epsilon(5, 7, 1e-5, 0.9)
    assert result.epsilon_lower_bound == pytest.approx(expected, rel=1e-12)
    assert result.max_detectable_epsilon == pytest.approx(expected, rel=1e-12)
    # Overlapping scores give a smaller bound, never a larger cap.
    g = torch.Generator().manual_seed(3)
    noisy = epsilon_lower_bound(torch.randn(9, generator=g) + 1, torch.randn(13, generator=g), delta=1e-5, confidence=0.9)
    assert noisy.epsilon_lower_bound <= noisy.max_detectable_epsilon == result.max_detectable_epsilon


@pytest.mark.parametrize("epsilon, delta", [(2.0, 1e-5), (0.5, 0.0), (8.0, 1e-6)])
def test_trials_needed_is_the_smallest_audit_that_can_detect_epsilon(epsilon, delta):
    n = trials_needed(epsilon, delta=delta)
    measured = lambda trials: trials - trials // 2  # the half epsilon_lower_bound measures on
    assert _perfect_attack_epsilon(measured(n), measured(n), delta, 0.95) > epsilon
    if n > 8:
        assert _perfect_attack_epsilon(measured(n - 1), measured(n - 1), delta, 0.95) <= epsilon


def test_an_audit_too_small_to_detect_the_claim_says_so():
    # 8 trials per side cannot show any epsilon at all at 95%: the cap is 0, below any claim.
    params, batch, canary, loss_fn = _problem()
    broken = fundp.dp_step(loss_fn, max_norm=1e4, noise_multiplier=0.0, expected_batch_size=9, grad_method="vmap")
    result = fundp.audit.audit_dp_step(broken, loss_fn, params, batch, canary, trials=8, key=fundp.random.key(0), delta=DELTA)
    assert result.max_detectable_epsilon == 0.0 == result.epsilon_lower_bound  # perfectly separable, yet nothing shown


def test_bad_input():
    with pytest.raises(ValueError, match="delta"):
        epsilon_lower_bound([1.0] * 8, [0.0] * 8, delta=1.0)
    with pytest.raises(ValueError, match="at least 4"):
        epsilon_lower_bound([1.0], [0.0], delta=1e-5)
    with pytest.raises(ValueError, match="finite"):
        epsilon_lower_bound([float("nan")] * 8, [0.0] * 8, delta=1e-5)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound([1.0] * 8, [0.0] * 8, delta=1e-5, confidence=1.0)
    with pytest.raises(TypeError, match="delta"):
        max_detectable_epsilon(10, 10, delta="small")
    with pytest.raises(ValueError, match="trials_in"):
        max_detectable_epsilon(0, 10, delta=1e-5)
    with pytest.raises(ValueError, match="failures"):
        clopper_pearson_upper(11, 10, 0.05)
    with pytest.raises(ValueError, match="epsilon"):
        trials_needed(-1.0, delta=1e-5)
    params, batch, canary, loss_fn = _problem()
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=9)
    with pytest.raises(ValueError, match="trials must be >= 8"):
        fundp.audit.audit_dp_step(step, loss_fn, params, batch, canary, trials=7, key=fundp.random.key(0), delta=DELTA)
