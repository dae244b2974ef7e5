"""Keyed Gaussian noise on pytrees."""

import math

import pytest
import torch

import fundp
from fundp.testing import assert_trees_close


def test_same_key_identical_different_key_independent():
    tree = {"a": torch.zeros(20_000, dtype=torch.float64), "b": torch.zeros(20_000, dtype=torch.float64)}
    k1, k2 = fundp.random.split(fundp.random.key(0))
    first = fundp.noise(tree, k1, 2.0)
    assert_trees_close(fundp.noise(tree, k1, 2.0), first, rtol=0, atol=0)  # every leaf, bit for bit
    other = fundp.noise(tree, k2, 2.0)
    bound = 5.3 / math.sqrt(20_000)  # |corr| of independent draws exceeds this with prob ~1e-7
    assert abs(torch.corrcoef(torch.stack([first["a"], other["a"]]))[0, 1]) < bound
    # Distinct leaves never share a stream, even with equal shapes.
    assert abs(torch.corrcoef(torch.stack([first["a"], first["b"]]))[0, 1]) < bound


def test_noise_std_and_mean():
    draws = fundp.noise({"w": torch.full((100_000,), 3.0, dtype=torch.float64)}, fundp.random.key(5), 0.5)["w"]
    n = draws.numel()
    assert abs(draws.mean().item() - 3.0) < 5.3 * 0.5 / math.sqrt(n)
    assert abs(draws.std().item() - 0.5) < 5.3 * 0.5 / math.sqrt(2 * n)


def test_zero_stddev_is_identity_and_dtype_kept():
    tree = {"w": torch.arange(4.0, dtype=torch.bfloat16), "nested": (torch.ones(2, 3, dtype=torch.float64),)}
    out = fundp.noise(tree, fundp.random.key(0), 0.0)
    assert_trees_close(out, tree, rtol=0, atol=0)  # structure, shapes, dtypes and values


def test_noise_is_the_same_eager_and_compiled(variant):
    """Keyed noise does not depend on how the step runs: the compiled draw equals the eager one."""
    tree = {"w": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float64)}
    key = fundp.random.key(7)
    expected = fundp.noise(tree, key, 0.5)
    got = variant(fundp.noise)(tree, key, 0.5)
    assert_trees_close(got, expected, rtol=1e-12, atol=1e-12)
    assert float(expected["b"].abs().sum()) > 0  # noise was drawn


@pytest.mark.parametrize("stddev", [-1.0, float("nan"), float("inf")])
def test_bad_stddev(stddev):
    with pytest.raises(ValueError, match="stddev"):
        fundp.noise({"w": torch.zeros(2)}, fundp.random.key(0), stddev)
