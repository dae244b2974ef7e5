"""Keys: published Threefry vectors, determinism, independence, and the normal sampler's statistics."""

import math

import pytest
import torch
from scipy import stats

import fundp
from fundp.random import _threefry2x32


@pytest.mark.parametrize(
    "key, counter, expected",
    [  # Known-answer tests of Threefry-2x32-20 from the Random123 distribution (kat_vectors).
        ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ],
)
def test_threefry_known_answers(key, counter, expected):
    t = lambda v: torch.tensor(v, dtype=torch.int64)
    out = _threefry2x32(t(key), t(counter[0]), t(counter[1]))
    assert tuple(int(v) for v in out) == expected


def test_same_key_same_draws_and_no_global_rng():
    state = torch.random.get_rng_state()
    a = fundp.random.normal(fundp.random.key(7), (1000,))
    torch.manual_seed(99)
    b = fundp.random.normal(fundp.random.key(7), (1000,))
    assert torch.equal(a, b)
    torch.random.set_rng_state(state)


def test_split_and_fold_in_give_distinct_keys():
    key = fundp.random.key(0)
    keys = fundp.random.split(key, 64)
    folded = torch.stack([fundp.random.fold_in(key, i) for i in range(64)])
    everything = torch.cat([keys, folded, key[None]])
    assert len({tuple(k.tolist()) for k in everything}) == everything.shape[0]
    assert torch.equal(fundp.random.fold_in(key, 3), fundp.random.fold_in(key, torch.tensor(3)))


def test_os_key_is_fresh():
    assert not torch.equal(fundp.random.os_key(), fundp.random.os_key())  # fails with prob 2^-64


def test_normal_matches_the_standard_normal():
    # Kolmogorov-Smirnov on 200k draws; a correct sampler fails with probability 1e-6.
    z = fundp.random.normal(fundp.random.key(1), (200_000,), torch.float64).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-6
    # Mean and variance: 5.3 standard errors ~ two-sided 1e-7 false-failure rate.
    assert abs(z.mean()) < 5.3 / math.sqrt(z.size)
    assert abs(z.var() - 1) < 5.3 * math.sqrt(2 / z.size)


def test_split_keys_are_independent_streams():
    a, b = fundp.random.split(fundp.random.key(2))
    x = fundp.random.normal(a, (50_000,), torch.float64)
    y = fundp.random.normal(b, (50_000,), torch.float64)
    corr = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    assert abs(corr) < 5.3 / math.sqrt(50_000)  # false-failure rate ~1e-7


def test_uniform_in_open_interval():
    u = fundp.random.uniform(fundp.random.key(3), (10_000,), torch.float64)
    assert (u > 0).all() and (u < 1).all()


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_bad_seed(seed):
    with pytest.raises((ValueError, TypeError), match="seed"):
        fundp.random.key(seed)


def test_bad_key():
    with pytest.raises(TypeError, match="key"):
        fundp.random.split(torch.tensor([1, 2, 3]))


# --------------------------------------------------------------------------- uniform: the interval
from fundp.random import _uniform_from_bits  # noqa: E402

