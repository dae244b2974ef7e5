"""A ``torch.utils.data`` bridge: padded Poisson batches, with their masks, from any map-style dataset.

:class:`PoissonBatchSampler` is a ``batch_sampler`` yielding the rows of
:func:`fundp.data.poisson_batches`; :class:`MaskedDataset` and :func:`collate_masked` turn them
into ``(batch, mask)`` pairs; :func:`poisson_loader` wires the three into a ``DataLoader`` that
yields each batch as a :class:`fundp.data.Batch` (rows, mask and sampler in one value, which
unpacks as ``batch, mask``).

Example:
  >>> import torch, fundp
  >>> ds = torch.utils.data.TensorDataset(torch.arange(10.0))
  >>> loader = fundp.data.poisson_loader(ds, 0.5, fundp.random.key(0), steps=2, pad_to_multiple=8)
  >>> [(tuple(b[0].shape), tuple(m.shape)) for b, m in loader]
  [((8,), (8,)), ((8,), (8,))]
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from fundp.sampling import Batch, PoissonBatches

__all__ = ["PaddedRow", "PoissonBatchSampler", "MaskedDataset", "collate_masked", "PoissonLoader", "poisson_loader"]


class PaddedRow:
    """One row of a padded Poisson batch: ``index`` into the dataset and ``real`` (False: padding).

    Deliberately neither an int nor a tuple, so handing these rows to a dataset that is not
    wrapped in :class:`MaskedDataset` fails loudly instead of silently training on padding.

    Example:
      >>> from fundp.loader import MaskedDataset, PaddedRow
      >>> row = PaddedRow(2, False)
      >>> row.index, row.real
      (2, False)
      >>> MaskedDataset([10, 20, 30])[row]
      (30, False)
    """

    __slots__ = ("index", "real")

    def __init__(self, index: int, real: bool):
        self.index = index
        self.real = real

    def __reduce__(self):  # picklable for DataLoader workers
        return (PaddedRow, (self.index, self.real))

    def __repr__(self) -> str:
        return f"PaddedRow({self.index}, {self.real})"


class PoissonBatchSampler(Sampler):
    """A ``batch_sampler`` for ``torch.utils.data.DataLoader`` yielding padded Poisson batches.

    Each batch is a list of ``P`` :class:`PaddedRow` s (the rows of :func:`poisson_batches` with
    the same arguments).  Use it with a dataset wrapped in :class:`MaskedDataset` and
    :func:`collate_masked`, so each loaded batch comes with its mask::

        sampler = PoissonBatchSampler(len(ds), q, key, steps=T)
        loader = DataLoader(MaskedDataset(ds), batch_sampler=sampler, collate_fn=collate_masked)
        for batch, mask in loader: ...

    (:func:`poisson_loader` does exactly this.)  ``.sample_rate`` and ``.batches`` expose the
    sampling for :func:`check_sampling_matches`.  Indices are drawn in the main process, so the
    batches do not depend on ``num_workers``.

    Example:
      >>> import fundp
      >>> from fundp.loader import PoissonBatchSampler
      >>> sampler = PoissonBatchSampler(10, 0.5, fundp.random.key(0), steps=2, pad_to_multiple=8)
      >>> next(iter(sampler))[:5]
      [PaddedRow(3, True), PaddedRow(5, True), PaddedRow(6, True), PaddedRow(7, True), PaddedRow(0, False)]
      >>> len(sampler), sampler.sample_rate
      (2, 0.5)
    """

    sampling = "poisson"

    def __init__(self, num_examples: int, sample_rate: float, key: torch.Tensor, *, steps: int, pad_to_multiple: int = 32):
        if steps is None:
            raise ValueError("steps must be an int for a DataLoader batch sampler (it needs a length)")
        self.batches = PoissonBatches(num_examples, sample_rate, key, steps=steps, pad_to_multiple=pad_to_multiple)

    @property
    def sample_rate(self) -> float:
        return self.batches.sample_rate

    @property
    def num_examples(self) -> int:
        return self.batches.num_examples

    @property
    def expected_batch_size(self) -> float:
        return self.batches.expected_batch_size

    def __iter__(self) -> Iterator[list[PaddedRow]]:
        for indices, mask in self.batches:
            yield [PaddedRow(i, r) for i, r in zip(indices.tolist(), mask.tolist())]

    def __len__(self) -> int:
        return len(self.batches)


class MaskedDataset(Dataset):
    """Wraps a map-style dataset so that ``ds[PaddedRow(i, real)] == (dataset[i], real)``.

    Uses the wrapped dataset's batched ``__getitems__`` when it has one.

    Example:
      >>> import torch
      >>> from fundp.loader import MaskedDataset, PaddedRow
      >>> ds = MaskedDataset(torch.utils.data.TensorDataset(torch.arange(3.0)))
      >>> ds[PaddedRow(1, True)]
      ((tensor(1.),), True)
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, row: PaddedRow) -> tuple[Any, bool]:
        if not isinstance(row, PaddedRow):
            raise TypeError(f"MaskedDataset is indexed by fundp.data.PaddedRow, got {type(row).__name__}")
        return self.dataset[row.index], row.real

    def __getitems__(self, rows: list[PaddedRow]) -> list[tuple[Any, bool]]:
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is None:
            return [self[row] for row in rows]
        items = getitems([row.index for row in rows])
        return list(zip(items, [row.real for row in rows]))


