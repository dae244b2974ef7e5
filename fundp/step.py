"""The stateless DP-SGD step: ``dp_step`` = ``clipped_grad_sum`` followed by ``privatize``.

One step computes, for a batch of ``B`` rows of which the unmasked ones are real examples,

    grads = (sum_i c_i g_i + N(0, (noise_multiplier * S)^2 I)) / expected_batch_size

with ``g_i`` the per-example gradients, ``c_i`` the clip factors (see :mod:`fundp.clipping`) and
``S`` the clipping sensitivity (``max_norm``, or ``sqrt(sum_l C_l^2)`` per layer).  The division is
by the *expected* batch size ``sample_rate * N``, never the realised one, whose value would leak
under Poisson sampling.

Gradient accumulation uses the two halves directly: sum ``clipped_grad_sum`` results over
physical chunks with :func:`add_clipped_sums`, then call :func:`privatize` once.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import optree
import torch

from fundp import random as fundp_random
from fundp._validate import check_batch, check_mask, check_number
from fundp.clipping import CLIP_STYLES, clip_sensitivity, factors_for
from fundp.engines import make_engine
from fundp.noise import noise_like

__all__ = [
    "ClippedSum",
    "StepResult",
    "clipped_grad_sum",
    "add_clipped_sums",
    "privatize",
    "dp_step",
]


class ClippedSum(NamedTuple):
    """The data-dependent half of a DP step, before noise."""

    grads: Any
    """Pytree like params: ``sum_i c_i g_i`` over the real rows."""
    loss_sum: torch.Tensor
    """Sum of the real rows' losses (a diagnostic, not privatised)."""
    num_examples: torch.Tensor
    """Number of real (unmasked) rows, an int64 scalar tensor."""
    norms: torch.Tensor
    """``[B]`` per-example gradient norms before clipping (0 for masked rows)."""
    num_nonfinite: torch.Tensor
    """Number of real rows dropped because their gradient was NaN or Inf."""
    aux: Any = None


class StepResult(NamedTuple):
    """What ``dp_step`` returns."""

    grads: Any
    """``(sum_i c_i g_i + N(0, (sigma S)^2)) / expected_batch_size``, a pytree like params."""
    ledger: Any
    """The ledger after this step (``None`` when ``None`` was passed)."""
    loss: torch.Tensor
    """Mean loss over the real rows (0 for an empty batch)."""
    norms: torch.Tensor
    """``[B]`` per-example gradient norms before clipping."""
    num_nonfinite: torch.Tensor
    """Real rows dropped for a NaN/Inf gradient in this step."""
    aux: Any = None


def _check_clip_style(clip_style: str) -> None:
    if clip_style not in CLIP_STYLES:
        raise ValueError(f"clip_style must be one of {CLIP_STYLES}, got {clip_style!r}")


def _check_max_norm_tree(max_norm: Any, clip_style: str) -> None:
    if clip_style == "per_layer" and not isinstance(max_norm, (int, float, torch.Tensor)):
        for threshold in optree.tree_leaves(max_norm):
            if check_number("max_norm", threshold, positive=True) <= 0:
                raise ValueError(f"max_norm must be > 0, got {threshold}")
        return
    if check_number("max_norm", max_norm, positive=True) <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")


def clipped_grad_sum(
    loss_fn: Callable,
    *,
    max_norm: Any,
    clip_style: str = "flat",
    gamma: float = 0.01,
    grad_method: str = "auto",
    has_aux: bool = False,
    randomness: str = "error",
) -> Callable:
    """Transform: returns ``f(params, batch, mask=None, key=None) -> ClippedSum``.

    ``f`` computes ``sum_i c_i g_i`` over the real rows of ``batch`` (``mask[i]`` True, or all
    rows), with clip factors ``c_i`` from ``clip_style`` (see :func:`fundp.clip`).  Masked rows
    and examples with a non-finite gradient contribute exactly zero.  ``key`` drives the model's
    random ops when ``randomness="different"``.
    """
    _check_clip_style(clip_style)
    _check_max_norm_tree(max_norm, clip_style)
    gamma = check_number("gamma", gamma, positive=True)
    engine = make_engine(grad_method, loss_fn, has_aux=has_aux, randomness=randomness)

    def f(params: Any, batch: Any, mask: torch.Tensor | None = None, key: torch.Tensor | None = None) -> ClippedSum:
        size = check_batch(batch)
        if mask is not None:
            check_mask(mask, size)
        out = engine(params, batch, key)
        if not isinstance(out.losses, torch.Tensor) or out.losses.shape != (size,):
            raise ValueError(f"loss_fn must return per-example losses of shape [B] = [{size}]")
        factors, norms = factors_for(out.sq_norms, max_norm, style=clip_style, gamma=gamma)
        finite = torch.isfinite(norms)
        real = finite if mask is None else finite & mask
        factors = optree.tree_map(lambda c: torch.where(real, c, torch.zeros_like(c)), factors)
        grads = out.weighted_sum(factors)
        losses = out.losses
        in_batch = torch.ones_like(finite) if mask is None else mask
        loss_sum = torch.where(in_batch, losses, torch.zeros_like(losses)).sum()
        norms = torch.where(in_batch, norms, torch.zeros_like(norms))
        num_nonfinite = (in_batch & ~finite).sum()
        return ClippedSum(grads, loss_sum, in_batch.sum(), norms, num_nonfinite, out.aux)

    return f


