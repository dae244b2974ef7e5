"""Certified lower bounds at small sample rates (issue 21, item 3): the dominated single steps on a
shifted grid (``fundp.accounting.pld._dominated_step``: an exact merge next to the support's edge,
so that a step whose bulk is narrower than a grid cell no longer drops a cell per step) and the
lower bounds of ``fundp.epsilon(..., bounds=True)`` / ``fundp.delta(..., bounds=True)`` built on them.

Independent references only:

* one step: its exact hockey-stick divergence and mean loss (KL) by ``scipy.integrate.quad`` of the
  two Gaussian mixtures' densities (written without cancellation; checked against
  ``tests/test_accounting_bounds.py``'s plain integrands where those are accurate);
* many steps: dp_accounting's PLD accountant, pessimistic (an upper estimate) and optimistic
  (``pessimistic_estimate=False``: a lower one).
"""

import math

import numpy as np
import pytest
from scipy import integrate

import fundp
from fundp.accounting import pld as pld_module
from fundp.accounting import prv
from tests.test_accounting_bounds import densities, dp_accounting_pair, hockey_stick, ledger

pytest.importorskip("dp_accounting")

#: (sigma, q, grid interval): grids from ~6 cells per q (the 10^5-step corner's bulk inside one
#: cell) to ~1000 cells per q, and large q.
STEPS = [(0.5, 1e-5, 6.1e-5), (1.0, 1e-5, 2.3e-6), (1.0, 1e-4, 1e-5), (1.0, 1e-3, 1e-4), (2.0, 0.1, 1e-3),
         (0.8, 0.5, 1e-2)]


def _pieces(sigma):
    return ((-40 * sigma, -1.0), (-1.0, 2.0), (2.0, 40 * sigma + 1))


def _quad(integrand, sigma, lo=-math.inf, hi=math.inf):
    """int integrand over [lo, hi] (clipped to +-40 sigma) by scipy.integrate.quad, in pieces."""
    total = 0.0
    for a, b in _pieces(sigma):
        a, b = max(a, lo), min(b, hi)
        if a < b:
            total += integrate.quad(integrand, a, b, epsabs=1e-25, epsrel=1e-11, limit=400)[0]
    return total


def _gaussian(sigma):
    scale = 1 / (sigma * math.sqrt(2 * math.pi))
    return lambda x: scale * math.exp(-x * x / (2 * sigma * sigma))


def exact_hockey_stick(sigma, q, direction, eps):
    """One step's ``int (P - e^eps Q)_+``, written without cancellation: with ``p0 = N(0, s^2)``,
    ``u(x) = q expm1((2x - 1) / (2 s^2))`` (so ``mu_1 = p0 (1 + u)``) it is ``int p0 (u - expm1(eps))_+``
    (remove) or ``int p0 (-expm1(eps) - e^eps u)_+`` (add), over the half-line where it is positive."""
    p0, s2 = _gaussian(sigma), sigma * sigma
    ratio = math.expm1(eps) / q  # the positive part starts where expm1(r) = ratio (remove) or -ratio e^-eps (add)
    if direction == "remove":
        cut = s2 * math.log1p(ratio) + 0.5 if ratio > -1 else -math.inf
        return _quad(lambda x: p0(x) * max(q * math.expm1((2 * x - 1) / (2 * s2)) - math.expm1(eps), 0.0), sigma,
                     lo=cut)
    ratio = -ratio * math.exp(-eps)
    cut = s2 * math.log1p(ratio) + 0.5 if ratio > -1 else -math.inf
    return _quad(lambda x: p0(x) * max(-math.expm1(eps) - math.exp(eps) * q * math.expm1((2 * x - 1) / (2 * s2)), 0.0),
                 sigma, hi=cut) if ratio > -1 else 0.0


def _small(u, direct, series):
    return series(u) if abs(u) < 1e-3 else direct(u)


def mean_loss(sigma, q, direction):
    """One step's KL ``E_P[log(P/Q)] = int Q (r log r - r + 1)``, ``r = P/Q``: with ``u`` as in
    :func:`exact_hockey_stick`, ``int p0 ((1 + u) log1p(u) - u)`` (remove) or ``int p0 (u - log1p(u))``
    (add), non-negative integrands taken by their series where ``|u| < 1e-3``."""
    p0, s2 = _gaussian(sigma), sigma * sigma
    if direction == "remove":
        def f(u):
            return _small(u, lambda v: (1 + v) * math.log1p(v) - v,
                          lambda v: v**2 / 2 - v**3 / 6 + v**4 / 12 - v**5 / 20 + v**6 / 30)
    else:
        def f(u):
            return _small(u, lambda v: v - math.log1p(v), lambda v: v**2 / 2 - v**3 / 3 + v**4 / 4 - v**5 / 5 + v**6 / 6)
    return _quad(lambda x: p0(x) * f(q * math.expm1((2 * x - 1) / (2 * s2))), sigma)