def collate_masked(samples: list[tuple[Any, bool]], collate_fn: Callable | None = None) -> tuple[Any, torch.Tensor]:
    """``[(item, real), ...] -> (collate_fn(items), BoolTensor[P] mask)`` (default: ``default_collate``).

    Example:
      >>> import torch
      >>> from fundp.loader import collate_masked
      >>> collate_masked([(torch.tensor(1.0), True), (torch.tensor(0.0), False)])
      (tensor([1., 0.]), tensor([ True, False]))
    """
    items = [item for item, _ in samples]
    mask = torch.tensor([bool(real) for _, real in samples], dtype=torch.bool)
    return (collate_fn or default_collate)(items), mask


class _MaskedCollate:
    """Picklable ``collate_masked`` bound to a user collate function (for worker processes)."""

    def __init__(self, collate_fn: Callable | None):
        self.collate_fn = collate_fn

    def __call__(self, samples):
        return collate_masked(samples, self.collate_fn)


class PoissonLoader(DataLoader):
    """The ``DataLoader`` of :func:`poisson_loader`: yields each padded Poisson batch as a
    :class:`fundp.data.Batch` (collated rows, mask and sampler), which a step takes whole.

    The value unpacks as ``batch, mask``, so ``for batch, mask in loader`` keeps working; the
    mask and the collated tensors are then tagged with the sampler (:mod:`fundp.guards`), so a step
    refuses them without ``mask=`` or with another sampler's accounting.  Built in the main process
    (after the workers' collation), so the sampler is the loader's own object.
    """

    def __init__(self, dataset: Any, batch_sampler: PoissonBatchSampler, **loader_kwargs: Any):
        super().__init__(dataset, batch_sampler=batch_sampler, **loader_kwargs)

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        import optree

        from fundp.guards import tag_mask, tag_padded

        batches = self.batch_sampler.batches  # type: ignore[union-attr]
        for data, mask in super().__iter__():
            tag_mask(mask, batches)
            for leaf in optree.tree_leaves(data):
                tag_padded(leaf, batches)
            yield Batch(data, mask, batches)


def poisson_loader(
    dataset: Dataset,
    sample_rate: float,
    key: torch.Tensor,
    *,
    steps: int,
    pad_to_multiple: int = 32,
    collate_fn: Callable | None = None,
    **loader_kwargs: Any,
) -> PoissonLoader:
    """A ``DataLoader`` over a map-style ``dataset`` yielding a :class:`fundp.data.Batch` per Poisson step.

    The batches are those of ``poisson_batches(len(dataset), sample_rate, key, steps=steps,
    pad_to_multiple=pad_to_multiple)``: each value holds ``P`` rows (``collate_fn``, default
    ``default_collate``, of the items), its ``mask`` (``BoolTensor[P]``) and the sampler; pass it
    whole to a step (``step(params, batch, key)``) or unpack it (``batch, mask = value``).  ``loader_kwargs`` go
    to ``DataLoader`` (``num_workers``, ``pin_memory``, ...); ``batch_size``, ``shuffle``,
    ``sampler``, ``batch_sampler`` and ``drop_last`` are refused since the Poisson sampler owns
    them.  ``loader.batch_sampler.sample_rate`` holds ``q``.

    Example:
      >>> import torch, fundp
      >>> ds = torch.utils.data.TensorDataset(torch.arange(10.0))
      >>> loader = fundp.data.poisson_loader(ds, 0.5, fundp.random.key(0), steps=2, pad_to_multiple=8)
      >>> (x,), mask = next(iter(loader))
      >>> x[mask], loader.batch_sampler.sample_rate
      (tensor([3., 5., 6., 7.]), 0.5)
    """
    for name in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
        if name in loader_kwargs:
            raise ValueError(f"poisson_loader sets {name} itself (Poisson sampling); do not pass it")
    try:
        num_examples = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("dataset must be a map-style Dataset with __len__") from None
    sampler = PoissonBatchSampler(num_examples, sample_rate, key, steps=steps, pad_to_multiple=pad_to_multiple)
    return PoissonLoader(MaskedDataset(dataset), batch_sampler=sampler, collate_fn=_MaskedCollate(collate_fn), **loader_kwargs)
