"""Everything a DP training loop threads from step to step, as one immutable value.

A hand-written loop has many things to carry forward, and forgetting one is silent: reusing the
key reuses the noise; dropping ``out.ledger`` under-reports epsilon; forgetting the optimizer
state resets momentum; dropping ``out.clip_state`` / ``out.noise_state`` restarts adaptive
clipping or breaks the correlation of the noise.  :class:`TrainState` holds ``(params,
opt_state, ledger, key, step, clip_state, noise_state)`` and :func:`train_step` advances all of
them together, so a loop is one line::

    state, out = fundp.train_step(step, opt, state, batch, mask=mask)

Schedules are functions of the step index: ``train_step(..., noise_multiplier=sigma_of,
max_norm=clip_of)`` calls ``sigma_of(state.step)`` / ``clip_of(state.step)`` (a number or a 0-d
tensor also works); a learning-rate schedule goes into the optimizer
(``fundp.optim.sgd(lr_of)``), which evaluates it at its own update count, equal to
``state.step`` for a state made by :meth:`TrainState.create` (and restored with it).

``train_step`` does exactly what a correct hand-written loop does (and nothing else); keyword
arguments whose value is ``None`` are not passed (a plain step takes neither state)::

    key, step_key = fundp.random.split(state.key)
    out = step(state.params, batch, step_key, ledger=state.ledger, mask=mask,
               noise_multiplier=sigma_of(state.step), max_norm=clip_of(state.step),
               clip_state=state.clip_state, noise_state=state.noise_state)
    updates, opt_state = opt.update(out.grads, state.opt_state, state.params)
    params = fundp.optim.apply_updates(state.params, updates)
    state = TrainState(params, opt_state, out.ledger, key, state.step + 1, out.clip_state, out.noise_state)

Combinations the step refuses (:data:`fundp.guards.UNSUPPORTED`, e.g. a per-step sigma with a
correlated ``noise_mechanism``) are refused by ``train_step`` too, at the first step, with the
table's reason, before anything is spent.

A ``TrainState`` saves with ``fundp.checkpoint.save(path, **state._asdict())`` and comes back with
:meth:`TrainState.restore` (or ``fundp.checkpoint.load``, whose fields have the same names).
Compatibility: the two new fields default to ``None``, so ``TrainState(params, opt_state,
ledger, key, step)`` still builds a state, but a state now unpacks into seven values.

Example:
  >>> import torch, fundp
  >>> from fundp.train_state import TrainState, train_step
  >>> loss_fn = lambda p, b: (b["x"] @ p["w"] - b["y"]) ** 2
  >>> step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, sample_rate=0.5)
  >>> opt = fundp.optim.sgd(0.1)
  >>> state = TrainState.create({"w": torch.zeros(2)}, opt, fundp.random.key(0))
  >>> batch = {"x": torch.arange(8.0).reshape(4, 2), "y": torch.ones(4)}
  >>> sigma_of = lambda t: 2.0 if t == 0 else 1.0  # a noise schedule: a function of the step
  >>> for _ in range(3):
  ...     state, out = train_step(step, opt, state, batch, noise_multiplier=sigma_of)
  >>> state.step, state.ledger.steps
  (3, 3)
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import torch

from fundp import optim
from fundp import random as fundp_random

__all__ = ["TrainState", "train_step"]


class TrainState(NamedTuple):
    """The loop's state: ``params``, ``opt_state``, ``ledger``, ``key``, ``step``, ``clip_state``,
    ``noise_state`` (immutable; replace, never mutate).

    Example:
      >>> import torch, fundp
      >>> from fundp.train_state import TrainState
      >>> state = TrainState.create({"w": torch.zeros(2)}, fundp.optim.sgd(0.1), fundp.random.key(0))
      >>> state._replace(step=state.step + 1).step, state.step, state.clip_state
      (1, 0, None)
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
    """Number of steps taken (the argument of the schedules at the next step)."""
    clip_state: Any = None
    """The adaptive-clipping state for the next step (``dp_step(..., adaptive_clipping=cfg)``:
    ``cfg.init(C0)`` at the start), or ``None``."""
    noise_state: Any = None
    """The correlated-noise state for the next step (``dp_step(..., noise_mechanism=mech)``:
    ``mech.init(params)`` at the start), or ``None``."""

    @classmethod
    def create(
        cls, params: Any, optimizer: Any, key: torch.Tensor, *, ledger: Any = "new", clip_state: Any = None, noise_state: Any = None
    ) -> TrainState:
        """Returns the state before the first step: ``opt_state = optimizer.init(params)``, ``step = 0``.

        ``ledger`` defaults to a fresh :class:`fundp.Ledger`; pass ``None`` for a non-private run.
        ``clip_state``: the initial adaptive-clipping state (``cfg.init(C0)``) when the step is
        built with ``adaptive_clipping=cfg``; ``noise_state``: the initial correlated-noise state
        (``mechanism.init(params)``) when it is built with ``noise_mechanism=mechanism``.

        Example:
          >>> import torch, fundp
          >>> from fundp.train_state import TrainState
          >>> cfg = fundp.adaptive.quantile_clipping(count_noise_multiplier=10.0)
          >>> state = TrainState.create({"w": torch.zeros(2)}, fundp.optim.adam(0.1), fundp.random.key(0), clip_state=cfg.init(1.0))
          >>> state.step, state.ledger, state.clip_state
          (0, Ledger([]), QuantileClipState(max_norm=tensor(1., dtype=torch.float64)))
        """
        _check_optimizer(optimizer)
        fundp_random.split(key)  # checks the key, naming it
        if isinstance(ledger, str) and ledger == "new":
            from fundp.accounting import Ledger

            ledger = Ledger()
        return cls(params, optimizer.init(params), ledger, key, 0, clip_state, noise_state)

    @classmethod
    def restore(
        cls, path: str | os.PathLike, like: TrainState, *, run_id: str | None = None, allow_other_run: bool = False
    ) -> TrainState:
        """Reads a state saved with ``fundp.checkpoint.save(path, **state._asdict())``.

        ``like`` gives the structure, shapes, dtypes and devices of every tensor (typically the
        freshly built ``TrainState.create(...)`` of the same run); a saved ``clip_state`` /
        ``noise_state`` is required exactly when ``like`` has one.  ``run_id`` and
        ``allow_other_run`` are :func:`fundp.checkpoint.load`'s; every check of that function
        applies (:class:`fundp.checkpoint.CheckpointError` on any mismatch).

        Example:
          >>> import os, tempfile, torch, fundp
          >>> from fundp.train_state import TrainState
          >>> opt = fundp.optim.sgd(0.1)
          >>> state = TrainState.create({"w": torch.ones(2)}, opt, fundp.random.key(3))
          >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
          >>> fundp.checkpoint.save(path, **state._replace(params={"w": torch.full((2,), 5.0)})._asdict())
          >>> TrainState.restore(path, like=state).params
          {'w': tensor([5., 5.])}
        """
        from fundp import checkpoint

        if not isinstance(like, TrainState):
            raise TypeError(f"like must be a fundp.TrainState (e.g. TrainState.create(...)), got {type(like).__name__}")
        loaded = checkpoint.load(
            path,
            params_like=like.params,
            opt_state_like=like.opt_state,
            clip_state_like=like.clip_state,
            noise_state_like=like.noise_state,
            device=like.key.device,
            run_id=run_id,
            allow_other_run=allow_other_run,
        )
        return cls(loaded.params, loaded.opt_state, loaded.ledger, loaded.key, loaded.step, loaded.clip_state, loaded.noise_state)


