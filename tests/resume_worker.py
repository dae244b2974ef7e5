"""A small DP training run that checkpoints every step; test_resume.py kills and resumes it.

Usage: python resume_worker.py CHECKPOINT STEPS [--crash-at K]
With --crash-at K the process SIGKILLs itself right after saving step K's checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fundp  # noqa: E402

N, BATCH, SIGMA, CLIP_NORM = 64, 16, 1.0, 1.0


def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    data = {"x": torch.randn(N, 5, generator=g, dtype=torch.float64), "y": torch.randint(0, 2, (N,), generator=g)}

    def loss_fn(p, batch):
        return F.cross_entropy(fundp.functional_call(model, p, (batch["x"],)), batch["y"], reduction="none")

    opt = fundp.optim.adam(0.05)
    step = fundp.dp_step(loss_fn, max_norm=CLIP_NORM, noise_multiplier=SIGMA, expected_batch_size=BATCH, sample_rate=BATCH / N)
    return params, data, opt, step


def train(path: str, steps: int, crash_at: int | None = None):
    params, data, opt, step = setup()
    if os.path.exists(path):
        state = fundp.checkpoint.load(path, params_like=params, opt_state_like=opt.init(params))
        params, opt_state, ledger, key, start = state.params, state.opt_state, state.ledger, state.key, state.step
    else:
        opt_state, ledger, key, start = opt.init(params), fundp.Ledger(), fundp.random.key(7), 0
    for t in range(start, steps):
        step_key = fundp.random.fold_in(key, t)
        rows = fundp.random.uniform(fundp.random.fold_in(step_key, 1), (N,), torch.float64) < BATCH / N
        out = step(params, {k: v[rows] for k, v in data.items()}, step_key, ledger=ledger)
        updates, opt_state = opt.update(out.grads, opt_state, params)
        params, ledger = fundp.optim.apply_updates(params, updates), out.ledger
        fundp.checkpoint.save(path, params=params, opt_state=opt_state, ledger=ledger, key=key, step=t + 1)
        if crash_at is not None and t + 1 == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return params, ledger


if __name__ == "__main__":
    crash = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--crash-at" else None
    train(sys.argv[1], int(sys.argv[2]), crash)
