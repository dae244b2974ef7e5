"""``fundp.compile(step)``: ``torch.compile`` with the ghost engine's backward inside the graph.

The ghost engine takes one ``torch.autograd.grad`` inside the step.  Dynamo traces that call only
with ``torch._dynamo.config.trace_autograd_ops = True``; otherwise it breaks the graph there (still
correct, two graphs).  fundp never changes that global option: :func:`compile` switches it on only
while the compiled step runs (a ``config.patch`` around each call), so other compiled code in the
process is unaffected.

The ghost engine's verification pass (``dp_step(verify="first")``) runs eagerly on the first call
of each input signature.  :func:`compile` therefore runs that first call of each signature eagerly
(it verifies), and every later call through the compiled graph, which then has no verification in
it: ``fundp.compile(step, fullgraph=True)`` works with the default engine.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import optree
import torch

__all__ = ["compile", "dynamo_options"]


def dynamo_options() -> Any:
    """The context in which fundp's steps trace to one graph (a no-op where the option does not exist).

    Example:
      >>> import torch
      >>> from fundp.compile import dynamo_options
      >>> with dynamo_options():
      ...     torch.ones(2).sum()
      tensor(2.)
    """
    config = getattr(getattr(torch, "_dynamo", None), "config", None)
    if config is not None and hasattr(config, "trace_autograd_ops"):
        return config.patch(trace_autograd_ops=True)
    return contextlib.nullcontext()


def compile(step: Callable, **compile_kwargs: Any) -> Callable:  # noqa: A001  (mirrors torch.compile)
    """Returns ``torch.compile(step, **compile_kwargs)`` run under :func:`dynamo_options`.

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
        with dynamo_options():
            return compiled(*args, **kwargs)

    return run


def _signature(args: tuple, kwargs: dict) -> tuple:
    leaves: list[Any] = optree.tree_leaves((args, kwargs), none_is_leaf=True)  # type: ignore[arg-type]
    return tuple((tuple(leaf.shape), leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor) else type(leaf)
                 for leaf in leaves)
