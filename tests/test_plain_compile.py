"""Plain ``torch.compile(step)`` (issue 26 item 6): the default step compiles to one graph, with no
dynamo option set, and every call equals micro-batched per-example clipping.

The ghost engine differentiates by ``torch.func.vjp`` under ``torch.compile``; a signature's first
call is verified inside the graph (the op ``fundp::ghost_verify`` runs the verified eager engine),
so every call runs one graph.  References are
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


def graph_runs_backend():
    """``(backend, runs, compiled)``: ``aot_eager`` (AOTAutograd traces the functorch transforms as
    inductor would; only the code generation is skipped) counting the graphs it compiled and the
    graph calls made since ``runs[0]`` was last set."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    runs, compiled = [0], [0]

    def backend(gm, inputs):
        compiled[0] += 1
        fn = aot_eager(gm, inputs)

        def run(*args):
            runs[0] += 1
            return fn(*args)

        return run

    return backend, runs, compiled


@pytest.mark.parametrize("model_cls", [MLP, pytest.param(SmallCNN, marks=pytest.mark.slow),
                                       pytest.param(TinyAttention, marks=pytest.mark.slow)])
def test_default_step_under_plain_torch_compile_is_one_graph_and_exact_on_every_call(model_cls, monkeypatch):
    # verify="first" (the default): the first call's verification is an op of the graph, so the
    # first call already runs one graph, and no call recompiles (issue 26: was 3 graphs, then 4).
    from fundp.engines.ghost import _engine

    verified_calls = []
    real_verify = _engine.verify_engine
    monkeypatch.setattr(_engine, "verify_engine", lambda *a, **k: verified_calls.append(1) or real_verify(*a, **k))
    model = make(model_cls)
    params, loss = params_of(model), classification_loss(model)
    seen_option = {"traced": None}  # (the key exists before tracing: dynamo guards on the dict's keys)

    def loss_fn(p, b):
        seen_option["traced"] = torch._dynamo.config.trace_autograd_ops  # read while dynamo traces
        return loss(p, b)

    step = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=0.0, expected_batch_size=B)  # auto, verify="first"
    backend, runs, compiled_graphs = graph_runs_backend()
    compiled = torch.compile(step, backend=backend)
    for seed in range(3):  # three batches of one shape
        runs[0] = 0
        batch = data_for(model, B, seed=seed + 1)
        out = compiled(params, batch, fundp.random.key(seed))
        check_exact(out, *clipped_reference(micro_batch_grads(model, loss, params, batch), C, B))
        assert runs[0] == 1, f"call {seed} ran {runs[0]} graphs"
    assert compiled_graphs[0] == 1, f"{compiled_graphs[0]} graphs compiled"
    assert len(verified_calls) == 1, "the first call (only) is verified, inside the graph"
    assert seen_option == {"traced": False}, "a dynamo option was switched on around the step"
    assert torch._dynamo.config.trace_autograd_ops is False


def test_the_compiled_engine_traces_loss_fn_once():
    # One run of loss_fn inside torch.func.vjp makes the probes and takes their gradients: no run
    # beforehand learns their shapes (there was one, whose values the compiler dropped: loss_fn was
    # traced twice per compilation).  A list appended to while dynamo traces is appended to each time
    # the graph runs, once per traced run of loss_fn; the checks that rerun loss_fn are off here.
    model = make(MLP)
    params, loss = params_of(model), classification_loss(model)
    traced: list = []

    def loss_fn(p, b):
        if torch.compiler.is_compiling():
            traced.append(1)
        return loss(p, b)

    step = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=0.0, expected_batch_size=B, verify=False,
                         check_batch_consistency=False)
    batch = data_for(model, B, seed=1)
    out = torch.compile(step, backend="eager", fullgraph=True)(params, batch, fundp.random.key(0))
    assert len(traced) == 1, f"loss_fn traced {len(traced)} times"
    check_exact(out, *clipped_reference(micro_batch_grads(model, loss, params, batch), C, B))


def test_a_compiled_graph_that_disagrees_with_the_verified_engine_is_refused_on_every_call(monkeypatch):
    # The compiled engine's norms are checked against the verified eager engine's, row by row, by
    # the op in the graph; a failed check leaves the signature unverified (checked again next call).
    from fundp.engines.ghost import GhostVerificationError, _engine

    real = _engine.leaf_sq_norms

    def doubled_when_compiled(handlers):
        norms = real(handlers)
        return [type(s)(s.scale * 2, s.scaled) if torch.compiler.is_compiling() else s for s in norms]

    monkeypatch.setattr(_engine, "leaf_sq_norms", doubled_when_compiled)
    model = make(MLP)
    params, loss = params_of(model), classification_loss(model)
    step = fundp.dp_step(loss, max_norm=C, noise_multiplier=0.0, expected_batch_size=B)
    compiled = torch.compile(step, backend="aot_eager")
    for seed in range(2):
        with pytest.raises(GhostVerificationError, match="under torch.compile"):
            compiled(params, data_for(model, B, seed=seed + 1), fundp.random.key(seed))


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


def test_without_verification_every_call_runs_one_graph():
    model = make(MLP)
    params, loss = params_of(model), classification_loss(model)
    backend, runs, _ = graph_runs_backend()
    step = fundp.dp_step(loss, max_norm=C, noise_multiplier=0.0, expected_batch_size=B, verify=False)
    compiled = torch.compile(step, backend=backend)
    for seed in range(2):
        runs[0] = 0
        batch = data_for(model, B, seed=seed + 1)
        check_exact(compiled(params, batch, fundp.random.key(seed)),
                    *clipped_reference(micro_batch_grads(model, loss, params, batch), C, B))
        assert runs[0] == 1, f"call {seed} ran {runs[0]} graphs"
