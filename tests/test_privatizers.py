"""Privatizers (fundp.privatizers): each one's noisy sum equals an independent computation for the
same key, bit for bit, and the events dp_step records equal the ledger computed by hand."""

import math

import optree
import pytest
import torch

import fundp
from fundp import adaptive, mf
from fundp.privatizers import (
    CorrelatedNoiseQuery,
    GaussianQuery,
    QuantileCountQuery,
    correlated_privatizer,
    gaussian_privatizer,
    quantile_privatizer,
    record,
    secure_gaussian_privatizer,
)

SUM = {"w": torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64), "b": torch.tensor([3.0, -0.5], dtype=torch.float64)}


def _by_hand(tree, key, stddev):
    """tree + stddev * z, z one float64 stream of standard normals from key cut in optree leaf order."""
    leaves, spec = optree.tree_flatten(tree)
    z = fundp.random.normal(key, (sum(leaf.numel() for leaf in leaves),), torch.float64)
    out, start = [], 0
    for leaf in leaves:
        out.append(leaf + stddev * z[start : start + leaf.numel()].reshape(leaf.shape))
        start += leaf.numel()
    return optree.tree_unflatten(spec, out)


def _equal(a, b):
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)))


def test_gaussian_privatizer_is_the_keyed_draw():
    key = fundp.random.key(3)
    p = gaussian_privatizer(1.3)
    noisy, state, event = p.privatize(SUM, 2.0, key, p.init(SUM))
    assert _equal(noisy, _by_hand(SUM, key, 1.3 * 2.0)) and state is None and event == GaussianQuery(1.3)
    # a per-call sigma (a schedule's 0-d tensor) overrides the built one
    noisy, _, event = p.privatize(SUM, 2.0, key, None, noise_multiplier=torch.tensor(0.5, dtype=torch.float64))
    assert _equal(noisy, _by_hand(SUM, key, 0.5 * 2.0)) and float(event.noise_multiplier) == 0.5
    with pytest.raises(ValueError, match="noise_multiplier"):
        gaussian_privatizer(-1.0)


def test_secure_privatizer_draws_from_the_secure_sampler(monkeypatch):
    calls = []

    def fake(tree, stddev, *, release_dtypes=None):
        calls.append(stddev)
        return optree.tree_map(lambda g: g + stddev, tree)

    monkeypatch.setattr(fundp.secure, "secure_noise", fake)
    noisy, _, event = secure_gaussian_privatizer(1.5).privatize(SUM, 2.0, None, None)
    assert calls == [3.0] and event == GaussianQuery(1.5)
    assert _equal(noisy, optree.tree_map(lambda g: g + 3.0, SUM))


def test_secure_privatizer_real_draws_have_the_std():
    big = {"w": torch.zeros(20000, dtype=torch.float64)}
    noisy, _, _ = secure_gaussian_privatizer(2.0).privatize(big, 0.5, None, None)
    # std 1: the sample std of 20000 draws is within 5 * 1/sqrt(2 * 20000) = 0.025
    assert abs(float(noisy["w"].std()) - 1.0) < 0.025


@pytest.mark.parametrize("participation", [mf.single_participation(), mf.min_separation(2)])
def test_correlated_privatizer_is_the_mechanism_draw(participation):
    mech = mf.mechanism(mf.banded_toeplitz([1.0, 0.5], 6), participation)
    p = correlated_privatizer(mech, 1.1)
    state = p.init(SUM)
    for t in range(3):
        key = fundp.random.key(10 + t)
        noisy, new_state, event = p.privatize(SUM, 2.0, key, state)
        draws, expected_state = mech.sample(state, key, 1.1 * 2.0, SUM)
        assert _equal(noisy, optree.tree_map(torch.add, SUM, draws)) and _equal(new_state, expected_state)
        assert event.mechanism is mech and event.noise_multiplier == 1.1 and int(event.step) == t
        state = new_state


def test_iid_noise_is_the_identity_case_of_correlated_noise():
    p_iid, p_mf = gaussian_privatizer(0.7), correlated_privatizer(mf.mechanism(mf.identity(4), mf.single_participation()), 0.7)
    state = p_mf.init(SUM)
    for t in range(4):
        key = fundp.random.key(t)
        noisy_mf, state, _ = p_mf.privatize(SUM, 3.0, key, state)
        assert _equal(noisy_mf, p_iid.privatize(SUM, 3.0, key, None)[0])
        assert _equal(noisy_mf, _by_hand(SUM, key, 0.7 * 3.0))


