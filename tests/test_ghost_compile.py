"""The ghost engine under ``torch.compile`` / ``fundp.compile``: one graph, equal to eager, verification
once per shape.

Moved from tests/test_ghost.py / tests/test_ghost_exactness.py (one file per rule family).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn.functional as F

import fundp
from fundp.testing import reference_step

from ghost_helpers import B, D, T, V, assert_close_global, batch_for, tokens
from models import MLP, TinyAttention, classification_loss, make, params_of


# (moved from tests/test_ghost.py)
def test_compiled_ghost_step_is_one_graph_equals_eager_and_does_not_recompile():
    model = make(TinyAttention)
    params, loss = params_of(model), classification_loss(model)
    step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=1.0, expected_batch_size=6, grad_method="ghost")
    reference = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=1.0, expected_batch_size=6, grad_method="ghost",
                              check_key_reuse=False)  # the eager step on the compiled step's keys
    key = fundp.random.key(3)
    step(params, batch_for(model, 6), key)  # the first call of a shape verifies (eagerly)
    with fundp.compile_options():  # the key guard is in the graph too
        explanation = torch._dynamo.explain(step)(params, batch_for(model, 6), fundp.random.fold_in(key, 100))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()  # dynamo's real tracing and guards, eager kernels
    compiled = fundp.compile(step, backend=counter)
    for seed in range(3):  # new batch tensors and keys each step: no recompile
        batch = batch_for(model, 6, seed=seed)
        eager, fast = reference(params, batch, fundp.random.fold_in(key, seed)), compiled(params, batch, fundp.random.fold_in(key, seed))
        assert_close_global(fast.grads, eager.grads, 1e-10)
    assert counter.frame_count == 1
    torch._dynamo.reset()


# (moved from tests/test_ghost.py)
def test_compiled_verification_runs_once_per_shape_and_then_one_graph():
    model = make(TinyAttention)
    params, loss = params_of(model), classification_loss(model)
    step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=1.0, expected_batch_size=6, grad_method="ghost")
    eager_step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=1.0, expected_batch_size=6, grad_method="ghost",
                               check_key_reuse=False)  # the reference, on the compiled step's keys
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = fundp.compile(step, backend=counter)
    frames = []
    for seed in range(4):
        batch = batch_for(model, 6, seed=seed)
        key = fundp.random.key(seed)
        assert_close_global(compiled(params, batch, key).grads, eager_step(params, batch, key).grads, 1e-10)
        frames.append(counter.frame_count)
    # First call: the verification breaks the graph once; second: one recompile without it; then none.
    assert frames[1] == frames[2] == frames[3], frames
    torch._dynamo.reset()
    assert torch._dynamo.config.trace_autograd_ops is False


# (moved from tests/test_ghost.py)
@pytest.mark.parametrize("wrap", ["torch.compile", "fundp.compile"])
def test_aot_compiled_ghost_step_equals_eager_with_or_without_the_scoped_option(wrap):
    # Plain torch.compile leaves dynamo's trace_autograd_ops off: the engine must then run outside
    # the graph (AOT graphs would hide the probes from autograd and give zero norms).
    model = make(MLP)
    params, loss = params_of(model), classification_loss(model)
    kw = dict(max_norm=0.05, noise_multiplier=0.0, expected_batch_size=6, grad_method="ghost", verify=False)
    step, reference = fundp.dp_step(loss, **kw), fundp.dp_step(loss, check_key_reuse=False, **kw)  # reference: same keys
    torch._dynamo.reset()
    compiled = (torch.compile if wrap == "torch.compile" else fundp.compile)(step, backend="aot_eager")
    for seed in range(2):
        batch = batch_for(model, 6, seed=seed)
        assert_close_global(compiled(params, batch, fundp.random.key(seed)).grads,
                            reference(params, batch, fundp.random.key(seed)).grads, 1e-10)
    torch._dynamo.reset()


# (moved from tests/test_ghost.py)
def test_fundp_compile_fullgraph_with_the_default_engine_and_verification():
    model = make(TinyAttention)
    params, loss = params_of(model), classification_loss(model)
    step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=1.0, expected_batch_size=6)  # auto, verify="first"
    reference = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=1.0, expected_batch_size=6, check_key_reuse=False)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = fundp.compile(step, backend=counter, fullgraph=True)  # with the key guard in the graph
    for seed in range(3):
        batch, key = batch_for(model, 6, seed=seed), fundp.random.key(seed)
        assert_close_global(compiled(params, batch, key).grads, reference(params, batch, key).grads, 1e-10)
    assert counter.frame_count == 1  # the first call ran eagerly (and verified), then one graph
    torch._dynamo.reset()


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
def test_compiled_tied_head_through_the_T_property_is_exact_and_keeps_huge_examples():
    # Under torch.compile dynamo does not show Tensor properties such as `.T` to the tracer: the
    # use `h @ emb.T` was once missed there, silently leaving the head's share out of emb's norm.
    # One graph (fullgraph) must equal the float64 eager step, for an ordinary batch and for one
    # whose example 2 is scaled by 1e25 (its squared norm overflows float32: clipped, not dropped).
    g = torch.Generator().manual_seed(14)
    params = {"emb": torch.randn(V, D, generator=g), "w": torch.randn(D, D, generator=g)}

    def loss_fn(p, b):
        h = F.linear(F.embedding(b["ids"], p["emb"]) * b["scale"][:, None, None], p["w"])
        return (h @ p["emb"].T).mean(dim=(1, 2))

    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B, grad_method="ghost",
                         verify=False)
    compiled = fundp.compile(step, backend="aot_eager", fullgraph=True)
    params64 = {k: v.double() for k, v in params.items()}
    for huge in (1.0, 1e25):
        scale = torch.ones(B)
        scale[2] = huge
        batch = {**tokens(), "scale": scale}
        out = compiled(params, batch, fundp.random.key(0))
        expected = step(params64, {**batch, "scale": scale.double()}, fundp.random.key(0))
        assert int(out.num_nonfinite) == 0
        torch.testing.assert_close(out.norms.double(), expected.norms, rtol=1e-5, atol=0)
        for name in params:
            torch.testing.assert_close(out.grads[name].double(), expected.grads[name], rtol=1e-4, atol=1e-6)


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
def test_compiled_ghost_follows_rows_through_the_T_property_of_batch_tensors():
    # Dynamo does not show `x.T` / `x.mT` to the tracer: such views of batch data get their layout
    # from their base (a reversal or a swap of the last two dims), so the step stays on the ghost
    # path in one graph and equals the float64 eager step.
    g = torch.Generator().manual_seed(15)
    params = {"w": torch.randn(D, D, generator=g), "v": torch.randn(3, D, generator=g)}

    def loss_fn(p, b):
        h = torch.tanh(F.linear(b["x"].T.T, p["w"]))  # [B, T, D]: .T reverses, twice is the identity
        h = h.mT.mT  # a swap of the last two dims, twice
        return (h @ p["v"].T).square().mean(dim=(1, 2))

    batch = {"x": torch.randn(B, T, D, generator=g)}
    step = fundp.dp_step(loss_fn, max_norm=0.5, noise_multiplier=0.0, expected_batch_size=B, grad_method="ghost",
                         verify=False)
    out = fundp.compile(step, backend="aot_eager", fullgraph=True)
    out(params, batch, fundp.random.key(0))  # the first call of a signature runs eagerly
    compiled = out(params, batch, fundp.random.key(0))
    ref = reference_step(loss_fn, params, batch, max_norm=0.5, expected_batch_size=B)  # micro-batched, float64
    for name in params:
        torch.testing.assert_close(compiled.grads[name].double(), ref.grads[name], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled.norms.double(), ref.norms, rtol=1e-5, atol=0)
