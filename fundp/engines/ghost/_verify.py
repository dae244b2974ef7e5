"""The verification pass: the ghost path checked against independent gradients, on real data.

``dp_step(..., verify="first")`` (the default) runs it on the first call for each new input
signature (batch shapes and dtypes, parameter shapes); ``"always"`` on every call; ``False`` never.
It runs eagerly (outside any ``torch.compile`` graph) and checks two things:

1. **The whole decomposition, for every example at once.**  With random weights
   ``w_i ~ U[1/2, 3/2]``, the engine's book-keeping sum ``sum_i w_i g_i`` (its ``weighted_sum`` —
   the very code that forms the clipped sum) must equal the true gradient of
   ``sum_i w_i L_i`` computed by plain autograd through the parameters.  A parameter use the
   tracer did not attribute (``torch.jit``, a custom ``autograd.Function``, an extension), rows
   attributed to the wrong example (a reordering, a layout misread), or examples that interact
   make the two differ for almost every ``w`` (the difference is a non-zero linear function of
   ``w``), so they are caught with probability one.
2. **Norms and losses of single examples.**  For two real examples, the engine's per-parameter
   squared norms and the batched forward's losses must equal those of the example run alone
   (micro-batching): this checks the norm formulas themselves and catches interaction that
   changes the forward (batch statistics).

Cost: one forward and backward of the batch plus two of a single example — about one
non-private step, once per input signature.  Tolerances (relative to the global gradient norm):
``1e-7`` in float64, ``1e-3`` in float32, ``5e-2`` when the parameters are 16-bit or autocast is on.
With ``randomness="different"`` (dropout) only check 1 runs, with the same keyed draws; rows left
out (masked, non-finite) are replaced by a copy of a kept row, so that the batch keeps its shape and
its draws.  A signature is recorded as verified only when something was checked.

When ``loss_fn`` reads a Python value from batch data (``int(lengths.max())``, ``.item()``,
``bool(mask.any())``: the tracer's ``data_dependent``), every call is verified, and check 2 also
compares the batched losses of up to 16 random examples alone and of two random halves of the batch.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import optree
import torch

from fundp.engines.ghost._layout import ExamplesInteractError

__all__ = ["GhostVerificationError", "verify_engine", "tolerance"]


class GhostVerificationError(RuntimeError):
    """The ghost path's per-example gradients disagree with single-example gradients.

    Raised by the engine's ``verify`` check (see the module docstring); a ``RuntimeError``.

    Example:
      >>> from fundp.engines.ghost import GhostVerificationError
      >>> try:
      ...     raise GhostVerificationError("params['w']: ghost and single-example gradients differ")
      ... except RuntimeError as error:
      ...     print(type(error).__name__)
      GhostVerificationError
    """


def tolerance(leaves: list) -> float:
    dtypes = {leaf.dtype for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()}
    autocast = any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda") if _has_autocast(device))
    if autocast or dtypes & {torch.float16, torch.bfloat16}:
        return 5e-2
    if dtypes == {torch.float64}:
        return 1e-7
    return 1e-3


def _has_autocast(device: str) -> bool:
    try:
        torch.is_autocast_enabled(device)
        return True
    except (TypeError, RuntimeError):
        return False


def _plain(sq: Any) -> torch.Tensor:
    """A ``[B]`` float64 squared norm from a plain tensor or a ``ScaledSqNorm``."""
    if hasattr(sq, "scale"):
        return sq.scale.double().square() * sq.scaled.double()
    return sq.double()


def _take(batch: Any, rows: torch.Tensor) -> Any:
    return optree.tree_map(lambda leaf: leaf.index_select(0, rows.to(leaf.device)), batch)


def _flat_norm(tensors: list) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors if t is not None))


def verify_engine(
    loss_fn: Callable,
    leaves: list,
    treespec: Any,
    batch: Any,
    key: Any,
    sq_norms: list,
    losses: torch.Tensor,
    weighted_sum: Callable[[list], list],
    names: list,
    has_aux: bool,
    randomness: str,
    rng: Callable,
    thorough: bool = False,
    seed: int = 0,
) -> bool:
    """Raises :class:`GhostVerificationError` (or :class:`ExamplesInteractError`) when the engine's
    per-example gradients are not those of single examples.

    Returns whether anything was checked (``False`` only when no example has a finite loss and
    gradient): a signature is recorded as verified only then.  ``thorough`` (``loss_fn`` read a
    Python value from the batch, so each call may compute differently): the losses of up to 16
    examples run alone (drawn with ``seed``) and of the two halves of the batch must equal the
    batched losses as well.
    """
    size = losses.shape[0]
    total = torch.zeros(size, dtype=torch.float64, device=losses.device)
    sq_norms = [_plain(sq) for sq in sq_norms]
    for sq in sq_norms:
        total = total + sq
    keep = torch.isfinite(total) & torch.isfinite(losses.double())
    if not bool(keep.any()):
        return False
    tol = tolerance(leaves)
    generator = torch.Generator().manual_seed(20261129)
    weights_cpu = 0.5 + torch.rand(size, generator=generator, dtype=torch.float64)
    weights = torch.where(keep, weights_cpu.to(losses.device), torch.zeros((), dtype=torch.float64, device=losses.device))
    proxies = [leaf.detach().requires_grad_() if leaf.is_floating_point() else leaf for leaf in leaves]
    differentiable = [i for i, p in enumerate(proxies) if isinstance(p, torch.Tensor) and p.requires_grad]
    rows = keep.nonzero().flatten()
    all_rows = bool(keep.all())
    if randomness != "error" and not all_rows:
        # The keyed draws depend on the batch shape: a sub-batch would see other draws.  Instead the
        # rows left out are replaced by a copy of a kept row (same shape, same draws) with weight 0.
        source = torch.where(keep, torch.arange(size, device=keep.device), rows[0])
        sub_batch, sub_weights = _take(batch, source), weights
    else:
        sub_batch = batch if all_rows else _take(batch, rows)
        sub_weights = weights if all_rows else weights.index_select(0, rows)
    with torch.enable_grad(), rng(key, sub_batch, randomness):
        out = loss_fn(optree.tree_unflatten(treespec, proxies), sub_batch)
        sub_losses = out[0] if has_aux else out
        weighted = (sub_losses.double() * sub_weights).sum()
    if all_rows:
        _check_same_losses(losses, sub_losses.detach(), tol)
    truth = list(torch.autograd.grad(weighted, [proxies[i] for i in differentiable], allow_unused=True))
    truth_by_leaf: list = [None] * len(leaves)
    for i, grad in zip(differentiable, truth):
        truth_by_leaf[i] = torch.zeros_like(proxies[i]) if grad is None else grad
    engine_sums = weighted_sum([weights] * len(leaves))
    scale = _flat_norm(truth_by_leaf) + 1e-30
    for i in differentiable:
        error = _flat_norm([engine_sums[i].double() - truth_by_leaf[i].double()])
        if error > tol * scale:
            raise GhostVerificationError(
                f"the ghost engine's per-example gradients for {names[i]} do not match autograd: "
                f"|sum_i w_i g_i - grad(sum_i w_i L_i)| = {error:.3g} vs |grad| = {scale:.3g} (tolerance {tol:g}). "
                "Some use of this parameter or some row of the batch is not what the engine assumed "
                "(code the tracer cannot see, examples reordered, or examples that interact). "
                "Use grad_method='vmap', or report the model.")
    if randomness != "error":
        return True
    if thorough:
        _check_losses_alone(loss_fn, proxies, treespec, batch, losses, rows, has_aux, tol, seed)
    checked = [int(rows[0])] + ([int(rows[-1])] if rows.numel() > 1 else [])
    for row in checked:
        one = _take(batch, torch.tensor([row]))
        with torch.enable_grad():
            out = loss_fn(optree.tree_unflatten(treespec, proxies), one)
            single = (out[0] if has_aux else out).reshape(-1)[0]
        grads = torch.autograd.grad(single, [proxies[i] for i in differentiable], allow_unused=True)
        batched_loss, single_loss = float(losses[row]), float(single.detach())
        if abs(single_loss - batched_loss) > tol * (abs(single_loss) + 1e-12) + 1e-12:
            raise ExamplesInteractError(
                f"example {row}'s loss is {batched_loss:.6g} in the batch but {single_loss:.6g} alone: the "
                "examples of a batch interact inside loss_fn (batch statistics, a reduction over the batch), so "
                "per-example gradients and DP-SGD's guarantee do not apply")
        true_sq = {i: (0.0 if g is None else float(g.double().square().sum())) for i, g in zip(differentiable, grads)}
        global_sq = sum(true_sq.values()) + 1e-300
        for i in differentiable:
            got = float(sq_norms[i][row])
            if abs(math.sqrt(max(got, 0.0)) - math.sqrt(true_sq[i])) > tol * math.sqrt(global_sq) + 1e-150:
                raise GhostVerificationError(
                    f"the ghost engine's per-example norm of {names[i]} for example {row} is {math.sqrt(max(got, 0)):.6g}, "
                    f"but the example alone gives {math.sqrt(true_sq[i]):.6g} (tolerance {tol:g} of the global norm "
                    f"{math.sqrt(global_sq):.6g}). Use grad_method='vmap', or report the model.")
    return True


def _check_same_losses(losses: torch.Tensor, again: torch.Tensor, tol: float) -> None:
    """The same batch (with the same keyed draws) run through ``loss_fn`` a second time must give the
    same losses; otherwise every comparison after it would blame a parameter for what is a change of
    state between the two forwards."""
    if again.numel() != losses.numel():
        return
    first, second = losses.double(), again.double().reshape(losses.shape)
    finite = torch.isfinite(first) & torch.isfinite(second)
    differ = finite & ((first - second).abs() > tol * (first.abs() + second.abs()) + 1e-12)
    if bool(differ.any()):
        row = int(differ.nonzero()[0, 0])
        raise GhostVerificationError(
            f"loss_fn gave example {row} the loss {float(first[row]):.6g} on the batch forward and "
            f"{float(second[row]):.6g} on the same batch again (with the same random draws): it changes state "
            "between calls (a buffer or counter updated in forward, a running statistic, BatchNorm in train mode "
            "with track_running_stats, a Python-side counter), so the single-example reruns that check the "
            "per-example gradients see another model. Make the forward pure: update such state outside the step, "
            "or put those modules in eval mode")


def _check_losses_alone(loss_fn, proxies, treespec, batch, losses, rows, has_aux, tol, seed) -> None:
    """The batched losses of up to 16 kept examples (drawn at random) and of each half of the kept
    rows (split at random) must equal their losses alone / in the half: a loss that depends on other
    examples through a Python value read from the batch (``int(lengths.max())``) differs."""
    generator = torch.Generator().manual_seed(20261206 + seed)
    shuffled = rows.cpu()[torch.randperm(rows.numel(), generator=generator)].to(rows.device)
    groups = [shuffled[i:i + 1] for i in range(min(16, shuffled.numel()))]
    if shuffled.numel() >= 4:
        half = shuffled.numel() // 2
        groups += [shuffled[:half].sort().values, shuffled[half:].sort().values]
    params = optree.tree_unflatten(treespec, [p.detach() if isinstance(p, torch.Tensor) else p for p in proxies])
    for group in groups:
        with torch.no_grad():
            out = loss_fn(params, _take(batch, group))
        alone = (out[0] if has_aux else out).detach().double().reshape(-1)
        batched = losses.double().index_select(0, group)
        if alone.shape != batched.shape or bool(((alone - batched).abs() > tol * (alone.abs() + 1e-12) + 1e-12).any()):
            which = f"example {int(group[0])}" if group.numel() == 1 else f"{group.numel()} examples"
            raise ExamplesInteractError(
                f"the losses of {which} differ in the batch and alone ({batched.tolist()[:4]} vs {alone.tolist()[:4]}): "
                "loss_fn reads a Python value from the batch (int(), .item(), bool(), .tolist()) and computes "
                "differently for other examples, so the examples of a batch interact and per-example gradients "
                "(DP-SGD's guarantee) do not apply. Compute such values per example, or with tensor ops only.")

