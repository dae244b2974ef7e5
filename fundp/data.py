"""Data for DP steps: Poisson sampling padded to fixed shapes, a ``DataLoader`` bridge, accumulation.

One namespace for three small modules:

* :mod:`fundp.sampling` — :func:`poisson_batches` (exact keyed Poisson sampling, padded with a
  mask so a compiled step sees a handful of shapes), :func:`gather` (the rows of one batch as a
  :class:`Batch` that carries its mask and sampler, which a step takes whole), :func:`shuffled_batches` (not Poisson; refused
  by the guard) and :func:`check_sampling_matches` (the ledger's ``sample_rate`` must be how the
  batches were drawn);
* :mod:`fundp.loader` — :func:`poisson_loader` and its pieces, for map-style
  ``torch.utils.data.Dataset`` s;
* gradient accumulation, which lives in the step itself: ``fundp.dp_step(...,
  physical_batch_size=)`` (:func:`fundp.step.accumulate`); :func:`accumulated_dp_step` is its
  alias and :func:`split_batch` its chunking.

Example:
  >>> import torch, fundp
  >>> batches = fundp.data.poisson_batches(100, 0.2, fundp.random.key(1), steps=2, pad_to_multiple=16)
  >>> fundp.data.check_sampling_matches(batches, 0.2, expected_batch_size=20.0)
  0.2
"""

from __future__ import annotations

from typing import Any, Callable

from fundp.loader import MaskedDataset, PaddedRow, PoissonBatchSampler, PoissonLoader, collate_masked, poisson_loader
from fundp.sampling import (
    Batch,
    PoissonBatches,
    SamplingMismatchWarning,
    ShuffledBatches,
    TruncatedPoissonBatches,
    _bernoulli_positions,
    check_sampling_matches,
    gather,
    padded_size,
    poisson_batches,
    poisson_indices,
    shuffled_batches,
    truncated_poisson_batches,
    truncation_probability,
)
from fundp.step import dp_step, split_batch
from fundp.types import Step

__all__ = [
    "Batch",
    "gather",
    "PoissonBatches",
    "poisson_batches",
    "poisson_indices",
    "padded_size",
    "ShuffledBatches",
    "shuffled_batches",
    "TruncatedPoissonBatches",
    "truncated_poisson_batches",
    "truncation_probability",
    "PaddedRow",
    "PoissonBatchSampler",
    "MaskedDataset",
    "collate_masked",
    "PoissonLoader",
    "poisson_loader",
    "split_batch",
    "accumulated_dp_step",
    "check_sampling_matches",
    "SamplingMismatchWarning",
]

_ = _bernoulli_positions  # re-exported for the sampling tests


def accumulated_dp_step(loss_fn: Callable, *, physical_batch_size: int, **dp_step_kwargs: Any) -> Step:
    """Alias of ``fundp.dp_step(loss_fn, physical_batch_size=..., **dp_step_kwargs)``.

    The logical batch is split with :func:`split_batch` into chunks of exactly
    ``physical_batch_size`` rows whose clipped sums are added; noise, the division by
    ``expected_batch_size`` and the accounting then happen once, as in ``dp_step`` on the whole
    batch (with the same key the results are equal, noise included, whenever the model uses no
    randomness; chunk ``c`` gets the model key ``fold_in(model_key, c)``).  Every ``dp_step``
    option works here (``sampler=``, ``compile_chunk=``, ``budget=``, ``distributed=``, ...).

    Example:
      >>> import torch, fundp
      >>> loss_fn = lambda p, b: (b @ p["w"]) ** 2
      >>> step = fundp.data.accumulated_dp_step(loss_fn, physical_batch_size=2, max_norm=1.0,
      ...                                       noise_multiplier=0.0, expected_batch_size=4.0, grad_method="vmap")
      >>> step({"w": torch.ones(2)}, torch.eye(2).repeat(2, 1), fundp.random.key(0)).grads["w"]
      tensor([0.5000, 0.5000])
    """
    return dp_step(loss_fn, physical_batch_size=physical_batch_size, **dp_step_kwargs)
