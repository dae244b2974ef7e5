"""Cyclic Poisson batches: the sampling under which banded MF is amplified.

Choquette-Choo et al. 2023 (Alg. 2): the ``N`` examples are split once into ``b`` partitions;
step ``t`` Poisson-samples partition ``t mod b`` (each of its examples joins independently with
probability ``q``).  An example is then only ever used at steps ``p, p + b, p + 2b, ...`` of its
partition ``p`` (``b``-min-separation), and the ``b``-banded mechanism on these batches is as
private as DP-SGD with rate ``q`` over ``ceil(n / b)`` steps (:func:`fundp.mf.cyclic_poisson`).

Everything is keyed like :func:`fundp.data.poisson_batches`: with
``partition_key, step_key = fundp.random.split(key)``, the partitions come from a keyed
permutation (``argsort`` of uniforms drawn from ``partition_key``; partition ``p`` holds
positions ``[p N / b, (p + 1) N / b)`` of it, sizes differing by at most one) and step ``t`` draws
only from ``fold_in(step_key, t)`` (exact Bernoulli inclusion by geometric gaps,
:func:`fundp.data.poisson_indices`).  Batches are padded with masked rows to a multiple of
``pad_to_multiple`` so a compiled step sees few shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from fundp import random as fundp_random
from fundp._validate import check_int, check_sample_rate
from fundp.sampling import StepIndexedBatches, _pad

__all__ = ["CyclicPoissonBatches", "cyclic_poisson_batches", "partitions", "check_batches_match"]


def partitions(num_examples: int, num_partitions: int, key: torch.Tensor) -> list[torch.Tensor]:
    """The ``b`` disjoint sorted index sets (``LongTensor``) of a keyed random split of ``range(N)``.

    Partition ``p`` is ``sort(perm[floor(p N / b) : floor((p + 1) N / b)])`` for the permutation
    ``perm = argsort(uniform(key, N))``: sizes ``floor(N / b)`` or ``ceil(N / b)``.

    Example:
      >>> import fundp
      >>> parts = fundp.mf.partitions(10, 3, fundp.random.key(0))
      >>> [len(p) for p in parts], sorted(int(i) for p in parts for i in p) == list(range(10))
      ([3, 3, 4], True)
    """
    n = check_int("num_examples", num_examples, minimum=1, maximum=2**31 - 1)
    b = check_int("num_partitions", num_partitions, minimum=1, maximum=n)
    fundp_random._check_key(key)
    scores = fundp_random.uniform(key.detach().cpu(), (n,), torch.float64)
    permutation = torch.argsort(scores, stable=True)
    bounds = [p * n // b for p in range(b + 1)]
    return [torch.sort(permutation[bounds[p] : bounds[p + 1]]).values for p in range(b)]


class CyclicPoissonBatches(StepIndexedBatches):
    """Iterable of padded cyclic-Poisson batches ``(indices: LongTensor[P], mask: BoolTensor[P])``.

    Made by :func:`cyclic_poisson_batches`.  ``batches[t]`` recomputes step ``t`` alone.
    Attributes: ``num_examples``, ``num_partitions``, ``sample_rate`` (``q``, per partition),
    ``steps``, ``pad_to_multiple``, ``expected_batch_size`` (``q N / b``, the divisor to give
    ``dp_step``), ``participation`` (``fundp.mf.cyclic_poisson(b, q)``, for the mechanism) and
    ``sampling == "cyclic_poisson"``.

    Example:
      >>> import fundp
      >>> batches = fundp.mf.cyclic_poisson_batches(12, 0.5, fundp.random.key(0), num_partitions=3,
      ...                                           steps=3, pad_to_multiple=4)
      >>> indices, mask = batches[1]  # step 1 samples from partition 1 only
      >>> indices[mask].tolist(), batches.partitions[1].tolist(), batches.expected_batch_size
      ([1, 7, 9], [1, 7, 9, 11], 2.0)
    """

    sampling = "cyclic_poisson"

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        key: torch.Tensor,
        *,
        num_partitions: int,
        steps: int | None,
        pad_to_multiple: int = 32,
        device: torch.device | str | None = None,
    ):
        self.num_examples = check_int("num_examples", num_examples, minimum=1, maximum=2**31 - 1)
        self.num_partitions = check_int("num_partitions", num_partitions, minimum=1, maximum=self.num_examples)
        self.sample_rate = check_sample_rate(sample_rate)
        self.steps = None if steps is None else check_int("steps", steps, minimum=0, maximum=2**32)
        self.pad_to_multiple = check_int("pad_to_multiple", pad_to_multiple, minimum=1)
        fundp_random._check_key(key)
        self.key = key.detach().cpu()
        partition_key, self._step_key = fundp_random.split(self.key)
        self.partitions = partitions(self.num_examples, self.num_partitions, partition_key)
        self.device = device

    @property
    def expected_batch_size(self) -> float:
        """``q N / b``: the public divisor of the noisy gradient sum."""
        return self.sample_rate * self.num_examples / self.num_partitions

    @property
    def participation(self) -> Any:
        """``fundp.mf.cyclic_poisson(num_partitions, sample_rate)``."""
        from fundp.mf.accounting import cyclic_poisson

        return cyclic_poisson(self.num_partitions, self.sample_rate)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded batch of step ``step``: partition ``step mod b`` sampled from ``fold_in(step_key, step)``."""
        from fundp.sampling import poisson_indices  # the exact keyed Bernoulli draw of DP-SGD's batches

        step = check_int("step", step, minimum=0, maximum=2**32 - 1)
        group = self.partitions[step % self.num_partitions]
        local = poisson_indices(group.numel(), self.sample_rate, fundp_random.fold_in(self._step_key, step))
        return _pad(group[local], self.pad_to_multiple, self.device)

    def __repr__(self) -> str:
        return (
            f"CyclicPoissonBatches(num_examples={self.num_examples}, num_partitions={self.num_partitions}, "
            f"sample_rate={self.sample_rate}, steps={self.steps}, pad_to_multiple={self.pad_to_multiple})"
        )