def _check_optimizer(optimizer: Any) -> None:
    if not callable(getattr(optimizer, "update", None)) or not callable(getattr(optimizer, "init", None)):
        raise TypeError(f"optimizer must be an (init, update) pair such as fundp.optim.sgd(...), got {type(optimizer).__name__}")


def _is_value(value: Any, thresholds: bool) -> bool:
    """A number, a tensor, or (``thresholds``) a pytree of per-layer thresholds."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (numbers.Real, torch.Tensor)):
        return True
    return thresholds and isinstance(value, (Mapping, list, tuple))


def _at_step(name: str, schedule: Any, step: int, *, thresholds: bool = False) -> Any:
    """``schedule(step)`` for a schedule, ``schedule`` itself for a constant (checked, naming ``name``).

    The value's range is checked by the step (``noise_multiplier >= 0``, ``max_norm > 0``).
    """
    kinds = "a number, a 0-d tensor" + (", a pytree of per-layer thresholds" if thresholds else "")
    if callable(schedule) and not isinstance(schedule, torch.Tensor):
        value = schedule(step)
        if not _is_value(value, thresholds):
            raise TypeError(f"{name}({step}) must return {kinds}, got {type(value).__name__}")
        return value
    if not _is_value(schedule, thresholds):
        raise TypeError(f"{name} must be {kinds} or a schedule step -> value, got {type(schedule).__name__}")
    return schedule


def train_step(
    step_fn: Callable,
    optimizer: Any,
    state: TrainState,
    batch: Any,
    *,
    mask: torch.Tensor | None = None,
    noise_multiplier: Any = None,
    max_norm: Any = None,
) -> tuple[TrainState, Any]:
    """Runs one step and returns ``(new_state, out)``; ``state`` itself is left as it was.

    Splits ``state.key`` into the key kept for later and this step's key, calls
    ``out = step_fn(state.params, batch, step_key, ledger=state.ledger, mask=mask, ...)`` (``step_fn``
    is a :func:`fundp.dp_step`, compiled or not), applies ``optimizer.update(out.grads, ...)`` and
    stores ``out.ledger``, ``out.clip_state`` and ``out.noise_state``.  ``out`` is the step's
    :class:`fundp.StepResult` (its ``loss`` and ``norms`` are not private).

    The step also gets, each only when set: ``noise_multiplier`` and ``max_norm``, evaluated at
    this step (``schedule(state.step)`` for a callable ``step -> value``, e.g. a
    ``fundp.optim`` schedule, whose 0-d tensors never recompile a compiled step; a number or a
    0-d tensor as it is; ``max_norm`` may also be a pytree of per-layer thresholds), and
    ``clip_state`` / ``noise_state`` from ``state``.  A learning-rate schedule belongs to the
    optimizer (``fundp.optim.adam(schedule)``): it is evaluated at the optimizer's update count,
    which advances with ``state.step``.  Combinations the step refuses (e.g. a ``max_norm``
    schedule with adaptive clipping, a ``noise_multiplier`` schedule with a cyclic-Poisson or
    non-banded min-separation ``noise_mechanism``: :data:`fundp.guards.UNSUPPORTED`) raise the
    step's error, with nothing spent.  A ``noise_multiplier`` schedule with a single-participation
    or banded min-separation :mod:`fundp.mf` mechanism is recorded step by step and accounted
    exactly (:meth:`fundp.mf.CorrelatedNoise.account`); it must be a data-independent function of
    the step.

    Example:
      >>> import torch, fundp
      >>> from fundp.train_state import TrainState, train_step
      >>> loss_fn = lambda p, b: (b["x"] @ p["w"]) ** 2
      >>> step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=2)
      >>> opt = fundp.optim.sgd(0.5)
      >>> state = TrainState.create({"w": torch.ones(1)}, opt, fundp.random.key(0), ledger=None)
      >>> batch = {"x": torch.tensor([[1.0], [2.0]])}  # two distinct rows (equal last rows would look like padding)
      >>> state, out = train_step(step, opt, state, batch)
      >>> state.params["w"], state.step  # grads: 2 clipped unit gradients / 2 = 1
      (tensor([0.5000]), 1)
      >>> state, out = train_step(step, opt, state, batch, max_norm=lambda t: 0.5 / t)
      >>> state.params["w"]  # at step 1 the threshold is 0.5: grads = 0.5
      tensor([0.2500])
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a fundp.TrainState (TrainState.create(...)), got {type(state).__name__}")
    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable (a fundp.dp_step), got {type(step_fn).__name__}")
    _check_optimizer(optimizer)
    kwargs: dict[str, Any] = {"ledger": state.ledger, "mask": mask}
    if noise_multiplier is not None:
        kwargs["noise_multiplier"] = _at_step("noise_multiplier", noise_multiplier, state.step)
    if max_norm is not None:
        kwargs["max_norm"] = _at_step("max_norm", max_norm, state.step, thresholds=True)
    if state.clip_state is not None:
        kwargs["clip_state"] = state.clip_state
    if state.noise_state is not None:
        kwargs["noise_state"] = state.noise_state
    next_key, step_key = fundp_random.split(state.key)
    out = step_fn(state.params, batch, step_key, **kwargs)
    if not (hasattr(out, "grads") and hasattr(out, "ledger")):
        raise TypeError(f"step_fn must return a StepResult with .grads and .ledger, got {type(out).__name__}")
    clip_state = _carried(out, "clip_state", state.clip_state)
    noise_state = _carried(out, "noise_state", state.noise_state)
    updates, opt_state = optimizer.update(out.grads, state.opt_state, state.params)
    params = optim.apply_updates(state.params, updates)
    return TrainState(params, opt_state, out.ledger, next_key, state.step + 1, clip_state, noise_state), out


def _carried(out: Any, name: str, before: Any) -> Any:
    """The state ``out`` returns for the next step; a step given a state must return its successor."""
    if before is None:
        return None
    after = getattr(out, name, None)
    if after is None:
        raise TypeError(f"step_fn was given {name} but returned no out.{name}: the state would be lost")
    return after
