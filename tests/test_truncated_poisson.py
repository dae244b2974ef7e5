"""Truncated Poisson sampling: one batch shape, the truncation accounted in delta.

Independent references: the binomial tail from exact rational arithmetic (``fractions``) and from
a log-space sum with ``math.lgamma``; the sampler's batch sizes against ``min(Binomial(N, q), B_max)``
by a chi-square test; the accounting against the closed form ``delta + (1 + e^eps) T p`` recomputed
here from ``fundp.delta`` of the plain ledger.
"""

import fractions
import math

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from scipy import stats

import fundp
from fundp.accounting import UnreachableTargetError, truncation
from fundp.sampling import poisson_indices, truncated_poisson_batches, truncation_probability
from models import MLP, classification_loss, make, params_of


def exact_tail(trials: int, rate: fractions.Fraction, above: int) -> fractions.Fraction:
    return sum((math.comb(trials, k) * rate**k * (1 - rate) ** (trials - k) for k in range(above + 1, trials + 1)),
               fractions.Fraction(0))


def log_space_tail(trials: int, rate: float, above: int) -> float:
    logs = [math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
            + k * math.log(rate) + (trials - k) * math.log1p(-rate) for k in range(above + 1, trials + 1)]
    top = max(logs)
    return math.exp(top) * math.fsum(math.exp(v - top) for v in logs)


@pytest.mark.parametrize("num_examples,rate,max_batch_size", [(9, "1/2", 9), (30, "1/10", 5), (40, "3/4", 35), (12, "1/3", 13)])
def test_truncation_probability_is_the_exact_binomial_tail_over_n_plus_one(num_examples, rate, max_batch_size):
    exact = exact_tail(num_examples + 1, fractions.Fraction(rate), max_batch_size)
    got = truncation_probability(num_examples, float(fractions.Fraction(rate)), max_batch_size)
    assert got == pytest.approx(float(exact), rel=1e-12, abs=0.0)


def test_truncation_probability_in_the_far_tail():
    # N = 60000, q = 256/N, B_max = 352: six standard deviations out.
    expected = log_space_tail(60001, 256 / 60000, 352)
    got = truncation_probability(60000, 256 / 60000, 352)
    assert 1e-12 < got < 1e-6
    assert got == pytest.approx(expected, rel=1e-9)


def test_every_batch_has_exactly_max_batch_size_rows_and_is_a_subset_of_the_poisson_draw():
    key = fundp.random.key(3)
    batches = truncated_poisson_batches(200, 0.1, key, max_batch_size=22, steps=60)
    truncated = 0
    for t, (indices, mask) in enumerate(batches):
        assert indices.shape == (22,) and mask.shape == (22,) and indices.dtype == torch.int64
        drawn = poisson_indices(200, 0.1, fundp.random.fold_in(fundp.random.fold_in(key, t), 0))
        kept = indices[mask]
        assert int(mask.sum()) == min(drawn.numel(), 22)
        assert torch.equal(kept, torch.sort(kept).values)  # sorted, no duplicates
        assert kept.unique().numel() == kept.numel()
        assert set(kept.tolist()) <= set(drawn.tolist())
        if drawn.numel() <= 22:
            assert torch.equal(kept, drawn)  # untruncated steps are the plain Poisson draw
        else:
            truncated += 1
        assert not mask[int(mask.sum()):].any()  # padding at the end
        assert torch.equal(batches[t][0], indices)  # step-indexed: recomputable alone
    assert truncated > 5  # E[B] = 20, sd 4.2: P[B > 22] is about 0.3


def test_batch_sizes_follow_the_truncated_binomial():
    # Chi-square goodness of fit of min(B, B_max) over 2000 steps; the key is fixed (deterministic),
    # and with a fresh key the test would fail falsely with probability 1e-4 (the p-value threshold).
    num_examples, rate, cap, steps = 100, 0.2, 23, 2000
    batches = truncated_poisson_batches(num_examples, rate, fundp.random.key(11), max_batch_size=cap, steps=steps)
    sizes = torch.tensor([int(mask.sum()) for _, mask in batches])
    # Cells: <= 14, 15, ..., 22, and the truncated cell (B >= 23, reported as 23).
    binomial = stats.binom(num_examples, rate)
    edges = list(range(15, cap))
    probabilities = [binomial.cdf(14)] + [binomial.pmf(k) for k in edges] + [binomial.sf(cap - 1)]
    observed = [int((sizes <= 14).sum())] + [int((sizes == k).sum()) for k in edges] + [int((sizes == cap).sum())]
    assert int((sizes > cap).sum()) == 0
    expected = [p * steps for p in probabilities]
    assert min(expected) > 5
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > 1e-4


def test_truncated_batches_are_uniform_subsets():
    # Every example is equally likely to be kept: per-index counts over 3000 steps, chi-square at
    # threshold 1e-4 (false-failure rate 1e-4 for a fresh key).
    num_examples, cap, steps = 12, 3, 3000
    batches = truncated_poisson_batches(num_examples, 0.5, fundp.random.key(5), max_batch_size=cap, steps=steps)
    counts = torch.zeros(num_examples)
    for indices, mask in batches:
        counts[indices[mask]] += 1
    _, p_value = stats.chisquare(counts.numpy())
    assert p_value > 1e-4


