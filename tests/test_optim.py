"""Functional optimizers against torch.optim on the same gradient sequence."""

import optree
import pytest
import torch

import fundp
from fundp.testing import assert_trees_close


def _gradient_sequence(steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(4, generator=g, dtype=torch.float64)} for _ in range(steps)]


CASES = [
    (lambda: fundp.optim.sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (lambda: fundp.optim.sgd(0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (lambda: fundp.optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (lambda: fundp.optim.adam(0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
    (lambda: fundp.optim.adam(0.01, weight_decay=0.1), lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1)),
    (lambda: fundp.optim.adamw(0.01, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
]


@pytest.mark.parametrize("make_fundp, make_torch", CASES)
def test_matches_torch_optim(make_fundp, make_torch, variant):
    init = {"a": torch.ones(3, 2, dtype=torch.float64), "b": torch.linspace(-1, 1, 4, dtype=torch.float64)}
    torch_params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    reference = make_torch(list(torch_params.values()))
    opt = make_fundp()
    update = variant(opt.update)
    params, state = dict(init), opt.init(init)
    for grads in _gradient_sequence():
        updates, state = update(grads, state, params)
        params = fundp.optim.apply_updates(params, updates)
        fundp.optim.set_grads(list(torch_params.values()), [grads["a"], grads["b"]])
        reference.step()
    for k in init:
        torch.testing.assert_close(params[k], torch_params[k].detach(), rtol=1e-12, atol=1e-14)


def test_update_is_pure_and_compiles_without_recompiles():
    import torch._dynamo.testing

    torch._dynamo.reset()
    opt = fundp.optim.adam(0.01)
    params = {"w": torch.ones(3)}
    state = opt.init(params)

    def train_step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return fundp.optim.apply_updates(params, updates), state

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(train_step, backend=counter)
    for grads in _gradient_sequence(4):
        old_params = optree.tree_map(torch.clone, params)
        old_state = optree.tree_map(torch.clone, state)
        new_params, new_state = compiled(params, state, {"w": grads["b"][:3].float()})
        # pure: the inputs are untouched, bit for bit (no in-place update of params or state) ...
        assert_trees_close(params, old_params, rtol=0, atol=0, msg="params mutated in place")
        assert_trees_close(state, old_state, rtol=0, atol=0, msg="optimizer state mutated in place")
        # ... and the step did move both (so the check above compares different values)
        assert not torch.equal(new_state.mu["w"], state.mu["w"]) and not torch.equal(new_params["w"], params["w"])
        params, state = new_params, new_state
    assert int(state.count) == 4 and counter.frame_count == 1


def test_set_grads_on_a_module_and_errors():
    model = torch.nn.Linear(2, 1)
    grads = {name: torch.full_like(p, 2.0) for name, p in model.named_parameters()}
    fundp.optim.set_grads(model, grads)
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in model.parameters())
    with pytest.raises(KeyError, match="wieght"):
        fundp.optim.set_grads(model, {"wieght": torch.ones(1, 2)})
    with pytest.raises(ValueError, match="lr"):
        fundp.optim.sgd(-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        fundp.optim.sgd(0.1, nesterov=True)


def test_apply_updates_does_not_chain_autograd_history_over_steps():
    # dict(model.named_parameters()) keeps requires_grad: the update must not link step t to t - 1.
    params = {"w": torch.nn.Parameter(torch.ones(3))}
    for _ in range(200):
        params = fundp.optim.apply_updates(params, {"w": torch.full((3,), 0.01)})
    assert params["w"].grad_fn is None and not params["w"].requires_grad
    torch.testing.assert_close(params["w"], torch.full((3,), 3.0))
