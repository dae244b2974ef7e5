"""Ledgers with many distinct (sigma, q) segments (noise schedules), several queries on one batch,
and scaling a schedule's shape to an epsilon target.

Every reference is computed independently of the code under test: Google's dp_accounting (RDP
curves), the scalar per-segment RDP path (itself checked against binomial sums and quadrature in
test_accounting_accuracy.py) with the conversion written out here, the Gaussian mechanism's
closed form (Balle & Wang 2018), and a two-dimensional quadrature of the joint mechanism.
Speed is measured in benchmarks/accounting.py, not here.
"""

import math

import numpy as np
import pytest
from scipy import optimize, special

from fundp.accounting import (
    Ledger,
    UnreachableTargetError,
    accountant_step,
    calibrate_noise_schedule,
    combined_noise_multiplier,
    delta,
    epsilon,
    rdp,
)

DELTA = 1e-5


def schedule(n, sigma=(0.8, 1.6), q=(0.01, 0.01), steps=1, seed=0):
    """``n`` distinct segments: sigmas on a geometric ramp, sample rates drawn in ``q``."""
    rng = np.random.default_rng(seed)
    sigmas = np.geomspace(*sigma, n)
    rates = rng.uniform(*q, n) if q[0] != q[1] else np.full(n, q[0])
    counts = rng.integers(1, steps + 1, n) if steps > 1 else np.ones(n, dtype=int)
    return [(float(s), float(r), int(c)) for s, r, c in zip(sigmas, rates, counts)]


def conversion(curve, orders, target):
    """Balle et al. 2020, Theorem 21, minimised over ``orders``: written out independently."""
    return min(
        total + math.log((a - 1) / a) - (math.log(target) + math.log(a)) / (a - 1) for total, a in zip(curve, orders)
    )


# ----------------------------------------------------------------------- RDP, vectorised


def test_vectorised_rdp_equals_the_sum_of_per_segment_curves():
    segments = schedule(40, sigma=(0.6, 6.0), q=(0.001, 0.2), steps=50)
    assert len(segments) > rdp.SCALAR_SEGMENTS  # the vectorised path
    orders = [1.5, 2.0, 2.5, 3.0, 7.3, 16.0, 64.0, 300.0, 2048.0]
    together = rdp.composed_rdp(segments, orders)
    apart = sum(steps * rdp.rdp(sigma, q, orders) for sigma, q, steps in segments)
    np.testing.assert_allclose(together, apart, rtol=1e-10)
    # The whole query equals the scalar path's minimum over its full grid (the conversion here).
    grid = list(rdp.DEFAULT_ORDERS)
    full = sum(steps * rdp.rdp(sigma, q, grid) for sigma, q, steps in segments)
    for target in (1e-5, 1e-9):
        assert 0 < int(np.argmin([conversion([c], [a], target) for c, a in zip(full, grid)])) < len(grid) - 1
        assert epsilon(Ledger(segments), target, accountant="rdp") == pytest.approx(
            max(conversion(full, grid, target), 0.0), rel=1e-9)
    eps = epsilon(Ledger(segments), DELTA, accountant="rdp")
    assert delta(Ledger(segments), eps, accountant="rdp") == pytest.approx(DELTA, rel=1e-6)


def test_vectorised_rdp_integer_orders_match_dp_accounting():
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    segments = schedule(60, sigma=(0.7, 3.0), q=(0.005, 0.05), steps=20, seed=1)
    orders = [2.0, 3.0, 8.0, 32.0, 128.0]
    accountant = rdp_privacy_accountant.RdpAccountant(orders=orders)
    for sigma, q, steps in segments:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    np.testing.assert_allclose(rdp.composed_rdp(segments, orders), accountant._rdp, rtol=1e-9)


