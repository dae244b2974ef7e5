"""Corners of the "prv" accountant: the provable FFT round-off bound, the Gaussian mechanism (q = 1)
at large epsilon, huge epsilon in ``delta``, and small-q / small-delta queries.

References are computed independently here: exact circular convolution in extended precision
(numpy ``longdouble``) of the same single-step PLDs, and the closed form of T composed Gaussian
mechanisms, ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``, ``mu = sqrt(T)/sigma``.
"""

import math
import time
import warnings

import numpy as np
import pytest
from scipy import special

from fundp.accounting import Ledger, delta, epsilon, pld, prv


# ------------------------------------------------------------------ the round-off bound


def exact_circular_composition(plds, tilt, size, start):
    """The tilted, normalised composed PLD on the circle of ``size`` points, by direct convolution
    in long double (binary powering), rolled so index 0 is lattice point ``start``."""
    total = None
    for single, count in plds:
        losses = single.grid.astype(np.longdouble) * np.longdouble(single.interval)
        with np.errstate(divide="ignore"):
            exponent = np.log(single.masses.astype(np.longdouble)) + np.longdouble(tilt) * losses
        weights = np.exp(exponent - exponent.max())
        weights /= weights.sum()
        signal = np.zeros(size, dtype=np.longdouble)
        np.add.at(signal, single.grid % size, weights)
        power, base, n = None, signal, count
        while n:
            if n & 1:
                power = base if power is None else circular(power, base)
            n >>= 1
            if n:
                base = circular(base, base)
        total = power if total is None else circular(total, power)
    return np.roll(total, -(start % size))


def circular(a, b):
    full = np.convolve(a, b)
    out = full[: a.size].copy()
    out[: full.size - a.size] += full[a.size:]
    return out


ROUND_OFF_CASES = [
    # (segments (sigma, q, count), interval, tilt)
    ([(1.0, 1.0, 20)], 0.02, 0.0),
    ([(1.0, 1.0, 20)], 0.02, 3.0),
    ([(0.8, 0.2, 50)], 0.01, 0.0),
    ([(0.8, 0.2, 50)], 0.01, 10.0),
    ([(0.7, 0.05, 300)], 0.005, 25.0),
    ([(1.0, 0.3, 7), (2.0, 0.5, 1), (0.9, 0.1, 33)], 0.04, 4.0),
]


@pytest.mark.parametrize("segments, interval, tilt", ROUND_OFF_CASES)
@pytest.mark.parametrize("direction", ["remove", "add"])
def test_composed_entries_stay_within_the_round_off_bound(segments, interval, tilt, direction):
    plds = [(pld.discretize(sigma, q, interval, direction, 1e-12), count) for sigma, q, count in segments]
    composed = pld.compose(plds, 1e-12, tilt=tilt)
    size = composed.masses.size
    assert size <= 4096, "keep the exact reference small"
    exact = exact_circular_composition(plds, tilt, size, composed.start)
    error = np.abs(composed.masses.astype(np.longdouble) - exact).astype(float)
    allowed = composed.entry_error + composed.relative_error * np.abs(exact).astype(float)
    assert np.all(error <= allowed), f"worst ratio {float(np.max(error / allowed)):.3g}"
    # The bound means something: round-off happened, and the bound is not absurdly loose.
    assert error.max() > 0
    assert composed.entry_error < 1e-11


def _split(single, fraction):
    """``single`` cut into bulk and tail where the tail holds about ``fraction`` of its mass."""
    suffix = np.cumsum(single.masses[::-1])[::-1]
    cut = int(np.searchsorted(-suffix, -fraction * suffix[0]))
    return (pld.DiscretePLD(single.interval, single.start, single.masses[:cut], 0.0),
            pld.DiscretePLD(single.interval, single.start + cut, single.masses[cut:], 0.0))


MIXTURE_CASES = [
    # (segments (sigma, q, count), interval, tilt, count vectors n (tail steps per segment))
    ([(0.8, 0.05, 40)], 0.01, 0.0, [(1,), (2,), (3,)]),
    ([(0.8, 0.05, 40)], 0.01, 12.0, [(1,), (2,), (3,)]),
    ([(0.7, 0.1, 20), (1.0, 0.2, 10)], 0.02, 5.0, [(1, 0), (0, 1), (1, 1), (2, 0), (0, 2)]),
]


