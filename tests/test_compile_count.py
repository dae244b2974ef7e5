"""A compiled step over Poisson batches compiles once per padded shape, and once in all with accumulation.

Compilations are counted with ``torch._dynamo.testing.CompileCounter`` (a backend that counts the
graphs dynamo hands it and runs them eagerly: dynamo's tracing and guards are the real ones, the
code generation is skipped to keep the test fast), after ``torch._dynamo.reset()``.  One test
uses inductor for real.
"""

import functools

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import fundp
import fundp.data as data
from models import MLP, classification_loss, make, params_of

N, Q, STEPS = 300, 0.1, 50


@pytest.fixture
def problem():
    torch._dynamo.reset()
    model = make(MLP, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)
    yield params_of(model), classification_loss(model), x, y
    torch._dynamo.reset()


def run(step, params, x, y, batches, train_key=fundp.random.key(1), ledger=None):
    outputs = []
    for t, (indices, mask) in enumerate(batches):
        out = step(params, {"x": x[indices], "y": y[indices]}, fundp.random.fold_in(train_key, t), ledger=ledger, mask=mask)
        ledger = out.ledger
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("grad_method", ["vmap", "ghost"])
@pytest.mark.parametrize("dynamic", [False, None])
def test_compiled_dp_step_compiles_once_per_padded_shape(problem, dynamic, grad_method):
    params, loss_fn, x, y = problem
    batches = data.poisson_batches(N, Q, fundp.random.key(0), steps=STEPS, pad_to_multiple=16)
    shapes = {indices.shape[0] for indices, _ in batches}
    assert 2 <= len(shapes) <= 4  # E[B] = 30, sd 5.2: sizes 16, 32, 48 (the bucketing at work)
    counter = torch._dynamo.testing.CompileCounter()
    # verify=False: the ghost engine's first-call verification (an eager pass per shape, tested in
    # test_ghost_compile.py) would add frames; fundp.compile traces its backward into the graph.
    eager = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=Q * N, grad_method=grad_method,
                          verify=False)
    compiled = fundp.compile(eager, backend=counter, dynamic=dynamic)
    outs = run(compiled, params, x, y, batches)
    assert counter.frame_count == len(shapes), f"{counter.frame_count} compilations for padded shapes {sorted(shapes)}"
    # The last step again, eagerly: the compiled step computes the same thing.
    last = batches[STEPS - 1]
    key = fundp.random.fold_in(fundp.random.key(1), STEPS - 1)
    reference = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=Q * N, grad_method=grad_method,
                              verify=False, check_key_reuse=False)  # the compiled step's key, again
    expected = reference(params, {"x": x[last[0]], "y": y[last[0]]}, key, mask=last[1])
    for k in params:
        torch.testing.assert_close(outs[-1].grads[k], expected.grads[k], rtol=1e-5, atol=1e-6)


def test_accumulated_step_compiles_exactly_once(problem):
    params, loss_fn, x, y = problem
    batches = data.poisson_batches(N, Q, fundp.random.key(0), steps=STEPS, pad_to_multiple=16)
    counter = torch._dynamo.testing.CompileCounter()
    step = data.accumulated_dp_step(
        loss_fn, physical_batch_size=16, max_norm=1.0, noise_multiplier=1.0, sampler=batches, grad_method="vmap",
        compile_chunk=functools.partial(torch.compile, backend=counter, dynamic=False),
    )  # fmt: skip
    run(step, params, x, y, batches)
    assert counter.frame_count == 1


def test_compiled_step_with_a_ledger_does_not_recompile_as_it_grows(problem):
    import fundp.accounting as accounting
    params, loss_fn, x, y = problem
    # pad_to_multiple 128 > every batch size here (B <= 30 + 9 sd): one padded shape.
    batches = data.poisson_batches(N, Q, fundp.random.key(0), steps=20, pad_to_multiple=128)
    counter = torch._dynamo.testing.CompileCounter()
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=Q * N, sample_rate=batches.sample_rate, grad_method="vmap")
    outs = run(torch.compile(step, backend=counter), params, x, y, batches, ledger=accounting.Ledger())
    assert counter.frame_count == 1
    assert accounting.epsilon(outs[-1].ledger, 1e-5) > 0


def test_inductor_accumulated_step_matches_eager_and_compiles_once(problem):
    params, loss_fn, x, y = problem
    batches = data.poisson_batches(N, Q, fundp.random.key(0), steps=6, pad_to_multiple=16)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = data.accumulated_dp_step(
        loss_fn, physical_batch_size=16, max_norm=1.0, noise_multiplier=1.0, sampler=batches, grad_method="vmap",
        compile_chunk=functools.partial(torch.compile, backend=counter, dynamic=False),
    )  # fmt: skip
    eager = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=Q * N, grad_method="vmap",
                          check_key_reuse=False)  # replays the compiled run's keys, to compare
    for fast, slow in zip(run(compiled, params, x, y, batches), run(eager, params, x, y, batches)):
        for k in params:
            torch.testing.assert_close(fast.grads[k], slow.grads[k], rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


def test_steps_built_with_different_float_settings_each_compile_to_one_graph(problem):
    # Dynamo traces a float it has seen with two values as a symbolic number: the step's checks of
    # max_norm / noise_multiplier must then still trace (no graph break under fullgraph=True).
    params, loss, x, y = problem
    batch = {"x": x[:8], "y": y[:8]}
    keys = iter(fundp.random.split(fundp.random.key(0), 12))  # a fresh key per step
    for grad_method in ("vmap", "ghost"):
        for max_norm, sigma in ((1.0, 1.1), (0.5, 0.7), (0.25, 0.9)):
            kw = dict(max_norm=max_norm, noise_multiplier=sigma, expected_batch_size=8.0, grad_method=grad_method)
            compiled = fundp.compile(fundp.dp_step(loss, **kw), backend="eager", fullgraph=True)
            compiled(params, batch, next(keys))  # eager first call (verification)
            key = next(keys)
            out = compiled(params, batch, key)
            expected = fundp.dp_step(loss, check_key_reuse=False, **kw)(params, batch, key)  # the same key, eagerly
            for name in params:
                torch.testing.assert_close(out.grads[name], expected.grads[name])
