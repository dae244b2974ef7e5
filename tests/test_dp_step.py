"""dp_step against an independent micro-batched computation, its noise, masks, compile, bad input."""

import math

import pytest
import torch
import torch._dynamo.testing

import fundp
from models import MLP, SmallCNN, classification_loss, data_for, make, micro_batch_grads, params_of


def reference_step(model, loss_fn, params, batch, *, max_norm, expected_batch_size, mask=None, style="flat", gamma=0.01):
    """Mean of clipped micro-batch gradients, written out with plain loops and float64 math."""
    grads = micro_batch_grads(model, loss_fn, params, batch)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(batch["y"].shape[0]):
        if mask is not None and not mask[i]:
            continue
        row = {k: grads[k][i] for k in params}
        if style == "per_layer":
            for k in params:
                n = row[k].norm().item()
                total[k] += row[k] * min(1.0, max_norm[k] / n if n > 0 else 1.0)
            continue
        n = math.sqrt(sum(row[k].pow(2).sum().item() for k in params))
        factor = max_norm / (n + gamma) if style == "automatic" else min(1.0, max_norm / n)
        for k in params:
            total[k] += row[k] * factor
    return {k: v / expected_batch_size for k, v in total.items()}


@pytest.mark.parametrize("style", ["flat", "automatic", "per_layer"])
@pytest.mark.parametrize("model_cls", [MLP, SmallCNN])
def test_noise_free_step_equals_micro_batched_clipping(model_cls, style, variant):
    model = make(model_cls)
    params, loss_fn, batch = params_of(model), classification_loss(model), data_for(model, 8)
    max_norm = {k: 0.05 * (i + 1) for i, k in enumerate(params)} if style == "per_layer" else 0.3
    step = fundp.dp_step(loss_fn, max_norm=max_norm, noise_multiplier=0.0, expected_batch_size=10.0, clip_style=style, grad_method="vmap")
    mask = torch.tensor([True, True, False, True, True, True, False, True])
    out = variant(step)(params, batch, fundp.random.key(0), mask=mask)
    expected = reference_step(model, loss_fn, params, batch, max_norm=max_norm, expected_batch_size=10.0, mask=mask, style=style)
    for k in params:
        torch.testing.assert_close(out.grads[k], expected[k], rtol=1e-10, atol=1e-13)
    losses = loss_fn(params, batch)
    torch.testing.assert_close(out.loss, losses[mask].mean())
    ref_norms = [math.sqrt(sum(g[i].pow(2).sum().item() for g in micro_batch_grads(model, loss_fn, params, batch).values())) for i in range(8)]
    torch.testing.assert_close(out.norms, torch.tensor(ref_norms, dtype=torch.float64) * mask)


def test_noise_statistics_and_key_determinism():
    torch.manual_seed(0)
    params = {"w": torch.zeros(50_000, dtype=torch.float64)}
    batch = {"x": torch.randn(4, 50_000, dtype=torch.float64)}
    loss_fn = lambda p, b: b["x"] @ p["w"]
    sigma, clip_norm, ebs = 1.3, 0.7, 4.0
    # This test compares steps on one key on purpose: the key-reuse guard is opted out of explicitly.
    step = fundp.dp_step(loss_fn, max_norm=clip_norm, noise_multiplier=sigma, expected_batch_size=ebs, grad_method="vmap",
                         check_key_reuse=False)
    clean = fundp.dp_step(loss_fn, max_norm=clip_norm, noise_multiplier=0.0, expected_batch_size=ebs, grad_method="vmap",
                          check_key_reuse=False)
    key = fundp.random.key(11)
    noisy = step(params, batch, key).grads["w"]
    assert torch.equal(noisy, step(params, batch, key).grads["w"])  # same key, same output
    assert not torch.equal(noisy, step(params, batch, fundp.random.key(12)).grads["w"])
    z = noisy - clean(params, batch, key).grads["w"]
    expected_std = sigma * clip_norm / ebs
    n = z.numel()  # 5.3 standard errors: false-failure rate ~1e-7 for each check
    assert abs(z.mean().item()) < 5.3 * expected_std / math.sqrt(n)
    assert abs(z.std().item() / expected_std - 1) < 5.3 / math.sqrt(2 * n)