def test_many_segments_beyond_the_exact_fractional_budget_stay_upper_bounds(monkeypatch):
    # A schedule whose noise and sample rate both ramp (batch size growing as the noise falls).
    segments = [(float(s), float(q), 1) for s, q in zip(np.geomspace(1.6, 0.8, 300), np.geomspace(0.005, 0.02, 300))]
    exact = epsilon(Ledger(segments), DELTA, accountant="rdp")
    # Fractional orders at a few dominating knots (sigma rounded down, q up) instead of per segment.
    for knots, slack in ((64, 1.02), (8, 1.05)):
        monkeypatch.setattr(rdp, "_FRACTIONAL_KNOTS", knots)
        coarse = rdp.epsilon(Ledger(segments).segments, DELTA)
        assert exact <= coarse <= exact * slack


def test_rdp_of_a_hundred_thousand_segments_runs():
    segments = schedule(10**5, sigma=(0.8, 1.6))
    value = epsilon(Ledger(segments), DELTA, accountant="rdp")
    # Same composed RDP as 10^5 steps at every sigma's ... bracketed by the extremes of the ramp.
    low = epsilon(Ledger([(1.6, 0.01, 10**5)]), DELTA, accountant="rdp")
    high = epsilon(Ledger([(0.8, 0.01, 10**5)]), DELTA, accountant="rdp")
    assert low < value < high


# --------------------------------------------------------------------------- PRV of schedules


def gaussian_epsilon(mu, target):
    """Exact epsilon of mu-GDP (the Gaussian mechanism, Balle & Wang 2018), written out here."""
    def profile(eps):
        return special.ndtr(-eps / mu + mu / 2) - math.exp(eps + special.log_ndtr(-eps / mu - mu / 2))
    high = 1.0
    while profile(high) > target:
        high *= 2
    return optimize.brentq(lambda e: profile(e) - target, 0.0, high, xtol=1e-14, rtol=1e-14)


def test_prv_of_a_heavy_segment_among_many_light_ones_is_bracketed():
    # One segment carries almost all the privacy loss; 300 distinct light ones add a little.
    # Domination brackets the answer: dropping the light ones gives less, and replacing each light
    # sigma by the smallest of them (more noise is post-processing) gives more.
    heavy = (2.0, 0.01, 500)
    light = [(float(s), 0.01, 1) for s in np.geomspace(10.0, 25.0, 300)]
    ours = epsilon(Ledger([heavy] + light), DELTA)
    assert epsilon(Ledger([heavy]), DELTA) < ours <= epsilon(Ledger([heavy, (10.0, 0.01, 300)]), DELTA) * (1 + 1e-3)


@pytest.mark.parametrize("n", [100, 400])
def test_prv_of_a_gaussian_schedule_is_a_tight_upper_bound(n):
    # q = 1: every step is a Gaussian mechanism, and the schedule composes exactly to mu-GDP with
    # mu^2 = sum_t sigma_t^-2.
    segments = schedule(n, sigma=(8.0, 16.0), q=(1.0, 1.0))
    exact = gaussian_epsilon(math.sqrt(sum(1 / s**2 for s, _, _ in segments)), DELTA)
    ours = epsilon(Ledger(segments), DELTA)
    assert exact * (1 - 1e-9) <= ours <= exact * (1 + 1e-3)


@pytest.mark.slow  # dp_accounting composes 2 x 70 distinct PLDs at interval 1e-4: ~1 min
def test_prv_of_a_subsampled_schedule_matches_dp_accounting():
    from dp_accounting.pld import privacy_loss_distribution as pld

    segments = schedule(70, sigma=(0.9, 1.8), q=(0.02, 0.02))
    assert len(segments) > 64  # the schedule path (sparse tails, stand-ins for aiming)
    total = {}
    for pessimistic in (True, False):
        for sigma, q, steps in segments:
            one = pld.from_gaussian_mechanism(
                standard_deviation=sigma, sensitivity=1.0, sampling_prob=q, value_discretization_interval=1e-4,
                pessimistic_estimate=pessimistic, use_connect_dots=pessimistic,
            ).self_compose(steps)
            total[pessimistic] = one if pessimistic not in total else total[pessimistic].compose(one)
    upper = total[True].get_epsilon_for_delta(DELTA)
    lower = total[False].get_epsilon_for_delta(DELTA)
    ours = epsilon(Ledger(segments), DELTA)
    assert ours >= lower * (1 - 1e-9), "below dp_accounting's optimistic (lower) estimate"
    assert abs(ours - upper) <= 1e-3 * upper, f"{ours} vs dp_accounting {upper}"


