"""fundp.accounting: the ledger, the public API, its errors, calibration and monotonicity properties.

Accuracy against closed forms and other accountants lives in test_accounting_accuracy.py.
"""

import json
import math
import pickle
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fundp.accounting import prv as prv_module
from fundp.accounting import (
    Ledger,
    Segment,
    UnreachableTargetError,
    accountant_step,
    calibrate_noise,
    delta,
    epsilon,
    max_steps,
)

DELTA = 1e-5


def step(ledger=None, sigma=1.0, q=0.01, steps=1):
    return accountant_step(Ledger() if ledger is None else ledger, noise_multiplier=sigma, sample_rate=q, steps=steps)


# --------------------------------------------------------------------------------------- ledger


def test_empty_ledger_spends_nothing():
    assert Ledger().segments == () and Ledger().steps == 0
    for accountant in ("prv", "rdp", "gdp_approx"):
        assert epsilon(Ledger(), DELTA, accountant=accountant) == 0.0
        assert delta(Ledger(), 1.0, accountant=accountant) == 0.0
    assert Ledger() == Ledger() and bool(Ledger())  # a value, not "no ledger"


def test_ledger_is_immutable_and_hashable():
    ledger = step(steps=3)
    with pytest.raises(AttributeError):
        ledger.segments = ()
    with pytest.raises(AttributeError):
        ledger.anything = 1
    same = step(steps=3)
    assert ledger == same and hash(ledger) == hash(same)
    assert {ledger: "a"}[same] == "a"
    assert ledger != step(steps=4) and ledger != step(sigma=1.5, steps=3)
    assert ledger != "not a ledger"
    assert pickle.loads(pickle.dumps(ledger)) == ledger


def test_accountant_step_is_pure():
    before = step(steps=5)
    after = accountant_step(before, noise_multiplier=2.0, sample_rate=0.1, steps=2)
    assert before.segments == (Segment(1.0, 0.01, 5),)
    assert after.steps == 7 and len(after.segments) == 2


def test_merging_keeps_a_million_steps_tiny():
    ledger = Ledger()
    for _ in range(1000):  # interleaved settings merge too: composition is commutative
        ledger = accountant_step(ledger, noise_multiplier=1.0, sample_rate=0.01)
        ledger = accountant_step(ledger, noise_multiplier=2.0, sample_rate=0.01, steps=999)
    assert ledger.segments == (Segment(1.0, 0.01, 1000), Segment(2.0, 0.01, 999_000))
    assert ledger.steps == 1_000_000
    assert len(ledger.to_json()) < 300
    # Order of composition does not matter, and equal mechanisms give equal ledgers.
    other = step(step(sigma=2.0, steps=999_000), sigma=1.0, steps=1000)
    assert other == ledger and hash(other) == hash(ledger)
    assert epsilon(other, DELTA) == epsilon(ledger, DELTA)


def test_zero_steps_is_a_no_op():
    ledger = step(steps=10)
    assert accountant_step(ledger, noise_multiplier=3.0, sample_rate=0.5, steps=0) is ledger
    assert Ledger([(1.0, 0.1, 0)]) == Ledger()


def test_json_round_trip():
    ledger = Ledger([(1.1, 256 / 60000, 14062), (0.7, 0.001, 5), (1.1, 256 / 60000, 1)])
    assert ledger.segments == (Segment(0.7, 0.001, 5), Segment(1.1, 256 / 60000, 14063))
    data = json.loads(json.dumps(ledger.to_dict()))
    assert Ledger.from_dict(data) == ledger
    assert Ledger.from_json(ledger.to_json()) == ledger
    assert Ledger.from_dict(Ledger().to_dict()) == Ledger()
    assert all(type(s.noise_multiplier) is float and type(s.steps) is int for s in Ledger.from_dict(data).segments)


def test_ledger_accepts_plain_numbers_of_any_kind():
    import numpy as np
    ledger = accountant_step(Ledger(), noise_multiplier=np.float32(2.0), sample_rate=np.float64(0.5), steps=np.int64(3))
    assert ledger == Ledger([(2.0, 0.5, 3)])
    assert type(ledger.segments[0].steps) is int and type(ledger.segments[0].noise_multiplier) is float
    assert accountant_step(Ledger(), noise_multiplier=1, sample_rate=1, steps=2.0) == Ledger([(1.0, 1.0, 2)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_multiplier=-1.0), r"noise_multiplier must be > 0, got -1.0"),
        (dict(noise_multiplier=0.0), r"noise_multiplier must be > 0"),
        (dict(noise_multiplier=float("nan")), r"noise_multiplier must be finite, got nan"),
        (dict(noise_multiplier=float("inf")), r"noise_multiplier"),
        (dict(sample_rate=0.0), r"sample_rate must be in \(0, 1\], got 0.0"),
        (dict(sample_rate=1.5), r"sample_rate must be in \(0, 1\], got 1.5"),
        (dict(sample_rate=float("nan")), r"sample_rate"),
        (dict(steps=-1), r"steps must be >= 0, got -1"),
        (dict(steps=2.5), r"steps must be a whole number"),
    ],
)
def test_accountant_step_rejects_bad_inputs(kwargs, match):
    arguments = dict(noise_multiplier=1.0, sample_rate=0.01, steps=1) | kwargs
    with pytest.raises(ValueError, match=match):
        accountant_step(Ledger(), **arguments)


