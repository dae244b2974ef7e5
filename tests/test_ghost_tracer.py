"""The tracer (fundp/engines/ghost/_tracer.py): randomness, interaction checks (batch norm statistics,
writes into buffers) and rows it cannot follow.

Moved from tests/test_ghost.py / tests/test_ghost_exactness.py (one file per rule family).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import ExamplesInteractError, GhostUnsupportedError, make_ghost_engine
from fundp.testing import reference_step

from ghost_helpers import B, D, features


# (moved from tests/test_ghost.py)
def test_dropout_needs_a_key_driven_randomness_and_is_deterministic_in_the_key():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, b):
        return F.cross_entropy(torch.func.functional_call(model, p, (b["x"],)), b["y"], reduction="none")

    batch = {"x": torch.randn(6, 4, dtype=torch.float64), "y": torch.arange(6) % 3}
    with pytest.raises(RuntimeError, match="randomness='different'"):
        make_ghost_engine(loss)(params, batch)
    step = fundp.dp_step(loss, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=6, grad_method="ghost",
                         randomness="different", check_key_reuse=False)  # one key twice: compared
    state = torch.get_rng_state()
    first, again = step(params, batch, fundp.random.key(1)), step(params, batch, fundp.random.key(1))
    other = step(params, batch, fundp.random.key(2))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must be left untouched"
    assert all(torch.equal(first.grads[k], again.grads[k]) for k in params)
    assert not all(torch.equal(first.grads[k], other.grads[k]) for k in params)
    with pytest.raises(ValueError, match="randomness='same'"):
        make_ghost_engine(loss, randomness="same")


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
def test_batch_norm_in_training_mode_through_torch_func_functional_call_is_refused():
    model = nn.Sequential(nn.Linear(D, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().train()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p, b):
        return F.cross_entropy(torch.func.functional_call(model, p, (b["x"],)), b["y"], reduction="none")

    for grad_method in ("auto", "ghost"):
        step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B, grad_method=grad_method)
        with pytest.raises(ExamplesInteractError, match="batch_norm.*BatchNorm1d"):
            step(params, features(), fundp.random.key(0))


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
def test_writing_batch_data_into_a_buffer_is_refused():
    g = torch.Generator().manual_seed(15)
    params = {"w": torch.randn(3, D, generator=g)}
    running = torch.zeros(D)

    def loss_fn(p, b):
        running.copy_(b["x"][0])  # one example's data written into state every example then reads
        return F.cross_entropy(F.linear(b["x"] + running, p["w"]), b["y"], reduction="none")

    with pytest.raises(ExamplesInteractError, match="buffer"):
        fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B)(params, features(), fundp.random.key(0))


def _interacting_losses(kind):
    """Losses in which every example reads rows of others through ops the tracer cannot follow."""
    def loss_fn(p, b):
        x = b["x"]
        if kind == "slice":  # every loss reads example 0 through a slice of the batch
            return F.linear(x, p["w"]).sum((1, 2)) * x[:1].square().sum()
        if kind == "unseen_view":  # .mT (unseen under compile) of a 4-D view, then a mean over the batch
            return F.linear(x, p["w"]).sum((1, 2)) * x.unsqueeze(1).mT.mean(0).sum()
        return F.linear(x, p["w"]).sum(-1) @ x.mT.mean(0).sum(0)  # "dataset_view": the batch is a slice
    return loss_fn


def _interaction_problem(kind):
    g = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(2, D, generator=g, dtype=torch.float64)}
    data = torch.randn(3 * B, 3, D, generator=g, dtype=torch.float64)
    return params, {"x": data[B:2 * B] if kind == "dataset_view" else data[:B].clone()}


# (moved from tests/test_ghost_exactness.py)
@pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py
@pytest.mark.parametrize("kind", ["slice", "unseen_view", "dataset_view"])
def test_losses_on_rows_the_tracer_cannot_follow_are_refused_or_computed_by_vmap(kind):
    # Found by review: such losses used to get ghost norms (eagerly for a slice of the batch; under
    # torch.compile for views it does not see) that matched nothing. Now "ghost" raises and "auto"
    # is the micro-batched result, eager and compiled; a compiled step whose eager first call
    # raised does not run the next call of that signature unchecked.
    params, batch = _interaction_problem(kind)
    loss_fn = _interacting_losses(kind)
    ref = reference_step(loss_fn, params, batch, max_norm=0.1, expected_batch_size=B)
    ghost = fundp.dp_step(loss_fn, max_norm=0.1, noise_multiplier=0.0, expected_batch_size=B, grad_method="ghost",
                          verify=False)
    auto = fundp.dp_step(loss_fn, max_norm=0.1, noise_multiplier=0.0, expected_batch_size=B, grad_method="auto",
                         verify=False)
    with pytest.raises((GhostUnsupportedError, ExamplesInteractError)):
        ghost(params, batch, fundp.random.key(0))
    compiled_ghost = fundp.compile(ghost, backend="aot_eager")
    for _ in range(2):
        with pytest.raises(Exception):  # the same signature again: checked again, not run unchecked
            compiled_ghost(params, batch, fundp.random.key(0))
    try:
        eager = auto(params, batch, fundp.random.key(0))
    except ExamplesInteractError:  # eagerly the tracer may see the mean over the batch itself
        eager = None
    try:
        with fundp.compile_options():  # traced directly (no eager first call): the compiled trace decides
            compiled = torch.compile(auto, backend="aot_eager")(params, batch, fundp.random.key(0))
    except ExamplesInteractError:
        # Inside torch.func.vjp a view of a batch tensor (`x.mT`, unseen) has that tensor as its base,
        # so the compiled trace follows its rows as eagerly and sees the same mean over the batch.
        assert eager is None, "the compiled step refused what the eager step computed"
        compiled = None
    for out in [o for o in (eager, compiled) if o is not None]:
        torch.testing.assert_close(out.norms, ref.norms, rtol=1e-9, atol=0)
        torch.testing.assert_close(out.grads["w"], ref.grads["w"], rtol=1e-9, atol=1e-12)
