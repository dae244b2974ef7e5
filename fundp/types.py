"""The values that flow through a DP step, and the types of its string options.

Kept apart from :mod:`fundp.step` so that every module can name them without importing the step
(:mod:`fundp.distributed` reduces a :class:`ClippedSum`; the step calls :mod:`fundp.distributed`).

Privacy labels: of a :class:`StepResult`, only ``grads`` and ``ledger`` are differentially
private (``grads`` is the noisy clipped sum, ``ledger`` depends only on public settings).
``clip_state`` is private when it is updated from a noisy count (adaptive clipping), and
``noise_state`` holds only noise.  ``loss``, ``norms``, ``num_nonfinite`` and ``aux`` are
computed from the raw examples and are **not** private.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Protocol, Union

import torch

__all__ = [
    "ClipStyle",
    "GradMethod",
    "Randomness",
    "Verify",
    "ClippedSum",
    "StepResult",
    "Step",
]

ClipStyle = Literal["flat", "per_layer", "automatic"]
"""``clip_style=`` of :func:`fundp.dp_step` (see :mod:`fundp.clipping`)."""
GradMethod = Literal["vmap", "ghost", "auto"]
"""``grad_method=`` of :func:`fundp.dp_step`: the per-example-norm engine."""
Randomness = Literal["error", "different", "same"]
"""``randomness=`` of :func:`fundp.dp_step`: how the model's random ops (dropout) are batched."""
Verify = Literal[False, "first", "always"]
"""``verify=`` of :func:`fundp.dp_step`: when a fast engine is checked against single-example gradients."""

Number = Union[float, torch.Tensor]
"""A Python float, or a 0-d tensor (traced by ``torch.compile``: changing it never recompiles)."""


class ClippedSum(NamedTuple):
    """The data-dependent half of a DP step, before noise: a sum of bounded contributions.

    ``sensitivity`` travels with the sum: it is the L2 sensitivity ``S`` of ``grads`` (the most
    ``grads`` can change when one example is added or removed), so :func:`fundp.privatize`
    derives the noise std ``noise_multiplier * S`` itself.  Sums of chunks of one batch
    (:func:`fundp.add_clipped_sums`) and across ranks keep it.

    Privacy: ``grads`` becomes private only after :func:`fundp.privatize`; every other field
    describes the raw examples and is not private.

    Example:
      >>> import torch, fundp
      >>> loss_fn = lambda p, b: (b @ p["w"]) ** 2
      >>> params, batch = {"w": torch.tensor([1.0, 0.0])}, torch.tensor([[1.0, 0.0], [2.0, 0.0]])
      >>> s = fundp.clipped_grad_sum(loss_fn, max_norm=1.0)(params, batch)  # norms 2 and 8, each clipped to 1
      >>> s.grads, s.norms, s.num_examples, s.sensitivity  # the sum is kept in float64
      ({'w': tensor([2., 0.], dtype=torch.float64)}, tensor([2., 8.]), tensor(2), 1.0)
      >>> fundp.privatize(s, fundp.random.key(0), noise_multiplier=0.0, expected_batch_size=2)
      {'w': tensor([1., 0.])}
    """

    grads: Any
    """Pytree like params: ``sum_i c_i g_i`` over the real rows."""
    loss_sum: torch.Tensor
    """Sum of the real rows' finite losses (a diagnostic, not privatised)."""
    num_examples: torch.Tensor
    """Number of real (unmasked) rows whose gradient was kept, an int64 scalar tensor."""
    norms: torch.Tensor
    """``[B]`` per-example gradient norms before clipping (0 for masked rows)."""
    num_nonfinite: torch.Tensor
    """Number of real rows dropped because their gradient was NaN or Inf."""
    aux: Any = None
    """Per-example auxiliary output, leaves ``[B, ...]`` (``None`` without ``has_aux``)."""
    sensitivity: Any = None
    """L2 sensitivity ``S`` of ``grads``: a float, or a 0-d tensor when ``max_norm`` is one."""
    dtypes: Any = None
    """The parameters' dtypes, a tuple in ``grads``' leaf order: ``grads`` is accumulated in
    float64 (so one example moves it by at most ``S``, whatever the parameter dtype) and
    :func:`fundp.privatize` rounds ``(grads + noise) / E[B]`` to these dtypes once, at the end."""


class StepResult(NamedTuple):
    """What a step made by :func:`fundp.dp_step` returns.

    Privatised (safe to release, to log, and to adapt hyperparameters from): ``grads``,
    ``ledger``; ``clip_state`` (updated from a *noisy* count) and ``noise_state`` (noise only).

    **Not private**: ``loss``, ``norms``, ``num_nonfinite`` and ``aux`` are computed from the
    raw examples with no noise.  Printing them for debugging is a choice; adapting a
    hyperparameter (a clipping threshold, a learning rate, early stopping) from them leaks
    information about the training data that the ledger does not account for.  Use
    ``dp_step(..., adaptive_clipping=...)`` for a private clipping threshold.

    Example:
      >>> import torch, fundp
      >>> loss_fn = lambda p, b: (b @ p["w"]) ** 2
      >>> step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=2)
      >>> out = step({"w": torch.tensor([1.0, 0.0])}, torch.tensor([[1.0, 0.0], [2.0, 0.0]]), fundp.random.key(0))
      >>> out.grads, out.loss, out.norms, out.ledger
      ({'w': tensor([1., 0.])}, tensor(2.5000), tensor([2., 8.]), None)
    """

    grads: Any
    """Private. ``(sum_i c_i g_i + N(0, (sigma S)^2)) / expected_batch_size``, a pytree like params."""
    ledger: Any
    """Private (public settings only). The ledger after this step (``None`` when ``None`` was passed)."""
    loss: torch.Tensor
    """NOT private. Mean loss over the real rows whose gradient was kept (0 for an empty batch)."""
    norms: torch.Tensor
    """NOT private. ``[B]`` per-example gradient norms before clipping (0 for masked rows)."""
    num_nonfinite: torch.Tensor
    """NOT private. Real rows dropped for a NaN/Inf gradient in this step."""
    aux: Any = None
    """NOT private. Per-example auxiliary output of ``loss_fn``, leaves ``[B, ...]``."""
    clip_state: Any = None
    """Private. The adaptive-clipping state after this step (``None`` without ``adaptive_clipping``)."""
    noise_state: Any = None
    """The correlated-noise mechanism's state after this step (``None`` without ``noise_mechanism``)."""


class Step(Protocol):
    """The type of the function :func:`fundp.dp_step` returns.

    ``step(params, batch, key, *, ledger=None, mask=None, max_norm=None, noise_multiplier=None,
    clip_state=None, noise_state=None) -> StepResult``.

    Example:
      >>> import torch, fundp
      >>> step: fundp.Step = fundp.dp_step(lambda p, b: b @ p["w"], max_norm=1.0, noise_multiplier=0.0,
      ...                                  expected_batch_size=1)
      >>> type(step({"w": torch.ones(2)}, torch.ones(1, 2), fundp.random.key(0))).__name__
      'StepResult'
    """

    def __call__(
        self,
        params: Any,
        batch: Any,
        key: torch.Tensor,
        *,
        ledger: Any = None,
        mask: torch.Tensor | None = None,
        max_norm: Any = None,
        noise_multiplier: Any = None,
        clip_state: Any = None,
        noise_state: Any = None,
    ) -> StepResult: ...
