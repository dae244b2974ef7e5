"""Small functional optimizers as ``(init, update)`` pairs, optax-style, and a bridge to ``torch.optim``.

``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)`` are pure: the
state is a NamedTuple of tensors/pytrees passed in and returned; nothing is mutated.  Apply the
updates with ``apply_updates(params, updates)`` (``params + updates``).  Step counts are tensors,
so a compiled training step does not recompile as they grow.

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

from typing import Any, Callable, NamedTuple

import optree
import torch

from fundp._validate import check_number

__all__ = [
    "Optimizer",
    "sgd",
    "adam",
    "adamw",
    "apply_updates",
    "set_grads",
]


class Optimizer(NamedTuple):
    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]


class SgdState(NamedTuple):
    momentum: Any  # pytree like params, or None without momentum


class AdamState(NamedTuple):
    count: torch.Tensor
    mu: Any
    nu: Any


def _zeros_like(tree: Any) -> Any:
    return optree.tree_map(lambda leaf: torch.zeros_like(leaf.detach()), tree)


def _check_lr(lr: float) -> float:
    lr = check_number("lr", lr, positive=True)
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return lr


def apply_updates(params: Any, updates: Any) -> Any:
    """Returns ``params + updates`` leafwise (a new pytree; params are not modified)."""
    return optree.tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


def sgd(lr: float, *, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> Optimizer:
    """SGD with optional heavy-ball/Nesterov momentum and L2 weight decay (as ``torch.optim.SGD``).

    ``d = g + wd * p``; with momentum ``b = mu * b + d`` (``b = d`` at the first step), and the
    update is ``-lr * (d + mu * b)`` for Nesterov, else ``-lr * b``.
    """
    lr = _check_lr(lr)
    momentum = check_number("momentum", momentum, positive=True)
    weight_decay = check_number("weight_decay", weight_decay, positive=True)
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True needs momentum > 0")

    def init(params: Any) -> SgdState:
        return SgdState(_zeros_like(params) if momentum else None)

    def update(grads: Any, state: SgdState, params: Any = None) -> tuple[Any, SgdState]:
        if weight_decay:
            if params is None:
                raise ValueError("params are required with weight_decay")
            grads = optree.tree_map(lambda g, p: g + weight_decay * p.detach(), grads, params)
        if not momentum:
            return optree.tree_map(lambda g: -lr * g, grads), state
        buffers = optree.tree_map(lambda b, g: momentum * b + g, state.momentum, grads)
        direction = optree.tree_map(lambda b, g: g + momentum * b, buffers, grads) if nesterov else buffers
        return optree.tree_map(lambda d: -lr * d, direction), SgdState(buffers)

    return Optimizer(init, update)


def _adam(lr: float, b1: float, b2: float, eps: float, weight_decay: float, decoupled: bool) -> Optimizer:
    lr = _check_lr(lr)
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0 <= check_number(name, beta) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    eps = check_number("eps", eps, positive=True)
    weight_decay = check_number("weight_decay", weight_decay, positive=True)

    def init(params: Any) -> AdamState:
        first = optree.tree_leaves(params)[0]
        return AdamState(torch.zeros((), dtype=torch.int64, device=first.device), _zeros_like(params), _zeros_like(params))

    def update(grads: Any, state: AdamState, params: Any = None) -> tuple[Any, AdamState]:
        if weight_decay and params is None:
            raise ValueError("params are required with weight_decay")
        if weight_decay and not decoupled:
            grads = optree.tree_map(lambda g, p: g + weight_decay * p.detach(), grads, params)
        count = state.count + 1
        mu = optree.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = optree.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        step = count.to(torch.float64)
        correction1 = 1 - b1**step
        correction2 = 1 - b2**step

        def direction(m, v):
            m_hat = m / correction1.to(m.dtype)
            v_hat = v / correction2.to(v.dtype)
            return m_hat / (torch.sqrt(v_hat) + eps)

        updates = optree.tree_map(lambda m, v: -lr * direction(m, v), mu, nu)
        if weight_decay and decoupled:
            updates = optree.tree_map(lambda u, p: u - lr * weight_decay * p.detach(), updates, params)
        return updates, AdamState(count, mu, nu)

    return Optimizer(init, update)


def adam(lr: float, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0) -> Optimizer:
    """Adam (Kingma & Ba) with bias correction, as ``torch.optim.Adam`` (L2 ``weight_decay``)."""
    return _adam(lr, b1, b2, eps, weight_decay, decoupled=False)


def adamw(lr: float, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01) -> Optimizer:
    """AdamW (Loshchilov & Hutter): Adam with decoupled weight decay ``-lr * wd * p``."""
    return _adam(lr, b1, b2, eps, weight_decay, decoupled=True)


@torch.no_grad()
def set_grads(module_or_params: torch.nn.Module | Any, grads: Any) -> None:
    """Writes fundp's (already private) gradients into ``.grad`` so any ``torch.optim`` optimizer can step.

    ``module_or_params`` is the model (``grads`` keyed by ``named_parameters`` names) or a pytree of
    parameter tensors with the same structure as ``grads``.  Then call ``optimizer.step()``.

    Example:
      >>> import torch, fundp
      >>> model = torch.nn.Linear(2, 1)
      >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
      >>> grads = {name: torch.ones_like(p) for name, p in model.named_parameters()}
      >>> fundp.optim.set_grads(model, grads); opt.step()
    """
    if isinstance(module_or_params, torch.nn.Module):
        named = dict(module_or_params.named_parameters())
        unknown = sorted(set(grads) - set(named))
        if unknown:
            raise KeyError(f"grads has names that are not parameters of the module: {unknown}")
        pairs = [(named[name], grad) for name, grad in grads.items()]
    else:
        pairs = list(zip(optree.tree_leaves(module_or_params), optree.tree_leaves(grads)))
    for param, grad in pairs:
        if param.shape != grad.shape:
            raise ValueError(f"gradient of shape {tuple(grad.shape)} for a parameter of shape {tuple(param.shape)}")
        param.grad = grad.detach().to(dtype=param.dtype, device=param.device).clone()