def test_accountant_step_rejects_bad_types():
    with pytest.raises(TypeError, match="noise_multiplier must be a real number"):
        accountant_step(Ledger(), noise_multiplier="1.0", sample_rate=0.1)
    with pytest.raises(TypeError, match="noise_multiplier"):
        accountant_step(Ledger(), noise_multiplier=True, sample_rate=0.1)
    with pytest.raises(TypeError, match="steps"):
        accountant_step(Ledger(), noise_multiplier=1.0, sample_rate=0.1, steps="3")
    with pytest.raises(TypeError, match="ledger must be a fundp.Ledger"):
        accountant_step({"segments": []}, noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(TypeError, match="ledger"):
        epsilon(None, DELTA)
    with pytest.raises(TypeError, match="segments\\[0\\]"):
        Ledger([(1.0, 0.1)])


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"segments": "no"},
        {"segments": [{"noise_multiplier": 1.0, "sample_rate": 0.1}]},
        {"segments": [{"noise_multiplier": -1.0, "sample_rate": 0.1, "steps": 1}]},
        {"format": "other/9", "segments": []},
    ],
)
def test_from_dict_validates(data):
    with pytest.raises(ValueError):
        Ledger.from_dict(data)


def test_accountant_step_inside_torch_compile():
    import torch

    def train_step(x, ledger, sigma):
        ledger = accountant_step(ledger, noise_multiplier=sigma, sample_rate=0.01)
        return x * 2, ledger

    compiled = torch.compile(train_step, backend="eager")
    ledger = Ledger()
    for _ in range(3):
        out, ledger = compiled(torch.ones(3), ledger, torch.tensor(1.25))
    assert torch.equal(out, torch.full((3,), 2.0))
    assert ledger == Ledger([(1.25, 0.01, 3)])
    assert type(ledger.segments[0].noise_multiplier) is float  # no tensor leaked into the ledger


# ------------------------------------------------------------------------------- query errors


def test_query_errors_name_the_argument():
    ledger = step(steps=10)
    for bad in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match="delta must be in \\(0, 1\\)"):
            epsilon(ledger, bad)
    with pytest.raises(ValueError, match="delta must be finite"):
        epsilon(ledger, float("nan"))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="epsilon must be > 0"):
            delta(ledger, bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="epsilon must be finite"):
            delta(ledger, bad)
    with pytest.raises(ValueError, match="accountant must be one of 'prv', 'rdp', 'gdp_approx', got 'moments'"):
        epsilon(ledger, DELTA, accountant="moments")
    with pytest.raises(ValueError, match="accountant"):
        delta(ledger, 1.0, accountant="PRV")


def test_accountants_agree_roughly_and_bounds_order():
    ledger = step(sigma=1.0, q=0.01, steps=2000)
    prv, rdp, gdp = (epsilon(ledger, DELTA, accountant=a) for a in ("prv", "rdp", "gdp_approx"))
    assert prv < rdp < 1.5 * prv  # both are bounds; PRV is the tight one
    assert abs(gdp - prv) < 0.25 * prv  # the CLT estimate is in the right ballpark here (not a bound!)
    assert delta(ledger, prv) <= DELTA * (1 + 1e-9)
    assert delta(ledger, rdp, accountant="rdp") <= DELTA * (1 + 1e-9)


def test_epsilon_and_delta_are_inverse():
    ledger = Ledger([(0.9, 0.02, 300), (2.0, 0.1, 50)])
    for target in (1e-3, 1e-6, 1e-9):
        eps = epsilon(ledger, target)
        assert delta(ledger, eps) == pytest.approx(target, rel=2e-3)
        assert delta(ledger, eps * 1.01) < target < delta(ledger, eps * 0.99)


