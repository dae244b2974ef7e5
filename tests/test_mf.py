"""Correlated-noise mechanisms (fundp.mf): online generation, covariance, sensitivity, accounting.

Every number is checked against an independent computation: dense ``C^{-1} Z`` with NumPy,
brute-force enumeration of participation patterns, the closed-form Gaussian mechanism written
out here with scipy, dp_accounting's PLD accountant, and fundp's DP-SGD ledger.
"""

from __future__ import annotations

import math
import os
import tempfile

import dp_accounting
import numpy as np
import optree
import pytest
import scipy.stats
import torch

import fundp
import fundp.mf as mf
from fundp.noise import noise_like

N_SMALL = 12


def _strategies(n: int) -> dict:
    rng = np.random.default_rng(0)
    general = np.tril(rng.uniform(0.2, 1.0, (n, n))) * (np.tri(n) - np.tri(n, k=-3))  # 3 bands
    return {
        "identity": mf.identity(n),
        "banded_toeplitz": mf.banded_toeplitz([1.0, 0.6, 0.3], n),
        "banded_general": mf.banded(general),
        "blt": mf.blt([0.9, 0.5], [0.3, 0.2], n),
        "tree": mf.tree(n),
    }


def _dense_noise(strategy, keys, sizes, stddev):
    """``stddev * sens * C^{-1} Z`` computed densely from the same standard normals."""
    z = np.stack([fundp.random.normal(k, (sum(sizes),), torch.float64).numpy() for k in keys])  # [n, d]
    inverse = np.linalg.inv(strategy.matrix())
    return inverse @ z * stddev


@pytest.mark.parametrize("name", ["identity", "banded_toeplitz", "banded_general", "blt", "tree"])
def test_online_generation_equals_dense_inverse(name):
    n = 13  # not a power of two: the tree's last nodes are incomplete
    strategy = _strategies(n)[name]
    mech = mf.mechanism(strategy, mf.single_participation())
    like = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(2, 2, dtype=torch.float64)}
    base = fundp.random.key(7)
    keys = [fundp.random.fold_in(base, t) for t in range(n)]
    expected = _dense_noise(strategy, keys, [3, 4], 0.7 * mech.sensitivity)
    state = mech.init(like)
    got = []
    for t in range(n):
        noise, state = mech.sample(state, keys[t], 0.7, like)
        leaves = optree.tree_leaves(noise)
        got.append(torch.cat([leaf.reshape(-1) for leaf in leaves]).numpy())
    assert int(state.step) == n
    np.testing.assert_allclose(np.stack(got), expected, rtol=1e-10, atol=1e-12)


