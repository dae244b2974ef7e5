"""The contract between ``dp_step`` and a per-example-norm engine.

An engine turns ``(params, batch, key)`` into everything clipping needs, in two phases, so
that *all* per-example norms are known before any clipped sum is formed:

1. ``sq_norms``: a pytree like ``params`` whose leaf for parameter ``l`` is either

   * a :class:`fundp.clipping.ScaledSqNorm` ``(scale, scaled)`` of ``[B]`` tensors with
     ``||g_il||^2 = scale^2 * scaled``, ``scale = max_j |g_ilj|`` (the preferred form: it cannot
     overflow, so a huge but finite gradient is clipped exactly instead of dropped), or
   * a plain ``[B]`` tensor of squared norms ``||g_il||^2`` (accumulated in >= float32).  **It may
     overflow**: a finite gradient whose squared norm exceeds the dtype's range (``|g| ~ 1e20``
     in float32) becomes Inf and the example is then *dropped* (factor 0) instead of clipped.

   NaN/Inf are allowed in either form — the caller drops such examples;
2. ``weighted_sum(factors)``: given a pytree like ``params`` of ``[B]`` clip factors ``c_il``,
   returns ``sum_i c_il * g_il`` per leaf.  A row with ``c_il == 0`` must contribute exactly
   nothing, even if its activations or gradients are NaN (use ``torch.where``, not a product).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch


class EngineOutput(NamedTuple):
    sq_norms: Any
    """Pytree like params of ``ScaledSqNorm`` (preferred) or ``[B]`` squared per-example norms."""
    losses: torch.Tensor
    """``[B]`` per-example losses (detached)."""
    aux: Any
    """Per-example auxiliary output of ``loss_fn``, leaves ``[B, ...]`` (``None`` without ``has_aux``)."""
    weighted_sum: Callable[[Any], Any]
    """``factors -> sum_i c_il g_il``, a pytree like params."""


Engine = Callable[[Any, Any, "torch.Tensor | None"], EngineOutput]
"""``engine(params, batch, key) -> EngineOutput``, built by ``make_engine(loss_fn, ...)``."""
