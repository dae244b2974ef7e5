"""fundp.data: Poisson batches (statistics, padding, determinism, scale), DataLoader bridge, guards, example.

Statistical checks use fixed keys, so they are deterministic; each threshold is chosen so that a
correct sampler would fail it with probability at most 2e-7 over the choice of key, and no test
runs more than five such checks (false-failure rate <= 1e-6 per test).  Exact binomial tails are
used where the statistic is exactly binomial; chi-square thresholds rely on the usual
large-count approximation (every merged bin expects >= 5 counts).
"""

import math
import os
import sys
import warnings

import pytest
import scipy.stats
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fundp
import fundp.data as data

ALPHA = 2e-7  # per-check false-failure rate


def inclusion_matrix(num_examples, sample_rate, key, steps, pad_to_multiple=8):
    """``[steps, N]`` bool: example i in step t, rebuilt from the padded (indices, mask) pairs."""
    rows = torch.zeros(steps, num_examples, dtype=torch.bool)
    for t, (indices, mask) in enumerate(data.poisson_batches(num_examples, sample_rate, key, steps=steps, pad_to_multiple=pad_to_multiple)):
        rows[t, indices[mask]] = True
    return rows


def binomial_two_sided_p(count, n, p):
    """Two-sided exact binomial p-value ``2 min(P(X <= k), P(X >= k))``, capped at 1."""
    return min(1.0, 2 * min(scipy.stats.binom.cdf(count, n, p), scipy.stats.binom.sf(count - 1, n, p)))


def chi_square(observed, expected):
    return float(((observed - expected) ** 2 / expected).sum())


def merge_small_bins(observed, expected, minimum=5.0):
    """Merges adjacent bins (left to right, remainder into the last) until each expects >= minimum."""
    obs, exp, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed, expected):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= minimum:
            obs.append(acc_o), exp.append(acc_e)
            acc_o, acc_e = 0.0, 0.0
    obs[-1] += acc_o
    exp[-1] += acc_e
    return torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)


# --------------------------------------------------------------------------- statistics


def subset_chi_square(rows, sample_rate):
    """Chi-square statistic of the observed subsets (rows ``[T, n]``) against product-Bernoulli(q)."""
    steps, n = rows.shape
    codes = (rows.to(torch.int64) * (2 ** torch.arange(n))).sum(dim=1)
    observed = torch.bincount(codes, minlength=2**n).to(torch.float64)
    sizes = torch.tensor([bin(s).count("1") for s in range(2**n)], dtype=torch.float64)
    expected = steps * sample_rate**sizes * (1 - sample_rate) ** (n - sizes)
    assert expected.min() >= 5
    return chi_square(observed, expected)


@pytest.mark.parametrize("sample_rate", [0.3, 0.7])  # 0.7 takes the complement (excluded-gaps) path
def test_one_step_is_independent_bernoulli_inclusion(sample_rate):
    """The joint law of one step over N = 4 examples is the product of Bernoulli(q): all 16
    subsets are checked against q^|S| (1-q)^(4-|S|) with a chi-square test (15 dof, threshold at
    upper tail ALPHA; every subset expects >= 16 counts)."""
    rows = inclusion_matrix(4, sample_rate, fundp.random.key(101), 2000)
    assert subset_chi_square(rows, sample_rate) < scipy.stats.chi2.isf(ALPHA, 15)


def test_multi_round_gap_sampling_is_still_bernoulli():
    """Forcing rounds of 1-3 gaps (so most draws span several rounds, each from its own key) keeps
    the product-Bernoulli law: the same chi-square test on N = 5 (31 dof, every subset expects
    >= 6.5 counts), threshold at upper tail ALPHA."""
    n, q, steps = 5, 0.35, 1200
    rows = torch.zeros(steps, n, dtype=torch.bool)
    key = fundp.random.key(55)
    for t in range(steps):
        rows[t, data._bernoulli_positions(n, q, fundp.random.fold_in(key, t), _round_size=1 + t % 3)] = True
    assert subset_chi_square(rows, q) < scipy.stats.chi2.isf(ALPHA, 2**n - 1)


