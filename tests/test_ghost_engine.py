"""The ghost engine end to end (fundp/engines/ghost/_engine.py): whole models against micro-batching and
the vmap engine, the mixed plan (``"auto"``), uses below the tracer, parameters never silently zero.

Moved from tests/test_ghost.py / tests/test_ghost_exactness.py (one file per rule family).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.clipping import ScaledSqNorm
from fundp.engines.ghost import GhostUnsupportedError, ghost_plan, make_ghost_engine
from fundp.testing import reference_step

from ghost_helpers import (
    B, Conv1dModel, ConvTwice, D, SequenceModel, TiedLoop, V, WithBilinear, assert_close_global, assert_exact,
    batch_for, features, model_reference_step, tokens,
)
from models import MLP, SmallCNN, TinyAttention, classification_loss, make, micro_batch_grads, params_of


MODELS = [MLP, SmallCNN, TinyAttention, SequenceModel, Conv1dModel, TiedLoop, ConvTwice]


# (moved from tests/test_ghost.py)
@pytest.mark.parametrize("style", ["flat", "per_layer", "automatic"])
@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_ghost_step_equals_micro_batched_clipping(model_cls, style):
    model = make(model_cls)
    params = params_of(model)
    batch = batch_for(model, 6)
    max_norm = 0.05 if style != "per_layer" else 0.02  # small enough that most examples are clipped
    step = fundp.dp_step(classification_loss(model), max_norm=max_norm, noise_multiplier=0.0,
                         expected_batch_size=6, clip_style=style, grad_method="ghost")
    out = step(params, batch, fundp.random.key(0))
    expected, norms = model_reference_step(model, params, batch, max_norm, style)
    torch.testing.assert_close(out.norms, norms, rtol=1e-10, atol=0)
    assert_close_global(out.grads, expected, 1e-10)
    assert bool((norms > max_norm).any()), "the test must exercise clipping"


# (moved from tests/test_ghost.py)
def test_ghost_per_leaf_norms_and_sums_equal_vmap_engine():
    model = make(SequenceModel)
    params, batch = params_of(model), batch_for(model, 5)
    loss = classification_loss(model)
    ghost = make_ghost_engine(loss)(params, batch)
    reference = micro_batch_grads(model, loss, params, batch)
    factors = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    sums = ghost.weighted_sum({k: factors for k in params})
    for k, rows in reference.items():
        sq = ghost.sq_norms[k]  # a ScaledSqNorm: ||g||^2 = scale^2 * scaled (no overflow)
        torch.testing.assert_close(sq.scale.square() * sq.scaled, rows.flatten(1).square().sum(1), rtol=1e-10, atol=1e-300)
        torch.testing.assert_close(sums[k], (rows * factors.reshape(-1, *[1] * (rows.dim() - 1))).sum(0), rtol=1e-10, atol=1e-14)


# (moved from tests/test_ghost.py)
def test_frozen_layers_are_not_tracked_and_cost_nothing():
    model = make(MLP)
    params = {k: v for k, v in params_of(model).items() if k.startswith("net.4")}  # only the head trains
    batch = batch_for(model, 5)
    loss = classification_loss(model)
    plan = ghost_plan(loss, params, batch)
    assert set(plan.values()) == {"ghost"} and len(plan) == 2
    out = fundp.dp_step(loss, max_norm=0.1, noise_multiplier=0.0, expected_batch_size=5, grad_method="ghost")(
        params, batch, fundp.random.key(0))
    grads = micro_batch_grads(model, loss, params, batch)
    total = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))
    torch.testing.assert_close(out.norms, total, rtol=1e-10, atol=0)
    assert set(out.grads) == set(params)


# (moved from tests/test_ghost.py)
@pytest.mark.parametrize("model_cls, fallback", [(WithBilinear, {"bilinear.weight", "bilinear.bias"})])
def test_unsupported_parameters_fall_back_to_vmap_in_auto_and_raise_in_ghost(model_cls, fallback):
    model = make(model_cls)
    params, batch = params_of(model), batch_for(model, 6)
    loss = classification_loss(model)
    plan = ghost_plan(loss, params, batch)
    assert {k[len("params['"):-2] for k, v in plan.items() if v.startswith("vmap")} == fallback
    for name in fallback:
        # The reason names the op, e.g. "used by multi_head_attention_forward".
        assert "vmap: " in plan[f"params['{name}']"]
    step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=0.0, expected_batch_size=6, grad_method="auto")
    out = step(params, batch, fundp.random.key(0))
    expected, norms = model_reference_step(model, params, batch, 0.05, "flat")
    torch.testing.assert_close(out.norms, norms, rtol=1e-10, atol=0)
    assert_close_global(out.grads, expected, 1e-10)
    strict = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=0.0, expected_batch_size=6, grad_method="ghost")
    with pytest.raises(GhostUnsupportedError, match=sorted(fallback)[0].split(".")[0]):
        strict(params, batch, fundp.random.key(0))


# (moved from tests/test_ghost.py)
def test_unused_and_duplicated_parameters_are_never_silently_zero():
    model = make(MLP)
    params = params_of(model)
    params["unused"] = torch.ones(3, dtype=torch.float64)
    loss = classification_loss(model)
    batch = batch_for(model, 4)

    def loss_with_extra(p, b):
        return loss({k: v for k, v in p.items() if k != "unused"}, b)

    assert ghost_plan(loss_with_extra, params, batch)["params['unused']"].startswith("vmap")
    with pytest.raises(GhostUnsupportedError, match="unused"):
        make_ghost_engine(loss_with_extra)(params, batch)
    out = make_ghost_engine(loss_with_extra, fallback=True)(params, batch)
    unused = out.sq_norms["unused"]
    assert torch.equal(unused.scale.square() * unused.scaled, torch.zeros(4, dtype=torch.float64))


# (moved from tests/test_ghost.py)
def test_padded_nan_rows_never_reach_the_sum():
    model = make(SmallCNN)
    params, batch = params_of(model), batch_for(model, 6)
    batch["x"][4:] = float("nan")
    mask = torch.tensor([True] * 4 + [False] * 2)
    step = fundp.dp_step(classification_loss(model), max_norm=0.05, noise_multiplier=0.0, expected_batch_size=4,
                         grad_method="ghost")
    out = step(params, batch, fundp.random.key(0), mask=mask)
    real = {k: v[:4] for k, v in batch.items()}
    expected, _ = model_reference_step(model, params, real, 0.05, "flat")
    assert all(bool(torch.isfinite(g).all()) for g in out.grads.values())
    assert_close_global(out.grads, expected, 1e-10)


# (moved from tests/test_ghost.py)
def test_float32_tolerances():
    # float32 against the float32 vmap engine (the same forward round-off on both sides).
    model = make(SequenceModel, dtype=torch.float32)
    params, batch = params_of(model), batch_for(model, 8, dtype=torch.float32)
    loss = classification_loss(model)
    ghost = make_ghost_engine(loss)(params, batch)
    reference = fundp.engines.make_vmap_engine(loss)(params, batch)
    def total(out):
        plain = [s.scale.square() * s.scaled if isinstance(s, ScaledSqNorm) else s for s in out.sq_norms.values()]
        return torch.sqrt(sum(plain))

    # The vmap engine accumulates its norms in float64 (issue 25): compare the values in float64.
    torch.testing.assert_close(total(ghost).double(), total(reference), rtol=1e-5, atol=0)
    factors = {k: torch.full((8,), 0.5) for k in params}
    assert_close_global(ghost.weighted_sum(factors), reference.weighted_sum(factors), 1e-4)


# (moved from tests/test_ghost.py)
def test_ghost_step_under_no_grad_and_with_grad_requiring_params():
    model = make(MLP)
    loss = classification_loss(model)
    batch = batch_for(model, 5)
    expected, norms = model_reference_step(model, params_of(model), batch, 0.05, "flat")
    step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=0.0, expected_batch_size=5, grad_method="ghost")
    with torch.no_grad():
        out = step(params_of(model), batch, fundp.random.key(0))
    assert_close_global(out.grads, expected, 1e-10)
    live = dict(model.named_parameters())  # not detached: the engine must not leave .grad behind
    out = step(live, batch, fundp.random.key(1))
    assert_close_global(out.grads, expected, 1e-10)
    assert all(p.grad is None for p in live.values())


class _Scaled(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w):
        return F.linear(x, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w, grad.T @ x


@torch.jit.script
def _scripted_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ w.t())


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
@pytest.mark.parametrize("hidden", ["autograd_function", "jit_script", "aten"])
def test_a_second_use_below_the_tracer_is_found_and_the_others_stay_on_ghost(hidden):
    g = torch.Generator().manual_seed(8)
    params = {"w": torch.randn(D, D, generator=g) * 0.5, "v": torch.randn(3, D, generator=g)}

    def loss_fn(p, b):
        h = torch.tanh(F.linear(b["x"], p["w"]))  # visible use
        if hidden == "autograd_function":
            h = h + _Scaled.apply(h, p["w"])  # a second use the mode cannot see
        elif hidden == "jit_script":
            h = h + _scripted_linear(h, p["w"])
        else:
            h = h + torch.ops.aten.linear(h, p["w"])
        return F.cross_entropy(F.linear(h, p["v"]), b["y"], reduction="none")

    plan = ghost_plan(loss_fn, params, features())
    assert plan["params['w']"].startswith("vmap"), plan
    assert plan["params['v']"] == "ghost"
    with pytest.raises(GhostUnsupportedError, match=r"params\['w'\]"):
        fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B, grad_method="ghost")(
            params, features(), fundp.random.key(0))
    assert_exact(loss_fn, params, features(), "flat", grad_method="auto")


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
@pytest.mark.parametrize("tied", [False, True])
def test_huge_but_finite_gradients_are_clipped_not_dropped_on_the_ghost_path(tied):
    # float32 activations of 1e25: a per-example squared norm of ~1e50 overflows float32, yet the
    # norm itself (~1e25) is finite; the engine's scaled norms keep it, so the example is clipped.
    g = torch.Generator().manual_seed(12)
    params = {"emb": torch.randn(V, D, generator=g, dtype=torch.float32),
              "w": torch.randn(D, D, generator=g, dtype=torch.float32)}

    def loss_fn(p, b):
        h = F.embedding(b["ids"], p["emb"]) * 1e25 if tied else b["x"].float().unsqueeze(1) * 1e25
        h = F.linear(h, p["w"])
        logits = h @ p["emb"].T
        return logits.mean(dim=(1, 2))

    batch = tokens() if tied else {"x": torch.randn(B, D, generator=g)}
    out = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B, grad_method="ghost",
                        verify=False)(params, batch, fundp.random.key(0))
    assert int(out.num_nonfinite) == 0
    assert bool(torch.isfinite(out.norms).all()) and float(out.norms.min()) > 1.0
    total = torch.sqrt(sum(v.double().square().sum() for v in out.grads.values()))
    assert 0 < float(total) <= 1.0 + 1e-4  # every example clipped to 1, averaged over B


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
def test_auto_keeps_every_share_of_a_tensor_built_from_a_parameter_that_falls_back():
    # Found by review: F.linear(x, w1 + w2) with w1 also used by an op without a rule (cdist): the
    # use of w1 + w2 was skipped for w2 as well, whose norm then missed that share.
    g = torch.Generator().manual_seed(3)
    params = {"w1": torch.randn(2, D, generator=g, dtype=torch.float64),
              "w2": torch.randn(2, D, generator=g, dtype=torch.float64)}
    batch = {"x": torch.randn(B, 3, D, generator=g, dtype=torch.float64)}

    def loss_fn(p, b):
        x = b["x"]
        return F.linear(x, p["w1"] + p["w2"]).square().sum((1, 2)) \
            + torch.cdist(x, p["w1"].expand(x.shape[0], -1, -1)).sum((1, 2))

    plan = ghost_plan(loss_fn, params, batch)
    assert plan["params['w2']"] == "ghost" and plan["params['w1']"].startswith("vmap")
    ref = reference_step(loss_fn, params, batch, max_norm=0.1, expected_batch_size=B)
    out = fundp.dp_step(loss_fn, max_norm=0.1, noise_multiplier=0.0, expected_batch_size=B, grad_method="auto",
                        verify=False)(params, batch, fundp.random.key(0))
    torch.testing.assert_close(out.norms, ref.norms, rtol=1e-9, atol=0)
    for name in params:
        torch.testing.assert_close(out.grads[name], ref.grads[name], rtol=1e-9, atol=1e-12)