def test_online_generation_float32_leaves_and_buffers():
    n = 10
    strategy = mf.blt([0.95, 0.6], [0.2, 0.3], n)
    mech = mf.mechanism(strategy, mf.single_participation())
    like = {"w": torch.zeros(5, dtype=torch.float32)}
    keys = [fundp.random.fold_in(fundp.random.key(3), t) for t in range(n)]
    expected = _dense_noise(strategy, keys, [5], 1.3 * mech.sensitivity)
    state = mech.init(like)
    assert state.buffers["w"].dtype == torch.float32 and state.buffers["w"].shape == (2, 5)
    for t in range(n):
        noise, state = mech.sample(state, keys[t], 1.3, like)
        assert noise["w"].dtype == torch.float32
        # float32 buffers: relative error of a few float32 ulps per step
        np.testing.assert_allclose(noise["w"].numpy(), expected[t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "participation", [mf.single_participation(), mf.cyclic_poisson(1, 0.01), mf.min_separation(5, max_participations=1)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_single_band_is_exactly_dp_sgd_noise(participation, dtype):
    mech = mf.mechanism(mf.banded_toeplitz([1.0], 20), participation)
    assert mech.sensitivity == 1.0
    like = {"w": torch.zeros(4, 3, dtype=dtype), "b": torch.zeros(3, dtype=dtype)}
    state = mech.init(like)
    for t in range(5):
        key = fundp.random.fold_in(fundp.random.key(11), t)
        stddev = 1.7 if t % 2 else torch.tensor(1.7, dtype=torch.float64)  # a number or a 0-d tensor
        noise, state = mech.sample(state, key, stddev, like)
        reference = noise_like(like, key, stddev)
        for got, want in zip(optree.tree_leaves(noise), optree.tree_leaves(reference)):
            assert got.dtype == want.dtype
            assert torch.equal(got, want)


def test_tree_prefix_noise_is_the_sum_of_dyadic_node_noises():
    # DP-FTRL semantics, from the tree's definition (not from C): the noise in the running sum of
    # steps 1..t is the sum of the noises of the dyadic nodes that tile [1, t] (one per set bit of
    # t); the node ending at step e carries Z_e.
    n = 23
    mech = mf.mechanism(mf.tree(n), mf.single_participation())
    like = {"w": torch.zeros(4, dtype=torch.float64)}
    keys = [fundp.random.fold_in(fundp.random.key(8), t) for t in range(n)]
    z = [fundp.random.normal(k, (4,), torch.float64) * mech.sensitivity for k in keys]
    state = mech.init(like)
    running = torch.zeros(4, dtype=torch.float64)
    for t in range(1, n + 1):
        noise, state = mech.sample(state, keys[t - 1], 1.0, like)
        running = running + noise["w"]
        expected, end = torch.zeros(4, dtype=torch.float64), 0
        for bit in reversed(range(t.bit_length())):
            if t >> bit & 1:
                end += 1 << bit
                expected = expected + z[end - 1]
        torch.testing.assert_close(running, expected, rtol=1e-12, atol=1e-12)


def test_mf_noise_adds_to_the_tree():
    mech = mf.mechanism(mf.identity(4), mf.single_participation())
    grads = {"w": torch.arange(3, dtype=torch.float64)}
    key = fundp.random.key(2)
    noisy, state = mf.mf_noise(grads, mech.init(grads), key, 0.5, mech)
    assert torch.equal(noisy["w"], fundp.noise(grads, key, 0.5)["w"])
    assert int(state.step) == 1


@pytest.mark.parametrize("name", ["banded_toeplitz", "blt", "tree"])
def test_empirical_covariance_matches_inverse_structure(name):
    # Each of the M coordinates of one leaf is an independent run, so one pass of n steps gives M
    # draws of the noise vector (x_0 .. x_{n-1}).  Entry (i, j) of the sample covariance has
    # standard deviation sqrt((S_ii S_jj + S_ij^2) / M); a 6-sigma band over n^2 = 64 entries
    # gives a false-failure probability below 64 * 2e-9 ~ 1e-7 (normal approximation; the keys
    # are fixed, so the test is deterministic).
    n, m, stddev = 8, 20000, 0.9
    strategy = _strategies(n)[name]
    mech = mf.mechanism(strategy, mf.single_participation())
    like = {"w": torch.zeros(m, dtype=torch.float64)}
    state = mech.init(like)
    rows = []
    for t in range(n):
        noise, state = mech.sample(state, fundp.random.fold_in(fundp.random.key(5), t), stddev, like)
        rows.append(noise["w"].numpy())
    x = np.stack(rows)
    empirical = x @ x.T / m
    inverse = np.linalg.inv(strategy.matrix())
    expected = (stddev * mech.sensitivity) ** 2 * inverse @ inverse.T
    tolerance = 6 * np.sqrt((np.outer(np.diag(expected), np.diag(expected)) + expected**2) / m)
    assert np.all(np.abs(empirical - expected) <= tolerance)
    # and the structure is really correlated (not the identity's): some off-diagonal entry is large
    if name != "identity":
        off = np.abs(expected - np.diag(np.diag(expected)))
        assert np.any(off > 5 * tolerance)


# --------------------------------------------------------------------------- sensitivity


def _patterns_cases():
    strategies = _strategies(N_SMALL)
    optimised = mf.optimize_banded_toeplitz(N_SMALL, 3)
    return [
        ("tree", strategies["tree"].matrix()),
        ("blt", strategies["blt"].matrix()),
        ("banded_toeplitz", strategies["banded_toeplitz"].matrix()),
        ("optimised", optimised.matrix()),
        ("banded_general", strategies["banded_general"].matrix()),
        ("prefix", np.tri(N_SMALL)),
    ]


@pytest.mark.parametrize("name,c", _patterns_cases())
@pytest.mark.parametrize("min_sep,k", [(1, 1), (1, 2), (3, 2), (3, None), (4, 3), (5, None)])
def test_sensitivity_against_brute_force(name, c, min_sep, k):
    # all these C have a non-negative Gram matrix, where max ||C u|| over indicators u is the sensitivity
    assert np.all(c.T @ c >= -1e-12)
    brute = mf.sensitivity_brute_force(c, min_sep=min_sep, max_participations=k)
    general = mf.sensitivity(c, min_sep=min_sep, max_participations=k)
    banded = not np.any(np.abs(np.subtract.outer(np.arange(N_SMALL), np.arange(N_SMALL)))[c != 0] >= min_sep)
    if k == 1 or banded:
        assert general == pytest.approx(brute, rel=1e-12)  # exact cases
    else:
        assert general >= brute * (1 - 1e-12)  # upper bound
    if name in ("blt", "banded_toeplitz", "optimised", "prefix"):  # Toeplitz, non-negative non-increasing
        coefs = c[:, 0]
        assert mf.toeplitz_sensitivity(coefs, N_SMALL, min_sep=min_sep, max_participations=k) == pytest.approx(brute, rel=1e-12)


def test_sensitivity_upper_bound_with_mixed_signs():
    rng = np.random.default_rng(1)
    c = np.tril(rng.normal(size=(9, 9))) + 3 * np.eye(9)
    for min_sep, k in [(1, 2), (2, 3), (3, None)]:
        assert mf.sensitivity(c, min_sep=min_sep, max_participations=k) >= mf.sensitivity_brute_force(
            c, min_sep=min_sep, max_participations=k
        )


def test_mechanism_sensitivity_matches_brute_force():
    n = N_SMALL
    cases = [
        (mf.optimize_banded_toeplitz(n, 3), mf.min_separation(3)),
        (mf.optimize_banded_toeplitz(n, 3), mf.min_separation(4, max_participations=2)),
        (mf.banded(_strategies(n)["banded_general"].matrix()), mf.min_separation(3, max_participations=3)),
        (mf.blt([0.9, 0.5], [0.3, 0.2], n), mf.min_separation(2, max_participations=4)),
        (mf.tree(n), mf.single_participation()),
        (mf.tree(n), mf.min_separation(4, max_participations=2)),
    ]
    for strategy, participation in cases:
        mech = mf.mechanism(strategy, participation)
        if isinstance(participation, mf.SingleParticipation):
            brute = mf.sensitivity_brute_force(strategy.matrix())
        else:
            brute = mf.sensitivity_brute_force(
                strategy.matrix(), min_sep=participation.min_sep, max_participations=participation.max_participations
            )
        if isinstance(strategy, mf.TreeAggregation) and not isinstance(participation, mf.SingleParticipation):
            assert mech.sensitivity >= brute * (1 - 1e-12)  # generic upper bound for a non-banded C
        else:
            assert mech.sensitivity == pytest.approx(brute, rel=1e-12)
    # the tree's single-participation sensitivity: sqrt(number of levels), = its largest column norm
    assert mf.mechanism(mf.tree(64), mf.single_participation()).sensitivity ** 2 == pytest.approx(7.0)
    for size in (1, 2, 3, 7, 8, 13, 100):
        dense = np.max(np.linalg.norm(mf.tree(size).matrix(), axis=0))
        assert mf.mechanism(mf.tree(size), mf.single_participation()).sensitivity == pytest.approx(dense, rel=1e-12)
    # banded Toeplitz with k full participations: sqrt(k) times the column norm
    coefs = np.array([1.0, 0.5, 0.25])
    mech = mf.mechanism(mf.banded_toeplitz(coefs, 12), mf.min_separation(3, max_participations=3))
    assert mech.sensitivity == pytest.approx(math.sqrt(3 * coefs @ coefs), rel=1e-12)


# --------------------------------------------------------------------------- optimisation


def _dense_loss(c: np.ndarray) -> float:
    """Single-participation prefix-sum loss from first principles: max column norm^2 x mean ||row of A C^-1||^2."""
    n = c.shape[0]
    b = np.tri(n) @ np.linalg.inv(c)
    return float(np.max(np.sum(c * c, axis=0)) * np.mean(np.sum(b * b, axis=1)))


def test_optimised_banded_beats_dp_sgd_and_tree():
    n = 64
    dp_sgd = _dense_loss(np.eye(n))
    assert dp_sgd == pytest.approx((n + 1) / 2)
    tree = _dense_loss(mf.tree(n).matrix())
    for bands in (4, 8):
        banded = _dense_loss(mf.optimize_banded_toeplitz(n, bands).matrix())
        assert banded < tree < dp_sgd
        assert mf.prefix_loss(mf.optimize_banded_toeplitz(n, bands)) == pytest.approx(banded, rel=1e-9)
    blt = _dense_loss(mf.optimize_blt(n, 2).matrix())
    assert blt < _dense_loss(mf.optimize_banded_toeplitz(n, 8).matrix())
    # within 1% of the full-band optimum
    full = _dense_loss(mf.optimize_banded_toeplitz(n, n).matrix())
    assert full <= blt <= 1.01 * full
    # more bands never hurt (each optimum is feasible for the next)
    losses = [_dense_loss(mf.optimize_banded_toeplitz(n, b).matrix()) for b in (1, 2, 4, 8, 16)]
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(losses, losses[1:]))


def test_blt_optimised_for_min_sep_beats_single_participation_blt_there():
    n, sep = 96, 12
    single = mf.optimize_blt(n, 3)
    multi = mf.optimize_blt(n, 3, min_sep=sep)

    def minsep_loss(strategy):
        c = strategy.matrix()
        brute_sens2 = mf.sensitivity(c, min_sep=sep, max_participations=None) ** 2  # generic bound, >= exact
        exact_sens2 = mf.mechanism(strategy, mf.min_separation(sep)).sensitivity ** 2
        assert exact_sens2 <= brute_sens2 * (1 + 1e-12)
        b = np.tri(n) @ np.linalg.inv(c)
        return exact_sens2 * np.mean(np.sum(b * b, axis=1))

    assert minsep_loss(multi) < minsep_loss(single)
    with pytest.raises(ValueError, match="min_sep"):
        mf.optimize_blt(n, 2, max_participations=3)


def test_optimise_max_objective():
    n = 32
    strategy = mf.optimize_banded_toeplitz(n, 4, objective="max")
    c = strategy.matrix()
    b = np.tri(n) @ np.linalg.inv(c)
    max_loss = np.max(np.sum(c * c, axis=0)) * np.max(np.sum(b * b, axis=1))
    mean_opt = mf.optimize_banded_toeplitz(n, 4, objective="mean").matrix()
    b2 = np.tri(n) @ np.linalg.inv(mean_opt)
    assert max_loss <= np.max(np.sum(mean_opt * mean_opt, axis=0)) * np.max(np.sum(b2 * b2, axis=1)) + 1e-9


# --------------------------------------------------------------------------- accounting


def _gaussian_delta(sigma: float, eps: float) -> float:
    """Balle & Wang 2018, Thm 8, for sensitivity 1 and noise std sigma."""
    return scipy.stats.norm.cdf(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * scipy.stats.norm.cdf(
        -eps * sigma - 1 / (2 * sigma)
    )


@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.5])
def test_epsilon_min_sep_is_the_gaussian_mechanism(sigma):
    delta = 1e-5
    mech = mf.mechanism(mf.optimize_banded_toeplitz(40, 4), mf.min_separation(8))
    eps = mf.epsilon(mech, noise_multiplier=sigma, delta=delta)
    assert _gaussian_delta(sigma, eps) == pytest.approx(delta, rel=1e-6)
    # dp_accounting's PLD accountant on one Gaussian mechanism
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.GaussianDpEvent(sigma))
    assert eps == pytest.approx(accountant.get_epsilon(delta), rel=2e-3)


