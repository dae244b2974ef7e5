"""Secure-mode noise: right distribution, OS entropy (no key, no global RNG), wired into dp_step."""

import math

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
    secure = fundp.dp_step(loss_fn, noise_multiplier=2.0, secure_mode=True, **kwargs)
    clean = fundp.dp_step(loss_fn, noise_multiplier=0.0, **kwargs)
    key = fundp.random.key(0)
    z = secure(params, batch, key).grads["w"] - clean(params, batch, key).grads["w"]
    expected = 2.0 * 0.5 / 4.0
    assert abs(z.std().item() / expected - 1) < 5.3 / math.sqrt(2 * z.numel())  # false-failure ~1e-7
    assert not torch.equal(secure(params, batch, key).grads["w"], secure(params, batch, key).grads["w"])
