"""Float64 releases are snapped to a power-of-two grid (the floating-point attack on float64 outputs).

Checked against independent computations: exact rational arithmetic (``fractions``), the grid's
closed form, an exact search over the float64 numbers for the attack, scipy for the
distribution, and the pre-change outputs pinned bit for bit for float32 / bfloat16.
"""

import math
import random
from fractions import Fraction

import pytest
import torch
from scipy import stats

import fundp
from fundp.noise import add_gaussian_noise, float64_grid, snapped_sum

F64 = torch.float64


def _exact_snap(total: float, noise: float, grid: float) -> float:
    """The nearest multiple of ``grid`` to the real ``total + noise`` (ties to even), rounded to float64."""
    return float(round((Fraction(total) + Fraction(noise)) / Fraction(grid)) * Fraction(grid))


@pytest.mark.parametrize(("stddev", "grid"), [(1.0, 2.0**-19), (0.75, 2.0**-20), (3.0, 2.0**-18), (2.0**-30, 2.0**-49), (1e6, 2.0**0)])
def test_float64_grid_closed_form(stddev, grid):
    assert float64_grid(stddev) == grid
    assert 2.0**-20 * stddev < grid <= 2.0**-19 * stddev
    with pytest.raises(ValueError, match="stddev"):
        float64_grid(0.0)


def test_snapped_sum_is_the_exact_sum_rounded():
    """Random sums, sums whose float64 rounding lands exactly on a grid midpoint (where rounding
    ``fl64(total + noise)`` would pick the wrong side), exact ties, and huge sums (grid finer
    than float64's), against exact rational arithmetic."""
    rng = random.Random(0)
    grid = 2.0**-19
    totals, noises = [], []
    for i in range(3000):
        kind = i % 4
        if kind == 0:
            total, noise = rng.uniform(-5, 5), rng.gauss(0, 1)
        elif kind == 1:  # fl64(total + noise) is a midpoint; the exact sum is just off it (or on it)
            total = rng.choice([1.0, -3.0, 0.1, 1234.5678])
            noise = (rng.randint(-2**22, 2**22) + 0.5) * grid - total
            noise = noise if i % 8 == 1 else math.nextafter(noise, rng.choice([math.inf, -math.inf]))
        elif kind == 2:
            total, noise = rng.choice([0.0, grid / 2, -grid / 2, 3 * grid / 2, 5 * grid / 2]), rng.choice([0.0, grid * 2**-70, -grid * 2**-70])
        else:  # |sum| >= 2^52 grid: float64's own grid is coarser than the snapping grid
            total, noise = rng.uniform(1, 2) * 2.0 ** rng.randint(34, 60), rng.gauss(0, 1) * 2.0 ** rng.randint(-5, 12)
        totals.append(total)
        noises.append(noise)
    got = snapped_sum(torch.tensor(totals, dtype=F64), torch.tensor(noises, dtype=F64), grid).tolist()
    expected = [_exact_snap(t, n, grid) for t, n in zip(totals, noises)]
    assert got == expected
    # The control: snapping the float64 sum instead is wrong on some midpoint cases (the test can tell).
    naive = [float(round(Fraction(t + n) / Fraction(grid)) * Fraction(grid)) for t, n in zip(totals, noises)]
    assert naive != expected


def test_snapped_sum_bad_arguments():
    with pytest.raises(ValueError, match="power of two"):
        snapped_sum(torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), 0.3)
    with pytest.raises(TypeError, match="float64"):
        snapped_sum(torch.zeros(1), torch.zeros(1, dtype=F64), 0.5)
    with pytest.raises(TypeError, match="release_dtypes"):
        fundp.secure.secure_noise({"w": torch.zeros(2, dtype=F64)}, 1.0, release_dtypes=[F64, F64])