def test_epsilon_cyclic_poisson_single_band_equals_dp_sgd_ledger():
    n, q, sigma, delta = 200, 0.02, 1.1, 1e-5
    mech = mf.mechanism(mf.identity(n), mf.cyclic_poisson(1, q))
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=sigma, sample_rate=q, steps=n)
    for accountant in ("prv", "rdp"):
        assert mf.epsilon(mech, noise_multiplier=sigma, delta=delta, accountant=accountant) == fundp.epsilon(
            ledger, delta, accountant=accountant
        )


def test_epsilon_cyclic_poisson_banded_against_dp_accounting():
    n, b, q, sigma, delta = 100, 4, 0.1, 1.0, 1e-5
    mech = mf.mechanism(mf.optimize_banded_toeplitz(n, b), mf.cyclic_poisson(b, q))
    eps = mf.epsilon(mech, noise_multiplier=sigma, delta=delta)
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, math.ceil(n / b)))
    assert eps == pytest.approx(accountant.get_epsilon(delta), rel=5e-3)
    # per-step accounting composes to the whole-run ledger
    ledger = fundp.Ledger()
    for t in range(n):
        ledger = mech.account(ledger, noise_multiplier=sigma, step=t)
    assert ledger == mech.ledger(sigma) and ledger.steps == n  # every step counts; 25 of them are charged
    assert fundp.epsilon(ledger, delta) == eps


