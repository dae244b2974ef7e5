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