# Threefry words that give the smallest and largest 52-bit integer k, and the two around the
# float32 rounding boundary 1 - 2**-25 (k = 2**52 - 2**27 and the next one).
_EXTREMES = [(0, 0), (0, 0xFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFF000), (0xFFFFFF80, 0), (0xFFFFFF7F, 0xFFFFFFFF)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_uniform_extreme_bit_patterns_stay_strictly_inside_0_1(dtype):
    hi = torch.tensor([h for h, _ in _EXTREMES], dtype=torch.int64)
    lo = torch.tensor([l for _, l in _EXTREMES], dtype=torch.int64)
    u = _uniform_from_bits(hi, lo, dtype)
    assert u.dtype == dtype
    assert (u > 0).all() and (u < 1).all(), u
    wide = u.double()
    assert torch.isfinite(torch.log(wide)).all() and torch.isfinite(torch.log1p(-wide)).all()
    # The documented interval: smallest and largest value for each dtype (closed form).
    low, high = {
        torch.float64: (2.0**-53, 1 - 2.0**-53),
        torch.float32: (2.0**-53, 1 - 2.0**-24),
        torch.bfloat16: (2.0**-53, 1 - 2.0**-8),
        torch.float16: (2.0**-14, 1 - 2.0**-11),
    }[dtype]
    assert wide[0].item() == low and wide[2].item() == high


def test_uniform_float64_values_are_exact_midpoints():
    # Independent computation with Python integers: u = (k + 1/2) / 2**52, k = top 52 of 64 bits.
    hi, lo = fundp.random.bits(fundp.random.key(11), (1000,))
    u = fundp.random.uniform(fundp.random.key(11), (1000,), torch.float64)
    for h, l, value in zip(hi.tolist(), lo.tolist(), u.tolist()):
        k = ((h << 32) | l) >> 12
        assert value == (2 * k + 1) / 2**53


def test_uniform_float32_is_uniform():
    u = fundp.random.uniform(fundp.random.key(12), (200_000,), torch.float32).double().numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-6  # false-failure rate 1e-6


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float32"])
def test_uniform_refuses_non_float_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        fundp.random.uniform(fundp.random.key(0), (3,), dtype)


# --------------------------------------------------------------------------- keys and fold_in data: ranges
@pytest.mark.parametrize("words", [[-1, 0], [0, 2**32], [2**40, 1], [0, -(2**63)]])
def test_key_words_out_of_uint32_range_are_refused(words):
    bad = torch.tensor(words, dtype=torch.int64)
    for call in (lambda: fundp.random.split(bad), lambda: fundp.random.fold_in(bad, 0),
                 lambda: fundp.random.normal(bad, (2,)), lambda: fundp.random.uniform(bad, (2,)),
                 lambda: fundp.random.bits(bad, (2,)), lambda: fundp.random.key_data(bad)):
        with pytest.raises(ValueError, match=r"key must hold two unsigned 32-bit words"):
            call()


@pytest.mark.parametrize("bad", [torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1.0, 2.0]), torch.zeros(2, 2, dtype=torch.int64), [0, 1]])
def test_key_of_wrong_dtype_or_shape_is_refused(bad):
    with pytest.raises(TypeError, match="key must be a fundp key"):
        fundp.random.split(bad)


def test_largest_valid_key_words_work():
    key = torch.tensor([2**32 - 1, 2**32 - 1], dtype=torch.int64)
    assert fundp.random.split(key).shape == (2, 2)


@pytest.mark.parametrize("data", [-1, 2**32, 2**64, torch.tensor(-1), torch.tensor(2**32), torch.tensor([2**33])])
def test_fold_in_data_out_of_range_is_refused(data):
    with pytest.raises(ValueError, match="data must be"):
        fundp.random.fold_in(fundp.random.key(0), data)


@pytest.mark.parametrize("data", [1.5, True, "3", torch.tensor(1.0), torch.tensor([1, 2]), torch.tensor(True)])
def test_fold_in_data_of_wrong_type_is_refused(data):
    with pytest.raises((TypeError, ValueError), match="data must be"):
        fundp.random.fold_in(fundp.random.key(0), data)


def test_fold_in_accepts_the_full_32_bit_range_without_aliasing():
    key = fundp.random.key(0)
    top = fundp.random.fold_in(key, 2**32 - 1)
    assert torch.equal(top, fundp.random.fold_in(key, torch.tensor(2**32 - 1)))
    assert not torch.equal(top, fundp.random.fold_in(key, 0))
    assert torch.equal(fundp.random.fold_in(key, torch.tensor([5], dtype=torch.int32)), fundp.random.fold_in(key, 5))


def test_fold_in_with_tensor_data_compiles_without_recompiles():
    compiled = torch.compile(fundp.random.fold_in, backend="eager", fullgraph=True)
    key = fundp.random.key(0)
    for t in range(3):
        assert torch.equal(compiled(key, torch.tensor(t)), fundp.random.fold_in(key, t))