def test_epsilon_cyclic_without_amplification_is_composed_gaussian():
    # sample rate 1: ceil(n / b) plain Gaussian mechanisms; dp_accounting's PLD composes them
    n, b, sigma, delta = 30, 4, 3.0, 1e-6
    mech = mf.mechanism(mf.optimize_banded_toeplitz(n, b), mf.cyclic_poisson(b, 1.0))
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.GaussianDpEvent(sigma), math.ceil(n / b))
    assert mf.epsilon(mech, noise_multiplier=sigma, delta=delta) == pytest.approx(accountant.get_epsilon(delta), rel=2e-3)
    calibrated = mf.calibrate_noise(mech, target_epsilon=2.0, delta=delta)
    assert mf.epsilon(mech, noise_multiplier=calibrated, delta=delta) == pytest.approx(2.0, rel=1e-9)


@pytest.mark.parametrize("target,expected_bands", [(0.1, 1), (20.0, 10)])
def test_amplified_banded_trades_amplification_for_correlation(target, expected_bands):
    # JAX-Privacy's test of the same trade-off (n = 100, N = 1000, batch 100): amplification wins
    # at small epsilon (1 band = DP-SGD), correlated noise at large epsilon (the most bands, 10).
    choice = mf.amplified_banded(100, num_examples=1000, expected_batch_size=100, target_epsilon=target, delta=1e-6)
    assert choice.bands == expected_bands
    assert choice.mechanism.participation == mf.cyclic_poisson(expected_bands, 100 * expected_bands / 1000)
    assert mf.epsilon(choice.mechanism, noise_multiplier=choice.noise_multiplier, delta=1e-6) <= target * (1 + 1e-9)
    assert choice.losses[choice.bands] == min(choice.losses.values())