def test_padded_rows_never_leak_even_with_nan():
    model = make(MLP)
    params, loss_fn, batch = params_of(model), classification_loss(model), data_for(model, 6)
    step = fundp.dp_step(loss_fn, max_norm=0.5, noise_multiplier=1.0, expected_batch_size=4.0, grad_method="vmap",
                         check_key_reuse=False)  # two batches on one key, compared
    mask = torch.tensor([True, True, True, True, False, False])
    poisoned = {"x": batch["x"].clone(), "y": batch["y"]}
    poisoned["x"][4:] = float("nan")
    key = fundp.random.key(3)
    a, b = step(params, batch, key, mask=mask), step(params, poisoned, key, mask=mask)
    for k in params:
        assert torch.equal(a.grads[k], b.grads[k])
    assert torch.equal(a.loss, b.loss) and int(b.num_nonfinite) == 0


def test_nonfinite_real_example_is_dropped_and_counted():
    model = make(MLP)
    params, loss_fn, batch = params_of(model), classification_loss(model), data_for(model, 5)
    step = fundp.dp_step(loss_fn, max_norm=0.5, noise_multiplier=0.0, expected_batch_size=5.0, grad_method="vmap",
                         check_key_reuse=False)  # two batches on one key, compared
    poisoned = {"x": batch["x"].clone(), "y": batch["y"]}
    poisoned["x"][2, 0] = float("inf")
    out = step(params, poisoned, fundp.random.key(0))
    assert int(out.num_nonfinite) == 1
    keep = torch.tensor([True, True, False, True, True])
    expected = step(params, batch, fundp.random.key(0), mask=keep)
    for k in params:
        torch.testing.assert_close(out.grads[k], expected.grads[k], rtol=1e-12, atol=1e-15)
    debug = fundp.dp_step(loss_fn, max_norm=0.5, noise_multiplier=0.0, expected_batch_size=5.0, grad_method="vmap", check_finite=True)
    debug(params, poisoned, fundp.random.key(0))  # Inf input, finite loss (tanh saturates): allowed
    poisoned["x"][2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss"):
        debug(params, poisoned, fundp.random.key(1))
    bad_params = dict(params, **{"net.0.bias": params["net.0.bias"] * float("nan")})
    with pytest.raises(FloatingPointError, match="net.0.bias"):
        debug(bad_params, batch, fundp.random.key(2))


@pytest.mark.parametrize("grad_method", ["vmap", "auto"])
def test_aux_is_per_example_under_every_engine(grad_method):
    """aux comes back with the shapes loss_fn gives on the whole batch, [B, ...], whatever the engine."""
    model = make(MLP)
    params, batch = params_of(model), data_for(model, 5)

    def loss_fn(p, b):
        logits = fundp.functional_call(model, p, (b["x"],))
        losses = torch.nn.functional.cross_entropy(logits, b["y"], reduction="none")
        return losses, {"logits": logits.detach(), "loss": losses.detach()}

    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=5, has_aux=True, grad_method=grad_method)
    out = step(params, batch, fundp.random.key(0))
    expected = loss_fn(params, batch)[1]  # the plain batched forward
    assert out.aux["logits"].shape == (5, 3) and out.aux["loss"].shape == (5,)
    torch.testing.assert_close(out.aux["logits"], expected["logits"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.aux["loss"], expected["loss"], rtol=1e-10, atol=1e-12)
    simple = fundp.dp_step(lambda p, b: ((b @ p["w"]) ** 2, b @ p["w"]), max_norm=1.0, noise_multiplier=0.0,
                           expected_batch_size=2, has_aux=True, grad_method=grad_method)
    torch.testing.assert_close(simple({"w": torch.ones(2)}, torch.eye(2), fundp.random.key(1)).aux, torch.ones(2))


def _small_problem(dtype=torch.float32):
    model = make(MLP, dtype=dtype)
    return model, params_of(model), classification_loss(model), data_for(model, 8, dtype=dtype)


def test_compiled_step_matches_eager_and_does_not_recompile():
    torch._dynamo.reset()
    model, params, loss_fn, batch = _small_problem()
    step = fundp.dp_step(loss_fn, max_norm=0.5, noise_multiplier=0.0, expected_batch_size=8, grad_method="vmap",
                         check_key_reuse=False)  # eager and compiled on one key, compared
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter)
    mask = torch.ones(8, dtype=torch.bool)
    for i in range(4):
        mask = mask.clone()
        mask[i] = False  # new values, same shape
        eager = step(params, batch, fundp.random.key(i), mask=mask)
        fast = compiled(params, batch, fundp.random.key(i), mask=mask)
        for k in params:
            torch.testing.assert_close(fast.grads[k], eager.grads[k], rtol=1e-4, atol=1e-6)
    assert counter.frame_count == 1