def test_inclusion_frequency_batch_sizes_and_independence_between_steps():
    n, q, steps = 50, 0.2, 2500
    rows = inclusion_matrix(n, q, fundp.random.key(7), steps)

    # 1. Each example's count over the steps is Binomial(steps, q): exact two-sided p-values with a
    #    Bonferroni correction over the 50 examples (family-wise false-failure rate ALPHA).
    counts = rows.sum(dim=0)
    p_values = [binomial_two_sided_p(int(c), steps, q) for c in counts]
    assert min(p_values) > ALPHA / n
    # 2. Jointly: sum of squared standardised counts ~ chi-square(50) (approximation, mean count 500).
    z2 = ((counts.double() - steps * q) ** 2 / (steps * q * (1 - q))).sum().item()
    assert z2 < scipy.stats.chi2.isf(ALPHA, n)

    # 3. Batch sizes ~ Binomial(50, 0.2): chi-square goodness of fit, tails merged to >= 5 expected.
    sizes = rows.sum(dim=1)
    support = torch.arange(n + 1)
    observed = torch.bincount(sizes, minlength=n + 1).double()
    expected = steps * torch.tensor(scipy.stats.binom.pmf(support.numpy(), n, q))
    obs, exp = merge_small_bins(observed.tolist(), expected.tolist())
    assert chi_square(obs, exp) < scipy.stats.chi2.isf(ALPHA, len(obs) - 1)

    # 4. Independence between steps: over disjoint step pairs (2k, 2k+1) the number of
    #    (example, pair) with the example in both steps is Binomial(n * steps / 2, q^2) exactly.
    both = (rows[0:-1:2] & rows[1::2]).sum().item()
    assert binomial_two_sided_p(both, n * (steps // 2), q * q) > ALPHA
    # 5. Consecutive batch sizes are uncorrelated: sqrt(T - 1) * r ~ N(0, 1) (approximation).
    s = sizes.double()
    r = torch.corrcoef(torch.stack([s[:-1], s[1:]]))[0, 1].item()
    assert abs(r) * math.sqrt(steps - 1) < scipy.stats.norm.isf(ALPHA / 2)


def test_rate_and_uniformity_over_positions_at_scale():
    """N = 10^6, q = 0.01, 100 steps.  (1) The total number of inclusions is Binomial(1e8, 0.01)
    (exact two-sided test at ALPHA; sd 995 on a mean of 1e6, so a 1% rate error fails);
    (2) inclusions spread uniformly over 100 position blocks: block counts ~ Binomial(1e6, 0.01)
    each, chi-square with 100 dof at ALPHA (normal approximation, mean count 1e4 per block);
    (3) no two steps drew the same batch."""
    n, q, steps = 10**6, 0.01, 100
    blocks = torch.zeros(100, dtype=torch.float64)
    seen = set()
    for indices, mask in data.poisson_batches(n, q, fundp.random.key(21), steps=steps, pad_to_multiple=256):
        real = indices[mask]
        blocks += torch.bincount(real // (n // 100), minlength=100).double()
        seen.add(hash(tuple(real[:20].tolist())))
    total = int(blocks.sum())
    assert binomial_two_sided_p(total, n * steps, q) > ALPHA
    expected = steps * (n // 100) * q
    z2 = ((blocks - expected) ** 2 / (expected * (1 - q))).sum().item()
    assert z2 < scipy.stats.chi2.isf(ALPHA, 100)
    assert len(seen) == steps


def test_sample_rate_one_takes_everything():
    for indices, mask in data.poisson_batches(37, 1.0, fundp.random.key(0), steps=3, pad_to_multiple=8):
        assert indices.shape == (40,) and mask.sum() == 37
        assert torch.equal(indices[mask], torch.arange(37))


# --------------------------------------------------------------------------- layout and determinism


@pytest.mark.parametrize(
    "num_examples, sample_rate, pad",
    [(1, 0.5, 1), (10, 0.05, 4), (100, 0.3, 32), (257, 0.9, 7), (1000, 0.5, 64), (5, 1.0, 3)],
)
def test_padded_layout(num_examples, sample_rate, pad):
    for indices, mask in data.poisson_batches(num_examples, sample_rate, fundp.random.key(3), steps=30, pad_to_multiple=pad):
        size = int(mask.sum())
        assert indices.dtype == torch.int64 and mask.dtype == torch.bool
        assert indices.shape == mask.shape and indices.dim() == 1
        assert indices.shape[0] % pad == 0 and indices.shape[0] >= pad
        assert indices.shape[0] - size < pad or size == 0 and indices.shape[0] == pad  # minimal padding
        assert mask[:size].all() and not mask[size:].any()  # real rows first
        real = indices[:size]
        assert (real[1:] > real[:-1]).all()  # distinct, increasing
        assert ((indices >= 0) & (indices < num_examples)).all()  # padding rows hold a valid index too


def test_empty_batches_are_yielded_not_skipped():
    batches = list(data.poisson_batches(20, 0.01, fundp.random.key(5), steps=200, pad_to_multiple=16))
    assert len(batches) == 200
    empty = [(i, m) for i, m in batches if not m.any()]
    # P(empty) = 0.99^20 = 0.818; 200 steps: exact binomial two-sided test at ALPHA.
    assert binomial_two_sided_p(len(empty), 200, 0.99**20) > ALPHA
    for indices, mask in empty:
        assert indices.shape == (16,) and torch.equal(indices, torch.zeros(16, dtype=torch.int64))


def test_same_key_same_batches_different_key_different():
    make = lambda seed: data.poisson_batches(1000, 0.02, fundp.random.key(seed), steps=6, pad_to_multiple=8)
    first = list(make(1))
    again = list(make(1))
    batches = make(1)
    replay = list(batches)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, replay))
    assert all(torch.equal(batches[t][0], first[t][0]) for t in range(6))  # random access = iteration
    other = list(make(2))
    assert all(not torch.equal(a[0][a[1]], b[0][b[1]]) for a, b in zip(first, other))
    assert not torch.equal(first[0][0][first[0][1]], first[1][0][first[1][1]])  # steps differ too
    with pytest.raises(IndexError):
        batches[6]
    # The key's words alone drive the batches: a copy of the key (or one on another device) is the same.
    copy = data.poisson_batches(1000, 0.02, fundp.random.key(1).clone(), steps=6, pad_to_multiple=8, device="cpu")
    assert torch.equal(next(iter(copy))[0], first[0][0])


def test_unbounded_stream_and_len():
    batches = data.poisson_batches(50, 0.1, fundp.random.key(0), steps=None)
    stream = iter(batches)
    for _ in range(5):
        next(stream)
    with pytest.raises(TypeError):
        len(batches)
    assert len(data.poisson_batches(50, 0.1, fundp.random.key(0), steps=0)) == 0
    assert list(data.poisson_batches(50, 0.1, fundp.random.key(0), steps=0)) == []


def test_ten_million_examples():
    """1e7 examples: O(qN) work per step, no O(N) Python loop.  Loose time bound (not a benchmark)."""
    import time

    n = 10**7
    for q in (1e-3, 0.999):  # included gaps; excluded gaps + complement
        batches = data.poisson_batches(n, q, fundp.random.key(9), steps=2, pad_to_multiple=1024)
        for indices, mask in batches:
            start = time.perf_counter()
            indices, mask = batches[0]
            assert time.perf_counter() - start < 10.0
            size = int(mask.sum())
            sd = math.sqrt(n * q * (1 - q))
            assert abs(size - n * q) < 6 * sd  # 6 sd: false-failure rate ~2e-9
            real = indices[:size]
            assert (real[1:] > real[:-1]).all() and real[0] >= 0 and real[-1] < n


# --------------------------------------------------------------------------- torch.utils.data


class DictDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_poisson_loader_gives_the_same_padded_batches(num_workers):
    n = 90
    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    y = torch.arange(n)
    key = fundp.random.key(4)
    loader = data.poisson_loader(DictDataset(x, y), 0.2, key, steps=5, pad_to_multiple=8, num_workers=num_workers)
    assert len(loader) == 5 and loader.batch_sampler.sample_rate == 0.2
    reference = data.poisson_batches(n, 0.2, key, steps=5, pad_to_multiple=8)
    for (batch, mask), (indices, ref_mask) in zip(loader, reference):
        assert torch.equal(mask, ref_mask)
        assert torch.equal(batch["y"], indices) and torch.equal(batch["x"], x[indices])


def test_batch_sampler_with_tensor_dataset_and_custom_collate():
    n = 30
    ds = TensorDataset(torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), torch.arange(n))
    sampler = data.PoissonBatchSampler(n, 0.5, fundp.random.key(8), steps=3, pad_to_multiple=4)
    loader = DataLoader(data.MaskedDataset(ds), batch_sampler=sampler, collate_fn=data.collate_masked)
    for (features, labels), mask in loader:
        assert features.shape == (labels.shape[0], 2) and labels.shape[0] % 4 == 0
        assert mask.dtype == torch.bool and int(mask.sum()) <= labels.shape[0]
    tuples = lambda items: [tuple(item) for item in items]
    (rows, mask) = data.collate_masked([((1, 2), True), ((3, 4), False)], collate_fn=tuples)
    assert rows == [(1, 2), (3, 4)] and mask.tolist() == [True, False]
    # Without the MaskedDataset wrapper the padded rows are refused loudly, not trained on.
    with pytest.raises((TypeError, IndexError)):
        next(iter(DataLoader(ds, batch_sampler=sampler)))
    with pytest.raises(ValueError, match="batch_size"):
        data.poisson_loader(ds, 0.5, fundp.random.key(8), steps=3, batch_size=4)


# --------------------------------------------------------------------------- guards


def test_check_sampling_matches_poisson():
    batches = data.poisson_batches(200, 0.05, fundp.random.key(0), steps=3)
    assert data.check_sampling_matches(batches, 0.05) == 0.05
    assert data.check_sampling_matches(batches, 0.05, expected_batch_size=10.0) == 0.05
    with pytest.raises(ValueError, match="sample_rate=0.1"):
        data.check_sampling_matches(batches, 0.1)
    with pytest.raises(ValueError, match="records no sample_rate"):
        data.check_sampling_matches(batches, None)
    with pytest.raises(ValueError, match="expected_batch_size"):
        data.check_sampling_matches(batches, 0.05, expected_batch_size=12.0)
    sampler = data.PoissonBatchSampler(200, 0.05, fundp.random.key(0), steps=3)
    loader = data.poisson_loader(TensorDataset(torch.zeros(200)), 0.05, fundp.random.key(0), steps=3)
    assert data.check_sampling_matches(sampler, 0.05) == data.check_sampling_matches(loader, 0.05) == 0.05
    with pytest.raises(ValueError):
        data.check_sampling_matches(loader, 0.04)
    with pytest.raises(ValueError, match="not Poisson"):  # an ordinary shuffled DataLoader
        data.check_sampling_matches(DataLoader(TensorDataset(torch.zeros(200)), batch_size=10, shuffle=True), 0.05)
    with pytest.raises(TypeError):
        data.check_sampling_matches([torch.arange(10)], 0.05)


def test_shuffled_batches_are_refused_as_poisson_unless_acknowledged():
    shuffled = data.shuffled_batches(100, 10, fundp.random.key(2), steps=25)
    with pytest.raises(ValueError, match="not Poisson"):
        data.check_sampling_matches(shuffled, 0.1)
    with pytest.warns(data.SamplingMismatchWarning):
        assert data.check_sampling_matches(shuffled, 0.1, acknowledge_not_poisson=True) is None
    with pytest.raises(ValueError, match="not Poisson"):
        data.accumulated_dp_step(lambda p, b: b["x"] @ p["w"], physical_batch_size=4, max_norm=1.0, noise_multiplier=1.0, sampler=shuffled, sample_rate=0.1, expected_batch_size=10.0)
    # The batches themselves: fixed size, each epoch a permutation, reproducible from the key.
    batches = list(shuffled)
    assert all(i.shape == (10,) and m.all() for i, m in batches)
    for epoch in range(2):
        seen = torch.cat([i for i, _ in batches[10 * epoch : 10 * epoch + 10]])
        assert torch.equal(seen.sort().values, torch.arange(100))
    assert not torch.equal(batches[0][0], batches[10][0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, data.shuffled_batches(100, 10, fundp.random.key(2), steps=25)))
    last = list(data.shuffled_batches(25, 10, fundp.random.key(2), steps=3, drop_last=False))[-1]
    assert last[0].shape == (10,) and last[1].sum() == 5


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=-0.1), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(sample_rate=float("nan")), "sample_rate"),
        (dict(num_examples=0), "num_examples"),
        (dict(num_examples=-3), "num_examples"),
        (dict(pad_to_multiple=0), "pad_to_multiple"),
        (dict(pad_to_multiple=-8), "pad_to_multiple"),
        (dict(steps=-1), "steps"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(kwargs, name):
    args = dict(num_examples=100, sample_rate=0.1, key=fundp.random.key(0), steps=5, pad_to_multiple=8) | kwargs
    for make in (data.poisson_batches, data.PoissonBatchSampler):
        with pytest.raises(ValueError, match=name):
            make(**args)


def test_bad_types():
    with pytest.raises(TypeError, match="num_examples"):
        data.poisson_batches("100", 0.1, fundp.random.key(0), steps=5)
    with pytest.raises(ValueError, match="num_examples"):  # the one vocabulary (_validate.check_int): whole floats pass
        data.poisson_batches(100.5, 0.1, fundp.random.key(0), steps=5)
    with pytest.raises(TypeError):
        data.poisson_batches(100, 0.1, torch.tensor([1.0, 2.0]), steps=5)  # not an int64 key
    with pytest.raises(ValueError, match="physical_batch_size"):
        data.split_batch({"x": torch.zeros(3)}, 0)


# --------------------------------------------------------------------------- the example


def test_research_loop_example_runs_end_to_end():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        import research_loop
    finally:
        sys.path.pop(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = research_loop.main(
            [
                "--num-examples", "512", "--batch-size", "32", "--pad-to-multiple", "32", "--hidden", "16",
                "--target-epsilon", "1.0", "--noise-multiplier", "2.0", "--max-steps", "60", "--log-every", "10",
                "--compile-backend", "eager", "--quiet",
            ]
        )  # fmt: skip
    assert 0 < out["steps"] < 60 and out["epsilon"] <= 1.0 + 1e-9  # sigma 2, q 1/16: epsilon crosses 1 near step 50
    assert math.isfinite(out["history"]["loss"][-1])
    assert all(size % 32 == 0 for size in out["batch_shapes"])
    small = research_loop.main(["--num-examples", "256", "--batch-size", "16", "--pad-to-multiple", "16", "--physical-batch-size", "16",
                                "--hidden", "8", "--max-steps", "20", "--no-compile", "--quiet", "--target-epsilon", "0.5"])  # fmt: skip
    assert small["stopped"] in ("target epsilon", "max steps") and small["epsilon"] <= 0.5 + 1e-9