@pytest.mark.parametrize("segments, interval, tilt, vectors", MIXTURE_CASES)
def test_mixture_entries_stay_within_the_round_off_bound(segments, interval, tilt, vectors):
    # The split composition's terms |n| >= 1 summed at one tilt by one FFT (fundp.accounting.mixture):
    # every entry within entry_error (+ relative_error) of the exact weighted sum of circular
    # compositions, in long double.
    from fundp.accounting.mixture import compose_mixture

    pieces, counts, log_weights = [], [], []
    for sigma, q, _ in segments:
        pieces += _split(pld.discretize(sigma, q, interval, "remove", 1e-12), 0.02)
    for n in vectors:
        row, log_binom = [], 0.0
        for (_, _, steps), k in zip(segments, n):
            row += [steps - k, k]
            log_binom += math.lgamma(steps + 1) - math.lgamma(k + 1) - math.lgamma(steps - k + 1)
        counts.append(row)
        log_weights.append(log_binom)
    composed = compose_mixture(pieces, counts, log_weights, 1e-12, tilt)
    size = composed.masses.size
    assert size <= 4096, "keep the exact reference small"
    exact = np.zeros(size, dtype=np.longdouble)
    log_norms = [np.log(np.sum(p.masses.astype(np.longdouble)
                               * np.exp(np.longdouble(tilt) * p.grid.astype(np.longdouble) * np.longdouble(interval))))
                 for p in pieces]
    for row, log_binom in zip(counts, log_weights):
        plds = [(p, c) for p, c in zip(pieces, row) if c > 0]
        weight = np.exp(np.longdouble(log_binom) + sum(np.longdouble(c) * norm for c, norm in zip(row, log_norms))
                        - np.longdouble(composed.log_scale))
        exact += weight * exact_circular_composition(plds, tilt, size, composed.start)
    error = np.abs(composed.masses.astype(np.longdouble) - exact).astype(float)
    allowed = composed.entry_error + composed.relative_error * np.abs(exact).astype(float)
    assert np.all(error <= allowed), f"worst ratio {float(np.max(error / allowed)):.3g}"
    assert error.max() > 0
    assert composed.entry_error < 1e-11


# ------------------------------------------------------------------ q = 1: the closed form


def gaussian_log_delta(mu, eps):
    """Closed form, by mpmath-free log-space algebra independent of fundp: log(Phi(a) - e^eps Phi(b))."""
    a, b = -eps / mu + mu / 2, -eps / mu - mu / 2
    log_a = special.log_ndtr(a)
    return log_a + math.log(-math.expm1(eps + special.log_ndtr(b) - log_a))


@pytest.mark.parametrize("sigma, steps, eps", [(1 / 3, 100, 500.0), (1 / 3, 100, 600.0), (0.25, 100, 900.0),
                                               (1.0, 1, 1.0), (20.0, 10_000, 0.05), (0.5, 7, 30.0)])
