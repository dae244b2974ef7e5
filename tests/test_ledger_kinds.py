"""The ledger records events, not only (sigma, q) segments (issue 20, item 2).

Independent references: the truncation probability from ``scipy.stats.binom`` (and exact rational
arithmetic for a small case); the truncated epsilon as the least eps certified by the plain Poisson
ledger's own epsilon, found here by bisection; the adaptive query's combined noise from Andrew et
al. 2021's closed form; correlated-noise runs from their participation schema's definition (the
Gaussian mechanism's closed form, Balle & Wang 2018, or ceil(n / b) Poisson steps).
"""

import collections
import fractions
import itertools
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


# --------------------------------------------------------------------------- item 2: adaptive clipping's query

LOSS = lambda p, b: b @ p["w"]  # noqa: E731  (per-example gradient = the row: norms known in advance)
ROWS = torch.tensor([[0.3, 0.4], [0.9, 1.2], [0.48, 0.64], [1.8, 2.4], [0.12, 0.16], [1.5, 2.0]], dtype=torch.float64)
MASK = torch.tensor([True, True, True, True, True, False])
PARAMS = {"w": torch.zeros(2, dtype=torch.float64)}


def andrew_effective(z_gradient, count_std, counts=1):
    """Andrew et al. 2021 (Thm 1, our count convention: sensitivity 1, std count_std): the gradient
    sum and ``counts`` noisy counts of one Poisson batch are one subsampled Gaussian of multiplier
    ``(z^-2 + counts / count_std^2)^(-1/2)``."""
    return 1.0 / math.sqrt(1.0 / z_gradient**2 + counts / count_std**2)


def test_adaptive_clipping_records_the_combined_noise_of_every_step_of_a_schedule():
    from fundp import adaptive

    q, count_std = 0.02, 6.0
    cfg = adaptive.quantile_clipping(count_noise_multiplier=count_std)
    step = fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=5.0, sample_rate=q,
                         grad_method="vmap", adaptive_clipping=cfg)
    schedule = [1.0, 1.3, 0.9, 1.3]
    ledger, state = fundp.Ledger(), cfg.init(1.0)
    for t, sigma in enumerate(schedule):
        out = step(PARAMS, ROWS, fundp.random.fold_in(fundp.random.key(3), t), mask=MASK, clip_state=state,
                   ledger=ledger, noise_multiplier=sigma)
        ledger, state = out.ledger, out.clip_state
    expected = collections.Counter(andrew_effective(sigma, count_std) for sigma in schedule)
    assert ledger.steps == 4 and ledger.events == ()
    assert [(s.noise_multiplier, s.sample_rate, s.steps) for s in ledger.segments] == [
        pytest.approx((z, q, n), rel=1e-14) for z, n in sorted(expected.items())]
    # Andrew et al.'s calibration: gradient noise raised so that the pair spends what DP-SGD at z does.
    z = 1.1
    z_gradient = adaptive.gradient_noise_multiplier_for(z, cfg)
    assert z_gradient == pytest.approx(1.0 / math.sqrt(z**-2 - count_std**-2), rel=1e-14)
    out = step(PARAMS, ROWS, fundp.random.key(99), mask=MASK, clip_state=cfg.init(1.0), ledger=fundp.Ledger(),
               noise_multiplier=z_gradient)
    assert fundp.epsilon(out.ledger, 1e-5) == pytest.approx(fundp.epsilon(Ledger([(z, q, 1)]), 1e-5), rel=1e-9)


# --------------------------------------------------------------------------- item 3: correlated noise (fundp.mf)


def gaussian_mechanism_epsilon(mu, delta):
    """Balle & Wang 2018, Thm 8, solved by bisection (scipy's normal CDF; nothing from fundp)."""
    def delta_at(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)

    low, high = 0.0, 100.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_at(middle) > delta else (low, middle)
    return high


_RUNS = itertools.count()  # each run its own keys: a key used by any earlier step is refused


def run_mf_steps(mech, steps, sigma=1.0, ledger=None):
    run_key = fundp.random.fold_in(fundp.random.key(5), next(_RUNS))
    step = fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=sigma, expected_batch_size=5.0, grad_method="vmap",
                         noise_mechanism=mech)
    ledger = fundp.Ledger() if ledger is None else ledger
    noise_state = mech.init(PARAMS)
    for t in range(steps):
        out = step(PARAMS, ROWS, fundp.random.fold_in(run_key, t), mask=MASK, noise_state=noise_state, ledger=ledger)
        ledger, noise_state = out.ledger, out.noise_state
    return ledger


