"""The per-call batch-consistency check: the batch's losses must not depend on which other examples
are in it, nor on their order.

The ghost engine's tracer proves the row layout of every op it sees, and the verification pass
(:mod:`._verify`) checks the result on the first call per input signature.  Code the tracer cannot
see (a ``torch.jit`` function, an extension op) can still couple examples on a *later* call, e.g.
a batch statistic that is inactive on the first batch.  Any such coupling that changes the
forward changes the losses of a different batch composition, so on every call
(``check_batch_consistency=True``):

* draw a random quarter of the rows (``ceil(B / 4)``, at least one), in random order, from the
  step's model key (``rows = argsort(hash(key, arange(B)))[:ceil(B / 4)]``,
  :func:`consistency_rows`: tensor ops only, a new subset each call, no recompilation);
* run ``loss_fn`` once more on those rows alone (forward only, ``torch.no_grad``) and compare with
  the full batch's losses of the same rows: example ``i`` fails when

  ``|L_i(batch) - L_i(subset)| > tol * (|L_i(batch)| + |L_i(subset)| + mean_j |L_j(batch)|)``

  (non-finite losses must be identical, NaN matching NaN).

A batch statistic (a mean, a max, a quantile of the batch) differs between a batch and a random
part of it, and an order-dependent op (a sort, a scan, a rank) sees another order, so a coupling
that moves a loss by more than the tolerance is caught on the call where it acts.  Why a
quarter: the check costs a forward of the subset (``k / B`` of the batch's forward), and a
smaller subset is *more* likely to differ from the batch, not less: a statistic that is the same
for the subset by chance (the batch maximum, when its row was drawn) escapes with probability
``k / B`` = 1/4 per call (1/2 with half the batch); a coupling of one pair of rows ``(i, j)`` is
seen when ``i`` is drawn and ``j`` is not, probability ``(k/B)(1 - k/B)`` = 3/16 (1/4 with a half).

Tolerances (:func:`fundp.engines.ghost._verify.tolerance`): ``1e-7`` when the parameters are
float64, ``1e-3`` in float32, ``5e-2`` with 16-bit parameters or autocast.  A batch of a quarter
of the size may take other kernels (other blocking of a reduction), so rows can differ by rounding: a
few units in the last place of each reduction, amplified by the network's conditioning; the
relative tolerances are ``~10^8`` (float64) and ``~10^4`` (float32) units of round-off, and the
scale includes the batch's mean absolute loss so that a loss near zero by cancellation
(a fitted regression) is compared against the batch's loss scale, not against itself.

Dropout (``randomness="different"``): the subset runs with its rows' indices in the step's batch
(:mod:`._keyed_dropout`), so each example draws the same masks as in the batch and the check runs
as without dropout.  A run with a random op not keyed per example (``torch.rand``, a dropout of a
sequence-first tensor: the engine's traced run or the subset's says so) is not compared.

What it cannot see: a coupling that changes only the backward (a custom ``autograd.Function``
whose backward mixes rows while its forward does not), and a run with random draws not keyed per
example (above), where what remains is the tracer (every call) and the first call's whole-batch
verification (same draws): a coupling hidden from the tracer that acts only on a later batch is
not caught; ``grad_method="vmap"`` or ``verify="always"`` covers it.

Reporting.  Eagerly the check reads one boolean on the host (free on the CPU, one device
synchronisation per call on an accelerator) and raises :class:`BatchConsistencyError` naming the
rows and their losses.  Inside a ``torch.compile`` graph it stays tensor-only:
``torch._assert_async`` raises a ``RuntimeError`` with the same advice (on CUDA a device-side
assert, which ends the process's CUDA context; no synchronisation while the check passes).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import optree
import torch

from fundp.engines.ghost._index import is_compiling
from fundp.engines.ghost._layout import ExamplesInteractError
from fundp.engines.ghost._verify import _take

__all__ = ["BatchConsistencyError", "check_batch_consistency", "consistency_rows", "inconsistent_rows", "subset_size"]

DOMAIN = 0x43484B31  # "CHK1": mixed into the key's words for the check's subsets
_MASK32 = 0xFFFFFFFF
_FALLBACK_WORDS = (20261206, 0x5EED)  # engines called without a key (randomness="error" allows it)

ADVICE = ("examples of a batch interact inside loss_fn through code the ghost engine's tracer cannot see "
          "(torch.jit, an extension op, a batch statistic computed out of its sight), so per-example "
          "gradients and DP-SGD's guarantee do not apply. Remove the coupling (compute it per example), or "
          "use grad_method='vmap' (each example alone); check_batch_consistency=False turns this check off")


class BatchConsistencyError(ExamplesInteractError):
    """A loss of the batch differs from the same example's loss in a random quarter of the batch.

    Raised by the per-call check of ``dp_step(..., check_batch_consistency=True)``; an
    :class:`~fundp.engines.ghost.ExamplesInteractError` (a ``ValueError``).

    Example:
      >>> from fundp.engines.ghost import BatchConsistencyError, ExamplesInteractError
      >>> issubclass(BatchConsistencyError, ExamplesInteractError)
      True
    """


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit words (int64 holding ``[0, 2**32)``): two rounds of
    ``x ^= x >> 16; x *= 0x45d9f3b`` (an odd multiplier: products stay below ``2**59``)."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def subset_size(size: int) -> int:
    """``ceil(size / 4)``: how many rows the check reruns (see the module docstring)."""
    return (size + 3) // 4


def consistency_rows(key: torch.Tensor | None, size: int, device: torch.device) -> torch.Tensor:
    """``LongTensor[ceil(size / 4)]``: a random quarter of ``range(size)`` in random order, drawn
    from ``key``.

    The rows are sorted by a keyed hash of their index, ``mix(mix(i + k0 ^ DOMAIN) ^ k1)`` with
    ``(k0, k1)`` the key's words: a bijection of 32-bit words, so no two rows tie, a new subset and
    order for each key, and about twenty integer ops (the threefry draw of :mod:`fundp.random`
    costs ~20x more op launches eagerly; the subset needs to be unpredictable to the model, not
    cryptographic).  Tensor ops only: no host read, no recompilation under ``torch.compile``.

    Example:
      >>> import torch, fundp
      >>> rows = consistency_rows(fundp.random.key(0), 10, torch.device("cpu"))
      >>> rows.shape, rows.unique().numel()
      (torch.Size([3]), 3)
    """
    index = torch.arange(size, dtype=torch.int64, device=device)
    if key is None:
        k0, k1 = torch.tensor(_FALLBACK_WORDS, dtype=torch.int64, device=device).unbind()
    else:
        k0, k1 = key.to(device=device, dtype=torch.int64).unbind()
    scores = _mix32(_mix32(((index + k0) & _MASK32) ^ DOMAIN) ^ k1)
    return scores.argsort()[: subset_size(size)]


def inconsistent_rows(full: torch.Tensor, rows: torch.Tensor, part: torch.Tensor, tol: float) -> torch.Tensor:
    """``BoolTensor[h]``: which of ``rows`` have a loss in the subset (``part[k]``) that differs from
    the batch's (``full[rows[k]]``) by more than the tolerance (see the module docstring).

    Example:
      >>> import torch
      >>> full = torch.tensor([1.0, 2.0, float("nan"), 4.0])
      >>> inconsistent_rows(full, torch.tensor([3, 2, 0]), torch.tensor([4.0, float("nan"), 1.5]), 1e-3)
      tensor([False, False,  True])
    """
    wide = torch.float64 if full.dtype == torch.float64 else torch.float32
    full_wide, part_wide = full.to(wide), part.to(wide)
    batch = full_wide.index_select(0, rows)
    finite = torch.isfinite(full_wide)
    scale = torch.where(finite, full_wide.abs(), torch.zeros_like(full_wide)).sum() / finite.sum().clamp(min=1)
    both = torch.isfinite(batch) & torch.isfinite(part_wide)
    bound = tol * (batch.abs() + part_wide.abs() + scale)
    close = both & ((batch - part_wide).abs() <= bound)
    same = (batch == part_wide) | (torch.isnan(batch) & torch.isnan(part_wide))
    return ~(close | same)


def check_batch_consistency(
    loss_fn: Callable, params: Any, batch: Any, key: torch.Tensor | None, losses: torch.Tensor, has_aux: bool,
    tol: float, randomness: str = "error", rng: Callable | None = None,
) -> None:
    """Runs ``loss_fn`` on a random quarter of ``batch`` (forward only) and raises when a row's loss
    differs from ``losses`` (``[B]``, the full batch's); see the module docstring.

    ``rng(key, part, randomness, rows)``: the context of the run (the engine's
    :func:`~._keyed_dropout.keyed_randomness`: each row's dropout masks those of the batch); a run
    whose draws were not keyed per example (``.unkeyed``) is not compared."""
    size = losses.shape[0]
    if size < 2:
        return
    rows = consistency_rows(key, size, losses.device)
    detached = optree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, params)
    part_batch = _take(batch, rows)
    keyed = None
    try:
        with torch.no_grad(), contextlib.nullcontext() if rng is None else rng(key, part_batch, randomness, rows) as keyed:
            out = loss_fn(detached, part_batch)
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        raise type(error)(
            f"loss_fn failed on {rows.numel()} of the batch's {size} rows, run by the per-call batch-consistency "
            f"check ({error}). loss_fn must accept a batch of any size (no batch size written into it); "
            "or pass check_batch_consistency=False") from error
    part = out[0] if has_aux else out
    if not isinstance(part, torch.Tensor) or part.shape != rows.shape:
        shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
        raise ValueError(
            f"loss_fn returned {shape} on {rows.numel()} of the batch's {size} rows, run by the per-call batch-consistency "
            f"check; it must return [{rows.numel()}] per-example losses: a batch of any size (no batch size written "
            "into it); or pass check_batch_consistency=False")
    if keyed is not None and keyed.unkeyed is not None:
        return  # a random op the subset drew other values for: nothing to compare
    bad = inconsistent_rows(losses.detach(), rows, part.detach(), tol)
    if is_compiling():
        torch._assert_async(~bad.any(), "BatchConsistencyError: a loss of the batch differs from the same "
                            "example's loss in a random quarter of the batch: " + ADVICE)
        return
    if bool(bad.any()):
        which = rows[bad].tolist()
        first = which[0]
        position = int(bad.nonzero()[0])
        raise BatchConsistencyError(
            f"example {first}'s loss is {float(losses[first]):.9g} in the batch of {size} but "
            f"{float(part[position]):.9g} in a random quarter of it ({len(which)} of {rows.numel()} rows differ, "
            f"tolerance {tol:g}): {ADVICE}")
