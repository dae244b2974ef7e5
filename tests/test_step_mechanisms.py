"""Stateful mechanisms as values in dp_step: adaptive clipping (clip_state) and correlated noise
(noise_state).  Expected values are computed by hand from the published update rules."""

import math

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import fundp
from fundp import adaptive
from fundp.noise import noise_like

# loss = x_i . w has per-example gradient x_i: the norms are the rows' norms, known in advance.
NORMS = [0.5, 1.5, 0.8, 3.0, 0.2, 2.5]
LOSS = lambda p, b: b @ p["w"]  # noqa: E731


def batch_with_norms():
    direction = torch.tensor([0.6, 0.8], dtype=torch.float64)
    return torch.stack([n * direction for n in NORMS])


MASK = torch.tensor([True, True, True, True, True, False])  # the 2.5 row is padding


def test_adaptive_clipping_update_and_state():
    cfg = adaptive.quantile_clipping(target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=0.0)
    step = fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=5.0, grad_method="vmap", adaptive_clipping=cfg)
    params, key = {"w": torch.zeros(2, dtype=torch.float64)}, fundp.random.key(4)
    out = step(params, batch_with_norms(), key, mask=MASK, clip_state=cfg.init(1.0))
    # Unclipped real rows at C = 1: 0.5, 0.8, 0.2 (2.5 is padding) -> f = 3 / 5; C <- C exp(-0.2 (0.6 - 0.5)).
    assert float(out.clip_state.max_norm) == pytest.approx(math.exp(-0.2 * 0.1), rel=1e-12)
    # The gradient half is exactly dp_step at C = 1 with the same key (the count has its own key).
    plain = fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=5.0, grad_method="vmap",
                          check_key_reuse=False)  # the reference, on the step's key
    torch.testing.assert_close(out.grads["w"], plain(params, batch_with_norms(), key, mask=MASK).grads["w"], rtol=0, atol=0)
    # The next step clips at the new C.
    key = fundp.random.fold_in(key, 1)  # the next step's key
    again = step(params, batch_with_norms(), key, mask=MASK, clip_state=out.clip_state)
    at_new_c = fundp.dp_step(LOSS, max_norm=math.exp(-0.02), noise_multiplier=1.0, expected_batch_size=5.0, grad_method="vmap",
                             check_key_reuse=False)  # the reference, on the step's key
    torch.testing.assert_close(again.grads["w"], at_new_c(params, batch_with_norms(), key, mask=MASK).grads["w"], rtol=1e-12, atol=1e-15)


def test_adaptive_count_noise_uses_its_own_key_and_the_ledger_records_the_pair():
    sigma, sigma_b, q = 1.0, 2.0, 0.01
    cfg = adaptive.quantile_clipping(target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=sigma_b)
    step = fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=sigma, expected_batch_size=5.0, sample_rate=q, grad_method="vmap", adaptive_clipping=cfg)
    params, key = {"w": torch.zeros(2, dtype=torch.float64)}, fundp.random.key(8)
    out = step(params, batch_with_norms(), key, mask=MASK, clip_state=cfg.init(1.0), ledger=fundp.Ledger())
    count_key = fundp.random.split(key, 3)[2]  # neither the noise key (0) nor the model key (1)
    noisy = 3 + sigma_b * float(fundp.random.normal(count_key, (), torch.float64))
    fraction = min(max(noisy / 5.0, 0.0), 1.0)
    assert float(out.clip_state.max_norm) == pytest.approx(math.exp(-0.2 * (fraction - 0.5)), rel=1e-12)
    # Andrew et al.: the gradient and count queries are one Gaussian mechanism with
    # z_eff = (z^-2 + sigma_b^-2)^(-1/2), recorded once.
    z_eff = (sigma**-2 + sigma_b**-2) ** -0.5
    assert out.ledger == fundp.accountant_step(fundp.Ledger(), noise_multiplier=z_eff, sample_rate=q)
    with pytest.raises(ValueError, match="clip_state"):
        step(params, batch_with_norms(), key, mask=MASK)
    with pytest.raises(ValueError, match="clip_state"):
        fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=5.0)(params, batch_with_norms(), key, clip_state=cfg.init(1.0))