def test_gaussian_mechanism_is_exact_at_any_epsilon(sigma, steps, eps):
    mu = math.sqrt(steps) / sigma
    d = math.exp(gaussian_log_delta(mu, eps))
    ledger = Ledger([(sigma, 1.0, steps)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent (or loud) fallback to RDP
        got_eps, got_delta = epsilon(ledger, d), delta(ledger, eps)
    assert eps <= got_eps <= eps * (1 + 1e-8)
    assert d <= got_delta <= d * (1 + 1e-8)


def test_gaussian_mechanisms_with_different_sigmas_compose_to_one():
    ledger = Ledger([(1.0, 1.0, 3), (2.0, 1.0, 8)])
    mu = math.sqrt(3 + 8 / 4)
    d = math.exp(gaussian_log_delta(mu, 2.0))
    assert 2.0 <= epsilon(ledger, d) <= 2.0 * (1 + 1e-8)


# ------------------------------------------------------------------ huge epsilon in delta


@pytest.mark.parametrize("eps", [501.0, 1e3, 1e6])
def test_delta_at_huge_epsilon_is_quick_bounded_and_says_it_used_rdp(eps):
    ledger = Ledger([(1.0, 0.01, 1000), (0.7, 0.001, 50_000)])
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="RDP"):
        value = delta(ledger, eps)
    assert time.perf_counter() - start < 5.0
    assert 0.0 <= value <= 1e-100  # the true delta is astronomically small this far out


# ------------------------------------------------------------------ small q, small delta: tight, or says so


def _epsilon_by_bisection(pld, delta):
    low, high = 0.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if pld.get_delta_for_epsilon(mid) > delta else (low, mid)
    return high


def _dp_accounting_epsilon(sigma, q, steps, delta, interval, pessimistic=True):
    """Independent composition: dp_accounting's two-sided PLD (pessimistic connect-the-dots: an
    upper bound; optimistic privacy buckets: a lower estimate), epsilon found by bisection on its
    delta curve (its own ``get_epsilon_for_delta`` drifts at delta ~1e-12)."""
    import logging

    from dp_accounting.pld import privacy_loss_distribution

    logging.getLogger().setLevel(logging.ERROR)  # "connect-the-dots does not support optimistic"
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=interval, pessimistic_estimate=pessimistic,
        use_connect_dots=pessimistic).self_compose(steps)
    low, high = 0.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if pld.get_delta_for_epsilon(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize("sigma, q, steps, delta, interval", [
    (1.0, 1e-4, 10_000, 1e-8, 3e-5),
    # dp_accounting's FFT has no round-off control: at delta 1e-12 its 3e-5 grid gives a *smaller*
    # delta than its 1.5e-5 grid (not monotone), so the finer grid is the fairer reference.
    pytest.param(0.9, 1e-4, 1000, 1e-12, 1.5e-5, marks=pytest.mark.slow),
])
def test_small_q_small_delta_is_tight_against_dp_accounting(sigma, q, steps, delta, interval):
    # The corners (were +0.17% / +8.5%): the split composition keeps the round-off allowance
    # below the promise, and no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = epsilon(Ledger([(sigma, q, steps)]), delta)
    upper = _dp_accounting_epsilon(sigma, q, steps, delta, interval)
    lower = _dp_accounting_epsilon(sigma, q, steps, delta, interval, pessimistic=False)
    assert lower <= value <= upper * (1 + 1e-3)


@pytest.mark.slow
def test_small_q_small_delta_delta_is_within_one_percent_and_quick():
    # fundp.delta in the corner (sigma 1, q 1e-4, T 1e4) near the epsilon of delta = 1e-8 (was
    # 1.5-2.5 s, now ~0.7 s alone).  Reference: dp_accounting's pessimistic (connect-the-dots) PLD
    # on grids 1e-5 and 5e-6, whose excess shrinks like h^2 (measured 1.0073e-8, 1.0009e-8):
    # Richardson-extrapolated, ~0.9987e-8.  Its optimistic PLD is no use here (FFT round-off: 4e-11).
    import logging

    from dp_accounting.pld import privacy_loss_distribution

    logging.getLogger().setLevel(logging.ERROR)
    sigma, q, steps, eps = 1.0, 1e-4, 10_000, 0.0623
    coarse, fine = (privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=h, pessimistic_estimate=True,
        use_connect_dots=True).self_compose(steps).get_delta_for_epsilon(eps) for h in (1e-5, 5e-6))
    reference = (4 * fine - coarse) / 3
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = delta(Ledger([(sigma, q, steps)]), eps)
    assert time.perf_counter() - start < 10  # ~0.7 s alone on one core (generous: a shared CI machine)
    assert reference * (1 - 2e-3) <= ours <= reference * 1.01  # the coarse pass alone: +1.4%


def _term_by_term_delta(sigma, q, steps, eps, interval, n_max=4):
    """delta at ``eps`` ("remove" direction) of ``steps`` subsampled Gaussian steps, composed term by
    term: each step's connect-the-dots PLD cut into bulk and tail (1e-3 / steps of its mass), and
    ``sum_n C(T, n) bulk^{*(T - n)} * tail^{*n}`` for ``n <= n_max``, each term by its own FFT
    (``pld.compose``, tilted at its own saddle point), plus ``P(Bin(T, p) > n_max)`` and the mass at
    +inf.  Every piece is an upper bound; none goes through fundp's split or summed composition."""
    from scipy import stats

    step = pld.discretize(sigma, q, interval, "remove", 1e-23)
    suffix = np.cumsum(step.masses[::-1])[::-1]
    cut = int(np.searchsorted(-suffix, -1e-3 / steps))
    bulk = pld.DiscretePLD(interval, step.start, step.masses[:cut], 0.0)
    tail = pld.DiscretePLD(interval, step.start + cut, step.masses[cut:], 0.0)
    total = 0.0
    for n in range(n_max + 1):
        plds = [(bulk, steps - n)] + ([(tail, n)] if n else [])
        log_binom = math.lgamma(steps + 1) - math.lgamma(n + 1) - math.lgamma(steps - n + 1)
        term = pld.compose(plds, 1e-20 * math.exp(-log_binom), tilt=pld.saddle_point(plds, eps), lowest_loss=eps / 2)
        total += math.exp(log_binom) * term.delta(eps)
    p = float(tail.masses.sum()) / float(step.masses.sum())
    return total + stats.binom.sf(n_max, steps, p) + (1 - (1 - step.infinity_mass) ** steps)