# ------------------------------------------------------- several queries on one sampled batch


def test_combined_noise_multiplier_formula_and_errors():
    assert combined_noise_multiplier(1.1) == 1.1
    assert combined_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    assert combined_noise_multiplier(3.0, 4.0, 12.0) == pytest.approx((1 / 9 + 1 / 16 + 1 / 144) ** -0.5, rel=1e-15)
    assert combined_noise_multiplier(1e-200, 1e-200) == pytest.approx(1e-200 / math.sqrt(2), rel=1e-15)  # no underflow
    with pytest.raises(ValueError, match="at least one"):
        combined_noise_multiplier()
    with pytest.raises(ValueError, match=r"noise_multipliers\[1\] must be > 0"):
        combined_noise_multiplier(1.0, 0.0)


def test_combined_mechanism_matches_the_gaussian_closed_form_at_q_1():
    # Without sampling, T releases of (gradient sum, count) with noise multipliers z_g, z_b are one
    # Gaussian mechanism with mu^2 = T (z_g^-2 + z_b^-2).
    z_g, z_b, steps = 4.0, 10.0, 50
    z = combined_noise_multiplier(z_g, z_b)
    ours = epsilon(accountant_step(Ledger(), noise_multiplier=z, sample_rate=1.0, steps=steps), DELTA)
    exact = gaussian_epsilon(math.sqrt(steps * (z_g**-2 + z_b**-2)), DELTA)
    assert exact * (1 - 1e-9) <= ours <= exact * (1 + 1e-3)


def joint_delta(z_g, z_b, q, eps):
    """delta(eps) of ONE step releasing (grad + N(0, z_g^2), count + N(0, z_b^2)) on a Poisson(q)
    batch (both sensitivities 1), by quadrature over the plane: no reduction to one dimension.
    Both adjacency directions; the larger is returned."""
    y1 = np.linspace(-12 * z_g, 1 + 12 * z_g, 3001)
    y2 = np.linspace(-12 * z_b, 1 + 12 * z_b, 3001)
    a, b = np.meshgrid(y1, y2, indexing="ij")
    absent = np.exp(-a**2 / (2 * z_g**2) - b**2 / (2 * z_b**2)) / (2 * math.pi * z_g * z_b)
    shifted = np.exp(-(a - 1) ** 2 / (2 * z_g**2) - (b - 1) ** 2 / (2 * z_b**2)) / (2 * math.pi * z_g * z_b)
    present = (1 - q) * absent + q * shifted
    area = (y1[1] - y1[0]) * (y2[1] - y2[0])
    remove = np.sum(np.maximum(present - math.exp(eps) * absent, 0.0)) * area
    add = np.sum(np.maximum(absent - math.exp(eps) * present, 0.0)) * area
    return max(remove, add)


@pytest.mark.parametrize("z_g, z_b, q, eps", [(1.0, 2.0, 0.2, 0.5), (0.8, 1.5, 0.5, 1.0)])
def test_combined_mechanism_matches_a_two_dimensional_quadrature(z_g, z_b, q, eps):
    z = combined_noise_multiplier(z_g, z_b)
    ours = delta(accountant_step(Ledger(), noise_multiplier=z, sample_rate=q), eps)
    reference = joint_delta(z_g, z_b, q, eps)  # quadrature error ~1e-6 relative on this grid
    assert ours == pytest.approx(reference, rel=2e-3)
    assert ours >= reference * (1 - 1e-4)