def cyclic_poisson_batches(
    num_examples: int,
    sample_rate: float,
    key: torch.Tensor,
    *,
    num_partitions: int,
    steps: int | None,
    pad_to_multiple: int = 32,
    device: torch.device | str | None = None,
) -> CyclicPoissonBatches:
    """Cyclic Poisson batches (Choquette-Choo et al. 2023, Alg. 2), padded to fixed shapes.

    Args:
      num_examples: ``N``.
      sample_rate: ``q`` in ``(0, 1]``: each example of the visited partition joins with probability ``q``.
      key: a :mod:`fundp.random` key (use one of its own).
      num_partitions: ``b`` >= the number of bands of the strategy.
      steps: ``n`` (``None``: unbounded).
      pad_to_multiple: padded sizes are multiples of it (never 0).
      device: where to put ``indices`` and ``mask``.

    Example:
      >>> import fundp
      >>> batches = fundp.mf.cyclic_poisson_batches(1000, 0.2, fundp.random.key(0), num_partitions=4, steps=8)
      >>> batches.expected_batch_size, batches.participation
      (50.0, cyclic_poisson(4, sample_rate=0.2))
      >>> parts = [set(batches.partitions[t % 4].tolist()) for t in range(8)]
      >>> all(set(i[m].tolist()) <= parts[t] for t, (i, m) in enumerate(batches))
      True
    """
    return CyclicPoissonBatches(
        num_examples, sample_rate, key, num_partitions=num_partitions, steps=steps,
        pad_to_multiple=pad_to_multiple, device=device,
    )


def check_batches_match(batches: Any, mechanism: Any, *, expected_batch_size: float | None = None) -> None:
    """Checks that ``batches`` are sampled the way ``mechanism``'s participation (its privacy) assumes.

    A mechanism with ``cyclic_poisson(b, q)`` needs :class:`CyclicPoissonBatches` with the same
    ``b`` and ``q``; ``expected_batch_size`` (the divisor given to the step), if passed, must be
    ``q N / b`` (relative tolerance 1e-6).  Poisson batches over the whole data set
    (``fundp.data.poisson_batches``) match ``cyclic_poisson(1, q)``.  Batches without a sampling
    description, or other participations, are not checked here: single participation and
    min-separation are properties of the order of the data, which the caller must guarantee.

    Raises ``ValueError`` naming the mismatch.

    Example:
      >>> import fundp
      >>> batches = fundp.mf.cyclic_poisson_batches(100, 0.5, fundp.random.key(0), num_partitions=2, steps=4)
      >>> mech = fundp.mf.mechanism(fundp.mf.identity(4), batches.participation)
      >>> fundp.mf.check_batches_match(batches, mech, expected_batch_size=25.0)
    """
    from fundp.mf.accounting import CyclicPoisson

    participation = mechanism.participation
    if not isinstance(participation, CyclicPoisson):
        return
    sampling = getattr(batches, "sampling", None)
    if sampling == "poisson":
        partitions_, rate = 1, float(batches.sample_rate)
        size = rate * batches.num_examples
    elif sampling == "cyclic_poisson":
        partitions_, rate = int(batches.num_partitions), float(batches.sample_rate)
        size = float(batches.expected_batch_size)
    else:
        raise ValueError(
            f"the mechanism assumes {participation!r} but the batches are sampled by {sampling!r}: "
            "use fundp.mf.cyclic_poisson_batches"
        )
    if partitions_ != participation.num_partitions or rate != participation.sample_rate:
        raise ValueError(
            f"the mechanism assumes {participation!r} but the batches use num_partitions={partitions_}, "
            f"sample_rate={rate}"
        )
    if expected_batch_size is not None and abs(float(expected_batch_size) - size) > 1e-6 * size:
        raise ValueError(f"expected_batch_size must be {size} (sample_rate * N / num_partitions), got {expected_batch_size}")