def test_compiled_noise_equals_eager_noise():
    torch._dynamo.reset()
    _, params, loss_fn, batch = _small_problem()
    step = fundp.dp_step(loss_fn, max_norm=0.5, noise_multiplier=2.0, expected_batch_size=8, grad_method="vmap",
                         check_key_reuse=False)  # eager and compiled on one key, compared
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter)
    for i in range(3):
        eager, fast = step(params, batch, fundp.random.key(i)), compiled(params, batch, fundp.random.key(i))
        for k in params:
            torch.testing.assert_close(fast.grads[k], eager.grads[k], rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_norm=-1.0), "max_norm"),
        (dict(max_norm=float("nan")), "max_norm"),
        (dict(max_norm=0.0), "max_norm"),
        (dict(noise_multiplier=-0.5), "noise_multiplier"),
        (dict(noise_multiplier=float("nan")), "noise_multiplier"),
        (dict(expected_batch_size=0), "expected_batch_size"),
        (dict(expected_batch_size=-3), "expected_batch_size"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(clip_style="nope"), "clip_style"),
        (dict(grad_method="nope"), "grad_method"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    base = dict(max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    base.update(kwargs)
    with pytest.raises(ValueError, match=name):
        fundp.dp_step(lambda p, b: b @ p["w"], **base)


def test_bad_calls_name_the_problem():
    X32 = torch.arange(6.0).reshape(3, 2)  # distinct rows (equal last rows would be refused as padding)
    step = fundp.dp_step(lambda p, b: (b["x"] @ p["w"]).mean(), max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, grad_method="vmap")
    params = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        step(params, {"x": X32}, fundp.random.key(0))
    good = fundp.dp_step(lambda p, b: b["x"] @ p["w"] + b["y"], max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, grad_method="vmap")
    with pytest.raises(ValueError, match="leading batch dimension"):
        good(params, {"x": X32, "y": torch.ones(2)}, fundp.random.key(0))
    with pytest.raises(ValueError, match="mask"):
        good(params, {"x": X32, "y": torch.ones(3)}, fundp.random.key(0), mask=torch.ones(3))
    with pytest.raises(TypeError, match="key"):
        good(params, {"x": X32, "y": torch.ones(3)}, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_smoke():
    model, params, loss_fn, batch = _small_problem()
    model = model.cuda()
    params = {k: v.cuda() for k, v in params.items()}
    batch = {k: v.cuda() for k, v in batch.items()}
    step = fundp.dp_step(classification_loss(model), max_norm=0.5, noise_multiplier=1.0, expected_batch_size=8)
    key = fundp.random.key(0, device="cuda")
    out = step(params, batch, key)
    assert all(g.is_cuda and torch.isfinite(g).all() for g in out.grads.values())
    compiled = torch.compile(step)(params, batch, key)
    for k in params:  # Threefry bits are identical on every device; ndtri may differ by rounding
        torch.testing.assert_close(compiled.grads[k], out.grads[k], rtol=1e-4, atol=1e-5)
    cpu = fundp.dp_step(classification_loss(model.cpu()), max_norm=0.5, noise_multiplier=1.0, expected_batch_size=8)
    ref = cpu({k: v.cpu() for k, v in params.items()}, {k: v.cpu() for k, v in batch.items()}, fundp.random.key(0))
    for k in params:
        torch.testing.assert_close(out.grads[k].cpu(), ref.grads[k], rtol=1e-4, atol=1e-5)
