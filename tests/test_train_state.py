"""TrainState / train_step: 20 steps equal a correct hand-written loop (same params, same ledger, the
epsilon of 20 recorded steps), keys are never reused, the input state is untouched, a checkpoint
round trip continues the same run, and misuse raises."""

import os

import pytest
import torch

import fundp
import fundp.data as data
from fundp.train_state import TrainState, train_step
from models import MLP, classification_loss, make, params_of

N, Q, SIGMA, STEPS = 120, 0.1, 1.1, 20


@pytest.fixture
def problem():
    model = make(MLP)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    step = fundp.dp_step(
        classification_loss(model), max_norm=1.0, noise_multiplier=SIGMA, expected_batch_size=Q * N, sample_rate=Q, grad_method="vmap"
    )
    batches = list(data.poisson_batches(N, Q, fundp.random.key(1), steps=STEPS, pad_to_multiple=8))
    return params_of(model), step, x, y, batches


def hand_written_loop(params, step, opt, x, y, batches, key):
    opt_state, ledger = opt.init(params), fundp.Ledger()
    for indices, mask in batches:
        key, step_key = fundp.random.split(key)
        out = step(params, {"x": x[indices], "y": y[indices]}, step_key, ledger=ledger, mask=mask)
        updates, opt_state = opt.update(out.grads, opt_state, params)
        params = fundp.optim.apply_updates(params, updates)
        ledger = out.ledger
    return params, opt_state, ledger, key


def test_twenty_steps_equal_the_hand_written_loop(problem):
    params, step, x, y, batches = problem
    opt = fundp.optim.sgd(fundp.optim.cosine_decay_schedule(0.5, STEPS), momentum=0.9)
    expected_params, expected_opt_state, expected_ledger, expected_key = hand_written_loop(params, step, opt, x, y, batches, fundp.random.key(7))

    fundp.guards.forget_keys()  # train_step replays the hand-written run: a new key scope, as in a new process
    state = TrainState.create(params, opt, fundp.random.key(7))
    losses = []
    for indices, mask in batches:
        state, out = train_step(step, opt, state, {"x": x[indices], "y": y[indices]}, mask=mask)
        losses.append(float(out.loss))
    assert state.step == STEPS and len(losses) == STEPS
    for k in params:
        assert torch.equal(state.params[k], expected_params[k]), k
        assert torch.equal(state.opt_state.momentum[k], expected_opt_state.momentum[k]), k
    assert torch.equal(state.key, expected_key)
    assert state.ledger == expected_ledger
    reference = fundp.accountant_step(fundp.Ledger(), noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS)
    assert state.ledger == reference
    assert fundp.epsilon(state.ledger, 1e-5) == fundp.epsilon(reference, 1e-5)
    assert fundp.epsilon(state.ledger, 1e-5) > 0


def test_keys_are_never_reused_and_the_input_state_is_untouched(problem):
    params, _, x, y, batches = problem
    seen = []

    def recording_step(params, batch, key, *, ledger, mask):
        seen.append(tuple(key.tolist()))
        grads = {k: torch.ones_like(v) for k, v in params.items()}
        return fundp.StepResult(grads, ledger, torch.tensor(0.0), torch.zeros(len(mask)), torch.tensor(0))

    opt = fundp.optim.sgd(0.1)
    state = first = TrainState.create(params, opt, fundp.random.key(3), ledger=None)
    snapshot = {k: v.clone() for k, v in params.items()}
    for indices, mask in batches[:10]:
        state, _ = train_step(recording_step, opt, state, {"x": x[indices], "y": y[indices]}, mask=mask)
        seen.append(tuple(state.key.tolist()))
    assert len(set(seen)) == len(seen) == 20  # every step key and every carried key distinct
    assert first.step == 0 and all(torch.equal(first.params[k], snapshot[k]) for k in params)
    assert state.ledger is None and state.step == 10


def test_checkpoint_round_trip_continues_the_same_run(problem, tmp_path):
    params, step, x, y, batches = problem
    opt = fundp.optim.adam(0.05)
    state = TrainState.create(params, opt, fundp.random.key(5))
    for i, (indices, mask) in enumerate(batches):
        if i == 10:
            path = os.path.join(tmp_path, "run.pt")
            fundp.checkpoint.save(path, **state._asdict())
            loaded = fundp.checkpoint.load(path, params_like=params, opt_state_like=opt.init(params))
            resumed = TrainState(*loaded[:5])
        state, _ = train_step(step, opt, state, {"x": x[indices], "y": y[indices]}, mask=mask)
    fundp.guards.forget_keys()  # a resume runs in a new process: its keys were never used there
    for indices, mask in batches[10:]:
        resumed, _ = train_step(step, opt, resumed, {"x": x[indices], "y": y[indices]}, mask=mask)
    assert resumed.step == state.step == STEPS and resumed.ledger == state.ledger
    assert all(torch.equal(resumed.params[k], state.params[k]) for k in params)


def test_misuse_raises(problem):
    params, step, x, y, batches = problem
    opt = fundp.optim.sgd(0.1)
    state = TrainState.create(params, opt, fundp.random.key(0))
    indices, mask = batches[0]
    batch = {"x": x[indices], "y": y[indices]}
    with pytest.raises(TypeError, match="state must be a fundp.TrainState"):
        train_step(step, opt, tuple(state), batch, mask=mask)
    with pytest.raises(TypeError, match="optimizer"):
        train_step(step, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), state, batch, mask=mask)
    with pytest.raises(TypeError, match="step_fn must return a StepResult"):
        train_step(lambda *a, **k: {"grads": None}, opt, state, batch, mask=mask)
    with pytest.raises(TypeError, match="key"):
        TrainState.create(params, opt, torch.tensor([1, 2], dtype=torch.int32))