def test_quantile_privatizer_is_the_noisy_count_and_update():
    cfg = adaptive.quantile_clipping(target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=2.0)
    p = quantile_privatizer(cfg, 4.0)
    norms = torch.tensor([0.5, 2.0, 0.1, 3.0, 0.2], dtype=torch.float64)
    mask = torch.tensor([True, True, True, False, True])
    key = fundp.random.key(5)
    state = p.init(1.0)
    count, new_state, event = p.privatize((norms, mask), 1, key, state)
    # by hand: 3 real rows under C = 1, plus sigma_b * z; C <- C exp(-eta (clip(count / 4, 0, 1) - gamma))
    expected = 3.0 + 2.0 * fundp.random.normal(key, (), torch.float64)
    assert torch.equal(count, expected) and event == QuantileCountQuery(cfg)
    fraction = min(max(float(expected) / 4.0, 0.0), 1.0)
    assert float(new_state.max_norm) == pytest.approx(math.exp(-0.2 * (fraction - 0.5)), rel=1e-15)
    with pytest.raises(ValueError, match="sensitivity 1"):
        p.privatize((norms, mask), 2.0, key, state)


def test_record_composes_the_queries_of_one_batch():
    cfg = adaptive.quantile_clipping(count_noise_multiplier=4.0)
    ledger = record(fundp.Ledger(), [GaussianQuery(3.0), QuantileCountQuery(cfg)], sample_rate=0.01)
    z_eff = (3.0**-2 + 4.0**-2) ** -0.5  # one subsampled Gaussian (Andrew et al. 2021): 2.4
    assert ledger == fundp.accountant_step(fundp.Ledger(), noise_multiplier=z_eff, sample_rate=0.01)
    assert record(fundp.Ledger(), GaussianQuery(torch.tensor(1.5)), sample_rate=0.1) == fundp.Ledger([(1.5, 0.1, 1)])
    mech = mf.mechanism(mf.identity(4), mf.cyclic_poisson(2, 0.1))
    assert record(fundp.Ledger(), CorrelatedNoiseQuery(mech, 1.0, 1)) == mech.account(fundp.Ledger(), noise_multiplier=1.0, step=1)
    with pytest.raises(ValueError, match="one gradient query"):
        record(fundp.Ledger(), [GaussianQuery(1.0), GaussianQuery(1.0)], sample_rate=0.1)
    with pytest.raises(ValueError, match="sample_rate"):
        record(fundp.Ledger(), GaussianQuery(1.0))
    with pytest.raises(ValueError, match="truncated"):
        record(fundp.Ledger(), CorrelatedNoiseQuery(mech, 1.0, 0), truncation=(10, 5))