@pytest.mark.parametrize("participation", ["single", "min_sep"])
def test_a_correlated_noise_step_records_its_run_and_fundp_epsilon_is_the_gaussian_mechanism(participation):
    import fundp.mf as mf

    n, sigma = 8, 1.7
    if participation == "single":
        mech = mf.mechanism(mf.tree(n), mf.single_participation())
    else:
        mech = mf.mechanism(mf.banded_toeplitz([1.0, 0.4], n), mf.min_separation(2))
    ledger = run_mf_steps(mech, 5, sigma)
    name = "single_participation" if participation == "single" else "min_separation"
    assert ledger.steps == 5 and ledger.segments == ()
    assert ledger.events == (CorrelatedNoiseSteps(name, sigma, 1.0, False, 4), CorrelatedNoiseSteps(name, sigma, 1.0, True, 1))
    exact = gaussian_mechanism_epsilon(1 / sigma, 1e-5)  # the whole n-step run: one Gaussian mechanism
    assert fundp.epsilon(ledger, 1e-5) == pytest.approx(exact, rel=1e-8) and fundp.epsilon(ledger, 1e-5) >= exact
    assert fundp.epsilon(ledger, 1e-5) == pytest.approx(mf.epsilon(mech, noise_multiplier=sigma, delta=1e-5), rel=1e-8)
    # the mechanism's own whole-run ledger (what fundp.mf.epsilon reads) after the remaining steps
    assert mech.account(ledger, noise_multiplier=sigma, step=5) != mech.ledger(sigma)  # 6 of 8 steps
    assert run_mf_steps(mech, n, sigma) == mech.ledger(sigma)
    # Serialised with the ledger, and a second run of the mechanism is charged again.
    assert Ledger.from_json(ledger.to_json()) == ledger and pickle.loads(pickle.dumps(ledger)) == ledger
    twice = run_mf_steps(mech, 2, sigma, ledger=ledger)
    assert fundp.epsilon(twice, 1e-5) == pytest.approx(gaussian_mechanism_epsilon(math.sqrt(2) / sigma, 1e-5), rel=1e-8)
    with pytest.raises(ValueError, match="n = 8"):
        mech.account(fundp.Ledger(), noise_multiplier=sigma, step=8)


