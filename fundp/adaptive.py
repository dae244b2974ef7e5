"""Adaptive clipping to a target quantile of the per-example gradient norms (Andrew et al. 2021).

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping"
(NeurIPS 2021).  Instead of a fixed clipping norm ``C``, keep ``C`` near the ``gamma``-quantile
of the per-example gradient norms, learned privately as training goes:

1. on the sampled batch, count the real examples that are *not* clipped,
   ``b = sum_i 1[||g_i|| <= C]`` (:func:`unclipped_count`), and release it with Gaussian noise,
   ``b~ = b + N(0, sigma_b^2)`` (:func:`noisy_unclipped_count`);
2. estimate the unclipped fraction ``f = clip(b~ / E[B], 0, 1)`` with the *expected* batch size
   (the realised one would leak under Poisson sampling) and take a geometric step
   ``C <- C * exp(-eta * (f - gamma))`` (:func:`update`): ``C`` shrinks while more than a fraction
   ``gamma`` of the examples fit under it and grows otherwise.  In expectation this is online
   gradient descent on ``log C`` for the pinball loss whose minimiser is the ``gamma``-quantile.

The state is a value, :class:`QuantileClipState` (``max_norm``, a 0-d tensor, or ``[K]`` for
per-layer thresholds), passed in and returned like optimizer state; the clipping of the gradients
at step ``t`` uses the ``C`` of step ``t`` and the count of the same batch updates ``C`` for step
``t + 1``.

Privacy.  The count ``b`` changes by 0 or 1 when one example is added or removed: sensitivity 1,
so ``count_noise_multiplier`` is ``sigma_b`` itself (std / sensitivity).  (Andrew et al. release
the centred sum ``sum_i (b_i - 1/2)``, of sensitivity 1/2, which needs ``E[B]`` to turn back into a
count; their ``sigma_b`` is ``count_noise_multiplier / 2`` here.)  The count and the gradient
sum are two Gaussian queries on the *same* Poisson-sampled batch, so they form one mechanism:
after dividing each by its noise std, adding one example moves the released pair by a vector of
norm at most ``sqrt(z_g^-2 + K sigma_b^-2)`` (``z_g`` the gradient noise multiplier, ``K`` the
number of thresholds), and a Poisson-subsampled Gaussian's privacy depends only on that norm
(rotation invariance).  The pair is therefore exactly a subsampled Gaussian with the single
noise multiplier

    z_eff = (z_g^-2 + K sigma_b^-2)^(-1/2)        (:func:`ledger_noise_multiplier`),

which is what the ledger records, once per step, at the step's sample rate.  Accounting the
count as a second ``accountant_step`` would treat the two queries as independently sampled and
*under*-report epsilon.  To spend exactly the budget of plain DP-SGD at noise ``z``, Andrew et
al. raise the gradient noise to ``z_g = (z^-2 - K sigma_b^-2)^(-1/2)``
(:func:`gradient_noise_multiplier_for`); it costs little: with ``sigma_b = E[B] / 20`` the
fraction's noise std is 0.05 and at ``E[B] = 256``, ``z = 1`` the gradient noise grows by 0.3%.

Everything here is tensor arithmetic without data-dependent Python control flow: it runs inside
``torch.compile`` without recompiling as ``C`` changes.

Example:
  >>> import torch, fundp
  >>> from fundp import adaptive
  >>> cfg = adaptive.quantile_clipping(target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=0.5)
  >>> state = cfg.init(1.0)
  >>> norms = torch.tensor([0.5, 2.0, 0.1, 3.0])       # per-example norms of this batch
  >>> mask = torch.tensor([True, True, True, False])   # the last row is padding
  >>> int(adaptive.unclipped_count(norms, state.max_norm, mask))
  2
  >>> count = adaptive.noisy_unclipped_count(norms, state.max_norm, mask, fundp.random.key(0), cfg)
  >>> state = adaptive.update(cfg, state, count, expected_batch_size=3.0)  # C for the next step
  >>> cfg = adaptive.quantile_clipping(count_noise_multiplier=256 / 20)
  >>> round(adaptive.ledger_noise_multiplier(cfg, 1.0), 5)  # the ledger records this, not 1.0
  0.99696
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from fundp import random as fundp_random
from fundp._validate import check_int, check_mask, check_nonnegative, check_positive, check_real

__all__ = [
    "QuantileClipState",
    "QuantileClipping",
    "quantile_clipping",
    "unclipped_count",
    "noisy_unclipped_count",
    "update",
    "ledger_noise_multiplier",
    "gradient_noise_multiplier_for",
]


class QuantileClipState(NamedTuple):
    """The adaptive clipping state: a value passed in and returned each step (and checkpointed).

    Example:
      >>> import torch
      >>> from fundp.adaptive import QuantileClipState
      >>> QuantileClipState(max_norm=torch.tensor(1.0, dtype=torch.float64))
      QuantileClipState(max_norm=tensor(1., dtype=torch.float64))
    """

    max_norm: torch.Tensor
    """The clipping threshold ``C`` to use at this step: a 0-d float64 tensor, or ``[K]`` per layer."""


def _threshold_tensor(initial_max_norm: Any, device: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(initial_max_norm, torch.Tensor) and initial_max_norm.dim() > 0 or (
        isinstance(initial_max_norm, Sequence) and not isinstance(initial_max_norm, (str, bytes))
    ):
        values = initial_max_norm.detach().reshape(-1).tolist() if isinstance(initial_max_norm, torch.Tensor) else list(initial_max_norm)
        if not values:
            raise ValueError("initial_max_norm must not be empty")
        checked = [check_positive(f"initial_max_norm[{i}]", v) for i, v in enumerate(values)]
        return torch.tensor(checked, dtype=dtype, device=device)
    return torch.tensor(check_positive("initial_max_norm", initial_max_norm), dtype=dtype, device=device)


class QuantileClipping(NamedTuple):
    """Settings of quantile-based adaptive clipping; build it with :func:`quantile_clipping`.

    Example:
      >>> from fundp import adaptive
      >>> cfg = adaptive.quantile_clipping(count_noise_multiplier=10.0)
      >>> cfg.init(0.5)
      QuantileClipState(max_norm=tensor(0.5000, dtype=torch.float64))
    """

    target_quantile: float = 0.5
    """``gamma`` in (0, 1): the fraction of examples that should be left unclipped."""
    learning_rate: float = 0.2
    """``eta`` > 0 of the geometric update ``C <- C exp(-eta (f - gamma))``."""
    count_noise_multiplier: float | None = None
    """``sigma_b`` >= 0: std of the noise on the unclipped count (its sensitivity is 1); required."""

    def init(self, initial_max_norm: Any, *, device: Any = None, dtype: torch.dtype = torch.float64) -> QuantileClipState:
        """Returns the state with ``max_norm = initial_max_norm`` (a number; a sequence or 1-d tensor for per-layer thresholds).

        Example:
          >>> from fundp import adaptive
          >>> adaptive.quantile_clipping(count_noise_multiplier=10.0).init([1.0, 2.0]).max_norm
          tensor([1., 2.], dtype=torch.float64)
        """
        _checked(self)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")
        return QuantileClipState(_threshold_tensor(initial_max_norm, device, dtype))


def _checked(cfg: Any) -> tuple[float, float, float]:
    """Validates a config (also one built directly as a NamedTuple); returns ``(gamma, eta, sigma_b)``."""
    if not isinstance(cfg, QuantileClipping):
        raise TypeError(f"cfg must be a fundp.adaptive.QuantileClipping, got {type(cfg).__name__}")
    gamma = check_real("target_quantile", cfg.target_quantile)
    if not 0 < gamma < 1:
        raise ValueError(f"target_quantile must be in (0, 1), got {gamma}")
    eta = check_positive("learning_rate", cfg.learning_rate)
    if cfg.count_noise_multiplier is None:
        raise ValueError(
            "count_noise_multiplier is required: the std of the noise on the unclipped count, e.g. "
            "expected_batch_size / 20 (0 only for non-private experiments)"
        )
    sigma_b = check_nonnegative("count_noise_multiplier", cfg.count_noise_multiplier)
    return gamma, eta, sigma_b


def quantile_clipping(*, target_quantile: float = 0.5, learning_rate: float = 0.2, count_noise_multiplier: float) -> QuantileClipping:
    """Returns a validated :class:`QuantileClipping`.

    Args:
      target_quantile: ``gamma`` in (0, 1), the fraction of examples to leave unclipped
        (Andrew et al. use 0.5).
      learning_rate: ``eta`` > 0 of the geometric update (Andrew et al. use 0.2).
      count_noise_multiplier: ``sigma_b`` >= 0, std of the noise on the unclipped count (sensitivity
        1).  The fraction estimate's noise std is ``sigma_b / E[B]``; ``E[B] / 20`` gives 0.05.
        0 releases the count exactly: no privacy (for experiments only; the ledger functions refuse it).

    Example:
      >>> from fundp import adaptive
      >>> adaptive.quantile_clipping(target_quantile=0.9, count_noise_multiplier=5.0).target_quantile
      0.9
    """
    cfg = QuantileClipping(
        target_quantile=check_real("target_quantile", target_quantile),
        learning_rate=check_real("learning_rate", learning_rate),
        count_noise_multiplier=check_real("count_noise_multiplier", count_noise_multiplier),
    )
    _checked(cfg)
    return cfg


def _as_threshold(max_norm: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(max_norm, torch.Tensor):
        return max_norm
    return torch.as_tensor(check_positive("max_norm", max_norm), dtype=torch.float64, device=like.device)


def unclipped_count(norms: torch.Tensor, max_norm: Any, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the number of real examples whose gradient is not clipped: ``sum_i 1[||g_i|| <= C]``.

    Args:
      norms: ``[B]`` per-example gradient norms before clipping (``[B, K]`` with per-layer norms).
      max_norm: ``C``: a number, a 0-d tensor, or ``[K]`` thresholds for ``[B, K]`` norms.
      mask: optional ``BoolTensor[B]``; padding rows (``False``) never count, nor do rows with a
        NaN/Inf norm (their gradient is dropped, not left unclipped).

    Returns an int64 tensor: 0-d, or ``[K]`` for ``[B, K]`` norms.  Not private on its own: release
    it with :func:`noisy_unclipped_count`.

    Example:
      >>> import torch
      >>> from fundp.adaptive import unclipped_count
      >>> norms = torch.tensor([0.5, float("nan"), 1.0, 0.2])
      >>> int(unclipped_count(norms, 1.0, mask=torch.tensor([True, True, True, False])))
      2
    """
    if not isinstance(norms, torch.Tensor) or norms.dim() not in (1, 2) or not norms.dtype.is_floating_point:
        raise ValueError(f"norms must be a float tensor of shape [B] or [B, K], got {getattr(norms, 'shape', type(norms).__name__)}")
    threshold = _as_threshold(max_norm, norms)
    if norms.dim() == 1 and threshold.dim() != 0:
        raise ValueError(f"max_norm must be a scalar for [B] norms, got shape {tuple(threshold.shape)}")
    if norms.dim() == 2 and threshold.dim() not in (0, 1):
        raise ValueError(f"max_norm must be a scalar or [K] for [B, K] norms, got shape {tuple(threshold.shape)}")
    real = torch.isfinite(norms)
    if mask is not None:
        check_mask(mask, norms.shape[0])
        real = real & (mask if norms.dim() == 1 else mask[:, None])
    unclipped = real & (norms <= threshold)
    return unclipped.sum(dim=0, dtype=torch.int64)


