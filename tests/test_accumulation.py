"""Gradient accumulation (fundp.data.accumulated_dp_step): equals one big batch, masks, empty batches.

References are independent: per-example gradients from one autograd backward per example
(``models.micro_batch_grads``), clipped and summed with plain loops in float64.
"""

import math

import pytest
import torch

import fundp
import fundp.data as data
from models import MLP, classification_loss, data_for, make, micro_batch_grads, params_of


def reference_flat(model, loss_fn, params, batch, mask, *, max_norm, expected_batch_size):
    grads = micro_batch_grads(model, loss_fn, params, batch)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(mask.shape[0]):
        if not mask[i]:
            continue
        norm = math.sqrt(sum(grads[k][i].pow(2).sum().item() for k in params))
        for k in params:
            total[k] += grads[k][i] * min(1.0, max_norm / norm)
    return {k: v / expected_batch_size for k, v in total.items()}


def padded_problem(real=70, pad_to=32, seed=1):
    """A float64 MLP and a logical batch of ``real`` rows padded to a multiple of ``pad_to``; the
    padding rows' inputs are NaN (they must never reach the result)."""
    model = make(MLP)
    params, loss_fn = params_of(model), classification_loss(model)
    total = pad_to * math.ceil(real / pad_to)
    batch = data_for(model, total, seed=seed)
    mask = torch.arange(total) < real
    batch["x"][~mask] = float("nan")
    return model, params, loss_fn, batch, mask


