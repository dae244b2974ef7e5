"""Per-example-norm engines for ``dp_step(grad_method=...)``; see :mod:`fundp.engines.base`."""

from __future__ import annotations

from typing import Callable

from fundp.engines.base import EngineOutput
from fundp.engines.vmap import make_vmap_engine

GRAD_METHODS = ("vmap", "ghost", "auto")


def make_engine(
    grad_method: str, loss_fn: Callable, *, has_aux: bool = False, randomness: str = "error", verify: bool | str = "first",
    check_batch_consistency: bool = True,
) -> Callable:
    """Returns ``engine(params, batch, key) -> EngineOutput`` for ``grad_method``.

    ``verify`` (``"first"``, ``"always"`` or ``False``) is how often the ghost path is checked
    against single-example gradients (see :mod:`fundp.engines.ghost`); ``"vmap"`` ignores it, and
    ``check_batch_consistency`` (the per-call check of :mod:`fundp.engines.ghost._consistency`).
    """
    if grad_method not in GRAD_METHODS:
        raise ValueError(f"grad_method must be one of {GRAD_METHODS}, got {grad_method!r}")
    if grad_method in ("ghost", "auto"):
        from fundp.engines.ghost import make_ghost_engine

        return make_ghost_engine(loss_fn, has_aux=has_aux, randomness=randomness, fallback=grad_method == "auto",
                                 verify=verify, check_batch_consistency=check_batch_consistency)
    return make_vmap_engine(loss_fn, has_aux=has_aux, randomness=randomness)


__all__ = ["EngineOutput", "GRAD_METHODS", "make_engine", "make_vmap_engine"]