@pytest.mark.parametrize("stddev", [1.0, 0.3])
def test_secure_float64_outputs_lie_on_the_grid(stddev):
    total = torch.linspace(-3, 3, 4001, dtype=F64)
    out = fundp.secure.secure_noise({"w": total}, stddev)["w"]
    grid = 2.0 ** (math.frexp(stddev)[1] - 20)  # the documented grid, by its formula
    k = out / grid
    assert torch.equal(k, torch.round(k))  # every released value is a multiple of the grid
    assert 0.5 * stddev < (out - total).std().item() < 2 * stddev  # and noise was added
    # The same through fundp.privatize (secure mode, float64 parameters, B_exp a power of two).
    clipped = fundp.clipped_grad_sum(lambda p, b: b @ p["w"], max_norm=1.0, grad_method="vmap")(
        {"w": torch.zeros(3, dtype=F64)}, torch.tensor([[0.1, 0.2, 0.3]], dtype=F64))
    released = fundp.privatize(clipped, fundp.random.key(0), noise_multiplier=stddev, expected_batch_size=4.0, secure_mode=True)["w"]
    k = released * 4.0 / 2.0 ** (math.frexp(stddev * clipped.sensitivity)[1] - 20)
    assert torch.equal(k, torch.round(k))


_MAGNITUDE = 0x7FFFFFFFFFFFFFFF


def _impossible(outputs: torch.Tensor, release) -> torch.Tensor:
    """``[N]`` bool: no float64 ``t`` has ``release(t) == output`` (``release`` monotone in ``t``):
    binary search over the float64 numbers in order for the least ``t`` with ``release >= output``."""

    def ordered(t):
        bits = t.view(torch.int64)
        return torch.where(bits < 0, -(bits & _MAGNITUDE), bits)

    def unordered(key):
        return torch.where(key < 0, (-key) | torch.iinfo(torch.int64).min, key).view(F64)

    low, high = ordered(torch.full_like(outputs, -1e300)), ordered(torch.full_like(outputs, 1e300))
    for _ in range(66):
        middle = low // 2 + high // 2 + ((low % 2) + (high % 2)) // 2
        above = release(unordered(middle)) >= outputs
        high, low = torch.where(above, middle, high), torch.where(above, low, middle + 1)
    return release(unordered(high)) != outputs


def test_exact_attack_finds_no_impossible_float64_output_in_secure_mode():
    """World A: sum 0; world B: sum 1 (= C); sigma = 1.  Each secure-mode output of world A is
    reached in world B by some float64 noise value.  Control: without the snap (the old
    release, ``fl64(sum + noise)``), a large share is impossible (43% measured at 10^6 outputs)."""
    zeros = torch.zeros(300, dtype=F64)
    out = fundp.secure.secure_noise({"w": zeros}, 1.0)["w"]
    grid = float64_grid(1.0)
    ones = torch.ones_like(zeros)
    assert not _impossible(out, lambda t: snapped_sum(ones, t, grid)).any()
    old = zeros + fundp.secure.secure_normal((300,), F64)
    assert _impossible(old, lambda t: ones + t).double().mean().item() > 0.15


def test_snapped_noise_distribution():
    """Research mode with ``snap_float64=True``, fixed key: the noise's mean, std and KS test
    (false-failure probability of a correct sampler over keys: <= 1e-6 each) and the snap moves
    each value by at most half a grid step from the unsnapped release of the same key."""
    n, stddev = 50_000, 0.5
    total = torch.full((n,), 3.0, dtype=F64)
    key = fundp.random.key(11)
    snapped = add_gaussian_noise({"w": total}, key, stddev, snap_float64=True)["w"]
    plain = add_gaussian_noise({"w": total}, key, stddev)["w"]
    grid = float64_grid(stddev)
    assert (snapped - plain).abs().max().item() <= grid / 2 + 2.0**-51  # + half an ulp of 3 + noise
    assert not torch.equal(snapped, plain)
    z = ((snapped - 3.0) / stddev).numpy()
    assert abs(z.mean()) < 5.3 / math.sqrt(n)
    assert abs(z.std() - 1) < 5.3 / math.sqrt(2 * n)
    assert stats.kstest(z, "norm").pvalue > 1e-6
    # Secure mode (OS entropy, so a fresh sample each run): false failure ~ 2e-7 per check.
    s = (fundp.secure.secure_noise({"w": torch.zeros(n, dtype=F64)}, stddev)["w"] / stddev).numpy()
    assert abs(s.mean()) < 5.3 / math.sqrt(n)
    assert abs(s.std() - 1) < 5.3 / math.sqrt(2 * n)