def test_truncation_delta_is_the_ledger_delta_plus_the_coupling_term():
    batches = truncated_poisson_batches(1000, 0.05, fundp.random.key(0), max_batch_size=90, steps=200)
    p = log_space_tail(1001, 0.05, 90)
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.05, steps=200)
    for eps in (0.5, 2.0, 4.0):
        expected = fundp.delta(ledger, eps) + (1 + math.exp(eps)) * 200 * p
        assert truncation.delta(ledger, eps, batches) == pytest.approx(expected, rel=1e-9)


def test_truncation_epsilon_is_the_least_certified_epsilon():
    batches = truncated_poisson_batches(1000, 0.05, fundp.random.key(0), max_batch_size=92, steps=200)
    p = log_space_tail(1001, 0.05, 92)
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.5, sample_rate=0.05, steps=200)
    delta = 1e-4
    assert 200 * p > 1e-6  # the term matters at this delta
    eps = truncation.epsilon(ledger, delta, batches)
    plain = fundp.epsilon(ledger, delta)
    assert eps > plain * 1.001
    # Certified: the plain ledger spends at most what is left of delta at eps ...
    assert fundp.epsilon(ledger, delta - (1 + math.exp(eps)) * 200 * p) <= eps
    # ... and it is the least such eps (0.1% less is not certified).
    smaller = eps * 0.999
    assert fundp.epsilon(ledger, delta - (1 + math.exp(smaller)) * 200 * p) > smaller


def test_truncation_calibrate_noise_and_max_steps_meet_the_target_tightly():
    batches = truncated_poisson_batches(1000, 0.05, fundp.random.key(0), max_batch_size=95, steps=None)
    sigma = truncation.calibrate_noise(2.0, 1e-4, batches, steps=200)
    spent = fundp.accountant_step(fundp.Ledger(), noise_multiplier=sigma, sample_rate=0.05, steps=200)
    assert truncation.epsilon(spent, 1e-4, batches) <= 2.0
    assert sigma > fundp.calibrate_noise(2.0, 1e-4, sample_rate=0.05, steps=200)  # truncation costs noise
    less = fundp.accountant_step(fundp.Ledger(), noise_multiplier=sigma * 0.995, sample_rate=0.05, steps=200)
    assert truncation.epsilon(less, 1e-4, batches) > 2.0

    steps = truncation.max_steps(2.0, 1e-4, batches, noise_multiplier=1.5)

    def eps(count):
        return truncation.epsilon(fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.5, sample_rate=0.05,
                                                        steps=count), 1e-4, batches)
    assert eps(steps) <= 2.0 < eps(steps + 1)
    assert steps < fundp.max_steps(2.0, 1e-4, noise_multiplier=1.5, sample_rate=0.05)


def test_a_truncation_term_larger_than_delta_is_refused():
    batches = truncated_poisson_batches(1000, 0.05, fundp.random.key(0), max_batch_size=50, steps=100)
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.05, steps=100)
    with pytest.raises(UnreachableTargetError, match="max_batch_size"):
        truncation.epsilon(ledger, 1e-5, batches)
    with pytest.raises(UnreachableTargetError, match="max_batch_size"):
        truncation.calibrate_noise(1.0, 1e-5, batches, steps=100)
    with pytest.raises(TypeError, match="TruncatedPoissonBatches"):
        truncation.epsilon(ledger, 1e-5, fundp.data.poisson_batches(1000, 0.05, fundp.random.key(0), steps=1))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="max_batch_size"):
        truncated_poisson_batches(10, 0.5, fundp.random.key(0), max_batch_size=0, steps=1)
    with pytest.raises(ValueError, match="sample_rate"):
        truncated_poisson_batches(10, 1.5, fundp.random.key(0), max_batch_size=4, steps=1)
    batches = truncated_poisson_batches(100, 0.1, fundp.random.key(0), max_batch_size=16, steps=1)
    with pytest.raises(ValueError, match="truncation"):
        fundp.data.check_sampling_matches(batches, 0.1)


def test_a_compiled_step_over_the_whole_run_compiles_one_graph():
    torch._dynamo.reset()
    try:
        model = make(MLP, dtype=torch.float32)
        params, loss_fn = params_of(model), classification_loss(model)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(300, 6, generator=g), torch.randint(0, 3, (300,), generator=g)
        batches = truncated_poisson_batches(300, 0.1, fundp.random.key(0), max_batch_size=64, steps=40)
        assert len({int(mask.sum()) for _, mask in batches}) > 5  # batch sizes vary; the shape does not
        counter = torch._dynamo.testing.CompileCounter()
        step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, sampler=batches, grad_method="vmap")
        compiled = torch.compile(step, backend=counter)
        ledger = fundp.Ledger()
        for t, (indices, mask) in enumerate(batches):
            out = compiled(params, {"x": x[indices], "y": y[indices]}, fundp.random.fold_in(fundp.random.key(1), t),
                           ledger=ledger, mask=mask)
            ledger = out.ledger
        assert counter.frame_count == 1
        assert ledger.steps == 40 and ledger.segments[0].sample_rate == 0.1
        assert truncation.epsilon(ledger, 1e-3, batches) == fundp.epsilon(ledger, 1e-3)  # the ledger records the truncation
    finally:
        torch._dynamo.reset()
