"""``fundp.compile(step)``: a thin convenience over ``torch.compile``.

Plain ``torch.compile(step)`` compiles fundp's steps, the default ghost engine included, to one
graph on every call, the first included: the engine differentiates with ``torch.func.vjp``, which
dynamo traces with no option set, and its first-call verification (``verify="first"``) is one
opaque op of that graph (``fundp::ghost_verify``), which runs the verified eager engine when the
graph first runs for a signature and returns at once afterwards.  fundp touches no dynamo option.

:func:`compile` runs each signature's first call eagerly instead (it verifies) and every later call
through ``torch.compile``.  It is kept as a convenience; ``torch.compile(step)`` needs it for
nothing (``fullgraph=True`` works with either).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import optree
import torch

__all__ = ["compile", "dynamo_options"]


def dynamo_options() -> Any:
    """Kept for compatibility: a context that sets nothing (fundp's steps need no dynamo option).

    Example:
      >>> import torch
      >>> from fundp.compile import dynamo_options
      >>> with dynamo_options():
      ...     torch.ones(2).sum()
      tensor(2.)
    """
    return contextlib.nullcontext()


def compile(step: Callable, **compile_kwargs: Any) -> Callable:  # noqa: A001  (mirrors torch.compile)
    """Returns ``torch.compile(step, **compile_kwargs)`` whose first call of each signature runs eagerly.

    Example:
      >>> import torch, fundp
      >>> loss_fn = lambda p, b: (b @ p["w"]) ** 2
      >>> step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=2)
      >>> from fundp.compile import compile  # the same function as fundp.compile
      >>> fast = compile(step, backend="eager")
      >>> fast({"w": torch.ones(2)}, torch.eye(2), fundp.random.key(0)).grads["w"]
      tensor([0.5000, 0.5000])
      >>> torch._dynamo.config.trace_autograd_ops  # unchanged outside the call
      False
    """
    compiled = torch.compile(step, **compile_kwargs)
    seen: set = set()

    @functools.wraps(step)
    def run(*args: Any, **kwargs: Any) -> Any:
        signature = _signature(args, kwargs)
        if signature not in seen:
            # Eagerly: the engine checks and verifies this signature.  It counts as seen only once
            # that succeeded: a call that raised (examples interact, verification failed) must not
            # let the next call with the same shapes run unchecked in the graph.
            out = step(*args, **kwargs)
            seen.add(signature)
            return out
        return compiled(*args, **kwargs)

    return run


def _signature(args: tuple, kwargs: dict) -> tuple:
    leaves: list[Any] = optree.tree_leaves((args, kwargs), none_is_leaf=True)  # type: ignore[arg-type]
    return tuple((tuple(leaf.shape), leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor) else type(leaf)
                 for leaf in leaves)
