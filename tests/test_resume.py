"""A run killed half-way and resumed ends with the same params and epsilon as an uninterrupted one."""

import signal
import subprocess
import sys

import pytest
import torch

import fundp
import resume_worker

WORKER = resume_worker.__file__


def test_killed_and_resumed_run_is_identical(tmp_path):
    interrupted = tmp_path / "interrupted.pt"
    crashed = subprocess.run([sys.executable, WORKER, str(interrupted), "12", "--crash-at", "5"], timeout=300)
    assert crashed.returncode == -signal.SIGKILL
    params, opt = resume_worker.setup()[0], resume_worker.setup()[2]
    half = fundp.checkpoint.load(interrupted, params_like=params, opt_state_like=opt.init(params))
    assert half.step == 5 and half.ledger.steps == 5  # nothing re-spent, nothing forgotten yet
    subprocess.run([sys.executable, WORKER, str(interrupted), "12"], timeout=300, check=True)

    straight_params, straight_ledger = resume_worker.train(str(tmp_path / "straight.pt"), 12)
    resumed = fundp.checkpoint.load(interrupted, params_like=params, opt_state_like=opt.init(params))
    assert resumed.step == 12
    for name in straight_params:
        assert torch.equal(resumed.params[name], straight_params[name])
    assert resumed.ledger == straight_ledger
    assert fundp.epsilon(resumed.ledger, 1e-5) == fundp.epsilon(straight_ledger, 1e-5)


def test_checkpoint_is_weights_only_and_checks_templates(tmp_path):
    params = {"w": torch.ones(2)}
    opt = fundp.optim.sgd(0.1, momentum=0.9)
    path = tmp_path / "c.pt"
    fundp.checkpoint.save(path, params=params, opt_state=opt.init(params), ledger=None, key=fundp.random.key(3), step=2, extra={"epoch": 1})
    torch.load(path, weights_only=True)  # loads without unpickling code
    state = fundp.checkpoint.load(path, params_like=params, opt_state_like=opt.init(params))
    assert state.ledger is None and state.extra == {"epoch": 1} and torch.equal(state.key, fundp.random.key(3))
    with pytest.raises(ValueError, match="params: tensor 0"):
        fundp.checkpoint.load(path, params_like={"w": torch.ones(3)}, opt_state_like=opt.init(params))
    with pytest.raises(ValueError, match="step"):
        fundp.checkpoint.save(path, params=params, opt_state=(), ledger=None, key=fundp.random.key(0), step=-1)
