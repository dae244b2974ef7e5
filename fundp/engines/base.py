"""The contract between ``dp_step`` and a per-example-norm engine.

An engine turns ``(params, batch, key)`` into everything clipping needs, in two phases, so
that *all* per-example norms are known before any clipped sum is formed:

1. ``sq_norms``: a pytree like ``params`` of ``[B]`` squared per-example gradient norms
   ``||g_il||^2`` for every leaf ``l`` (accumulated in >= float32; NaN/Inf allowed — the caller
   drops such examples);
2. ``weighted_sum(factors)``: given a pytree like ``params`` of ``[B]`` clip factors ``c_il``,
   returns ``sum_i c_il * g_il`` per leaf.  A row with ``c_il == 0`` must contribute exactly
   nothing, even if its activations or gradients are NaN (use ``torch.where``, not a product).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch


class EngineOutput(NamedTuple):
    sq_norms: Any
    """Pytree like params of ``[B]`` squared per-example gradient norms."""
    losses: torch.Tensor
    """``[B]`` per-example losses (detached)."""
    aux: Any
    """Auxiliary output of ``loss_fn`` (``None`` without ``has_aux``)."""
    weighted_sum: Callable[[Any], Any]
    """``factors -> sum_i c_il g_il``, a pytree like params."""


Engine = Callable[[Any, Any, "torch.Tensor | None"], EngineOutput]
"""``engine(params, batch, key) -> EngineOutput``, built by ``make_engine(loss_fn, ...)``."""