@pytest.mark.parametrize("direction", ["remove", "add"])
@pytest.mark.parametrize("sigma, q, h", STEPS)
def test_dominated_step_is_below_the_exact_profile(direction, sigma, q, h):
    """The dominated step, its masses at its own grid losses ``offset + k h``, has a hockey-stick
    ``sum_j m_j (1 - e^{eps - t_j})_+`` never above the exact one of its direction at any epsilon
    (negative ones included), and a mean loss at or below the exact KL, within 1e-3 of a grid cell
    of it (the neighbour balancing alone lost up to 0.9 of a cell at q = 1e-5)."""
    step = pld_module.discretize(sigma, q, h, direction, 1e-14, optimistic=True)
    assert step.infinity_mass == 0 and np.all(step.masses >= 0) and step.masses.sum() <= 1 + 1e-12
    assert -h < step.offset <= 0
    losses = step.offset + step.losses
    spread = math.sqrt(step.moments()[1])
    for eps in np.concatenate([spread * np.array([-3.0, -1.0, -0.3, 0.0, 0.3, 1.0, 3.0]), [0.5, 2.0]]):
        discrete = float(np.sum(step.masses * np.maximum(-np.expm1(eps - losses), 0.0)))
        exact = exact_hockey_stick(sigma, q, direction, eps)
        assert discrete <= exact * (1 + 1e-9) + 1e-15, (eps, discrete, exact)
    if q >= 1e-3:  # the plain integrand of the other test file agrees where it does not cancel
        assert exact_hockey_stick(sigma, q, direction, 0.5 * spread) == pytest.approx(
            hockey_stick(*((densities(sigma, q)[1], densities(sigma, q)[0]) if direction == "remove"
                           else densities(sigma, q)), 0.5 * spread, sigma), rel=1e-7)
    kl = mean_loss(sigma, q, direction)
    mean = float(np.sum(step.masses * losses))
    assert mean <= kl * (1 + 1e-7) + 1e-15
    assert mean >= kl - 1e-3 * h, (mean - kl) / h


def unclamped_lower_epsilon(segments, delta):
    """The lower pass's own epsilon (``fundp.epsilon(..., bounds=True)`` clips it at the upper bound,
    which would hide a lower bound that is too high)."""
    upper, direction, pld = prv._epsilon_search(segments, delta)
    return prv._lower(segments, pld, direction, prv._TAIL_FRACTION * delta * (1 - delta), upper, math.inf,
                      lambda lower, shift: prv._epsilon_lower(lower, shift, delta))


@pytest.mark.slow
def test_small_q_corner_lower_bound_is_tight():
    """sigma 0.5, q 1e-5, 10^5 steps, delta 1e-10: the certified lower bound was 22% below the upper
    one (2.307 vs 2.824); now within 0.1% of it, below dp_accounting's pessimistic value and with
    dp_accounting's optimistic value below our upper bound; delta alike at that epsilon."""
    segments = ((0.5, 1e-5, 100_000),)
    lower, upper = fundp.epsilon(fundp.Ledger(segments), 1e-10, bounds=True)
    raw = unclamped_lower_epsilon(segments, 1e-10)
    assert 0 < raw <= lower < upper <= lower * (1 + 1e-3)
    optimistic, pessimistic = dp_accounting_pair(0.5, 1e-5, 100_000, delta=1e-10, interval=1e-4)
    assert lower <= pessimistic and optimistic <= upper
    d_lower, d_upper = fundp.delta(fundp.Ledger(segments), lower, bounds=True)
    assert 0.9e-10 < d_lower < d_upper
    optimistic, pessimistic = dp_accounting_pair(0.5, 1e-5, 100_000, epsilon=lower, interval=1e-4)
    assert d_lower <= pessimistic and optimistic <= d_upper


@pytest.mark.slow
def test_two_segments_lower_bound_is_tight():
    """Two segments with different q (their dominated steps on different offsets, the composed frame
    shifted back by their sum): within 0.1%, consistent with dp_accounting's PLDs composed the
    same way."""
    from dp_accounting.pld import privacy_loss_distribution

    segments = ((1.0, 1e-3, 2000), (1.2, 1e-4, 5000))
    lower, upper = fundp.epsilon(fundp.Ledger(segments), 1e-8, bounds=True)
    assert 0 < unclamped_lower_epsilon(segments, 1e-8) <= lower < upper <= lower * (1 + 1e-3)
    values = []
    for pessimistic in (False, True):
        composed = None
        for sigma, q, steps in segments:
            pld = privacy_loss_distribution.from_gaussian_mechanism(
                sigma, sampling_prob=q, value_discretization_interval=1e-4, pessimistic_estimate=pessimistic,
                use_connect_dots=pessimistic).self_compose(steps)
            composed = pld if composed is None else composed.compose(pld)
        values.append(composed.get_epsilon_for_delta(1e-8))
    assert lower <= values[1] and values[0] <= upper