def test_a_cyclic_poisson_correlated_noise_run_is_its_amplified_dp_sgd_ledger():
    import fundp.mf as mf

    n, b, q, sigma = 12, 3, 0.2, 1.1
    mech = mf.mechanism(mf.banded_toeplitz([1.0, 0.5, 0.2], n), mf.cyclic_poisson(b, q))
    model = torch.nn.Linear(3, 2).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p, batch):
        return torch.nn.functional.cross_entropy(fundp.functional_call(model, p, (batch["x"],)), batch["y"], reduction="none")

    batches = mf.cyclic_poisson_batches(60, q, fundp.random.key(1), num_partitions=b, steps=n, pad_to_multiple=16)
    x, y = torch.randn(60, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), torch.arange(60) % 2
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=sigma, sampler=batches, noise_mechanism=mech)
    ledger, state = fundp.Ledger(), mech.init(params)
    history = [ledger]
    for t, (indices, mask) in enumerate(batches):
        out = step(params, {"x": x[indices], "y": y[indices]}, fundp.random.fold_in(fundp.random.key(2), t),
                   mask=mask, noise_state=state, ledger=ledger)
        ledger, state = out.ledger, out.noise_state
        history.append(ledger)
    for t, recorded in enumerate(history):  # Thm 4: ceil(t / b) Poisson-subsampled Gaussian steps after t steps
        poisson = Ledger([(sigma, q, -(-t // b))])
        assert recorded.steps == t
        for accountant in ("prv", "rdp"):
            assert fundp.epsilon(recorded, 1e-5, accountant=accountant) == fundp.epsilon(poisson, 1e-5, accountant=accountant)
    assert ledger == mech.ledger(sigma)
    for accountant in ("prv", "rdp"):
        assert fundp.epsilon(ledger, 1e-5, accountant=accountant) == mf.epsilon(mech, noise_multiplier=sigma, delta=1e-5, accountant=accountant)
    # adaptive clipping's count is not covered by the amplification argument: refused, not ignored
    cfg = fundp.adaptive.quantile_clipping(count_noise_multiplier=5.0)
    with pytest.raises(NotImplementedError, match="cyclic"):
        mech.account(fundp.Ledger(), noise_multiplier=sigma, step=0, adaptive_clipping=cfg)


def mu_of(sigma, count_std, participations):
    return math.sqrt(sigma**-2 + participations / count_std**2)


def test_adaptive_clipping_with_a_min_sep_correlated_noise_run_is_one_gaussian_mechanism():
    import fundp.mf as mf

    n, sep, sigma, count_std = 9, 3, 1.5, 4.0
    mech = mf.mechanism(mf.banded_toeplitz([1.0, 0.4], n), mf.min_separation(sep))
    cfg = fundp.adaptive.quantile_clipping(count_noise_multiplier=count_std)
    # (dp_step still refuses adaptive_clipping + noise_mechanism at build time, fundp.guards' table;
    # the mechanism's ledger entry is what such a step would record)
    ledger = fundp.Ledger()
    for t in range(4):
        ledger = mech.account(ledger, noise_multiplier=sigma, step=t, adaptive_clipping=cfg)
    assert ledger.events[1] == CorrelatedNoiseSteps("min_separation", pytest.approx(1 / mu_of(sigma, count_std, 3)), 1.0, True, 1)
    # each example joins at most ceil(9 / 3) = 3 steps: its counts move by at most sqrt(3);
    # with the correlated-noise release, mu^2 = 1 / sigma^2 + 3 / count_std^2 over the whole run
    mu = mu_of(sigma, count_std, 3)
    assert fundp.epsilon(ledger, 1e-5) == pytest.approx(gaussian_mechanism_epsilon(mu, 1e-5), rel=1e-8)
    assert fundp.epsilon(ledger, 1e-5) > fundp.epsilon(run_mf_steps(mech, 4, sigma), 1e-5)  # the count is charged


def test_correlated_noise_runs_and_plain_dp_sgd_steps_compose_in_one_ledger():
    import fundp.mf as mf

    dp_accounting = pytest.importorskip("dp_accounting")
    mech = mf.mechanism(mf.tree(4), mf.single_participation())
    ledger = run_mf_steps(mech, 4, sigma=2.0)
    for _ in range(50):
        ledger = accountant_step(ledger, noise_multiplier=1.0, sample_rate=0.02)
    ledger = accountant_step(ledger, noise_multiplier=1.0, sample_rate=0.02, steps=3, truncation=(500, 40))
    assert ledger.steps == 57
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_accounting.GaussianDpEvent(2.0))
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.0)), 53)
    p = binomial_tail(500, 0.02, 40)
    for eps in (1.0, 2.0):
        assert fundp.delta(ledger, eps) == pytest.approx(pld.get_delta(eps) + (1 + math.exp(eps)) * 3 * p, rel=5e-3)
    assert fundp.epsilon(ledger, 1e-5) == pytest.approx(pld.get_epsilon(1e-5 - (1 + math.exp(fundp.epsilon(ledger, 1e-5))) * 3 * p), rel=5e-3)


def test_a_correlated_noise_run_whose_noise_multiplier_changes_is_refused():
    import fundp.mf as mf

    mech = mf.mechanism(mf.tree(8), mf.single_participation())
    ledger = mech.account(fundp.Ledger(), noise_multiplier=2.0, step=0)
    ledger = mech.account(ledger, noise_multiplier=0.5, step=1)  # t = 1 is not charged: would hide sigma = 0.5
    with pytest.raises(ValueError, match="several noise multipliers"):
        fundp.epsilon(ledger, 1e-5)
    with pytest.raises(TypeError, match="ledger"):
        mech.account(None, noise_multiplier=2.0, step=0)


def test_certified_lower_bounds_cover_correlated_noise_runs_and_refuse_truncation():
    import fundp.mf as mf

    mech = mf.mechanism(mf.banded_toeplitz([1.0, 0.5], 8), mf.cyclic_poisson(2, 0.1))
    recorded = mech.ledger(1.2)
    lower, upper = fundp.epsilon(recorded, 1e-5, bounds=True)
    assert (lower, upper) == fundp.epsilon(Ledger([(1.2, 0.1, 4)]), 1e-5, bounds=True)  # its 4 charged steps
    truncated = accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.1, truncation=(100, 40))
    with pytest.raises(ValueError, match="truncated"):
        fundp.epsilon(truncated, 1e-5, bounds=True)
    with pytest.raises(ValueError, match="truncated"):
        fundp.delta(truncated, 1.0, bounds=True)