def add_clipped_sums(first: ClippedSum, second: ClippedSum) -> ClippedSum:
    """Adds the clipped sums of two physical chunks of one logical batch (norms concatenated)."""
    return ClippedSum(
        optree.tree_map(torch.add, first.grads, second.grads),
        first.loss_sum + second.loss_sum,
        first.num_examples + second.num_examples,
        torch.cat([first.norms, second.norms]),
        first.num_nonfinite + second.num_nonfinite,
        None,
    )


def privatize(
    grad_sum: Any, key: torch.Tensor, *, noise_stddev: float, expected_batch_size: float, secure_mode: bool = False
) -> Any:
    """Returns ``(grad_sum + N(0, noise_stddev^2)) / expected_batch_size``, the noise drawn from ``key``.

    With ``secure_mode=True`` the noise comes from :mod:`fundp.secure` (OS entropy, hardened
    sampler) and ``key`` is not used for it.
    """
    noise_stddev = check_number("noise_stddev", noise_stddev, positive=True)
    expected_batch_size = check_number("expected_batch_size", expected_batch_size, positive=True)
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    if secure_mode:
        from fundp.secure import secure_noise

        return optree.tree_map(lambda g: g / expected_batch_size, secure_noise(grad_sum, noise_stddev))
    draws = noise_like(grad_sum, key, noise_stddev)
    return optree.tree_map(lambda g, z: (g + z) / expected_batch_size, grad_sum, draws)


@torch.compiler.disable
def _account(ledger: Any, noise_multiplier: float, sample_rate: float | None, budget: Any) -> Any:
    # Plain Python on plain numbers: kept out of the compiled graph so a growing ledger never
    # triggers a recompile.  Runs before the data is touched, so an over-budget step is refused
    # before anything is computed.
    if ledger is None:
        if budget is not None:
            raise ValueError("budget needs a ledger: pass step(..., ledger=fundp.Ledger())")
        return None
    if sample_rate is None:
        raise ValueError("sample_rate is required to update a ledger: pass dp_step(..., sample_rate=q)")
    if budget is not None:
        from fundp.budget import spend

        return spend(ledger, noise_multiplier=noise_multiplier, sample_rate=sample_rate, budget=budget)
    from fundp.accounting import accountant_step

    return accountant_step(ledger, noise_multiplier=noise_multiplier, sample_rate=sample_rate)


@torch.compiler.disable
def _raise_if_nonfinite(params: Any, losses_ok: torch.Tensor) -> None:
    for path, leaf in zip(*optree.tree_flatten_with_path(params)[:2]):
        if not bool(torch.isfinite(leaf).all()):
            raise FloatingPointError(f"params{''.join(f'[{p!r}]' for p in path)} contains NaN or Inf")
    if not bool(losses_ok):
        raise FloatingPointError("the loss of a real (unmasked) example is NaN or Inf")