def noisy_unclipped_count(
    norms: torch.Tensor, max_norm: Any, mask: torch.Tensor | None, key: torch.Tensor, cfg: QuantileClipping
) -> torch.Tensor:
    """Returns ``unclipped_count(norms, max_norm, mask) + N(0, sigma_b^2)``, the noise drawn from ``key``.

    The Gaussian mechanism on a sensitivity-1 count (``sigma_b = cfg.count_noise_multiplier``).
    Use a key of its own, independent of the gradient noise's (``fundp.random.split``).  The
    result is a float tensor (0-d, or ``[K]``) in ``max_norm``'s dtype (float64 for a number).

    Example:
      >>> import torch, fundp
      >>> from fundp import adaptive
      >>> cfg = adaptive.quantile_clipping(count_noise_multiplier=0.0)
      >>> adaptive.noisy_unclipped_count(torch.tensor([0.5, 2.0]), 1.0, None, fundp.random.key(0), cfg)
      tensor(1., dtype=torch.float64)
    """
    _checked(cfg)
    return _with_count_noise(unclipped_count(norms, max_norm, mask), _as_threshold(max_norm, norms), key, cfg)


def _with_count_noise(count: torch.Tensor, threshold: torch.Tensor, key: torch.Tensor, cfg: QuantileClipping) -> torch.Tensor:
    """``count + N(0, sigma_b^2)`` in ``threshold``'s dtype, the noise drawn from ``key`` (the count
    may be the sum of several ranks' counts: the noise is added once, to the total)."""
    _, _, sigma_b = _checked(cfg)
    dtype = threshold.dtype if threshold.dtype.is_floating_point else torch.float64
    noise = fundp_random.normal(key, tuple(count.shape), dtype).to(count.device)
    return count.to(dtype) + sigma_b * noise


