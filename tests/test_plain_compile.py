"""Plain ``torch.compile(step)`` (issue 26 item 6): the default step compiles to one graph, with no
dynamo option set, and every call equals micro-batched per-example clipping.

The ghost engine differentiates by ``torch.func.vjp`` under ``torch.compile``; a signature's first
call runs the engine eagerly (verification), the next recompiles to one graph.  References are
computed here, one example at a time with plain autograd (``models.micro_batch_grads``), then
clipped and summed by hand.  ``backend="aot_eager"``: AOTAutograd traces the functorch transforms
as inductor would (only the code generation is skipped).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import GhostUnsupportedError
from models import (MLP, SmallCNN, TinyAttention, classification_loss, data_for, graph_break_loss, make, micro_batch_grads,
                    params_of)

C, B = 0.05, 6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def clipped_reference(grads: dict, max_norm: float, expected_batch_size: float) -> tuple:
    """``(sum_i min(1, C / ||g_i||) g_i / expected_batch_size, ||g_i||)`` from per-example gradients ``[B, ...]``."""
    norms = torch.sqrt(sum(g.flatten(1).square().sum(dim=1) for g in grads.values()))
    factors = torch.clamp(max_norm / norms, max=1.0)
    summed = {k: torch.einsum("b,b...->...", factors, g) / expected_batch_size for k, g in grads.items()}
    return summed, norms


def check_exact(out, expected: dict, norms: torch.Tensor) -> None:
    torch.testing.assert_close(out.norms, norms, rtol=1e-10, atol=0)
    for name, value in expected.items():
        torch.testing.assert_close(out.grads[name], value, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_cls", [MLP, pytest.param(SmallCNN, marks=pytest.mark.slow),
                                       pytest.param(TinyAttention, marks=pytest.mark.slow)])
def test_default_step_under_plain_torch_compile_is_one_graph_and_exact_on_every_call(model_cls):
    model = make(model_cls)
    params, loss = params_of(model), classification_loss(model)
    seen_option = {}

    def loss_fn(p, b):
        seen_option["traced"] = torch._dynamo.config.trace_autograd_ops  # read while dynamo traces
        return loss(p, b)

    step = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=0.0, expected_batch_size=B)  # auto, verify="first"
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter)
    frames = []
    for seed in range(3):  # three batches of one shape
        batch = data_for(model, B, seed=seed + 1)
        out = compiled(params, batch, fundp.random.key(seed))
        check_exact(out, *clipped_reference(micro_batch_grads(model, loss, params, batch), C, B))
        frames.append(counter.frame_count)
    assert frames[1] == frames[2], f"the third call recompiled: {frames}"
    # The verified signature traces to one graph without a break.
    explanation = torch._dynamo.explain(step)(params, data_for(model, B, seed=9), fundp.random.key(9))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    assert seen_option == {"traced": False}, "a dynamo option was switched on around the step"
    assert torch._dynamo.config.trace_autograd_ops is False


def _two_layer_problem():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, generator=g, dtype=torch.float64),
              "v": torch.randn(2, 3, generator=g, dtype=torch.float64)}

    def batch(seed):
        gg = torch.Generator().manual_seed(seed + 10)
        return {"x": torch.randn(B, 4, generator=gg, dtype=torch.float64), "y": torch.randint(0, 2, (B,), generator=gg),
                "m": torch.randint(0, 2, (B,), generator=gg)}

    return params, batch


def _reference(loss_fn, params, batch):
    rows = []
    for i in range(B):
        leaf = {k: v.clone().requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(loss_fn(leaf, {k: v[i:i + 1] for k, v in batch.items()}).sum(), list(leaf.values()))
        rows.append(dict(zip(leaf, grads)))
    return clipped_reference({k: torch.stack([r[k] for r in rows]) for k in params}, C, B)


@pytest.mark.slow
@pytest.mark.parametrize("graph_break", ["print", "item", "branch"])
def test_graph_break_in_loss_fn_under_plain_compile_is_exact_on_every_call(graph_break, capsys):
    params, batch = _two_layer_problem()

    loss_fn = graph_break_loss(graph_break)

    step = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=0.0, expected_batch_size=B)
    compiled = torch.compile(step, backend="aot_eager")
    for seed in range(3):
        check_exact(compiled(params, batch(seed), fundp.random.key(seed)), *_reference(loss_fn, params, batch(seed)))


@pytest.mark.parametrize("grad_method", ["auto", "ghost"])
def test_transpose_property_under_plain_compile_is_exact(grad_method):
    # Dynamo does not show `w.T` to the tracer: the use must still be attributed (or refused).
    params, batch = _two_layer_problem()

    def loss_fn(p, b):
        return F.cross_entropy(torch.tanh(b["x"] @ p["w"].T) @ p["v"].T, b["y"], reduction="none")

    step = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=0.0, expected_batch_size=B, grad_method=grad_method,
                         verify=False)  # the compiled trace alone decides
    compiled = torch.compile(step, backend="aot_eager")
    for seed in range(3):
        check_exact(compiled(params, batch(seed), fundp.random.key(seed)), *_reference(loss_fn, params, batch(seed)))


@pytest.mark.slow
def test_an_op_without_rule_under_plain_compile_is_exact_on_vmap_or_refused():
    params, batch = _two_layer_problem()

    def loss_fn(p, b):
        h = torch.tanh(F.linear(b["x"], p["w"])) + torch.ops.aten.mm(b["x"], p["w"].t().contiguous()) * 0.5
        return F.cross_entropy(F.linear(h, p["v"]), b["y"], reduction="none")

    auto = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=0.0, expected_batch_size=B, verify=False)
    compiled = torch.compile(auto, backend="aot_eager")
    for seed in range(2):
        check_exact(compiled(params, batch(seed), fundp.random.key(seed)), *_reference(loss_fn, params, batch(seed)))
    ghost = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=0.0, expected_batch_size=B, grad_method="ghost",
                          verify=False)
    with pytest.raises(GhostUnsupportedError, match=r"cannot handle params\['w'\]"):
        torch.compile(ghost, backend="aot_eager")(params, batch(0), fundp.random.key(0))


def _scripted_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


@pytest.mark.parametrize("grad_method", ["auto", "ghost"])
def test_the_compiled_path_finds_a_use_the_tracer_never_saw(grad_method, monkeypatch):
    # The compiled path's own guarantee, run eagerly (is_compiling forced, so the eager graph walk is
    # off): a TorchScript function shows its ops to no TorchFunctionMode, so the tracer never sees
    # this use of `w`; the losses still require grad through it (structurally), so "auto" puts every
    # parameter on vmap (exact) and "ghost" refuses.  Zeros from torch.func could not tell.
    from fundp.engines.ghost import _engine, make_ghost_engine

    monkeypatch.setattr(_engine, "is_compiling", lambda: True)
    params, batch = _two_layer_problem()

    scripted = torch.jit.script(_scripted_product)

    def hidden(p, b):
        h = torch.tanh(F.linear(b["x"], p["w"])) + scripted(b["x"], p["w"])
        return F.cross_entropy(F.linear(h, p["v"]), b["y"], reduction="none")

    engine = make_ghost_engine(hidden, fallback=grad_method == "auto", verify=False)
    if grad_method == "ghost":
        with pytest.raises(GhostUnsupportedError, match="cannot see"):
            engine(params, batch(0), None)
        return
    out = engine(params, batch(0), None)
    expected, norms = _reference(hidden, params, batch(0))
    total = torch.sqrt(sum(s.scale.square() * s.scaled if hasattr(s, "scaled") else s for s in out.sq_norms.values()))
    torch.testing.assert_close(total, norms, rtol=1e-10, atol=0)


def test_fundp_compile_is_a_thin_wrapper_that_sets_no_option():
    model = make(MLP)
    params, loss = params_of(model), classification_loss(model)
    step = fundp.dp_step(loss, max_norm=C, noise_multiplier=0.0, expected_batch_size=B)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = fundp.compile(step, backend=counter, fullgraph=True)
    for seed in range(3):
        batch = data_for(model, B, seed=seed + 1)
        check_exact(compiled(params, batch, fundp.random.key(seed)),
                    *clipped_reference(micro_batch_grads(model, loss, params, batch), C, B))
    assert counter.frame_count == 1  # first call eager (verified), then one graph
    assert torch._dynamo.config.trace_autograd_ops is False


def test_without_first_call_verification_every_call_runs_one_graph():
    # verify="first" runs a signature's first call outside the graph (a break that dynamo keeps as a
    # split of the step into a few graphs around the engine's); with verify=False nothing breaks.
    model = make(MLP)
    params, loss = params_of(model), classification_loss(model)
    runs = [0]

    def backend(gm, inputs):
        def run(*args):
            runs[0] += 1
            return gm.forward(*args)

        return run

    step = fundp.dp_step(loss, max_norm=C, noise_multiplier=0.0, expected_batch_size=B, verify=False)
    compiled = torch.compile(step, backend=backend)
    for seed in range(3):
        runs[0] = 0
        batch = data_for(model, B, seed=seed + 1)
        check_exact(compiled(params, batch, fundp.random.key(seed)),
                    *clipped_reference(micro_batch_grads(model, loss, params, batch), C, B))
        assert runs[0] == 1, f"call {seed} ran {runs[0]} graphs"
