"""Small functional optimizers as ``(init, update)`` pairs, optax-style, and a bridge to ``torch.optim``.

``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)`` are pure: the
state is a NamedTuple of tensors/pytrees passed in and returned; nothing is mutated.  Apply the
updates with ``apply_updates(params, updates)`` (``params + updates``).

Learning rates change without recompiling.  ``lr`` is a float, a 0-d tensor, or a *schedule*
``schedule(count) -> lr`` evaluated at the step count that the optimizer state carries as a 0-d
``int64`` tensor (0 at the first update).  Under ``torch.compile`` the count is an input of the
graph, so a decaying learning rate compiles once.  A 0-d tensor ``lr`` is read at every update:
changing it in place (``lr.fill_(0.01)``) takes effect at the next update, also without a
recompile.

Schedules (optax's definitions, ``count`` = number of updates done so far):

* :func:`constant_schedule`, :func:`linear_schedule`, :func:`polynomial_schedule`;
* :func:`cosine_decay_schedule`, :func:`exponential_decay`, :func:`piecewise_constant_schedule`;
* :func:`warmup_cosine_decay_schedule` (linear warm-up, then cosine decay), :func:`join_schedules`.

Gradient transformations compose with :func:`chain` (each is an :class:`Optimizer` pair):
:func:`scale`, :func:`scale_by_schedule`, :func:`scale_by_learning_rate`,
:func:`add_decayed_weights`, :func:`trace` (momentum), :func:`scale_by_adam`.  Everything here is
post-processing of already-private gradients: it costs no privacy.

Example:
  >>> import torch, fundp
  >>> opt = fundp.optim.sgd(lr=0.1, momentum=0.9)
  >>> params = {"w": torch.ones(2)}
  >>> state = opt.init(params)
  >>> updates, state = opt.update({"w": torch.ones(2)}, state, params)
  >>> fundp.optim.apply_updates(params, updates)["w"]
  tensor([0.9000, 0.9000])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple, Union

import optree
import torch

from fundp._validate import check_int, check_nonnegative, check_positive, check_real

__all__ = [
    "Optimizer",
    "Schedule",
    "SgdState",
    "AdamState",
    "TraceState",
    "ScaleByScheduleState",
    "sgd",
    "adam",
    "adamw",
    "chain",
    "scale",
    "scale_by_schedule",
    "scale_by_learning_rate",
    "add_decayed_weights",
    "trace",
    "scale_by_adam",
    "constant_schedule",
    "polynomial_schedule",
    "linear_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "piecewise_constant_schedule",
    "join_schedules",
    "warmup_cosine_decay_schedule",
    "apply_updates",
    "set_grads",
]

Schedule = Callable[[Any], torch.Tensor]
"""``schedule(count) -> Tensor[]``: a float64 0-d tensor for a step count (0-d int tensor or int)."""

LearningRate = Union[float, torch.Tensor, Schedule]


class Optimizer(NamedTuple):
    """An ``(init, update)`` pair; also the type of every gradient transformation here.

    ``init(params) -> state``; ``update(grads, state, params=None) -> (updates, new_state)``.

    Example:
      >>> import torch, fundp
      >>> def update(grads, state, params=None):
      ...     return {k: -v for k, v in grads.items()}, state
      >>> negate = fundp.optim.Optimizer(init=lambda params: None, update=update)
      >>> negate.update({"w": torch.ones(2)}, negate.init(None))
      ({'w': tensor([-1., -1.])}, None)
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]