def update(cfg: QuantileClipping, state: QuantileClipState, noisy_count: torch.Tensor, expected_batch_size: float | torch.Tensor) -> QuantileClipState:
    """Returns the next state: ``C <- C * exp(-eta * (f - gamma))`` with ``f = clip(noisy_count / E[B], 0, 1)``.

    ``noisy_count`` is :func:`noisy_unclipped_count` of this step's batch; ``expected_batch_size``
    is ``E[B] = q N``, public (dividing by the realised batch size would leak).  Clipping ``f``
    to ``[0, 1]`` bounds the step (post-processing: free).  Per-layer thresholds update
    elementwise.

    Example:
      >>> import torch
      >>> from fundp import adaptive
      >>> cfg = adaptive.quantile_clipping(target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=0.0)
      >>> state = adaptive.update(cfg, cfg.init(1.0), torch.tensor(10.0), expected_batch_size=10)
      >>> round(float(state.max_norm), 6)  # all unclipped: shrink by exp(-0.2 * 0.5)
      0.904837
    """
    gamma, eta, _ = _checked(cfg)
    if not isinstance(state, QuantileClipState):
        raise TypeError(f"state must be a QuantileClipState (from cfg.init), got {type(state).__name__}")
    # A tensor (possibly traced) is used as given; a number is checked.
    expected = expected_batch_size if isinstance(expected_batch_size, torch.Tensor) else check_positive("expected_batch_size", expected_batch_size)
    max_norm = state.max_norm
    count = torch.as_tensor(noisy_count, dtype=max_norm.dtype, device=max_norm.device)
    if count.shape != max_norm.shape:
        raise ValueError(f"noisy_count has shape {tuple(count.shape)}, max_norm {tuple(max_norm.shape)}")
    fraction = torch.clamp(count / expected, 0.0, 1.0)
    return state._replace(max_norm=max_norm * torch.exp(-eta * (fraction - gamma)))