def test_adaptive_step_compiles_once_as_the_threshold_moves():
    torch._dynamo.reset()
    cfg = adaptive.quantile_clipping(target_quantile=0.5, learning_rate=0.5, count_noise_multiplier=0.5)
    step = fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=5.0, grad_method="vmap", adaptive_clipping=cfg)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(step, backend=counter)
    params, state = {"w": torch.zeros(2, dtype=torch.float64)}, cfg.init(1.0)
    values = []
    for t in range(6):
        state = compiled(params, batch_with_norms(), fundp.random.key(t), mask=MASK, clip_state=state).clip_state
        values.append(float(state.max_norm))
    assert len(set(values)) == 6 and counter.frame_count == 1
    torch._dynamo.reset()


class IdentityMechanism:
    """C = I: independent Gaussian noise, i.e. DP-SGD; the state counts the draws."""

    def __init__(self):
        self.stddevs = []

    def init(self, params):
        return torch.zeros((), dtype=torch.int64)

    def sample(self, state, key, stddev, like):
        self.stddevs.append(stddev)
        return noise_like(like, key, stddev), state + 1


def test_identity_noise_mechanism_reproduces_dp_step():
    params = {k: torch.zeros(2, dtype=torch.float64) for k in "abcd"}
    loss_fn = lambda p, b: sum(b @ p[k] for k in "abcd")  # noqa: E731
    batch = batch_with_norms()
    mech = IdentityMechanism()
    kw = dict(max_norm=1.0, noise_multiplier=1.3, expected_batch_size=5.0, clip_style="per_layer", grad_method="vmap")
    step = fundp.dp_step(loss_fn, noise_mechanism=mech, **kw)
    plain = fundp.dp_step(loss_fn, check_key_reuse=False, **kw)  # the reference, on the step's keys
    state = mech.init(params)
    for t in range(3):
        out = step(params, batch, fundp.random.key(t), mask=MASK, noise_state=state)
        expected = plain(params, batch, fundp.random.key(t), mask=MASK)
        for k in params:
            torch.testing.assert_close(out.grads[k], expected.grads[k], rtol=0, atol=0)
        state = out.noise_state
    assert int(state) == 3
    assert mech.stddevs == [pytest.approx(1.3 * 2.0)] * 3  # sigma * S, S = sqrt(4) * 1 per layer
    with pytest.raises(ValueError, match="fundp.mf"):
        step(params, batch, fundp.random.key(0), mask=MASK, noise_state=state, ledger=fundp.Ledger())
    with pytest.raises(ValueError, match="noise_state"):
        step(params, batch, fundp.random.key(0), mask=MASK)
    with pytest.raises(TypeError, match="noise_mechanism"):
        fundp.dp_step(loss_fn, noise_mechanism=object(), **kw)


def test_cyclic_poisson_batches_as_the_sampler_of_a_correlated_noise_step():
    import fundp.mf as mf

    model = torch.nn.Linear(3, 2).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p, b):
        return torch.nn.functional.cross_entropy(fundp.functional_call(model, p, (b["x"],)), b["y"], reduction="none")

    n, partitions, q = 8, 2, 0.5
    mech = mf.mechanism(mf.banded_toeplitz([1.0, 0.3], n), mf.cyclic_poisson(partitions, q))
    batches = mf.cyclic_poisson_batches(40, q, fundp.random.key(1), num_partitions=partitions, steps=n, pad_to_multiple=16)
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.arange(40) % 2
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, sampler=batches, noise_mechanism=mech)
    assert step.expected_batch_size == pytest.approx(batches.expected_batch_size)
    state = mech.init(params)
    for t, (indices, mask) in zip(range(2), batches):
        out = step(params, {"x": x[indices], "y": y[indices]}, fundp.random.key(t), mask=mask, noise_state=state)
        state = out.noise_state
    assert int(state.step) == 2
    with pytest.raises(ValueError, match="noise_mechanism"):
        fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, sampler=batches)
    other = mf.mechanism(mf.banded_toeplitz([1.0, 0.3], n), mf.cyclic_poisson(partitions, 0.25))
    with pytest.raises(ValueError):
        fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, sampler=batches, noise_mechanism=other)
