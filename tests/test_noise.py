"""Keyed Gaussian noise on pytrees."""

import math

import pytest
import torch

import fundp


def test_same_key_identical_different_key_independent():
    tree = {"a": torch.zeros(20_000, dtype=torch.float64), "b": torch.zeros(20_000, dtype=torch.float64)}
    k1, k2 = fundp.random.split(fundp.random.key(0))
    first = fundp.noise(tree, k1, 2.0)
    assert torch.equal(first["a"], fundp.noise(tree, k1, 2.0)["a"])
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
    tree = {"w": torch.arange(4.0, dtype=torch.bfloat16)}
    out = fundp.noise(tree, fundp.random.key(0), 0.0)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], tree["w"])


@pytest.mark.parametrize("stddev", [-1.0, float("nan"), float("inf")])
def test_bad_stddev(stddev):
    with pytest.raises(ValueError, match="stddev"):
        fundp.noise({"w": torch.zeros(2)}, fundp.random.key(0), stddev)
