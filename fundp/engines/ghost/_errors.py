"""The ghost engine's refusal error, in a module of its own: the tracer and the rules raise it and
the engine imports them (no import cycle)."""

from __future__ import annotations

__all__ = ["GhostUnsupportedError"]


class GhostUnsupportedError(ValueError):
    """A parameter cannot be handled by the ghost engine (``grad_method="ghost"``).

    Example:
      >>> import torch
      >>> from fundp.engines.ghost import GhostUnsupportedError, make_ghost_engine
      >>> loss_fn = lambda p, b: torch.nn.functional.linear(b[torch.tensor([1, 0])], p["w"]).sum(dim=1)
      >>> try:  # rows reordered by an index the tracer cannot follow
      ...     make_ghost_engine(loss_fn)({"w": torch.ones(1, 2)}, torch.ones(2, 2), None)
      ... except GhostUnsupportedError as error:
      ...     print(str(error)[:46])
      grad_method='ghost' cannot handle params['w']:
    """
