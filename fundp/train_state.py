"""Everything a DP training loop threads from step to step, as one immutable value.

A hand-written loop has four things to carry forward, and forgetting one is silent: reusing the
key reuses the noise; dropping ``out.ledger`` under-reports epsilon; forgetting the optimizer
state resets momentum.  :class:`TrainState` holds ``(params, opt_state, ledger, key, step)`` and
:func:`train_step` advances all of them together, so a loop is one line::

    state, out = fundp.train_step(step, opt, state, batch, mask=mask)

``train_step`` does exactly what a correct hand-written loop does (and nothing else)::

    key, step_key = fundp.random.split(state.key)
    out = step(state.params, batch, step_key, ledger=state.ledger, mask=mask)
    updates, opt_state = opt.update(out.grads, state.opt_state, state.params)
    params = fundp.optim.apply_updates(state.params, updates)
    state = TrainState(params, opt_state, out.ledger, key, state.step + 1)

A ``TrainState`` saves with ``fundp.checkpoint.save(path, **state._asdict())``; the fields are the
ones :func:`fundp.checkpoint.load` returns.

Example:
  >>> import torch, fundp
  >>> from fundp.train_state import TrainState, train_step
  >>> loss_fn = lambda p, b: (b["x"] @ p["w"] - b["y"]) ** 2
  >>> step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, sample_rate=0.5)
  >>> opt = fundp.optim.sgd(0.1)
  >>> state = TrainState.create({"w": torch.zeros(2)}, opt, fundp.random.key(0))
  >>> batch = {"x": torch.ones(4, 2), "y": torch.ones(4)}
  >>> for _ in range(3):
  ...     state, out = train_step(step, opt, state, batch)
  >>> state.step, state.ledger.steps
  (3, 3)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from fundp import optim
from fundp import random as fundp_random

__all__ = ["TrainState", "train_step"]


class TrainState(NamedTuple):
    """The loop's state: ``params``, ``opt_state``, ``ledger``, ``key``, ``step`` (immutable; replace, never mutate).

    Example:
      >>> import torch, fundp
      >>> from fundp.train_state import TrainState
      >>> state = TrainState.create({"w": torch.zeros(2)}, fundp.optim.sgd(0.1), fundp.random.key(0))
      >>> state._replace(step=state.step + 1).step, state.step
      (1, 0)
    """

    params: Any
    """The parameters, a pytree of tensors."""
    opt_state: Any
    """The optimizer's state (``optimizer.init(params)`` at the start)."""
    ledger: Any
    """The privacy ledger after the last step (``None`` for a non-private run)."""
    key: torch.Tensor
    """The key the *next* step splits; never used twice."""
    step: int
    """Number of steps taken."""

    @classmethod
    def create(cls, params: Any, optimizer: Any, key: torch.Tensor, *, ledger: Any = "new") -> TrainState:
        """Returns the state before the first step: ``opt_state = optimizer.init(params)``, ``step = 0``.

        ``ledger`` defaults to a fresh :class:`fundp.Ledger`; pass ``None`` for a non-private run.

        Example:
          >>> import torch, fundp
          >>> from fundp.train_state import TrainState
          >>> state = TrainState.create({"w": torch.zeros(2)}, fundp.optim.adam(0.1), fundp.random.key(0))
          >>> state.step, state.ledger
          (0, Ledger([]))
        """
        _check_optimizer(optimizer)
        fundp_random.split(key)  # checks the key, naming it
        if isinstance(ledger, str) and ledger == "new":
            from fundp.accounting import Ledger

            ledger = Ledger()
        return cls(params, optimizer.init(params), ledger, key, 0)


def _check_optimizer(optimizer: Any) -> None:
    if not callable(getattr(optimizer, "update", None)) or not callable(getattr(optimizer, "init", None)):
        raise TypeError(f"optimizer must be an (init, update) pair such as fundp.optim.sgd(...), got {type(optimizer).__name__}")


def train_step(step_fn: Callable, optimizer: Any, state: TrainState, batch: Any, *, mask: torch.Tensor | None = None) -> tuple[TrainState, Any]:
    """Runs one step and returns ``(new_state, out)``; ``state`` itself is left as it was.

    Splits ``state.key`` into the key kept for later and this step's key, calls
    ``out = step_fn(state.params, batch, step_key, ledger=state.ledger, mask=mask)`` (``step_fn``
    is a :func:`fundp.dp_step`, compiled or not), applies ``optimizer.update(out.grads, ...)`` and
    stores ``out.ledger``.  ``out`` is the step's :class:`fundp.StepResult` (its ``loss`` and
    ``norms`` are not private).

    Example:
      >>> import torch, fundp
      >>> from fundp.train_state import TrainState, train_step
      >>> loss_fn = lambda p, b: (b["x"] @ p["w"]) ** 2
      >>> step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=2)
      >>> opt = fundp.optim.sgd(0.5)
      >>> state = TrainState.create({"w": torch.ones(1)}, opt, fundp.random.key(0), ledger=None)
      >>> state, out = train_step(step, opt, state, {"x": torch.ones(2, 1)})
      >>> state.params["w"], state.step  # grads: 2 clipped unit gradients / 2 = 1
      (tensor([0.5000]), 1)
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a fundp.TrainState (TrainState.create(...)), got {type(state).__name__}")
    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable (a fundp.dp_step), got {type(step_fn).__name__}")
    _check_optimizer(optimizer)
    next_key, step_key = fundp_random.split(state.key)
    out = step_fn(state.params, batch, step_key, ledger=state.ledger, mask=mask)
    if not (hasattr(out, "grads") and hasattr(out, "ledger")):
        raise TypeError(f"step_fn must return a StepResult with .grads and .ledger, got {type(out).__name__}")
    updates, opt_state = optimizer.update(out.grads, state.opt_state, state.params)
    params = optim.apply_updates(state.params, updates)
    return TrainState(params, opt_state, out.ledger, next_key, state.step + 1), out
