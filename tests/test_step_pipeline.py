"""One pipeline: accumulation is dp_step(physical_batch_size=), the sensitivity travels with the
clipped sum, fullgraph compilation, tensor hyperparameters that never recompile, verify plumbing.

References are independent of the code under test where numbers are checked: noise from
``fundp.noise`` with a hand-computed std, clipped sums from single-example autograd
(``models.micro_batch_grads``).
"""

import math

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import fundp
import fundp.data as data
import fundp.step as step_module
from models import MLP, classification_loss, data_for, make, micro_batch_grads, params_of


def four_leaf_problem(rows=12):
    """A linear model with four parameter leaves (per-layer clipping at C = 1: sensitivity 2)."""
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(3, generator=g, dtype=torch.float64) for k in "abcd"}
    x = {k: torch.randn(rows, 3, generator=g, dtype=torch.float64) for k in "abcd"}

    def loss_fn(p, b):
        return sum((b[k] @ p[k]) for k in "abcd") ** 2

    return params, x, loss_fn


def test_per_layer_accumulation_recipe_gets_the_same_noise_as_dp_step():
    """The README recipe (clipped_grad_sum per chunk, add_clipped_sums, privatize) with per-layer
    clipping of four leaves at C = 1: sensitivity 2, so noise std 2 sigma, exactly as dp_step."""
    params, batch, loss_fn = four_leaf_problem()
    sigma, ebs, key = 1.5, 12.0, fundp.random.key(5)
    summed = fundp.clipped_grad_sum(loss_fn, max_norm=1.0, clip_style="per_layer", grad_method="vmap")
    first = summed(params, {k: v[:6] for k, v in batch.items()})
    second = summed(params, {k: v[6:] for k, v in batch.items()})
    total = fundp.add_clipped_sums(first, second)
    assert total.sensitivity == pytest.approx(2.0, rel=1e-15)
    noise_key, _ = fundp.random.split(key)
    recipe = fundp.privatize(total, noise_key, noise_multiplier=sigma, expected_batch_size=ebs)
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=sigma, expected_batch_size=ebs, clip_style="per_layer", grad_method="vmap")
    whole = step(params, batch, key).grads
    # Independent: the noise alone, drawn by fundp.noise with the hand-computed std 2 * sigma.
    noise = fundp.noise({k: torch.zeros(3, dtype=torch.float64) for k in "abcd"}, noise_key, 2.0 * sigma)
    for k in "abcd":
        torch.testing.assert_close(recipe[k], whole[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(recipe[k] - total.grads[k] / ebs, noise[k] / ebs, rtol=1e-12, atol=1e-14)


def test_add_clipped_sums_refuses_different_sensitivities():
    params, batch, loss_fn = four_leaf_problem()
    a = fundp.clipped_grad_sum(loss_fn, max_norm=1.0, grad_method="vmap")(params, batch)
    b = fundp.clipped_grad_sum(loss_fn, max_norm=2.0, grad_method="vmap")(params, batch)
    with pytest.raises(ValueError, match="sensitivit"):
        fundp.add_clipped_sums(a, b)
    with pytest.raises(ValueError, match="sensitivity"):
        fundp.add_clipped_sums(a, a._replace(sensitivity=None))


def test_privatize_forms():
    params, batch, loss_fn = four_leaf_problem()
    clipped = fundp.clipped_grad_sum(loss_fn, max_norm=1.0, grad_method="vmap")(params, batch)
    key = fundp.random.key(0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        fundp.privatize(clipped, key, expected_batch_size=4.0)
    with pytest.raises(ValueError, match="sensitivity"):
        fundp.privatize(clipped._replace(sensitivity=None), key, noise_multiplier=1.0, expected_batch_size=4.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        fundp.privatize(clipped, key, noise_multiplier=-1.0, expected_batch_size=4.0)
    with pytest.warns(DeprecationWarning, match="ClippedSum"):
        old = fundp.privatize(clipped.grads, key, noise_stddev=1.0, expected_batch_size=4.0)
    new = fundp.privatize(clipped, key, noise_multiplier=1.0, expected_batch_size=4.0)  # S = 1
    for k in params:
        torch.testing.assert_close(old[k], new[k], rtol=0, atol=0)


OPTIONS = [
    dict(),
    dict(clip_style="per_layer", max_norm=0.2),
    dict(clip_style="automatic"),
    dict(check_finite=True),
    dict(has_aux=True),
    dict(sample_rate=0.1, budget=(50.0, 1e-5)),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_every_dp_step_option_works_with_accumulation(options):
    model = make(MLP)
    params = params_of(model)
    base_loss = classification_loss(model)
    loss_fn = (lambda p, b: (lambda l: (l, l.detach()))(base_loss(p, b))) if options.get("has_aux") else base_loss
    batch, mask = data_for(model, 20), torch.arange(20) < 17
    # Three step objects compared on one key: the key-reuse guard is opted out of explicitly.
    kw = dict(max_norm=0.5, noise_multiplier=1.2, expected_batch_size=18.0, grad_method="vmap", check_key_reuse=False) | options
    key = fundp.random.key(3)
    # A fresh (equal) ledger per step object: a consumed ledger is refused by every step object.
    fresh = (lambda: fundp.Ledger()) if "budget" in options else (lambda: None)
    whole = fundp.dp_step(loss_fn, **kw)(params, batch, key, mask=mask, ledger=fresh())
    chunked = fundp.dp_step(loss_fn, physical_batch_size=8, **kw)(params, batch, key, mask=mask, ledger=fresh())
    alias = data.accumulated_dp_step(loss_fn, physical_batch_size=8, **kw)(params, batch, key, mask=mask, ledger=fresh())
    for out in (chunked, alias):
        for k in params:
            torch.testing.assert_close(out.grads[k], whole.grads[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out.loss, whole.loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.norms, whole.norms, rtol=1e-12, atol=0)
        assert out.ledger == whole.ledger
        if options.get("has_aux"):
            assert out.aux.shape == (20,)
            torch.testing.assert_close(out.aux, whole.aux, rtol=1e-12, atol=0)


@pytest.mark.parametrize("physical", [None, 4])
def test_empty_batches_give_pure_noise_in_both(physical):
    """All rows masked, and a batch of zero rows: grads are the noise alone, the same for both."""
    params = {"w": torch.zeros(5, dtype=torch.float64)}
    loss_fn = lambda p, b: b @ p["w"]
    step = fundp.dp_step(loss_fn, max_norm=0.7, noise_multiplier=2.0, expected_batch_size=4.0, grad_method="vmap", physical_batch_size=physical,
                         check_key_reuse=False)  # two batches on one key, compared
    key = fundp.random.key(9)
    expected = fundp.noise({"w": torch.zeros(5, dtype=torch.float64)}, fundp.random.split(key)[0], 2.0 * 0.7)["w"] / 4.0
    masked = step(params, torch.full((8, 5), float("nan"), dtype=torch.float64), key, mask=torch.zeros(8, dtype=torch.bool))
    empty = step(params, torch.zeros(0, 5, dtype=torch.float64), key)
    for out in (masked, empty):
        torch.testing.assert_close(out.grads["w"], expected, rtol=1e-14, atol=0)
        assert float(out.loss) == 0.0 and int(out.num_nonfinite) == 0
    assert empty.norms.shape == (0,) and masked.norms.shape == (8,)


def test_fullgraph_compile_without_a_ledger():
    """No ledger, budget or debug check: the whole step is one graph (fullgraph=True), with or
    without accumulation, and equals the eager step.  The key-reuse guard (on by default) is in
    that graph: a custom op, no graph break."""
    torch._dynamo.reset()
    model = make(MLP, dtype=torch.float32)
    params, loss_fn, batch = params_of(model), classification_loss(model), data_for(model, 8, dtype=torch.float32)
    mask = torch.arange(8) < 6
    for physical in (None, 4):
        torch._dynamo.reset()
        kw = dict(max_norm=0.5, noise_multiplier=1.0, expected_batch_size=8, grad_method="vmap", physical_batch_size=physical)
        eager = fundp.dp_step(loss_fn, check_key_reuse=False, **kw)  # the reference, on the compiled step's keys
        counter = torch._dynamo.testing.CompileCounter()
        compiled = torch.compile(fundp.dp_step(loss_fn, **kw), backend=counter, fullgraph=True)
        for i in range(3):
            key = fundp.random.key(100 * (physical or 0) + i)
            fast, slow = compiled(params, batch, key, mask=mask), eager(params, batch, key, mask=mask)
            for k in params:
                torch.testing.assert_close(fast.grads[k], slow.grads[k], rtol=1e-5, atol=1e-6)
        assert counter.frame_count == 1
    # A ledger is accounted outside the graph: fullgraph=True then refuses, as documented.
    torch._dynamo.reset()
    compiled = torch.compile(fundp.dp_step(loss_fn, max_norm=0.5, noise_multiplier=1.0, expected_batch_size=8, sample_rate=0.1, grad_method="vmap"), fullgraph=True, backend="eager")
    with pytest.raises(Exception):
        compiled(params, batch, fundp.random.key(0), ledger=fundp.Ledger())
    torch._dynamo.reset()


def test_tensor_hyperparameters_change_without_recompiling():
    """9 steps with 9 different clipping thresholds and noise multipliers (0-d tensors passed at
    call time) compile once, and each equals a step built with those values as plain floats."""
    torch._dynamo.reset()
    model = make(MLP, dtype=torch.float32)
    params, loss_fn, batch = params_of(model), classification_loss(model), data_for(model, 8, dtype=torch.float32)
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=8, grad_method="vmap")
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(step, backend=counter)
    for t in range(9):
        c, sigma = 0.1 + 0.05 * t, 0.5 + 0.1 * t
        out = compiled(params, batch, fundp.random.key(t), max_norm=torch.tensor(c), noise_multiplier=torch.tensor(sigma))
        ref = fundp.dp_step(loss_fn, max_norm=c, noise_multiplier=sigma, expected_batch_size=8, grad_method="vmap",
                            check_key_reuse=False)(params, batch, fundp.random.key(t))  # the compiled step's key
        for k in params:
            torch.testing.assert_close(out.grads[k], ref.grads[k], rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    # Built with 0-d tensors, mutated in place between steps (a schedule): one graph as well.
    torch._dynamo.reset()
    c, sigma = torch.tensor(0.3), torch.tensor(1.0)
    scheduled = fundp.dp_step(loss_fn, max_norm=c, noise_multiplier=sigma, expected_batch_size=8, sample_rate=0.1, grad_method="vmap")
    counter = torch._dynamo.testing.CompileCounter()
    compiled, ledger = torch.compile(scheduled, backend=counter), fundp.Ledger()
    for t in range(4):
        sigma.fill_(1.0 + t)
        ledger = compiled(params, batch, fundp.random.key(100 + t), ledger=ledger).ledger  # fresh keys
    expected = fundp.Ledger()
    for t in range(4):  # the ledger read each step's value (outside the graph)
        expected = fundp.accountant_step(expected, noise_multiplier=1.0 + t, sample_rate=0.1)
    assert ledger == expected
    torch._dynamo.reset()


def test_call_time_overrides_are_checked_in_eager_mode():
    step = fundp.dp_step(lambda p, b: b @ p["w"], max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, grad_method="vmap")
    params, batch = {"w": torch.zeros(2)}, torch.eye(2)
    with pytest.raises(ValueError, match="max_norm"):
        step(params, batch, fundp.random.key(0), max_norm=-1.0)
    with pytest.raises(ValueError, match="max_norm"):
        step(params, batch, fundp.random.key(0), max_norm=torch.tensor(0.0))
    with pytest.raises(ValueError, match="noise_multiplier"):
        step(params, batch, fundp.random.key(0), noise_multiplier=-0.5)


def test_verify_is_validated_and_passed_to_the_engine(monkeypatch):
    for bad in ("sometimes", True, 0, None):
        with pytest.raises(ValueError, match="verify"):
            fundp.dp_step(lambda p, b: b @ p["w"], max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, verify=bad)
        with pytest.raises(ValueError, match="verify"):
            fundp.clipped_grad_sum(lambda p, b: b @ p["w"], max_norm=1.0, verify=bad)
    seen = []
    real = step_module.make_engine

    def spy(grad_method, loss_fn, **kwargs):
        seen.append(kwargs["verify"])
        return real(grad_method, loss_fn, **kwargs)

    monkeypatch.setattr(step_module, "make_engine", spy)
    fundp.dp_step(lambda p, b: b @ p["w"], max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, verify="always", grad_method="vmap")
    fundp.clipped_grad_sum(lambda p, b: b @ p["w"], max_norm=1.0, verify=False, grad_method="vmap")
    fundp.dp_step(lambda p, b: b @ p["w"], max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, grad_method="vmap")
    assert seen == ["always", False, "first"]


@pytest.mark.parametrize("kwargs, name", [(dict(clip_style="Flat"), "clip_style"), (dict(grad_method="vmapp"), "grad_method"), (dict(randomness="differnt"), "randomness")])
def test_misspelled_options_raise_at_runtime(kwargs, name):
    with pytest.raises(ValueError, match=name):
        fundp.dp_step(lambda p, b: b @ p["w"], max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, **kwargs)


def test_accumulated_clipped_sum_matches_micro_batching():
    """accumulate(clipped_grad_sum) against single-example autograd, clipped by hand (float64)."""
    model = make(MLP)
    params, loss_fn, batch = params_of(model), classification_loss(model), data_for(model, 11)
    summed = step_module.accumulate(fundp.clipped_grad_sum(loss_fn, max_norm=0.3, grad_method="vmap"), 4)
    out = summed(params, batch)
    grads = micro_batch_grads(model, loss_fn, params, batch)
    for k in params:
        expected = torch.zeros_like(params[k])
        for i in range(11):
            norm = math.sqrt(sum(grads[j][i].pow(2).sum().item() for j in params))
            expected += grads[k][i] * min(1.0, 0.3 / norm)
        torch.testing.assert_close(out.grads[k], expected, rtol=1e-10, atol=1e-13)
    assert out.norms.shape == (11,) and int(out.num_examples) == 11 and out.sensitivity == 0.3