class SgdState(NamedTuple):
    """The state of :func:`sgd`.

    Example:
      >>> import torch, fundp
      >>> opt = fundp.optim.sgd(lr=0.1, momentum=0.9)
      >>> opt.init({"w": torch.ones(2)})
      SgdState(count=tensor(0), momentum={'w': tensor([0., 0.])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # (shadows tuple.count, as in optax)
    """Updates done so far, a 0-d int64 tensor (the schedules' argument)."""
    momentum: Any
    """Pytree like params, or ``None`` without momentum."""


class AdamState(NamedTuple):
    """The state of :func:`adam` and :func:`adamw`.

    Example:
      >>> import torch, fundp
      >>> opt = fundp.optim.adam(lr=0.1)
      >>> params = {"w": torch.ones(2)}
      >>> _, state = opt.update({"w": torch.tensor([1.0, -2.0])}, opt.init(params), params)
      >>> state
      AdamState(count=tensor(1), mu={'w': tensor([ 0.1000, -0.2000])}, nu={'w': tensor([0.0010, 0.0040])})
    """

    count: torch.Tensor  # type: ignore[assignment]  # (shadows tuple.count, as in optax)
    """Updates done so far, a 0-d int64 tensor."""
    mu: Any
    """First-moment estimate, a pytree like params."""
    nu: Any
    """Second-moment estimate, a pytree like params."""


class TraceState(NamedTuple):
    trace: Any
    """Momentum buffer, a pytree like params."""


class ScaleByScheduleState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # (shadows tuple.count, as in optax)
    """Updates done so far, a 0-d int64 tensor."""


# --------------------------------------------------------------------------- helpers


def _zeros_like(tree: Any) -> Any:
    return optree.tree_map(lambda leaf: torch.zeros_like(leaf.detach()), tree)


def _zero_count(params: Any) -> torch.Tensor:
    leaves = optree.tree_leaves(params)
    device = leaves[0].device if leaves else None
    return torch.zeros((), dtype=torch.int64, device=device)


def _as_count(count: Any) -> torch.Tensor:
    """The step count as a float64 tensor (a 0-d int tensor stays on its device; an int is checked)."""
    if isinstance(count, torch.Tensor):
        if count.dtype.is_floating_point or count.dtype.is_complex or count.dtype == torch.bool:
            raise TypeError(f"count must be an integer tensor, got {count.dtype}")
        return count.to(torch.float64)
    return torch.tensor(float(check_int("count", count, minimum=0)), dtype=torch.float64)


def _as_lr(lr: LearningRate, name: str = "lr") -> Callable[[torch.Tensor], Any]:
    """``lr`` as a function of the count: a float stays a float, a tensor is read at each call."""
    if callable(lr) and not isinstance(lr, torch.Tensor):
        value = lr(torch.zeros((), dtype=torch.int64))
        check_real(f"{name}(0)", value)  # fails early on a schedule that does not return a number
        return lr
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float, a one-element float tensor or a schedule, got a {lr.dtype} tensor of shape {tuple(lr.shape)}")
        check_positive(name, lr)
        tensor = lr
        return lambda count: tensor.reshape(())
    number = check_positive(name, lr)
    return lambda count: number


def _check_params_given(params: Any, what: str) -> None:
    if params is None:
        raise ValueError(f"params are required with {what}: call update(grads, state, params)")


def apply_updates(params: Any, updates: Any) -> Any:
    """Returns ``params + updates`` leafwise (a new pytree; params are not modified).

    The result is detached: it carries no autograd history, so a loop over parameters that
    require grad (``dict(model.named_parameters())``) does not grow its graph by one node per step.

    Example:
      >>> import torch, fundp
      >>> fundp.optim.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})["w"]
      tensor([1.5000, 0.0000])
    """
    return optree.tree_map(lambda p, u: p.detach() + u.detach().to(p.dtype), params, updates)


# --------------------------------------------------------------------------- schedules


def constant_schedule(value: float) -> Schedule:
    """``lr(t) = value``.

    Example:
      >>> import fundp
      >>> float(fundp.optim.constant_schedule(0.1)(7))
      0.1
    """
    value = check_real("value", value)
    return lambda count: torch.full_like(_as_count(count), value)


def polynomial_schedule(
    init_value: float, end_value: float, power: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """``lr(t) = (init - end) * (1 - s / transition_steps)^power + end``, ``s = clip(t - begin, 0, transition_steps)``.

    Constant ``init_value`` before ``transition_begin``, ``end_value`` after the transition.

    Example:
      >>> import fundp
      >>> schedule = fundp.optim.polynomial_schedule(1.0, 0.0, power=2, transition_steps=4)
      >>> [float(schedule(t)) for t in range(6)]
      [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    """
    init_value = check_real("init_value", init_value)
    end_value = check_real("end_value", end_value)
    power = check_positive("power", power)
    transition_steps = check_int("transition_steps", transition_steps, minimum=1)
    transition_begin = check_int("transition_begin", transition_begin, minimum=0)

    def schedule(count: Any) -> torch.Tensor:
        s = torch.clamp(_as_count(count) - transition_begin, 0, transition_steps)
        return (init_value - end_value) * (1 - s / transition_steps) ** power + end_value

    return schedule


def linear_schedule(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Linear interpolation from ``init_value`` to ``end_value`` over ``transition_steps`` (power 1).

    Example:
      >>> import fundp
      >>> schedule = fundp.optim.linear_schedule(0.0, 1.0, transition_steps=4)
      >>> [float(schedule(t)) for t in (0, 1, 4, 9)]
      [0.0, 0.25, 1.0, 1.0]
    """
    return polynomial_schedule(init_value, end_value, 1.0, transition_steps, transition_begin)


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """``lr(t) = init * ((1 - alpha) * c^exponent + alpha)``, ``c = (1 + cos(pi * min(t, decay_steps) / decay_steps)) / 2``.

    Decays from ``init_value`` to ``alpha * init_value`` over ``decay_steps`` (Loshchilov &
    Hutter's cosine schedule, without restarts), then stays there.

    Example:
      >>> import fundp
      >>> schedule = fundp.optim.cosine_decay_schedule(1.0, decay_steps=4)
      >>> [round(float(schedule(t)), 4) for t in range(6)]
      [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
    """
    init_value = check_real("init_value", init_value)
    decay_steps = check_int("decay_steps", decay_steps, minimum=1)
    alpha = check_nonnegative("alpha", alpha)
    if alpha > 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    exponent = check_positive("exponent", exponent)

    def schedule(count: Any) -> torch.Tensor:
        t = torch.clamp(_as_count(count), max=decay_steps)
        cosine = 0.5 * (1 + torch.cos(math.pi * t / decay_steps))
        return init_value * ((1 - alpha) * cosine**exponent + alpha)

    return schedule


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """``lr(t) = init * decay_rate^(s / transition_steps)``, ``s = max(t - transition_begin, 0)``.

    With ``staircase=True`` the exponent is ``floor(s / transition_steps)``.  ``end_value``
    bounds the result (below for ``decay_rate < 1``, above for ``decay_rate > 1``).

    Example:
      >>> import fundp
      >>> schedule = fundp.optim.exponential_decay(1.0, transition_steps=2, decay_rate=0.5, staircase=True)
      >>> [float(schedule(t)) for t in range(5)]
      [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    init_value = check_real("init_value", init_value)
    transition_steps = check_int("transition_steps", transition_steps, minimum=1)
    decay_rate = check_positive("decay_rate", decay_rate)
    transition_begin = check_int("transition_begin", transition_begin, minimum=0)
    if not isinstance(staircase, bool):
        raise TypeError(f"staircase must be a bool, got {type(staircase).__name__}")
    end = None if end_value is None else check_real("end_value", end_value)

    def schedule(count: Any) -> torch.Tensor:
        exponent = torch.clamp_min(_as_count(count) - transition_begin, 0) / transition_steps
        if staircase:
            exponent = torch.floor(exponent)
        value = init_value * decay_rate**exponent
        if end is not None:
            value = torch.clamp_min(value, end) if decay_rate < 1 else torch.clamp_max(value, end)
        return value

    return schedule


def piecewise_constant_schedule(init_value: float, boundaries_and_scales: Mapping[int, float]) -> Schedule:
    """``lr(t) = init * prod(scale_b for every boundary b <= t)`` (step decay).

    Example:
      >>> import fundp
      >>> schedule = fundp.optim.piecewise_constant_schedule(1.0, {2: 0.1, 4: 0.5})
      >>> [round(float(schedule(t)), 6) for t in range(6)]
      [1.0, 1.0, 0.1, 0.1, 0.05, 0.05]
    """
    init_value = check_real("init_value", init_value)
    if not isinstance(boundaries_and_scales, Mapping):
        raise TypeError(f"boundaries_and_scales must be a dict {{step: scale}}, got {type(boundaries_and_scales).__name__}")
    pairs = sorted(
        (check_int("boundaries_and_scales key", b, minimum=0), check_real(f"boundaries_and_scales[{b}]", s))
        for b, s in boundaries_and_scales.items()
    )

    def schedule(count: Any) -> torch.Tensor:
        t = _as_count(count)
        value = torch.full_like(t, init_value)
        for boundary, factor in pairs:
            value = torch.where(t >= boundary, value * factor, value)
        return value

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Runs ``schedules[i + 1]`` from step ``boundaries[i]`` on, restarted: it sees ``t - boundaries[i]``.

    Example:
      >>> import fundp
      >>> warm = fundp.optim.linear_schedule(0.0, 1.0, transition_steps=2)
      >>> schedule = fundp.optim.join_schedules([warm, fundp.optim.constant_schedule(0.3)], [2])
      >>> [float(schedule(t)) for t in range(4)]
      [0.0, 0.5, 0.3, 0.3]
    """
    schedules = list(schedules)
    bounds = [check_int("boundaries", b, minimum=0) for b in boundaries]
    if len(schedules) != len(bounds) + 1:
        raise ValueError(f"join_schedules needs one more schedule than boundaries, got {len(schedules)} and {len(bounds)}")
    if any(b2 < b1 for b1, b2 in zip(bounds, bounds[1:])):
        raise ValueError(f"boundaries must be non-decreasing, got {bounds}")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"schedules[{i}] must be callable, got {type(s).__name__}")

    def schedule(count: Any) -> torch.Tensor:
        count = count if isinstance(count, torch.Tensor) else torch.tensor(check_int("count", count, minimum=0))
        value = torch.as_tensor(schedules[0](count), dtype=torch.float64)
        for boundary, later in zip(bounds, schedules[1:]):
            value = torch.where(count >= boundary, torch.as_tensor(later(count - boundary), dtype=torch.float64), value)
        return value

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float, peak_value: float, warmup_steps: int, decay_steps: int, end_value: float = 0.0, exponent: float = 1.0
) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine decay to
    ``end_value`` at step ``decay_steps`` (which counts the warm-up, as in optax).

    Example:
      >>> import fundp
      >>> schedule = fundp.optim.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=4)
      >>> [float(schedule(t)) for t in range(6)]
      [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    init_value = check_real("init_value", init_value)
    peak_value = check_real("peak_value", peak_value)
    if peak_value == 0:
        raise ValueError("peak_value must be != 0")
    end_value = check_real("end_value", end_value)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
    decay_steps = check_int("decay_steps", decay_steps, minimum=warmup_steps + 1)
    decay = cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha=end_value / peak_value, exponent=exponent)
    if warmup_steps == 0:
        return decay
    return join_schedules([linear_schedule(init_value, peak_value, warmup_steps), decay], [warmup_steps])


# --------------------------------------------------------------------------- gradient transformations


def chain(*transforms: Optimizer) -> Optimizer:
    """Composes gradient transformations left to right; the state is the tuple of their states.

    Example:
      >>> import torch, fundp
      >>> opt = fundp.optim.chain(fundp.optim.add_decayed_weights(0.5), fundp.optim.scale(-1.0))
      >>> params = {"w": torch.ones(2)}
      >>> updates, _ = opt.update({"w": torch.ones(2)}, opt.init(params), params)
      >>> updates["w"]
      tensor([-1.5000, -1.5000])
    """
    for i, t in enumerate(transforms):
        if not (hasattr(t, "init") and hasattr(t, "update")):
            raise TypeError(f"transforms[{i}] must be an (init, update) pair, got {type(t).__name__}")

    def init(params: Any) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(grads: Any, state: tuple, params: Any = None) -> tuple[Any, tuple]:
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(f"state must be the tuple of {len(transforms)} states made by this chain's init")
        new_states = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    return Optimizer(init, update)


def scale(factor: float) -> Optimizer:
    """``u -> factor * u`` (stateless).

    Example:
      >>> import torch, fundp
      >>> fundp.optim.scale(-2.0).update({"w": torch.ones(1)}, ())[0]["w"]
      tensor([-2.])
    """
    factor = check_real("factor", factor)

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        return optree.tree_map(lambda g: factor * g, grads), state

    return Optimizer(lambda params: (), update)


def scale_by_schedule(step_size_fn: Schedule) -> Optimizer:
    """``u -> step_size_fn(count) * u``; the count (0 at the first update) lives in the state.

    Example:
      >>> import torch, fundp
      >>> opt = fundp.optim.scale_by_schedule(lambda t: 1.0 / (t + 1))
      >>> state = opt.init({"w": torch.ones(1)})
      >>> for _ in range(3):
      ...     u, state = opt.update({"w": torch.ones(1)}, state)
      >>> u["w"]
      tensor([0.3333])
    """
    if not callable(step_size_fn):
        raise TypeError(f"step_size_fn must be callable, got {type(step_size_fn).__name__}")

    def update(grads: Any, state: ScaleByScheduleState, params: Any = None) -> tuple[Any, ScaleByScheduleState]:
        factor = step_size_fn(state.count)
        return optree.tree_map(lambda g: factor * g, grads), ScaleByScheduleState(state.count + 1)

    return Optimizer(lambda params: ScaleByScheduleState(_zero_count(params)), update)


def scale_by_learning_rate(lr: LearningRate) -> Optimizer:
    """``u -> -lr(count) * u``, for ``lr`` a float, a 0-d tensor or a schedule (the descent step of a chain).

    Example:
      >>> import torch, fundp
      >>> opt = fundp.optim.scale_by_learning_rate(0.1)
      >>> opt.update({"w": torch.ones(1)}, opt.init({"w": torch.ones(1)}))[0]["w"]
      tensor([-0.1000])
    """
    lr_at = _as_lr(lr)

    def update(grads: Any, state: ScaleByScheduleState, params: Any = None) -> tuple[Any, ScaleByScheduleState]:
        step = lr_at(state.count)
        return optree.tree_map(lambda g: -step * g, grads), ScaleByScheduleState(state.count + 1)

    return Optimizer(lambda params: ScaleByScheduleState(_zero_count(params)), update)


def add_decayed_weights(weight_decay: float) -> Optimizer:
    """``u -> u + weight_decay * params`` (stateless; needs ``params``).

    Example:
      >>> import torch, fundp
      >>> opt = fundp.optim.add_decayed_weights(0.1)
      >>> opt.update({"w": torch.zeros(1)}, (), {"w": torch.full((1,), 2.0)})[0]["w"]
      tensor([0.2000])
    """
    weight_decay = check_nonnegative("weight_decay", weight_decay)

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if not weight_decay:
            return grads, state
        _check_params_given(params, "weight_decay")
        return optree.tree_map(lambda g, p: g + weight_decay * p.detach(), grads, params), state

    return Optimizer(lambda params: (), update)


def trace(decay: float, nesterov: bool = False) -> Optimizer:
    """Momentum: ``b <- decay * b + u`` (``b = 0`` before the first update); returns ``b``, or ``u + decay * b`` (Nesterov).

    Example:
      >>> import torch, fundp
      >>> opt = fundp.optim.trace(0.5)
      >>> state = opt.init({"w": torch.zeros(1)})
      >>> _, state = opt.update({"w": torch.ones(1)}, state)
      >>> opt.update({"w": torch.ones(1)}, state)[0]["w"]
      tensor([1.5000])
    """
    decay = check_nonnegative("decay", decay)
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")

    def update(grads: Any, state: TraceState, params: Any = None) -> tuple[Any, TraceState]:
        buffers = optree.tree_map(lambda b, g: decay * b + g, state.trace, grads)
        out = optree.tree_map(lambda b, g: g + decay * b, buffers, grads) if nesterov else buffers
        return out, TraceState(buffers)

    return Optimizer(lambda params: TraceState(_zeros_like(params)), update)


def _adam_direction(grads: Any, state: AdamState, b1: float, b2: float, eps: float) -> tuple[Any, AdamState]:
    count = state.count + 1
    mu = optree.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = optree.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
    step = count.to(torch.float64)
    correction1 = 1 - b1**step
    correction2 = 1 - b2**step

    def direction(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m_hat = m / correction1.to(m.dtype)
        v_hat = v / correction2.to(v.dtype)
        return m_hat / (torch.sqrt(v_hat) + eps)

    return optree.tree_map(direction, mu, nu), AdamState(count, mu, nu)


def _check_betas(b1: float, b2: float, eps: float) -> tuple[float, float, float]:
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0 <= check_real(name, beta) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    return float(b1), float(b2), check_nonnegative("eps", eps)


def _adam_init(params: Any) -> AdamState:
    return AdamState(_zero_count(params), _zeros_like(params), _zeros_like(params))


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` with bias-corrected moments (no learning rate, no sign).

    Example:
      >>> import torch, fundp
      >>> opt = fundp.optim.scale_by_adam()
      >>> opt.update({"w": torch.full((1,), 3.0)}, opt.init({"w": torch.zeros(1)}))[0]["w"]
      tensor([1.0000])
    """
    b1, b2, eps = _check_betas(b1, b2, eps)

    def update(grads: Any, state: AdamState, params: Any = None) -> tuple[Any, AdamState]:
        return _adam_direction(grads, state, b1, b2, eps)

    return Optimizer(_adam_init, update)


# --------------------------------------------------------------------------- optimizers


def sgd(lr: LearningRate, *, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> Optimizer:
    """SGD with optional heavy-ball/Nesterov momentum and L2 weight decay (as ``torch.optim.SGD``).

    ``d = g + wd * p``; with momentum ``b = mu * b + d`` (``b = d`` at the first step), and the
    update is ``-lr(t) * (d + mu * b)`` for Nesterov, else ``-lr(t) * b``, where ``t`` is the
    number of updates done before this one (``lr`` a float, a 0-d tensor or a schedule).

    Example:
      >>> import torch, fundp
      >>> opt = fundp.optim.sgd(fundp.optim.exponential_decay(1.0, transition_steps=1, decay_rate=0.5))
      >>> params = {"w": torch.zeros(1)}
      >>> state = opt.init(params)
      >>> for _ in range(3):
      ...     updates, state = opt.update({"w": torch.ones(1)}, state, params)
      ...     params = fundp.optim.apply_updates(params, updates)
      >>> params["w"]  # -(1 + 0.5 + 0.25)
      tensor([-1.7500])
    """
    lr_at = _as_lr(lr)
    momentum = check_nonnegative("momentum", momentum)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True needs momentum > 0")

    def init(params: Any) -> SgdState:
        return SgdState(_zero_count(params), _zeros_like(params) if momentum else None)

    def update(grads: Any, state: SgdState, params: Any = None) -> tuple[Any, SgdState]:
        if weight_decay:
            _check_params_given(params, "weight_decay")
            grads = optree.tree_map(lambda g, p: g + weight_decay * p.detach(), grads, params)
        step = lr_at(state.count)
        if not momentum:
            return optree.tree_map(lambda g: -step * g, grads), SgdState(state.count + 1, None)
        buffers = optree.tree_map(lambda b, g: momentum * b + g, state.momentum, grads)
        direction = optree.tree_map(lambda b, g: g + momentum * b, buffers, grads) if nesterov else buffers
        return optree.tree_map(lambda d: -step * d, direction), SgdState(state.count + 1, buffers)

    return Optimizer(init, update)


def _adam(lr: LearningRate, b1: float, b2: float, eps: float, weight_decay: float, decoupled: bool) -> Optimizer:
    lr_at = _as_lr(lr)
    b1, b2, eps = _check_betas(b1, b2, eps)
    weight_decay = check_nonnegative("weight_decay", weight_decay)

    def update(grads: Any, state: AdamState, params: Any = None) -> tuple[Any, AdamState]:
        if weight_decay:
            _check_params_given(params, "weight_decay")
        if weight_decay and not decoupled:
            grads = optree.tree_map(lambda g, p: g + weight_decay * p.detach(), grads, params)
        step = lr_at(state.count)
        direction, new_state = _adam_direction(grads, state, b1, b2, eps)
        updates = optree.tree_map(lambda d: -step * d, direction)
        if weight_decay and decoupled:
            updates = optree.tree_map(lambda u, p: u - step * weight_decay * p.detach(), updates, params)
        return updates, new_state

    return Optimizer(_adam_init, update)


def adam(lr: LearningRate, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0) -> Optimizer:
    """Adam (Kingma & Ba) with bias correction, as ``torch.optim.Adam`` (L2 ``weight_decay``).

    ``lr`` is a float, a 0-d tensor or a schedule of the update count (0 at the first update).

    Example:
      >>> import torch, fundp
      >>> opt = fundp.optim.adam(0.1)
      >>> params = {"w": torch.zeros(1)}
      >>> updates, state = opt.update({"w": torch.full((1,), 5.0)}, opt.init(params), params)
      >>> updates["w"], int(state.count)  # the first Adam step is -lr * sign(g)
      (tensor([-0.1000]), 1)
    """
    return _adam(lr, b1, b2, eps, weight_decay, decoupled=False)


def adamw(lr: LearningRate, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01) -> Optimizer:
    """AdamW (Loshchilov & Hutter): Adam with decoupled weight decay ``-lr(t) * wd * p``.

    Example:
      >>> import torch, fundp
      >>> opt = fundp.optim.adamw(0.1, weight_decay=0.5)
      >>> params = {"w": torch.ones(1)}
      >>> opt.update({"w": torch.ones(1)}, opt.init(params), params)[0]["w"]  # -0.1 - 0.1 * 0.5
      tensor([-0.1500])
    """
    return _adam(lr, b1, b2, eps, weight_decay, decoupled=True)


# --------------------------------------------------------------------------- torch.optim bridge


def _path_name(path: tuple) -> str:
    return "".join(f"[{p!r}]" for p in path)


@torch.no_grad()
def set_grads(module_or_params: torch.nn.Module | Any, grads: Any) -> None:
    """Writes fundp's (already private) gradients into ``.grad`` so any ``torch.optim`` optimizer can step.

    ``module_or_params`` is the model (``grads`` a dict keyed by ``named_parameters`` names) or a
    pytree of the parameter tensors themselves — the very tensors the ``torch.optim`` optimizer
    holds — with the same structure as ``grads``.  Leaves that an optimizer cannot hold are
    refused, so the gradients never land on copies: a detached tensor (``p.detach()``, as in a
    functional ``params`` dict) or any tensor that does not require grad raises ``TypeError``.
    Then call ``optimizer.step()``.

    Example:
      >>> import torch, fundp
      >>> model = torch.nn.Linear(2, 1)
      >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
      >>> grads = {name: torch.ones_like(p) for name, p in model.named_parameters()}
      >>> fundp.optim.set_grads(model, grads); opt.step()
      >>> detached = {name: p.detach() for name, p in model.named_parameters()}
      >>> fundp.optim.set_grads(detached, grads)
      Traceback (most recent call last):
      ...
      TypeError: params['bias'] is not a parameter an optimizer can hold ...
    """
    if isinstance(module_or_params, torch.nn.Module):
        if not isinstance(grads, Mapping):
            raise TypeError(f"with a module, grads must be a dict keyed by parameter names, got {type(grads).__name__}")
        named = dict(module_or_params.named_parameters())
        unknown = sorted(set(grads) - set(named))
        if unknown:
            raise KeyError(f"grads has names that are not parameters of the module: {unknown}")
        pairs = [(f"[{name!r}]", named[name], grad) for name, grad in grads.items()]
    else:
        paths, leaves, spec = optree.tree_flatten_with_path(module_or_params)
        grad_leaves, grad_spec = optree.tree_flatten(grads)
        if grad_spec != spec:
            raise ValueError(f"grads must have the structure of params: {grad_spec} vs {spec}")
        pairs = [(_path_name(path), leaf, grad) for path, leaf, grad in zip(paths, leaves, grad_leaves)]
        for where, leaf, _ in pairs:
            if not isinstance(leaf, torch.Tensor) or not leaf.is_leaf or not leaf.requires_grad:
                what = type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else (
                    "a detached tensor (requires_grad=False)" if not leaf.requires_grad else "a non-leaf tensor")
                raise TypeError(
                    f"params{where} is not a parameter an optimizer can hold ({what}): its .grad would be "
                    "written to a copy the optimizer never reads. Pass the module instead: "
                    "fundp.optim.set_grads(model, grads)"
                )
    for where, param, grad in pairs:
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"grads{where} must be a tensor, got {type(grad).__name__}")
        if param.shape != grad.shape:
            raise ValueError(f"grads{where} has shape {tuple(grad.shape)} for a parameter of shape {tuple(param.shape)}")
        param.grad = grad.detach().to(dtype=param.dtype, device=param.device).clone()