def test_account_single_participation_records_one_gaussian():
    mech = mf.mechanism(mf.tree(16), mf.single_participation())
    ledger = fundp.Ledger()
    for t in range(16):
        ledger = mech.account(ledger, noise_multiplier=2.0, step=t)
    assert ledger.segments == () and ledger.steps == 16
    assert fundp.accounting.accountants.composition(ledger) == (((2.0, 1.0, 1),), 0.0)  # one Gaussian run
    assert fundp.epsilon(ledger, 1e-5) == pytest.approx(mf.epsilon(mech, noise_multiplier=2.0, delta=1e-5), rel=1e-3)


def test_calibrate_noise_round_trip():
    for participation in (mf.min_separation(4), mf.cyclic_poisson(4, 0.05)):
        mech = mf.mechanism(mf.optimize_banded_toeplitz(64, 4), participation)
        sigma = mf.calibrate_noise(mech, target_epsilon=3.0, delta=1e-6)
        assert mf.epsilon(mech, noise_multiplier=sigma, delta=1e-6) <= 3.0 + 1e-9
        assert mf.epsilon(mech, noise_multiplier=sigma * 0.99, delta=1e-6) > 3.0


# --------------------------------------------------------------------------- sampling


def test_cyclic_poisson_batches():
    num, b, q, steps = 1000, 4, 0.2, 20
    batches = mf.cyclic_poisson_batches(num, q, fundp.random.key(9), num_partitions=b, steps=steps, pad_to_multiple=16)
    parts = batches.partitions
    part_sets = [set(p.tolist()) for p in parts]
    assert sorted(torch.cat(parts).tolist()) == list(range(num))
    seen: dict[int, list[int]] = {}
    counts = []
    for t, (indices, mask) in enumerate(batches):
        assert indices.shape[0] % 16 == 0
        real = indices[mask].tolist()
        assert set(real) <= part_sets[t % b]
        assert len(set(real)) == len(real)
        counts.append(len(real))
        for i in real:
            seen.setdefault(i, []).append(t)
    # every example's steps are >= b apart (b-min-separation)
    assert all(all(y - x >= b for x, y in zip(ts, ts[1:])) for ts in seen.values())
    # inclusion rate: 20 draws of Binomial(250, 0.2); total ~ Binomial(5000, 0.2), sd 28.3:
    # a 6-sd band (false-failure probability ~2e-9)
    assert abs(sum(counts) - steps * 250 * q) <= 6 * math.sqrt(steps * 250 * q * (1 - q))
    # reproducible, and any step recomputed alone
    again = mf.cyclic_poisson_batches(num, q, fundp.random.key(9), num_partitions=b, steps=steps, pad_to_multiple=16)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(batches, again))
    assert torch.equal(batches[17][0], list(batches)[17][0])
    assert batches.expected_batch_size == pytest.approx(50.0)
    mech = mf.mechanism(mf.optimize_banded_toeplitz(steps, b), batches.participation)
    mf.check_batches_match(batches, mech, expected_batch_size=50.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        mf.check_batches_match(batches, mech, expected_batch_size=200.0)
    other = mf.mechanism(mf.identity(steps), mf.cyclic_poisson(2, q))
    with pytest.raises(ValueError, match="num_partitions=4"):
        mf.check_batches_match(batches, other)
    plain = fundp.data.poisson_batches(num, q, fundp.random.key(9), steps=steps)
    mf.check_batches_match(plain, mf.mechanism(mf.identity(steps), mf.cyclic_poisson(1, q)), expected_batch_size=num * q)
    with pytest.raises(ValueError, match="sampled by"):
        mf.check_batches_match(object(), mech)


# --------------------------------------------------------------------------- state


def test_state_checkpoint_round_trip_continues_the_stream():
    n = 16
    mech = mf.mechanism(mf.optimize_blt(n, 2), mf.single_participation())
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    keys = [fundp.random.fold_in(fundp.random.key(4), t) for t in range(n)]
    state = mech.init(params)
    straight = []
    for t in range(n):
        noise, state = mech.sample(state, keys[t], 1.0, params)
        straight.append(noise)
    state = mech.init(params)
    for t in range(6):
        _, state = mech.sample(state, keys[t], 1.0, params)
    path = os.path.join(tempfile.mkdtemp(), "run.pt")
    fundp.checkpoint.save(path, params=params, opt_state=state, ledger=None, key=keys[0], step=6)
    restored = fundp.checkpoint.load(path, params_like=params, opt_state_like=mech.init(params)).opt_state
    assert int(restored.step) == 6
    for t in range(6, n):
        noise, restored = mech.sample(restored, keys[t], 1.0, params)
        assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(noise), optree.tree_leaves(straight[t])))