@pytest.mark.parametrize("physical", [1, 7, 16, 96, 200])
def test_noise_free_accumulation_equals_one_big_batch(physical):
    model, params, loss_fn, batch, mask = padded_problem()
    kw = dict(max_norm=0.4, noise_multiplier=0.0, expected_batch_size=64.0, grad_method="vmap",
              check_key_reuse=False)  # two steps compared on one key
    step = data.accumulated_dp_step(loss_fn, physical_batch_size=physical, **kw)
    out = step(params, batch, fundp.random.key(0), mask=mask)
    big = fundp.dp_step(loss_fn, **kw)(params, batch, fundp.random.key(0), mask=mask)
    clean = {k: v[mask] for k, v in batch.items()}
    expected = reference_flat(model, loss_fn, params, clean, torch.ones(70, dtype=torch.bool), max_norm=0.4, expected_batch_size=64.0)
    for k in params:
        torch.testing.assert_close(out.grads[k], expected[k], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(out.grads[k], big.grads[k], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.loss, loss_fn(params, clean).mean())
    torch.testing.assert_close(out.norms, big.norms, rtol=1e-12, atol=0.0)
    assert out.norms.shape == (96,) and int(out.num_nonfinite) == 0


@pytest.mark.parametrize("style", ["flat", "per_layer", "automatic"])
def test_same_key_with_noise_equals_dp_step(style):
    """With the same key and noise > 0 the accumulated step is dp_step (the noise is drawn once,
    from the same noise key): equal to float64 rounding of the sum."""
    model, params, loss_fn, batch, mask = padded_problem(real=45)
    max_norm = {k: 0.1 * (i + 1) for i, k in enumerate(params)} if style == "per_layer" else 0.4
    kw = dict(max_norm=max_norm, noise_multiplier=1.3, expected_batch_size=50.0, clip_style=style, grad_method="vmap",
              check_key_reuse=False)  # two steps compared on one key
    key = fundp.random.key(17)
    out = data.accumulated_dp_step(loss_fn, physical_batch_size=16, **kw)(params, batch, key, mask=mask)
    big = fundp.dp_step(loss_fn, **kw)(params, batch, key, mask=mask)
    for k in params:
        torch.testing.assert_close(out.grads[k], big.grads[k], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.loss, big.loss, rtol=1e-12, atol=0.0)
    other = data.accumulated_dp_step(loss_fn, physical_batch_size=16, **kw)(params, batch, fundp.random.key(18), mask=mask)
    assert not torch.equal(other.grads["net.0.weight"], out.grads["net.0.weight"])


def test_padding_rows_never_change_the_result():
    model, params, loss_fn, batch, mask = padded_problem(real=40)
    step = data.accumulated_dp_step(loss_fn, physical_batch_size=16, max_norm=0.4, noise_multiplier=1.0, expected_batch_size=40.0, grad_method="vmap",
                                    check_key_reuse=False)  # three batches compared on one key
    key = fundp.random.key(2)
    poisoned = step(params, batch, key, mask=mask)  # NaN in padded rows
    replaced = {k: v.clone() for k, v in batch.items()}
    replaced["x"][~mask] = 1e6  # huge but finite: would dominate any leak
    replaced["y"][~mask] = 0
    clean = step(params, replaced, key, mask=mask)
    for k in params:
        assert torch.isfinite(poisoned.grads[k]).all()
        assert torch.equal(poisoned.grads[k], clean.grads[k])
    assert torch.equal(poisoned.loss, clean.loss) and int(poisoned.num_nonfinite) == 0
    # A row 0 that is itself padding (so the chunk filler copies a NaN row) changes nothing either.
    shifted_mask = mask.roll(1)
    shifted = {k: v.roll(1, dims=0) for k, v in batch.items()}
    assert not shifted_mask[0]
    out = step(params, shifted, key, mask=shifted_mask)
    for k in params:
        torch.testing.assert_close(out.grads[k], poisoned.grads[k], rtol=1e-12, atol=1e-15)


def test_empty_batch_gives_finite_pure_noise():
    """All rows masked (and NaN): grads = N(0, (sigma C)^2) / ebs exactly.  Statistical check on
    20000 coordinates: mean within 5.3 standard errors of 0 and sample std within 5.3 standard
    errors (sd of s/sigma ~ 1/sqrt(2n)) of sigma*C/ebs; false-failure rate ~1e-7 per check."""
    dim, sigma, clip_norm, ebs = 20_000, 1.7, 0.6, 25.0
    params = {"w": torch.zeros(dim, dtype=torch.float64)}
    batch = {"x": torch.full((32, dim), float("nan"), dtype=torch.float64)}
    loss_fn = lambda p, b: b["x"] @ p["w"]
    step = data.accumulated_dp_step(loss_fn, physical_batch_size=16, max_norm=clip_norm, noise_multiplier=sigma, expected_batch_size=ebs, grad_method="vmap")
    out = step(params, batch, fundp.random.key(4), mask=torch.zeros(32, dtype=torch.bool))
    g = out.grads["w"]
    assert torch.isfinite(g).all() and float(out.loss) == 0.0 and int(out.num_nonfinite) == 0
    std = sigma * clip_norm / ebs
    assert abs(g.mean().item()) < 5.3 * std / math.sqrt(dim)
    assert abs(g.std().item() / std - 1) < 5.3 / math.sqrt(2 * dim)
    # The same noise dp_step would add for this key: its noise key is split(key)[0].
    expected = fundp.noise({"w": torch.zeros(dim, dtype=torch.float64)}, fundp.random.split(fundp.random.key(4))[0], sigma * clip_norm)["w"] / ebs
    torch.testing.assert_close(g, expected, rtol=1e-14, atol=0.0)


def test_empty_poisson_batch_end_to_end():
    """An empty Poisson step (q tiny) goes through the padded pipeline as pure noise."""
    n = 50
    batches = data.poisson_batches(n, 1e-6, fundp.random.key(0), steps=3, pad_to_multiple=8)
    x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    step = data.accumulated_dp_step(lambda p, b: (b["x"] @ p["w"] - 1.0) ** 2, physical_batch_size=8, max_norm=1.0, noise_multiplier=1.0, sampler=batches, grad_method="vmap")
    for t, (indices, mask) in enumerate(batches):
        assert indices.shape == (8,) and not mask.any()
        out = step(params, {"x": x[indices]}, fundp.random.key(t), mask=mask)
        assert torch.isfinite(out.grads["w"]).all() and out.grads["w"].abs().sum() > 0


def test_split_batch():
    batch = {"a": torch.arange(10.0), "b": torch.arange(20).reshape(10, 2)}
    mask = torch.tensor([True] * 7 + [False] * 3)
    chunks = data.split_batch(batch, 4, mask)
    assert len(chunks) == 3 and all(c["a"].shape == (4,) and c["b"].shape == (4, 2) and m.shape == (4,) for c, m in chunks)
    rows = torch.cat([c["a"][m] for c, m in chunks])
    assert torch.equal(rows, torch.arange(7.0))
    last, last_mask = chunks[-1]
    assert last_mask.tolist() == [False, False, False, False] and last["a"].tolist() == [8.0, 9.0, 0.0, 0.0]
    assert len(data.split_batch(batch, 10)) == 1 and len(data.split_batch(batch, 11)) == 1
    with pytest.raises(ValueError, match="mask"):
        data.split_batch(batch, 4, torch.ones(9, dtype=torch.bool))


def test_sampler_supplies_and_guards_the_rates():
    batches = data.poisson_batches(400, 0.05, fundp.random.key(0), steps=2, pad_to_multiple=16)
    loss_fn = lambda p, b: (b["x"] @ p["w"]) ** 2
    step = data.accumulated_dp_step(loss_fn, physical_batch_size=16, max_norm=1.0, noise_multiplier=1.0, sampler=batches)
    assert step.sample_rate == 0.05
    with pytest.raises(ValueError, match="sample_rate"):
        data.accumulated_dp_step(loss_fn, physical_batch_size=16, max_norm=1.0, noise_multiplier=1.0, sampler=batches, sample_rate=0.04)
    with pytest.raises(ValueError, match="expected_batch_size"):
        data.accumulated_dp_step(loss_fn, physical_batch_size=16, max_norm=1.0, noise_multiplier=1.0, sampler=batches, expected_batch_size=30.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        data.accumulated_dp_step(loss_fn, physical_batch_size=16, max_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="physical_batch_size"):
        data.accumulated_dp_step(loss_fn, physical_batch_size=0, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        data.accumulated_dp_step(loss_fn, physical_batch_size=4, max_norm=1.0, noise_multiplier=-1.0, expected_batch_size=4.0)


def test_aux_and_model_randomness():
    x = torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    params = {"w": torch.ones(4, dtype=torch.float64)}

    def loss_fn(p, b):
        h = torch.nn.functional.dropout(b["x"], 0.5, training=True)
        losses = (h @ p["w"]) ** 2
        return losses, losses.detach()

    step = data.accumulated_dp_step(loss_fn, physical_batch_size=8, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=20.0, has_aux=True, randomness="different", grad_method="vmap",
                                    check_key_reuse=False)  # same key, same dropout masks: compared
    a = step(params, {"x": x}, fundp.random.key(1))
    b = step(params, {"x": x}, fundp.random.key(1))
    c = step(params, {"x": x}, fundp.random.key(2))
    assert torch.equal(a.grads["w"], b.grads["w"]) and not torch.equal(a.grads["w"], c.grads["w"])
    # aux is per-example [B, ...] as in dp_step (the chunks' rows concatenated, the filler dropped).
    # Here aux is each example's loss, so its mean over the 20 rows is the step's mean loss.
    assert a.aux.shape == (20,)
    torch.testing.assert_close(a.aux.mean(), a.loss, rtol=1e-12, atol=0.0)


def test_ledger_records_one_logical_step():
    import fundp.accounting as accounting
    loss_fn = lambda p, b: (b["x"] @ p["w"]) ** 2
    batch = {"x": torch.arange(64.0).reshape(32, 2)}  # distinct rows: equal last rows look like padding
    kw = dict(max_norm=1.0, noise_multiplier=1.1, expected_batch_size=32.0, sample_rate=0.01)
    acc = data.accumulated_dp_step(loss_fn, physical_batch_size=8, **kw)
    big = fundp.dp_step(loss_fn, **kw)
    params = {"w": torch.zeros(2)}
    ledger_a = acc(params, batch, fundp.random.key(0), ledger=accounting.Ledger()).ledger
    ledger_b = big(params, batch, fundp.random.key(1), ledger=accounting.Ledger()).ledger
    assert accounting.epsilon(ledger_a, 1e-5) == accounting.epsilon(ledger_b, 1e-5) > 0