def _model():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    params = {"w": torch.randn(3, generator=g, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    return (lambda p, b: (b @ p["w"] + p["b"]) ** 2), params, x


@pytest.mark.parametrize("kind", ["gaussian", "adaptive", "correlated"])
def test_dp_step_is_the_assembly_of_its_values(kind):
    """dp_step's grads, states and ledger equal clipped_grad_sum + privatizer + division, by hand."""
    loss_fn, params, x = _model()
    mask = torch.tensor([True, True, False, True, True, True])
    cfg = adaptive.quantile_clipping(count_noise_multiplier=3.0)
    mech = mf.mechanism(mf.banded_toeplitz([1.0, 0.4], 4), mf.min_separation(2))
    options = {"adaptive": dict(adaptive_clipping=cfg), "correlated": dict(noise_mechanism=mech)}.get(kind, {})
    step = fundp.dp_step(loss_fn, max_norm=0.5, noise_multiplier=1.2, expected_batch_size=5.0, sample_rate=0.1,
                         grad_method="vmap", **options)
    summed = fundp.clipped_grad_sum(loss_fn, max_norm=0.5, grad_method="vmap")
    key = fundp.random.fold_in(fundp.random.key(77), hash(kind) % 1000)
    clip_state = cfg.init(0.5) if kind == "adaptive" else None
    noise_state = mech.init(params) if kind == "correlated" else None
    out = step(params, x, key, mask=mask, ledger=fundp.Ledger(), clip_state=clip_state, noise_state=noise_state)
    noise_key, model_key, count_key = fundp.random.split(key, 3)
    clipped = summed(params, x, mask, model_key)
    if kind == "correlated":
        draws, expected_noise_state = mech.sample(noise_state, noise_key, 1.2 * 0.5, clipped.grads)
        expected = optree.tree_map(lambda g, z: (g + z) / 5.0, clipped.grads, draws)
        assert _equal(out.noise_state, expected_noise_state)
        assert out.ledger == mech.account(fundp.Ledger(), noise_multiplier=1.2, step=0)
    else:
        expected = optree.tree_map(lambda g: g / 5.0, _by_hand(clipped.grads, noise_key, 1.2 * 0.5))
        z_eff = 1.2 if kind == "gaussian" else (1.2**-2 + 3.0**-2) ** -0.5
        assert out.ledger == fundp.Ledger([(z_eff, 0.1, 1)])
    assert _equal(out.grads, expected)
    if kind == "adaptive":
        unclipped = float(((clipped.norms <= 0.5) & mask).sum())  # real rows under C = 0.5
        count = unclipped + 3.0 * fundp.random.normal(count_key, (), torch.float64)
        fraction = min(max(float(count) / 5.0, 0.0), 1.0)
        assert float(out.clip_state.max_norm) == pytest.approx(0.5 * math.exp(-0.2 * (fraction - 0.5)), rel=1e-14)


def test_adaptive_clipping_with_min_separation_noise_is_accounted_as_dp_accounting_says():
    """Issue 20 item 4: adaptive clipping + a min-separation mechanism is accepted; the run is one
    Gaussian mechanism (the MF release, sigma) composed with k count releases (sigma_b each, k the
    most steps an example joins): checked against dp_accounting's PLD accountant."""
    import dp_accounting

    loss_fn, params, _ = _model()
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma, sigma_b, n, delta = 1.5, 2.0, 4, 1e-5
    cfg = adaptive.quantile_clipping(count_noise_multiplier=sigma_b)
    mech = mf.mechanism(mf.banded_toeplitz([1.0, 0.5], n), mf.min_separation(2))
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=sigma, expected_batch_size=5.0, grad_method="vmap",
                         adaptive_clipping=cfg, noise_mechanism=mech)
    ledger, clip_state, noise_state = fundp.Ledger(), cfg.init(1.0), mech.init(params)
    for t in range(n):  # two fixed batches in turn: every example joins steps 2 apart, k = 2 times
        rows = x[5 * (t % 2) : 5 * (t % 2) + 5]
        out = step(params, rows, fundp.random.fold_in(fundp.random.key(31), t), ledger=ledger,
                   clip_state=clip_state, noise_state=noise_state)
        ledger, clip_state, noise_state = out.ledger, out.clip_state, out.noise_state
    assert ledger.steps == n and mech.max_participations() == 2
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma_b), 2))
    assert fundp.epsilon(ledger, delta) == pytest.approx(accountant.get_epsilon(delta), rel=2e-3)
    # cyclic Poisson (amplified) stays refused, with the table's reason, before the first step
    error, reason = fundp.guards.UNSUPPORTED[("adaptive_clipping", "noise_mechanism")]
    with pytest.raises(error, match="cyclic-Poisson"):
        fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=sigma, expected_batch_size=5.0, adaptive_clipping=cfg,
                      noise_mechanism=mf.mechanism(mf.banded_toeplitz([1.0, 0.5], n), mf.cyclic_poisson(2, 0.5)))


def test_mf_names_do_not_shadow_the_ledger_functions():
    """fundp.mf's whole-run epsilon / calibration have their own names; the old ones (with another
    signature than fundp.epsilon / fundp.calibrate_noise) are deprecated aliases, not public."""
    assert "epsilon" not in mf.__all__ and "calibrate_noise" not in mf.__all__
    mech = mf.mechanism(mf.identity(8), mf.single_participation())
    sigma = mf.calibrate_mechanism_noise(mech, target_epsilon=2.0, delta=1e-5)
    assert mf.mechanism_epsilon(mech, noise_multiplier=sigma, delta=1e-5) == pytest.approx(2.0, rel=1e-6)
    with pytest.warns(DeprecationWarning, match="mechanism_epsilon"):
        assert mf.epsilon(mech, noise_multiplier=sigma, delta=1e-5) == mf.mechanism_epsilon(mech, noise_multiplier=sigma, delta=1e-5)
    with pytest.warns(DeprecationWarning, match="calibrate_mechanism_noise"):
        assert mf.calibrate_noise(mech, target_epsilon=2.0, delta=1e-5) == sigma
