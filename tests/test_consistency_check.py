"""The ghost engine's per-call batch-consistency check (issue 26 item 4).

A coupling the tracer cannot see (here inside ``torch.jit.script``, whose ops never reach a
``TorchFunctionMode``) and that is inactive on the first batch passes the first-call verification;
the per-call check must catch it on the later call where it acts, while exact models never trip it
(float32 and float64, eager and compiled).  Without the check the later call is silently wrong:
that is what makes these tests able to fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import BatchConsistencyError, ExamplesInteractError
from fundp.engines.ghost import _consistency, _engine
from tests import models as M

B = 8


@torch.jit.script
def _hidden_center(h: torch.Tensor) -> torch.Tensor:
    # A batch mean subtracted out of the tracer's sight, only once some activation exceeds 10.
    active = (h.abs().amax() > 10.0).to(h.dtype)
    return h - active * h.mean(0, keepdim=True)


@torch.jit.script
def _hidden_rank(h: torch.Tensor) -> torch.Tensor:
    # Each row scaled by its rank in the batch (a sort over the batch), again only once active.
    active = (h.abs().amax() > 10.0).to(h.dtype)
    ranks = h[:, 0].argsort().argsort().to(h.dtype)
    return h * (1.0 + active * ranks[:, None])


def coupled_loss(hidden):
    def loss_fn(p, b):
        return F.linear(hidden(F.linear(b, p["w"])), p["v"]).pow(2).sum(1)

    return loss_fn


def coupled_params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g, dtype=dtype), "v": torch.randn(2, 4, generator=g, dtype=dtype)}


def coupled_batches(dtype=torch.float64):
    """A quiet first batch (the coupling stays off, verification passes), then one with a large row."""
    g = torch.Generator().manual_seed(1)
    quiet = 0.1 * torch.randn(B, 3, generator=g, dtype=dtype)
    loud = torch.randn(B, 3, generator=g, dtype=dtype)
    loud[2] *= 100.0
    return quiet, loud


def micro_batch_norms(loss_fn, params, batch):
    """Independent reference: each example alone, one autograd backward each."""
    norms = []
    for i in range(batch.shape[0]):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(loss_fn(leaves, batch[i:i + 1]).sum(), list(leaves.values()))
        norms.append(torch.sqrt(sum(g.double().square().sum() for g in grads)))
    return torch.stack(norms)


def make_step(loss_fn, **kwargs):
    return fundp.dp_step(loss_fn, max_norm=1e9, noise_multiplier=0.0, expected_batch_size=B, **kwargs)


@pytest.mark.parametrize("hidden", [_hidden_center, _hidden_rank], ids=["batch_mean", "batch_rank"])
def test_a_hidden_coupling_inactive_at_first_is_caught_on_a_later_call(hidden):
    loss_fn, params = coupled_loss(hidden), coupled_params()
    quiet, loud = coupled_batches()
    step = make_step(loss_fn)
    out = step(params, quiet, fundp.random.key(0))  # verified, and exact: the coupling is off
    torch.testing.assert_close(out.norms, micro_batch_norms(loss_fn, params, quiet), rtol=1e-9, atol=0)
    with pytest.raises(BatchConsistencyError, match=r"grad_method='vmap'") as caught:
        step(params, loud, fundp.random.key(1))
    assert isinstance(caught.value, ExamplesInteractError)
    assert "in the batch of 8 but" in str(caught.value)


@pytest.mark.parametrize("hidden", [_hidden_center, _hidden_rank], ids=["batch_mean", "batch_rank"])
def test_without_the_check_the_later_call_is_silently_wrong(hidden):
    # The risk the option leaves when turned off (documented): no error, wrong norms.
    loss_fn, params = coupled_loss(hidden), coupled_params()
    quiet, loud = coupled_batches()
    step = make_step(loss_fn, check_batch_consistency=False)
    step(params, quiet, fundp.random.key(0))
    out = step(params, loud, fundp.random.key(1))
    reference = micro_batch_norms(loss_fn, params, loud)
    assert float((out.norms - reference).abs().max()) > 1e-3 * float(reference.abs().max())


def test_vmap_is_exact_on_the_coupled_model_as_the_error_advises():
    loss_fn, params = coupled_loss(_hidden_center), coupled_params()
    _, loud = coupled_batches()
    out = make_step(loss_fn, grad_method="vmap")(params, loud, fundp.random.key(1))
    torch.testing.assert_close(out.norms, micro_batch_norms(loss_fn, params, loud), rtol=1e-9, atol=1e-12)


def spy_on_the_check(monkeypatch):
    calls = []
    original = _engine._check_consistency
    monkeypatch.setattr(_engine, "_check_consistency", lambda *a, **k: calls.append(a[4].shape[0]) or original(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("model_cls", [M.MLP, M.SmallCNN, M.TinyAttention])
def test_exact_models_never_trip_the_check(monkeypatch, model_cls, dtype):
    calls = spy_on_the_check(monkeypatch)
    model = M.make(model_cls, dtype=dtype)
    params, loss_fn = M.params_of(model), M.classification_loss(model)
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=16)
    for call in range(4):
        batch = M.data_for(model, 16 + call % 2, seed=call, dtype=dtype)  # two signatures, two calls each
        out = step(params, batch, fundp.random.key(call))
        assert bool(torch.isfinite(out.norms).all())
    assert calls == [16, 17, 16, 17]  # ran on every call, verified or not


def test_a_nan_row_alone_is_consistent_and_a_nan_spread_by_the_batch_is_not():
    full = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    rows = torch.tensor([3, 1])
    assert not _consistency.inconsistent_rows(full, rows, torch.tensor([float("inf"), float("nan")]), 1e-3).any()
    assert _consistency.inconsistent_rows(full, torch.tensor([1]), torch.tensor([2.0]), 1e-3).all()
    assert _consistency.inconsistent_rows(torch.tensor([1.0, 2.0]), torch.tensor([0]), torch.tensor([float("nan")]), 1e-3).all()


def test_a_padded_row_with_nan_inputs_does_not_trip_the_check():
    model = M.make(M.MLP)
    params, loss_fn = M.params_of(model), M.classification_loss(model)
    batch = M.data_for(model, B)
    batch["x"][3] = float("nan")
    mask = torch.ones(B, dtype=torch.bool)
    mask[3] = False
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B)
    for call in range(3):
        out = step(params, batch, fundp.random.key(call), mask=mask)
        assert bool(torch.isfinite(out.grads["net.0.weight"]).all())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.float64, 1e-7)])
def test_tolerance_passes_rounding_and_catches_a_coupling_above_it(dtype, tol):
    g = torch.Generator().manual_seed(3)
    full = torch.randn(64, generator=g, dtype=torch.float64).abs().to(dtype)
    rows = torch.arange(0, 64, 2)
    eps = torch.finfo(dtype).eps
    rounded = full[rows] * (1 + 64 * eps)  # 64 units of round-off: far more than the 1 ulp measured
    assert not _consistency.inconsistent_rows(full, rows, rounded, tol).any()
    scale = full.double().abs().mean()
    batch = full[rows].double()
    shifted = (batch + 5 * tol * (batch.abs() + scale)).to(dtype)  # a coupling just above the tolerance
    assert _consistency.inconsistent_rows(full, rows, shifted, tol).all()


def test_the_rows_are_a_random_quarter_in_random_order_drawn_from_the_key():
    assert [_consistency.consistency_rows(fundp.random.key(0), n, torch.device("cpu")).numel()
            for n in (2, 3, 4, 5, 8, 9, 64)] == [1, 1, 1, 2, 2, 3, 16]  # ceil(B / 4)
    draws = [_consistency.consistency_rows(fundp.random.key(k), 10, torch.device("cpu")) for k in range(20)]
    for rows in draws:
        assert rows.shape == (3,) and rows.unique().numel() == 3 and int(rows.min()) >= 0 and int(rows.max()) < 10
    assert len({tuple(r.tolist()) for r in draws}) == 20  # a new subset and order each call
    assert any(not bool((r[1:] > r[:-1]).all()) for r in draws)  # not in batch order
    again = _consistency.consistency_rows(fundp.random.key(7), 10, torch.device("cpu"))
    assert torch.equal(again, draws[7])


def test_a_batch_of_one_and_models_with_unkeyed_random_ops_skip_the_check_but_dropout_runs_it(monkeypatch):
    loss_fn, params = coupled_loss(_hidden_center), coupled_params()
    _, loud = coupled_batches()
    make_step(loss_fn)(params, loud[2:3], fundp.random.key(0))  # one example: nothing can couple

    def dropout_loss(p, b):  # keyed per example: the subset draws each row's masks of the batch
        return F.dropout(F.linear(b, p["w"]), 0.5, training=True).pow(2).sum(1)

    def noise_loss(p, b):  # torch.randn_like draws from torch's RNG: the subset would draw others
        h = F.linear(b, p["w"])
        return (h + torch.randn_like(h)).pow(2).sum(1)

    calls = spy_on_the_check(monkeypatch)
    for loss in (dropout_loss, noise_loss):
        step = fundp.dp_step(loss, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B, randomness="different")
        step({"w": params["w"]}, loud, fundp.random.key(0))
    assert calls == [B]  # dropout_loss only


def test_a_loss_fn_with_the_batch_size_written_into_it_gets_a_clear_error():
    def fixed_size(p, b):  # works for B rows and for one (verification), not for B // 4
        return F.linear(b, p["w"]).reshape(B if b.shape[0] == B else 1, -1).sum(1)

    with pytest.raises((RuntimeError, ValueError), match="any size.*check_batch_consistency=False"):
        make_step(fixed_size)(coupled_params(), coupled_batches()[0], fundp.random.key(0))


def test_the_option_is_checked():
    with pytest.raises(TypeError, match="check_batch_consistency must be a bool"):
        make_step(coupled_loss(_hidden_center), check_batch_consistency="yes")


@pytest.mark.slow
def test_in_a_graph_the_check_raises_without_a_graph_break():
    # The reporting used inside torch.compile: tensor-only, one graph (fullgraph=True).
    def coupled(p, b):
        return (b - b.mean(0, keepdim=True)).pow(2).sum(1) * p

    def run(losses_of, b, key):
        losses = losses_of(torch.ones(()), b)
        _consistency.check_batch_consistency(losses_of, torch.ones(()), b, key, losses, False, 1e-7)
        return losses

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    independent = lambda p, b: b.pow(2).sum(1) * p  # noqa: E731
    x = torch.randn(6, 3, dtype=torch.float64)
    compiled(independent, x, fundp.random.key(0))
    with pytest.raises(RuntimeError, match="BatchConsistencyError"):
        compiled(coupled, x, fundp.random.key(0))


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["torch.compile", "fundp.compile"])
def test_compiled_steps_keep_the_check(wrap):
    compile_fn = torch.compile if wrap == "torch.compile" else fundp.compile
    # Exact model, float32: several calls, no false alarm.
    model = M.make(M.MLP, dtype=torch.float32)
    params, loss_fn = M.params_of(model), M.classification_loss(model)
    step = compile_fn(fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=16),
                      backend="aot_eager")
    for call in range(2):
        out = step(params, M.data_for(model, 16, seed=call, dtype=torch.float32), fundp.random.key(call))
        assert bool(torch.isfinite(out.norms).all())
    # The hidden coupling: caught on the later call (eagerly outside the graph, or in it).
    coupled, cparams = coupled_loss(_hidden_center), coupled_params()
    quiet, loud = coupled_batches()
    step = compile_fn(make_step(coupled), backend="aot_eager")
    step(cparams, quiet, fundp.random.key(0))
    with pytest.raises((BatchConsistencyError, RuntimeError), match="BatchConsistencyError|in the batch of"):
        step(cparams, loud, fundp.random.key(1))