# add_gaussian_noise(tree, key(20261207), 0.7) before snapping existed, as raw bits.
_PINNED_TREE = {"a": [0.0, 1.5, -2.25, 1e-3], "b": [0.0, 3.0, -1.0]}
_PINNED_A = [-1098980365, 1066116690, -1076661751, 1067552379]  # float32 bits (int32 view)
_PINNED_B = [-16627, 16405, -16650]  # bfloat16 bits (int16 view)


@pytest.mark.parametrize("snap", [False, True])
def test_float32_and_bfloat16_unchanged_bit_for_bit(snap):
    tree = {"a": torch.tensor(_PINNED_TREE["a"]), "b": torch.tensor(_PINNED_TREE["b"], dtype=torch.bfloat16)}
    key = fundp.random.key(20261207)
    out = add_gaussian_noise(tree, key, 0.7, snap_float64=snap)
    assert out["a"].view(torch.int32).tolist() == _PINNED_A
    assert out["b"].view(torch.int16).tolist() == _PINNED_B
    # By the formula: one float64 N(0, 1) stream cut into the leaves, scaled, added in float64, rounded once.
    z = fundp.random.normal(key, (7,), F64) * 0.7
    assert torch.equal(out["a"], (tree["a"].double() + z[:4]).float())
    assert torch.equal(out["b"], (tree["b"].double() + z[4:]).bfloat16())
    # A float64 sum released as float32 (release_dtypes) is not snapped either.
    wide = add_gaussian_noise({"a": tree["a"].double()}, key, 0.7, snap_float64=True, release_dtypes=[torch.float32])["a"]
    assert torch.equal(wide, tree["a"].double() + fundp.random.normal(key, (4,), F64) * 0.7)


def test_secure_float32_unchanged_bit_for_bit(monkeypatch):
    """Secure mode with the OS entropy fixed: float32 / bfloat16 leaves, and float64 sums
    released as float32 (``release_dtypes``), are the unsnapped ``round(x + sigma z)`` of the sampler."""
    entropy = random.Random(3).randbytes(8 * 4 * 10)
    monkeypatch.setattr(fundp.secure.os, "urandom", lambda n: entropy[:n])
    x = torch.linspace(-2, 2, 10, dtype=F64)
    z = fundp.secure.secure_normal((10,), F64) * 1.3
    tree = {"a": x.float(), "b": x.bfloat16(), "wide": x}
    leaves = {name: fundp.secure.secure_noise({name: leaf}, 1.3, release_dtypes=[torch.float32] if name == "wide" else None)[name]
              for name, leaf in tree.items()}
    assert torch.equal(leaves["a"], (x.float().double() + z).float())
    assert torch.equal(leaves["b"], (x.bfloat16().double() + z).bfloat16())
    assert torch.equal(leaves["wide"], x + z)
    # A None entry is the leaf's own dtype (float64 here: snapped), as in privatize's dtypes.
    both = fundp.secure.secure_noise({"f": x, "g": x[:0]}, 1.3, release_dtypes=[None, torch.float32])
    assert torch.equal(both["f"], snapped_sum(x, z, 2.0**-19))
    snapped = fundp.secure.secure_noise({"w": x}, 1.3)["w"]  # the same entropy, released in float64
    assert torch.equal(snapped, snapped_sum(x, z, 2.0**-19)) and not torch.equal(snapped, x + z)


def test_zero_stddev_is_not_snapped():
    x = {"w": torch.tensor([0.1, 1 / 3], dtype=F64)}
    assert torch.equal(fundp.secure.secure_noise(x, 0.0)["w"], x["w"])
    assert torch.equal(add_gaussian_noise(x, fundp.random.key(0), 0.0, snap_float64=True)["w"], x["w"])