def _count_noise(cfg: QuantileClipping, num_counts: int) -> float:
    _, _, sigma_b = _checked(cfg)
    if sigma_b == 0:
        raise ValueError("count_noise_multiplier is 0: the count is released exactly and no finite privacy holds")
    return sigma_b / math.sqrt(check_int("num_counts", num_counts, minimum=1))


def ledger_noise_multiplier(cfg: QuantileClipping, noise_multiplier: float, *, num_counts: int = 1) -> float:
    """Returns ``z_eff = (z_g^-2 + K sigma_b^-2)^(-1/2)``, the one noise multiplier the ledger records per step.

    The gradient sum (noise multiplier ``z_g = noise_multiplier``) and ``K = num_counts`` unclipped
    counts (sensitivity 1 each, noise std ``sigma_b``) released on the same Poisson batch are
    exactly one subsampled Gaussian mechanism of multiplier ``z_eff`` (see the module docstring).
    Record ``accountant_step(ledger, noise_multiplier=z_eff, sample_rate=q)``; two separate
    steps would under-report epsilon.

    Example:
      >>> from fundp import adaptive
      >>> cfg = adaptive.quantile_clipping(count_noise_multiplier=4.0)
      >>> round(adaptive.ledger_noise_multiplier(cfg, 3.0), 6)  # (1/9 + 1/16)^(-1/2) = 12/5
      2.4
    """
    z_g = check_positive("noise_multiplier", noise_multiplier)
    sigma = _count_noise(cfg, num_counts)
    return (z_g**-2 + sigma**-2) ** -0.5


def gradient_noise_multiplier_for(target_noise_multiplier: float, cfg: QuantileClipping, *, num_counts: int = 1) -> float:
    """Returns ``z_g = (z^-2 - K sigma_b^-2)^(-1/2)``: the gradient noise that, with the count, spends what DP-SGD at ``z`` does.

    Andrew et al.'s choice: ``ledger_noise_multiplier(cfg, z_g) == z``, so the run has exactly the
    privacy of plain DP-SGD at ``z = target_noise_multiplier`` (same ``q``, same steps).  Raises
    when ``sigma_b <= sqrt(K) z``: the count alone would spend the whole budget.

    Example:
      >>> from fundp import adaptive
      >>> cfg = adaptive.quantile_clipping(count_noise_multiplier=4.0)
      >>> round(adaptive.gradient_noise_multiplier_for(2.4, cfg), 6)
      3.0
    """
    z = check_positive("target_noise_multiplier", target_noise_multiplier)
    sigma = _count_noise(cfg, num_counts)
    rest = z**-2 - sigma**-2
    if rest <= 0:
        raise ValueError(
            f"count_noise_multiplier must be > sqrt(num_counts) * target_noise_multiplier = "
            f"{z * math.sqrt(num_counts):g}: with {cfg.count_noise_multiplier:g} the count alone spends the whole budget"
        )
    return rest**-0.5