def test_rdp_warns_when_the_optimum_is_at_the_edge_of_the_orders():
    with pytest.warns(UserWarning, match="edge of the orders grid"):
        epsilon(Ledger([(0.1, 1.0, 10**5)]), DELTA, accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epsilon(step(steps=1000), DELTA, accountant="rdp")  # the usual case does not warn


# --------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("target, q, steps", [(1.0, 0.01, 1000), (8.0, 256 / 60000, 14062), (0.05, 0.02, 100)])
def test_calibrate_noise_is_tight_and_feasible(target, q, steps, accountant):
    sigma = calibrate_noise(target, DELTA, sample_rate=q, steps=steps, accountant=accountant)

    def spent(s):
        return epsilon(Ledger([(s, q, steps)]), DELTA, accountant=accountant)

    assert spent(sigma) <= target
    assert spent(sigma * (1 - 1e-3)) > target


def test_calibrate_noise_on_top_of_an_existing_ledger():
    spent_already = step(sigma=1.0, q=0.01, steps=500)
    sigma = calibrate_noise(2.0, DELTA, sample_rate=0.01, steps=500, ledger=spent_already)
    assert epsilon(step(spent_already, sigma=sigma, steps=500), DELTA) <= 2.0
    assert epsilon(step(spent_already, sigma=sigma * 0.999, steps=500), DELTA) > 2.0
    alone = calibrate_noise(2.0, DELTA, sample_rate=0.01, steps=500)
    assert sigma > alone


def test_calibrate_noise_errors():
    with pytest.raises(UnreachableTargetError, match="unreachable"):
        calibrate_noise(1e-3, 1e-10, sample_rate=1.0, steps=10**6)
    assert issubclass(UnreachableTargetError, ValueError)
    with pytest.raises(ValueError, match="target_epsilon must be > 0"):
        calibrate_noise(0.0, DELTA, sample_rate=0.1, steps=10)
    with pytest.raises(ValueError, match="delta must be in"):
        calibrate_noise(1.0, 2.0, sample_rate=0.1, steps=10)
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise(1.0, DELTA, sample_rate=0.0, steps=10)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        calibrate_noise(1.0, DELTA, sample_rate=0.1, steps=0)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        calibrate_noise(1.0, DELTA, sample_rate=0.1, steps=-3)
    with pytest.raises(ValueError, match="accountant"):
        calibrate_noise(1.0, DELTA, sample_rate=0.1, steps=10, accountant="nope")


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("target, sigma, q", [(1.0, 1.0, 0.01), (3.0, 1.1, 256 / 60000), (0.5, 5.0, 0.2)])
def test_max_steps_is_the_boundary(target, sigma, q, accountant):
    n = max_steps(target, DELTA, noise_multiplier=sigma, sample_rate=q, accountant=accountant)

    def spent(steps):
        return epsilon(Ledger([(sigma, q, steps)]), DELTA, accountant=accountant)

    assert n >= 1 and spent(n) <= target < spent(n + 1)


def test_max_steps_errors_and_ledger():
    with pytest.raises(UnreachableTargetError, match="one step"):
        max_steps(0.1, DELTA, noise_multiplier=0.5, sample_rate=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        max_steps(1.0, DELTA, noise_multiplier=-1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="target_epsilon"):
        max_steps(-1.0, DELTA, noise_multiplier=1.0, sample_rate=0.1)
    spent_already = step(sigma=1.0, q=0.01, steps=100)
    total = max_steps(1.0, DELTA, noise_multiplier=1.0, sample_rate=0.01)
    more = max_steps(1.0, DELTA, noise_multiplier=1.0, sample_rate=0.01, ledger=spent_already)
    assert more == total - 100


# ------------------------------------------------------------------------ monotonicity (hypothesis)

# Every prv value is an upper bound within 0.1% of the exact epsilon, which is monotone; so a
# computed epsilon can undercut a smaller mechanism's by at most that 0.1%.
SLACK = 1 - 1e-3
sigmas = st.floats(0.6, 4.0)
rates = st.floats(1e-3, 0.5)
counts = st.integers(1, 2000)


@settings(max_examples=20, deadline=None)
@given(sigma=sigmas, q=rates, steps=counts, more=st.integers(1, 2000))
def test_more_steps_spend_more(sigma, q, steps, more):
    less_spent = epsilon(Ledger([(sigma, q, steps)]), DELTA)
    assert epsilon(Ledger([(sigma, q, steps + more)]), DELTA) >= SLACK * less_spent


@settings(max_examples=20, deadline=None)
@given(sigma=sigmas, q=rates, steps=counts, factor=st.floats(1.0, 3.0))
def test_more_noise_spends_less(sigma, q, steps, factor):
    assert epsilon(Ledger([(sigma * factor, q, steps)]), DELTA) <= epsilon(Ledger([(sigma, q, steps)]), DELTA) / SLACK


@settings(max_examples=20, deadline=None)
@given(sigma=sigmas, q=rates, steps=counts, factor=st.floats(1.0, 2.0))
def test_larger_sample_rate_spends_more(sigma, q, steps, factor):
    bigger = min(1.0, q * factor)
    assert epsilon(Ledger([(sigma, bigger, steps)]), DELTA) >= SLACK * epsilon(Ledger([(sigma, q, steps)]), DELTA)


@settings(max_examples=15, deadline=None)
@given(sigma=sigmas, q=rates, steps=counts)
def test_rdp_bounds_prv_and_delta_inverts(sigma, q, steps):
    ledger = Ledger([(sigma, q, steps)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # extreme draws may sit at the orders grid's edge
        rdp = epsilon(ledger, DELTA, accountant="rdp")
    prv = epsilon(ledger, DELTA)
    assert prv <= rdp / SLACK  # both bound the same exact epsilon; prv is within 0.1% of it
    # delta is its own (independent) upper bound, also within 0.1%-ish of exact -- where it is a
    # PLD computation: past epsilon 500 delta takes the RDP bound (time-bounded, looser, warned).
    if 0 < prv < prv_module._LARGEST_PLD_DELTA_EPSILON:
        assert delta(ledger, prv) <= DELTA * 1.002
    assert math.isfinite(prv)
