"""Secure-mode noise: right distribution, OS entropy (no key, no global RNG), wired into dp_step."""

import math

import pytest
import torch
from scipy import stats

import fundp


def test_secure_normal_is_standard_normal():
    z = fundp.secure.secure_normal((200_000,), torch.float64).numpy()
    # KS test and moments; a correct sampler fails each with probability <= 1e-6.
    assert stats.kstest(z, "norm").pvalue > 1e-6
    assert abs(z.mean()) < 5.3 / math.sqrt(z.size)
    assert abs(z.var() - 1) < 5.3 * math.sqrt(2 / z.size)


def test_secure_noise_uses_os_entropy_not_torch_rng():
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    a = fundp.secure.secure_noise({"w": torch.zeros(1000)}, 1.0)["w"]
    torch.manual_seed(0)
    b = fundp.secure.secure_noise({"w": torch.zeros(1000)}, 1.0)["w"]
    assert not torch.equal(a, b)  # equal only with probability ~0
    torch.random.set_rng_state(state)


def test_dp_step_secure_mode_noise_scale():
    params = {"w": torch.zeros(40_000, dtype=torch.float64)}
    batch = torch.randn(4, 40_000, dtype=torch.float64)
    loss_fn = lambda p, b: b @ p["w"]
    kwargs = dict(max_norm=0.5, expected_batch_size=4.0, grad_method="vmap")
    # One key on purpose: secure noise does not come from the key (opted out of the key guard).
    secure = fundp.dp_step(loss_fn, noise_multiplier=2.0, secure_mode=True, check_key_reuse=False, **kwargs)
    clean = fundp.dp_step(loss_fn, noise_multiplier=0.0, check_key_reuse=False, **kwargs)
    key = fundp.random.key(0)
    z = secure(params, batch, key).grads["w"] - clean(params, batch, key).grads["w"]
    expected = 2.0 * 0.5 / 4.0
    assert abs(z.std().item() / expected - 1) < 5.3 / math.sqrt(2 * z.numel())  # false-failure ~1e-7
    assert not torch.equal(secure(params, batch, key).grads["w"], secure(params, batch, key).grads["w"])


def test_secure_noise_accepts_zero_element_leaves():
    tree = {"w": torch.zeros(3, dtype=torch.float64), "empty": torch.zeros(0), "hollow": torch.zeros(2, 0, 5, dtype=torch.bfloat16)}
    out = fundp.secure.secure_noise(tree, 1.0)
    assert out["empty"].shape == (0,) and out["empty"].dtype == torch.float32
    assert out["hollow"].shape == (2, 0, 5) and out["hollow"].dtype == torch.bfloat16
    assert out["w"].shape == (3,) and not torch.equal(out["w"], tree["w"])
    assert fundp.secure.secure_normal((0,)).shape == (0,)
    assert fundp.secure.secure_normal((4, 0), torch.float64).shape == (4, 0)


@pytest.mark.parametrize("byte", [0x00, 0xFF, 0x80, 0x7F])
def test_secure_normal_is_finite_for_extreme_entropy(monkeypatch, byte):
    # All-ones OS bytes used to map to the uniform 1.0 and the inverse CDF to +inf.
    monkeypatch.setattr(fundp.secure.os, "urandom", lambda n: bytes([byte]) * n)
    z = fundp.secure.secure_normal((16,), torch.float64)
    assert torch.isfinite(z).all()
    assert z.abs().max() < 2 * 8.3  # each of the four draws is within ndtri(2**-53) ~ 8.2 of 0, halved sum


def test_secure_noise_bad_arguments():
    with pytest.raises(ValueError, match="stddev must be >= 0"):
        fundp.secure.secure_noise({"w": torch.zeros(2)}, -1.0)
    with pytest.raises(TypeError, match="floating-point"):
        fundp.secure.secure_noise({"w": torch.zeros(2, dtype=torch.int64)}, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        fundp.secure.secure_normal((2,), torch.int32)
