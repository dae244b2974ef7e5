"""The ledger records events, not only (sigma, q) segments (issue 20, item 2).

Independent references: the truncation probability from ``scipy.stats.binom`` (and exact rational
arithmetic for a small case); the truncated epsilon as the least eps certified by the plain Poisson
ledger's own epsilon, found here by bisection; the adaptive query's combined noise from Andrew et
al. 2021's closed form; correlated-noise runs from their participation schema's definition (the
Gaussian mechanism's closed form, Balle & Wang 2018, or ceil(n / b) Poisson steps).
"""

import collections
import fractions
import json
import math
import pickle
import random
import warnings

import pytest
import torch
from scipy import stats

import fundp
from fundp.accounting import CorrelatedNoiseSteps, Ledger, Segment, TruncatedPoisson, accountant_step, truncation
from fundp.sampling import truncated_poisson_batches
from models import MLP, classification_loss, make, params_of

DELTA = 1e-4


def binomial_tail(num_examples, rate, max_batch_size):
    """``P[Binomial(N + 1, q) > B]`` from scipy (not the ledger's own helper)."""
    return float(stats.binom.sf(max_batch_size, num_examples + 1, rate))


def least_certified_epsilon(plain, total, delta, accountant="prv"):
    """The least eps with ``epsilon(plain, delta - (1 + e^eps) total) <= eps``: a scan up from the
    plain epsilon by 1% steps to the first certified value, then bisection below it."""
    def certified(eps):
        remaining = delta - (1 + math.exp(eps)) * total
        return remaining > 0 and fundp.epsilon(plain, remaining, accountant=accountant) <= eps

    low = fundp.epsilon(plain, delta, accountant=accountant)
    assert not certified(low * 0.999)
    high = low
    while not certified(high):
        low, high = high, high * 1.01
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (low, middle) if certified(middle) else (middle, high)
    return high


# --------------------------------------------------------------------------- item 1: truncated Poisson


def tiny_problem(seed=0, n=300):
    model = make(MLP, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return params_of(model), classification_loss(model), torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_a_truncated_poisson_step_records_its_truncation_and_fundp_epsilon_includes_it():
    params, loss_fn, x, y = tiny_problem()
    n, q, b_max, steps = 300, 0.1, 58, 12
    batches = truncated_poisson_batches(n, q, fundp.random.key(0), max_batch_size=b_max, steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the build-time warning is gone: fundp.epsilon is the truth
        step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.3, sampler=batches, grad_method="vmap")
    ledger = fundp.Ledger()
    for t, (indices, mask) in enumerate(batches):
        ledger = step(params, {"x": x[indices], "y": y[indices]}, fundp.random.fold_in(fundp.random.key(1), t),
                      ledger=ledger, mask=mask).ledger
    assert ledger.steps == steps
    assert ledger.segments == (Segment(1.3, q, steps),)
    assert ledger.events == (TruncatedPoisson(n, b_max, q, steps),)

    p = binomial_tail(n, q, b_max)
    assert p == pytest.approx(float(sum(math.comb(n + 1, k) * fractions.Fraction(1, 10) ** k * fractions.Fraction(9, 10) ** (n + 1 - k)
                                        for k in range(b_max + 1, n + 2))), rel=1e-10)
    assert steps * p > 1e-6  # the term matters at this delta
    plain = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.3, sample_rate=q, steps=steps)
    got = fundp.epsilon(ledger, DELTA)
    assert got > fundp.epsilon(plain, DELTA) * 1.001
    assert got == pytest.approx(least_certified_epsilon(plain, steps * p, DELTA), rel=1e-6)
    assert got == truncation.epsilon(plain, DELTA, batches)  # the sampler-based function agrees ...
    assert got == truncation.epsilon(ledger, DELTA, batches)  # ... and does not charge the recorded steps twice
    for eps in (0.5, 2.0, 5.0):
        expected = fundp.delta(plain, eps) + (1 + math.exp(eps)) * steps * p
        assert fundp.delta(ledger, eps) == pytest.approx(expected, rel=1e-12)
        assert fundp.delta(ledger, eps, accountant="rdp") == pytest.approx(
            fundp.delta(plain, eps, accountant="rdp") + (1 + math.exp(eps)) * steps * p, rel=1e-12)
    assert fundp.epsilon(ledger, DELTA, accountant="rdp") == pytest.approx(
        least_certified_epsilon(plain, steps * p, DELTA, "rdp"), rel=1e-6)