@pytest.mark.slow
def test_million_step_corner_delta_is_within_one_percent_and_quick():
    # fundp.delta at (sigma 1, q 1e-5, T 10^6) at the epsilon of delta = 1e-12 (issue 21 item 4: was
    # 2.85 s on a quiet machine, ~0.7 s now, the split composition's tail terms summed in one FFT;
    # dp_accounting's PLDs (FFT round-off) and prv_accountant (refuses) give nothing usable here).
    # Reference: the same expansion composed term by term on the grid 2^-22 (~fundp's fine grid,
    # whose discretisation excess was measured <= 0.12%): ~1e-12 (0.99753e-12).
    sigma, q, steps, eps = 1.0, 1e-5, 10**6, 0.0807431
    for cache in (prv._composed_cached, prv._split_composed, prv._step_pld, prv._step_plds_cached, prv._stack):
        cache.cache_clear()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = delta(Ledger([(sigma, q, steps)]), eps)
    assert time.perf_counter() - start < 3  # ~0.7 s alone on one core (generous: a shared CI machine)
    reference = _term_by_term_delta(sigma, q, steps, eps, 2.0**-22)
    assert reference * (1 - 2e-3) <= ours <= reference * 1.01


def test_small_q_small_delta_says_when_the_promise_is_not_met():
    # Five segments: more than the split composition takes; the round-off allowance costs ~0.11%
    # here, and says so.
    ledger = Ledger([(1.0 + 0.02 * i, 1e-4, 2000) for i in range(5)])
    with pytest.warns(UserWarning, match="0.1% promise is not met"):
        value = epsilon(ledger, 1e-10)
    assert 0.0720 < value < 0.0730


@pytest.mark.slow
def test_a_few_small_q_segments_are_split_and_tight():
    # Two segments (was: the warning, +0.13%): the multi-binomial split keeps the allowance below
    # the promise; dp_accounting composes the same two segments independently.
    import logging

    from dp_accounting.pld import privacy_loss_distribution

    logging.getLogger().setLevel(logging.ERROR)
    segments, target = [(1.0, 1e-4, 5000), (1.05, 1e-4, 5000)], 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = epsilon(Ledger(segments), target)

    def composed(pessimistic):
        plds = [privacy_loss_distribution.from_gaussian_mechanism(
            sigma, sampling_prob=q, value_discretization_interval=3e-5, pessimistic_estimate=pessimistic,
            use_connect_dots=pessimistic).self_compose(steps) for sigma, q, steps in segments]
        return plds[0].compose(plds[1])

    def bisect(pld):
        low, high = 0.0, 1.0
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (mid, high) if pld.get_delta_for_epsilon(mid) > target else (low, mid)
        return high

    assert bisect(composed(False)) <= value <= bisect(composed(True)) * (1 + 1e-3)


@pytest.mark.slow
def test_tiny_sample_rate_with_a_heavy_tail_is_fast_and_tight():
    # sigma 0.5, q 1e-5, 10^5 steps, delta 1e-10 (issue 21: was 96 s, a 10^6-point single step from
    # the Gaussian grid model): sized by the saddle point now.  Within dp_accounting's pessimistic
    # and optimistic PLDs, and fundp.delta at dp_accounting's (upper) epsilon within 1% of its delta.
    sigma, q, steps, target = 0.5, 1e-5, 100_000, 1e-10
    ledger = Ledger([(sigma, q, steps)])
    start = time.perf_counter()
    value = epsilon(ledger, target)
    assert time.perf_counter() - start < 30  # ~1.5 s alone on one core
    import logging

    from dp_accounting.pld import privacy_loss_distribution

    logging.getLogger().setLevel(logging.ERROR)
    pessimistic, optimistic = (privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=1e-4, pessimistic_estimate=side,
        use_connect_dots=side).self_compose(steps) for side in (True, False))
    upper = _epsilon_by_bisection(pessimistic, target)
    assert _epsilon_by_bisection(optimistic, target) <= value <= upper * (1 + 1e-3)
    # fundp.delta at dp_accounting's (upper-bound) epsilon: at most 1% above the target (the true
    # delta there is below it), and above dp_accounting's optimistic delta.
    start = time.perf_counter()
    ours = delta(ledger, upper)
    assert time.perf_counter() - start < 30  # ~2 s alone on one core
    assert optimistic.get_delta_for_epsilon(upper) <= ours <= target * 1.01


def test_standard_queries_do_not_warn():
    ledger = Ledger([(1.1, 256 / 60000, 60 * 60000 // 256)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 2.38 < epsilon(ledger, 1e-5) < 2.3825