def dp_step(
    loss_fn: Callable,
    *,
    max_norm: Any,
    noise_multiplier: float,
    expected_batch_size: float,
    sample_rate: float | None = None,
    clip_style: str = "flat",
    gamma: float = 0.01,
    grad_method: str = "auto",
    has_aux: bool = False,
    randomness: str = "error",
    check_finite: bool = False,
    distributed: bool = False,
    process_group: Any = None,
    secure_mode: bool = False,
    budget: Any = None,
) -> Callable:
    """Transform: returns a stateless DP-SGD step ``step(params, batch, key, ledger=None, mask=None)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> Tensor[B]`` per-example losses.
      max_norm: clipping threshold ``C`` (a pytree of thresholds for ``clip_style="per_layer"``).
      noise_multiplier: ``sigma``; the noise std on the clipped sum is ``sigma * S`` with ``S`` the
        sensitivity of :func:`fundp.clipping.clip_sensitivity`.  0 gives a non-private step.
      expected_batch_size: ``sample_rate * N``, the divisor of the noisy sum.
      sample_rate: Poisson rate ``q`` recorded in the ledger (required when a ledger is passed).
      clip_style: ``"flat"`` (default), ``"per_layer"`` or ``"automatic"``.
      gamma: stability constant of automatic clipping.
      grad_method: per-example-norm engine, ``"vmap"``, ``"ghost"`` or ``"auto"``.
      has_aux: ``loss_fn`` returns ``(losses, aux)``; ``aux`` comes back in ``.aux``.
      randomness: ``"different"`` for models with dropout (driven by ``key``).
      check_finite: debug mode: raise ``FloatingPointError`` when params or a real example's
        loss are NaN/Inf (synchronises with the device; off by default).
      distributed: inside an initialised ``torch.distributed`` group, each rank passes its shard
        of the global batch; clipped sums are all-reduced (SUM) and every rank adds the same
        noise from the same key, so all ranks hold identical gradients equal to one process on
        the whole batch.  ``expected_batch_size`` is the *global* one.  See
        :mod:`fundp.distributed`.
      process_group: the group for ``distributed=True`` (default: the world).
      secure_mode: draw the noise from OS entropy with the hardened sampler of
        :mod:`fundp.secure` (for production; slower, not reproducible from the key, and a graph
        break under ``torch.compile``).  With ``distributed=True`` only rank 0's draw is used:
        it is broadcast so every rank still adds the same noise.
      budget: ``fundp.Budget(epsilon, delta)`` or ``(epsilon, delta)``: a step whose ledger
        would exceed it raises :class:`fundp.BudgetExceededError` before touching the data.

    The returned ``step`` computes ``StepResult(grads, ledger, loss, norms, num_nonfinite, aux)``
    with ``grads = (sum_i c_i g_i + N(0, (sigma S)^2)) / expected_batch_size``.  ``key`` is split into a
    noise key and a model key; the same key gives the same result.  ``torch.compile(step)`` works
    and does not recompile across steps of one batch shape.

    Example:
      >>> import torch, fundp
      >>> loss_fn = lambda p, b: (b["x"] @ p["w"] - b["y"]) ** 2
      >>> step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=2)
      >>> batch = {"x": torch.eye(2), "y": torch.zeros(2)}
      >>> step({"w": torch.tensor([3.0, 0.1])}, batch, fundp.random.key(0)).grads["w"]
      tensor([0.5000, 0.1000])
    """
    noise_multiplier = check_number("noise_multiplier", noise_multiplier, positive=True)
    expected_batch_size = check_number("expected_batch_size", expected_batch_size, positive=True)
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    if sample_rate is not None:
        sample_rate = check_number("sample_rate", sample_rate)
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not isinstance(check_finite, bool):
        raise TypeError("check_finite must be a bool")
    if not isinstance(distributed, bool):
        raise TypeError("distributed must be a bool")
    if budget is not None:
        from fundp.budget import _as_budget

        budget = _as_budget(budget)
        if sample_rate is None:
            raise ValueError("budget needs sample_rate: pass dp_step(..., sample_rate=q)")
    summed = clipped_grad_sum(
        loss_fn,
        max_norm=max_norm,
        clip_style=clip_style,
        gamma=gamma,
        grad_method=grad_method,
        has_aux=has_aux,
        randomness=randomness,
    )

    def step(params: Any, batch: Any, key: torch.Tensor, ledger: Any = None, mask: torch.Tensor | None = None) -> StepResult:
        new_ledger = _account(ledger, noise_multiplier, sample_rate, budget)
        noise_key, model_key = fundp_random.split(key)
        if distributed:
            from fundp import distributed as fundp_distributed

            fundp_distributed.check_not_sharded(params)
            rank, _ = fundp_distributed.rank_and_world_size(process_group)
            # Each rank's dropout masks differ; the noise key stays shared.
            model_key = fundp_random.fold_in(model_key, rank)
        clipped = summed(params, batch, mask, model_key)
        if distributed:
            clipped = fundp_distributed.all_reduce_clipped_sum(clipped, process_group)
        if check_finite:
            losses_ok = torch.isfinite(clipped.loss_sum)
            _raise_if_nonfinite(params, losses_ok)
        sensitivity = clip_sensitivity(max_norm, style=clip_style, params=params)
        grads = privatize(
            clipped.grads,
            noise_key,
            noise_stddev=noise_multiplier * sensitivity,
            expected_batch_size=expected_batch_size,
            secure_mode=secure_mode,
        )
        if distributed and secure_mode:
            grads = fundp_distributed.broadcast_from_rank0(grads, process_group)
        loss = clipped.loss_sum / torch.clamp_min(clipped.num_examples, 1).to(clipped.loss_sum.dtype)
        return StepResult(grads, new_ledger, loss, clipped.norms, clipped.num_nonfinite, clipped.aux)

    return step

