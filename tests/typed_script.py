"""A small DP training loop written against fundp's public API, with type annotations.

``tests/test_typing.py`` runs mypy (default settings) on this file, as a user's type checker
would: what a step returns must be a ``StepResult`` (not ``Any``), so a misspelled field or a
wrong argument is caught before the run.  It also runs the script and checks that it learns.

Run it:  python tests/typed_script.py   (prints one JSON line)
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import assert_type

import fundp
from fundp.step import Step, StepResult

Params = dict[str, torch.Tensor]
Batch = dict[str, torch.Tensor]

NUM_EXAMPLES = 512
SAMPLE_RATE = 0.125
DELTA = 1e-5

MODEL = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))


def make_data(key: torch.Tensor) -> Batch:
    """Two linearly separable classes: ``y = 1[x . w > 0]`` for a fixed ``w``."""
    x = fundp.random.normal(key, (NUM_EXAMPLES, 4))
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 1.0]) > 0).long()
    return {"x": x, "y": y}


def init_params(key: torch.Tensor) -> Params:
    """Parameters drawn from ``key`` (never from torch's global RNG)."""
    names = [name for name, _ in MODEL.named_parameters()]
    keys = fundp.random.split(key, len(names))
    return {
        name: 0.5 * fundp.random.normal(k, tuple(p.shape)) for (name, p), k in zip(MODEL.named_parameters(), keys)
    }


def loss_fn(params: Params, batch: Batch) -> torch.Tensor:
    """Per-example cross-entropy, ``[B]``."""
    logits = fundp.functional_call(MODEL, params, (batch["x"],))
    return F.cross_entropy(logits, batch["y"], reduction="none")


def accuracy(params: Params, data: Batch) -> float:
    with torch.no_grad():
        logits = fundp.functional_call(MODEL, params, (data["x"],))
    return float((logits.argmax(dim=1) == data["y"]).float().mean())


def train(num_steps: int = 40, seed: int = 0) -> dict[str, float]:
    data_key, init_key, batch_key, train_key = fundp.random.split(fundp.random.key(seed), 4)
    data = make_data(data_key)
    params = init_params(init_key)
    step: Step = fundp.dp_step(
        loss_fn,
        max_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=SAMPLE_RATE * NUM_EXAMPLES,
        sample_rate=SAMPLE_RATE,
        clip_style="flat",
        grad_method="auto",
    )
    optimizer = fundp.optim.sgd(0.5, momentum=0.5)
    opt_state = optimizer.init(params)
    ledger: fundp.Ledger = fundp.Ledger()
    batches = fundp.data.poisson_batches(NUM_EXAMPLES, SAMPLE_RATE, batch_key, steps=num_steps, pad_to_multiple=32)
    first_loss = math.nan
    for t, (indices, mask) in enumerate(batches):
        batch: Batch = {name: values[indices] for name, values in data.items()}
        out = step(params, batch, fundp.random.fold_in(train_key, t), ledger=ledger, mask=mask)
        assert_type(out, StepResult)
        updates, opt_state = optimizer.update(out.grads, opt_state, params)
        params = fundp.optim.apply_updates(params, updates)
        ledger = out.ledger
        if t == 0:
            first_loss = float(out.loss)
    epsilon: float = fundp.epsilon(ledger, DELTA)
    return {
        "epsilon": epsilon,
        "steps": float(ledger.steps),
        "first_loss": first_loss,
        "final_loss": float(loss_fn(params, data).mean()),
        "accuracy": accuracy(params, data),
    }


if __name__ == "__main__":
    print(json.dumps(train()))