def test_a_second_accountant_step_for_the_count_query_under_reports():
    # Two accountant_step calls describe each query with its OWN, independent Poisson sample:
    # the differing example then escapes each query separately, which is more private than the
    # real release (one sample, both queries see the example or neither).  So the naive ledger's
    # epsilon is *smaller* than the truth - it under-reports; the combined mechanism is the truth.
    z_g, z_b, q, steps = 1.0, 5.0, 0.01, 1000
    naive = Ledger([(z_g, q, steps), (z_b, q, steps)])
    joint = accountant_step(Ledger(), noise_multiplier=combined_noise_multiplier(z_g, z_b), sample_rate=q, steps=steps)
    for accountant in ("prv", "rdp"):
        assert epsilon(naive, DELTA, accountant=accountant) < epsilon(joint, DELTA, accountant=accountant)
    # At q = 1 there is no sampling to be independent about, and the two agree.
    naive_q1 = Ledger([(4.0, 1.0, 10), (10.0, 1.0, 10)])
    joint_q1 = accountant_step(Ledger(), noise_multiplier=combined_noise_multiplier(4.0, 10.0), sample_rate=1.0, steps=10)
    assert epsilon(naive_q1, DELTA) == pytest.approx(epsilon(joint_q1, DELTA), rel=2e-3)


# ------------------------------------------------------------------------ schedule calibration


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrate_noise_schedule_meets_the_target_tightly(accountant):
    profile = [1.0] * 50 + [0.8] * 50
    sigmas = calibrate_noise_schedule(1.5, DELTA, sample_rate=0.05, noise_profile=profile, accountant=accountant)
    assert len(sigmas) == 100
    scale = sigmas[0]
    assert sigmas[-1] == pytest.approx(0.8 * scale, rel=1e-15)

    def spent(s):
        return epsilon(Ledger([(s * p, 0.05, 1) for p in profile]), DELTA, accountant=accountant)

    assert spent(scale) <= 1.5 < spent(0.999 * scale)


def test_calibrate_noise_schedule_with_a_callable_profile_and_a_ledger():
    def decay(t):  # six plateaus
        return 1.0 / (1 + (t // 50) / 4)

    spent_already = accountant_step(Ledger(), noise_multiplier=2.0, sample_rate=0.01, steps=500)
    sigmas = calibrate_noise_schedule(3.0, DELTA, sample_rate=0.01, noise_profile=decay, steps=300, ledger=spent_already)
    assert sigmas[0] / sigmas[299] == pytest.approx(decay(0) / decay(299), rel=1e-12)
    ledger = Ledger(spent_already.segments + tuple((s, 0.01, 1) for s in sigmas))
    assert epsilon(ledger, DELTA) <= 3.0
    lower = Ledger(spent_already.segments + tuple((0.999 * s, 0.01, 1) for s in sigmas))
    assert epsilon(lower, DELTA) > 3.0


def test_calibrate_noise_schedule_errors():
    with pytest.raises(ValueError, match="steps is required"):
        calibrate_noise_schedule(1.0, DELTA, sample_rate=0.01, noise_profile=lambda t: 1.0)
    with pytest.raises(ValueError, match="steps is only for a callable"):
        calibrate_noise_schedule(1.0, DELTA, sample_rate=0.01, noise_profile=[1.0], steps=3)
    with pytest.raises(ValueError, match=r"noise_profile\[1\] must be > 0"):
        calibrate_noise_schedule(1.0, DELTA, sample_rate=0.01, noise_profile=[1.0, -1.0])
    with pytest.raises(ValueError, match="at least one step"):
        calibrate_noise_schedule(1.0, DELTA, sample_rate=0.01, noise_profile=[])
    with pytest.raises(TypeError, match="noise_profile must be"):
        calibrate_noise_schedule(1.0, DELTA, sample_rate=0.01, noise_profile=3.0)
    with pytest.raises(UnreachableTargetError):
        calibrate_noise_schedule(1e-4, 1e-10, sample_rate=1.0, noise_profile=[1.0] * 10**4)
    with pytest.raises(ValueError, match="target_epsilon must be > 0"):
        calibrate_noise_schedule(0.0, DELTA, sample_rate=0.01, noise_profile=[1.0])