def test_only_truncated_steps_are_charged_when_a_ledger_mixes_samplers():
    q, n, b_max = 0.05, 1000, 70
    p = binomial_tail(n, q, b_max)
    ledger = fundp.Ledger()
    for t in range(30):  # 10 truncated steps among 30
        ledger = accountant_step(ledger, noise_multiplier=1.0, sample_rate=q, truncation=(n, b_max) if t % 3 == 0 else None)
    assert ledger.steps == 30 and ledger.events == (TruncatedPoisson(n, b_max, q, 10),)
    plain = Ledger([(1.0, q, 30)])
    for eps in (1.0, 3.0):
        assert fundp.delta(ledger, eps) == pytest.approx(fundp.delta(plain, eps) + (1 + math.exp(eps)) * 10 * p, rel=1e-12)
    # the sampler-based function charges the 20 unrecorded steps too (its documented over-charge)
    batches = truncated_poisson_batches(n, q, fundp.random.key(0), max_batch_size=b_max, steps=None)
    assert truncation.delta(ledger, 2.0, batches) == pytest.approx(fundp.delta(plain, 2.0) + (1 + math.e**2) * 30 * p, rel=1e-12)


def test_a_truncation_term_that_uses_up_delta_is_refused_by_fundp_epsilon():
    ledger = accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.05, steps=100, truncation=(1000, 50))
    with pytest.raises(fundp.accounting.UnreachableTargetError, match="max_batch_size"):
        fundp.epsilon(ledger, 1e-5)
    with pytest.raises(ValueError, match="sample_rate"):  # a sampler at another rate than the step's
        accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.04,
                        truncation=truncated_poisson_batches(1000, 0.05, fundp.random.key(0), max_batch_size=80, steps=1))
    with pytest.raises(TypeError, match="truncation"):
        accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.04, truncation=7)


def test_events_are_part_of_the_value_equality_hash_and_serialisation():
    plain = Ledger([(1.0, 0.1, 5)])
    truncated = accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.1, steps=5, truncation=(100, 20))
    assert plain != truncated and plain.segments == truncated.segments and plain.steps == truncated.steps
    same = Ledger([(1.0, 0.1, 5)], [TruncatedPoisson(100, 20, 0.1, 5)])
    assert truncated == same and hash(truncated) == hash(same)
    assert len({plain, truncated, same}) == 2
    for ledger in (plain, truncated):
        assert Ledger.from_json(ledger.to_json()) == ledger
        assert pickle.loads(pickle.dumps(ledger)) == ledger
        assert eval(repr(ledger), {"Ledger": Ledger, "TruncatedPoisson": TruncatedPoisson}) == ledger
    data = truncated.to_dict()
    assert data["format"] == "fundp.Ledger/2"
    assert data["events"] == [{"kind": "truncated_poisson", "num_examples": 100, "max_batch_size": 20, "sample_rate": 0.1, "steps": 5}]
    # a ledger without events writes the old format, byte for byte, and old files still load
    old = '{"format": "fundp.Ledger/1", "segments": [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5}]}'
    assert plain.to_json() == old and Ledger.from_json(old) == plain
    with pytest.raises(ValueError, match="events"):  # the old format has no events
        Ledger.from_dict({**json.loads(old), "events": data["events"]})
    with pytest.raises(ValueError, match="kind"):
        Ledger.from_dict({**data, "events": [{"kind": "nonsense", "steps": 1}]})


def test_a_checkpoint_keeps_the_events(tmp_path):
    ledger = accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.1, steps=3, truncation=(100, 20))
    params = {"w": torch.ones(2)}
    path = tmp_path / "run.ckpt"
    fundp.checkpoint.save(path, params=params, opt_state=(), ledger=ledger, key=fundp.random.key(0), step=3)
    state = fundp.checkpoint.load(path, params_like=params, opt_state_like=())
    assert state.ledger == ledger and state.ledger.events == ledger.events


def test_appending_events_keeps_every_old_ledger_its_own_value():
    rng = random.Random(0)
    history, ledger, steps = [Ledger()], Ledger(), []
    for _ in range(400):
        sigma, q = rng.choice([0.8, 1.0, 2.0]), rng.choice([0.01, 0.05])
        cut = rng.choice([None, (1000, 40), (1000, 60)])
        ledger = accountant_step(ledger, noise_multiplier=sigma, sample_rate=q, truncation=cut)
        steps.append((sigma, q, cut))
        history.append(ledger)

    def expected(prefix):
        segments = collections.Counter((sigma, q) for sigma, q, _ in prefix)
        events = collections.Counter((cut[0], cut[1], q) for _, q, cut in prefix if cut is not None)
        return (tuple(Segment(s, q, c) for (s, q), c in sorted(segments.items())),
                tuple(TruncatedPoisson(n, b, q, c) for (n, b, q), c in sorted(events.items())))

    for t in rng.sample(range(len(history)), 50) + [0, len(history) - 1]:
        assert (history[t].segments, history[t].events) == expected(steps[:t])
        assert history[t].steps == t
    branch = accountant_step(history[200], noise_multiplier=9.0, sample_rate=0.5, truncation=(10, 9))
    assert branch.events[0] == TruncatedPoisson(10, 9, 0.5, 1) and history[200].events == expected(steps[:200])[1]