@pytest.mark.parametrize("name", ["banded_general", "blt", "tree"])
def test_tensor_stddev_and_compile_one_graph(name):
    from torch._dynamo.utils import counters

    n = 8
    mech = mf.mechanism(_strategies(n)[name], mf.single_participation())
    like = {"w": torch.zeros(5), "b": torch.zeros(2, 2)}

    def draw(state, key, stddev):
        return mech.sample(state, key, stddev, like)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(draw, fullgraph=True, backend="eager")
    eager_state = compiled_state = mech.init(like)
    for t in range(n):
        key = fundp.random.fold_in(fundp.random.key(1), t)
        stddev = torch.tensor(0.5 + t)  # a schedule: a new value every step
        c, _ = mech.sample(eager_state, key, 0.0, like)  # zero noise multiplier: no noise
        assert torch.equal(c["w"], torch.zeros(5))
        a, eager_state = draw(eager_state, key, stddev)
        b, compiled_state = compiled(compiled_state, key, stddev)
        assert all(torch.allclose(x, y) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)))
    assert counters["stats"]["unique_graphs"] == 1  # no recompiles across steps or stddev values
    torch._dynamo.reset()


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="bands"):
        mf.optimize_banded_toeplitz(16, 0)
    with pytest.raises(ValueError, match="bands"):
        mf.banded_toeplitz([], 16)
    with pytest.raises(ValueError, match="bands .* min_sep"):
        mf.mechanism(mf.banded_toeplitz([1.0, 0.5, 0.2], 16), mf.min_separation(2))
    with pytest.raises(ValueError, match="bands .* num_partitions"):
        mf.mechanism(mf.banded_toeplitz([1.0, 0.5, 0.2], 16), mf.cyclic_poisson(2, 0.1))
    with pytest.raises(ValueError, match="banded"):
        mf.mechanism(mf.tree(16), mf.cyclic_poisson(2, 0.1))
    mech = mf.mechanism(mf.identity(4), mf.single_participation())
    like = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="stddev"):
        mech.sample(mech.init(like), fundp.random.key(0), -1.0, like)
    with pytest.raises(ValueError, match="noise_multiplier"):
        mf.epsilon(mech, noise_multiplier=-1.0, delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        mf.epsilon(mech, noise_multiplier=1.0, delta=0.0)
    with pytest.raises(ValueError, match="min_sep"):
        mf.min_separation(0)
    with pytest.raises(ValueError, match="sample_rate"):
        mf.cyclic_poisson(2, 1.5)
    with pytest.raises(ValueError, match="num_partitions"):
        mf.cyclic_poisson(0, 0.5)
    with pytest.raises(ValueError, match="buffers"):
        mf.optimize_blt(16, 0)
    with pytest.raises(ValueError, match="objective"):
        mf.optimize_banded_toeplitz(16, 2, objective="median")
    with pytest.raises(ValueError, match="noise_multiplier"):
        mech.account(fundp.Ledger(), noise_multiplier=0.0, step=0)
    with pytest.raises(TypeError, match="participation"):
        mf.mechanism(mf.identity(4), "poisson")
    assert mf.epsilon(mech, noise_multiplier=0.0, delta=1e-5) == math.inf
    state = mech.init(like)
    for t in range(4):
        _, state = mech.sample(state, fundp.random.fold_in(fundp.random.key(0), t), 1.0, like)
    with pytest.raises(ValueError, match="n = 4 steps"):
        mech.sample(state, fundp.random.key(9), 1.0, like)
