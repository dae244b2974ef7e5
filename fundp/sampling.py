"""Poisson-sampled batches with fixed padded shapes, shuffled batches, and the sampling guard.

DP-SGD's privacy analysis (and so the ledger) assumes **Poisson sampling**: at every step each of
the ``N`` examples joins the batch independently with probability ``q``.  Batch sizes then vary
from step to step, which a compiled step would see as a new shape every time.  This module makes
the correct sampling the fast path:

* :func:`poisson_batches` yields ``(indices, mask)`` per step: the sampled indices, padded with
  masked rows up to a multiple of ``pad_to_multiple`` rows.  A compiled ``dp_step`` therefore
  sees only a handful of shapes over a whole run (one per bucket the batch size falls in, see
  "Shapes" below).  Empty batches are yielded as ``pad_to_multiple`` masked rows, never skipped:
  skipping them would change the sampling the accounting assumes.
* :mod:`fundp.loader` gives the same padded batches, with masks, from any map-style
  ``torch.utils.data.Dataset``; ``dp_step(..., physical_batch_size=)`` processes a logical batch
  as fixed-size physical chunks (gradient accumulation).
* :class:`Batch` (made by :func:`gather`, or yielded by :func:`fundp.data.poisson_loader`) holds
  the gathered rows of one batch with its mask and the sampler that drew it: a step takes it
  whole (``step(params, batch, key)``), so the mask cannot be forgotten and a batch of another
  sampler is refused.
* :func:`check_sampling_matches` guards the link between the data pipeline and the accounting:
  the ``sample_rate`` the ledger records must be the one the batches were sampled with, and
  shuffled fixed-size batches (:func:`shuffled_batches`) are refused as Poisson unless the user
  explicitly acknowledges the mismatch (and then a warning is raised).

How a step is sampled (exact, O(q N) work, no Python loop over examples)
-------------------------------------------------------------------------
Step ``t`` uses only ``key_t = fundp.random.fold_in(key, t)``: same key, same batches, and any
step can be recomputed on its own (``batches[t]``), e.g. after resuming from a checkpoint.

The included examples of ``N`` independent Bernoulli(``r``) trials are found through their
*gaps*: the numbers of failures before each success are i.i.d. Geometric(``r``), drawn by the
inverse CDF ``G = floor(log(U) / log(1 - r))`` from keyed 53-bit uniforms ``U`` (Threefry,
:func:`fundp.random.uniform`), and the included indices are their running sums
``i_j = sum_{k<=j} (G_k + 1) - 1``, kept while ``< N``.  This *is* independent Bernoulli inclusion
(not an approximation of it), so the batch size is Binomial(``N``, ``q``) and the included set is
uniform given its size.  The only deviation is floating-point rounding of ``log`` on the 2^-53
grid of ``U``: a relative error of order 1e-16 in each gap probability.  The work is vectorised
tensor code of size about ``r N``: for ``q <= 1/2`` the gaps of the included examples are drawn
(``r = q``); for ``q > 1/2`` those of the *excluded* ones (``r = 1 - q``, computed exactly) and the
complement is taken with an ``N``-element boolean mask.  ``q = 1`` includes everything.  At
``N = 10^7`` and ``q = 0.01`` a step takes a few milliseconds.  torch's and numpy's global RNGs
are never used.

Shapes
------
* Plain ``dp_step`` on :func:`poisson_batches`: the padded size is
  ``P = pad_to_multiple * max(1, ceil(B / pad_to_multiple))``.  With ``B ~ Binomial(N, q)``,
  ``B`` stays within ``q N +- 5 sqrt(q N (1 - q))`` except with probability below 1e-6 per step,
  so a run sees about ``10 sqrt(q N) / pad_to_multiple + 2`` shapes.  Pick ``pad_to_multiple``
  near ``2 sqrt(q N)`` or larger to keep that to a handful (e.g. ``q N = 256``, ``pad_to_multiple
  = 32``: ``176 <= B <= 336``, so ``P`` is one of the 6 sizes 192, 224, ..., 352).  ``torch.compile(step)`` then compiles once per shape and
  never again (``tests/test_compile_count.py`` checks it; the ``vmap``-based step is specialised
  to each shape, also under the default ``dynamic=None``).  Keep the number of shapes below
  dynamo's recompile limit (``torch._dynamo.config.recompile_limit``, 8 by default), or dynamo
  falls back to eager for further shapes.
* ``dp_step(..., physical_batch_size=)``: one shape, ``physical_batch_size`` rows, whatever the batch size.
  Use ``pad_to_multiple=physical_batch_size`` so no chunk is entirely padding.

Example:
  >>> import torch, fundp
  >>> batches = fundp.data.poisson_batches(1000, 0.05, fundp.random.key(0), steps=3, pad_to_multiple=32)
  >>> [(tuple(i.shape), int(m.sum())) for i, m in batches]
  [((64,), 42), ((64,), 46), ((64,), 46)]
  >>> batches.sample_rate, len(batches)
  (0.05, 3)
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from fundp import random as fundp_random
from fundp._validate import check_int, check_real, check_sample_rate

__all__ = [
    "PoissonBatches",
    "poisson_batches",
    "TruncatedPoissonBatches",
    "truncated_poisson_batches",
    "truncation_probability",
    "poisson_indices",
    "padded_size",
    "ShuffledBatches",
    "shuffled_batches",
    "check_sampling_matches",
    "sampler_of",
    "SamplingMismatchWarning",
    "Batch",
    "gather",
]

# Indices are int64 and the running sums of up to N + 1 gaps (each clipped to N) must not
# overflow: (N + 1) * (N + 1) < 2**63 holds for N < 2**31.
_MAX_EXAMPLES = 2**31 - 1
# fold_in takes the step number as one 32-bit word.
_MAX_STEPS = 2**32


# --------------------------------------------------------------------------- argument checks


def _check_steps(steps: Any) -> int | None:
    if steps is None:
        return None
    return check_int("steps", steps, minimum=0, maximum=_MAX_STEPS)


def _cpu_key(key: Any) -> torch.Tensor:
    fundp_random._check_key(key)
    return key.detach().to("cpu")


# --------------------------------------------------------------------------- sampling


def _bernoulli_positions(num_trials: int, rate: float, key: torch.Tensor, _round_size: int | None = None) -> torch.Tensor:
    """Sorted int64 positions of the successes among ``num_trials`` i.i.d. Bernoulli(``rate``) trials.

    ``0 < rate <= 1/2``.  Gaps (failures before each success) are Geometric(``rate``) by inverse
    CDF; round ``k`` of gaps draws from ``fold_in(key, k)``.  Round sizes depend only on
    ``(num_trials, rate)``, so the result is a pure function of the key.  (``_round_size`` forces
    small rounds, for tests of the multi-round path.)
    """
    log_fail = math.log1p(-rate)  # log(1 - r) < 0, accurate for tiny r
    mean = num_trials * rate
    # Enough gaps to pass the end with probability ~1 - 1e-9 in one round; more rounds otherwise.
    first = min(num_trials + 1, math.ceil(mean + 6.0 * math.sqrt(mean * (1.0 - rate)) + 16))
    later = min(num_trials + 1, max(first // 4, 1024))
    if _round_size is not None:
        first = later = _round_size
    pieces = []
    last = torch.tensor(-1, dtype=torch.int64)
    for round_number in range(num_trials + 2):  # each round advances >= 1 position: always ends
        size = first if round_number == 0 else later
        uniforms = fundp_random.uniform(fundp_random.fold_in(key, round_number), (size,), torch.float64)
        # floor(log U / log(1 - r)) ~ Geometric(r) on {0, 1, ...}: P(G >= k) = P(U <= (1 - r)^k).
        # Clipping at num_trials keeps the running sums in int64; a gap that long ends the batch anyway.
        gaps = torch.floor(torch.log(uniforms) / log_fail).clamp_(max=float(num_trials)).to(torch.int64)
        positions = last + torch.cumsum(gaps + 1, dim=0)
        pieces.append(positions)
        last = positions[-1]
        if int(last) >= num_trials:
            break
    positions = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    count = int(torch.searchsorted(positions, torch.tensor([num_trials], dtype=torch.int64))[0])
    return positions[:count]


def poisson_indices(num_examples: int, sample_rate: float, key: torch.Tensor) -> torch.Tensor:
    """Returns the sorted ``LongTensor[B]`` of examples included by one Poisson draw from ``key``.

    Each of the ``num_examples`` examples is included independently with probability
    ``sample_rate`` (exactly, up to float64 rounding; see the module docstring), so
    ``B ~ Binomial(num_examples, sample_rate)``; ``B`` may be 0.  Unpadded: use
    :func:`poisson_batches` for fixed shapes.  Computed on the CPU.

    Example:
      >>> import fundp
      >>> from fundp.sampling import poisson_indices
      >>> poisson_indices(10, 0.5, fundp.random.key(0))
      tensor([0, 2, 4, 6, 9])
    """
    num_examples = check_int("num_examples", num_examples, minimum=1, maximum=_MAX_EXAMPLES)
    sample_rate = check_sample_rate(sample_rate)
    key = _cpu_key(key)
    if sample_rate == 1.0:
        return torch.arange(num_examples, dtype=torch.int64)
    if sample_rate <= 0.5:
        return _bernoulli_positions(num_examples, sample_rate, key)
    # Drawing the excluded examples keeps the work at O((1 - q) N) gaps; 1 - q is exact for q >= 1/2.
    excluded = _bernoulli_positions(num_examples, 1.0 - sample_rate, key)
    keep = torch.ones(num_examples, dtype=torch.bool)
    keep[excluded] = False
    return keep.nonzero().squeeze(1)


def padded_size(batch_size: int, pad_to_multiple: int) -> int:
    """``P = pad_to_multiple * max(1, ceil(batch_size / pad_to_multiple))``: never 0, so an empty
    batch keeps a shape.

    Example:
      >>> import fundp
      >>> [fundp.data.padded_size(b, 32) for b in (0, 1, 32, 33)]
      [32, 32, 32, 64]
    """
    batch_size = check_int("batch_size", batch_size, minimum=0)
    pad_to_multiple = check_int("pad_to_multiple", pad_to_multiple, minimum=1)
    return pad_to_multiple * max(1, -(-batch_size // pad_to_multiple))


def _pad(indices: torch.Tensor, pad_to_multiple: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    size = indices.shape[0]
    total = pad_to_multiple * max(1, -(-size // pad_to_multiple))
    # Padding rows hold index 0: a valid example (so loading it never fails), masked out.
    padded = torch.zeros(total, dtype=torch.int64)
    padded[:size] = indices
    mask = torch.zeros(total, dtype=torch.bool)
    mask[:size] = True
    if device is not None:
        padded, mask = padded.to(device), mask.to(device)
    return padded, mask


def _tagged(sampler: Any, batch: Any, padded: bool = True) -> Any:
    """``batch``, its mask tagged with the sampler that yielded it (:func:`fundp.guards.tag_mask`)
    and, when its rows may be padding (``padded``), its indices too (:func:`fundp.guards.tag_padded`:
    a step refuses them without their mask)."""
    if isinstance(batch, tuple) and len(batch) == 2:
        from fundp.guards import tag_mask, tag_padded

        tag_mask(batch[1], sampler)
        if padded:
            tag_padded(batch[0], sampler)
    return batch


class Batch:
    """One batch as a value: the gathered rows, their mask and the sampler that drew them.

    ``data`` is a pytree of tensors of ``P`` rows each (the padded batch), ``mask`` its
    ``BoolTensor[P]`` (True: a real example, False: padding) and ``sampler`` the fundp sampler
    whose ``(indices, mask)`` it was gathered with (:func:`gather`; :func:`fundp.data.poisson_loader`
    yields these values).  A step takes it whole, ``step(params, batch, key)``: the mask comes
    from it (passing ``mask=`` as well is refused) and a batch whose sampler is not the one the
    step was built for (``dp_step(..., sampler=)``), or whose sampling contradicts the step's
    accounting, is refused.  Immutable; unpacks as ``data, mask = batch``; a pytree
    (``torch.utils._pytree``) whose leaves are those of ``data`` and ``mask``, the sampler riding
    along; ``batch.to(device)`` moves it.

    Example:
      >>> import torch, fundp
      >>> x = torch.arange(10.0)[:, None]
      >>> batches = fundp.data.poisson_batches(10, 0.5, fundp.random.key(0), steps=2, pad_to_multiple=8)
      >>> batch = fundp.data.gather(x, *batches[0])
      >>> batch.data[batch.mask].flatten().tolist(), batch.sampler is batches
      ([3.0, 5.0, 6.0, 7.0], True)
    """

    __slots__ = ("data", "mask", "sampler")
    data: Any
    mask: torch.Tensor
    sampler: Any

    def __init__(self, data: Any, mask: torch.Tensor, sampler: Any):
        from fundp._validate import check_batch, check_mask

        if sampler is None:
            raise ValueError("Batch needs the sampler its rows were drawn by (sampler=None): use fundp.data.gather")
        check_mask(mask, check_batch(data))
        for name, value in (("data", data), ("mask", mask), ("sampler", sampler_of(sampler))):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a fundp.data.Batch is immutable")

    def __iter__(self) -> Iterator[Any]:
        return iter((self.data, self.mask))

    def to(self, *args: Any, **kwargs: Any) -> "Batch":
        """The same batch with every tensor of ``data`` converted by ``tensor.to(*args, **kwargs)``
        and the mask moved to the device of the first (it stays a bool tensor)."""
        import optree

        moved = optree.tree_map(lambda leaf: leaf.to(*args, **kwargs) if isinstance(leaf, torch.Tensor) else leaf, self.data)
        return Batch(moved, self.mask.to(optree.tree_leaves(moved)[0].device), self.sampler)

    def __repr__(self) -> str:
        return f"Batch(rows={self.mask.shape[0]}, real={int(self.mask.sum())}, sampler={self.sampler!r})"


def _unflatten_batch(children: Any, sampler: Any) -> Batch:
    batch = object.__new__(Batch)  # children may be any values (tree_map): no checks
    for name, value in zip(Batch.__slots__, (*children, sampler)):
        object.__setattr__(batch, name, value)
    return batch


def _register_batch() -> None:
    from torch.utils import _pytree

    if Batch not in _pytree.SUPPORTED_NODES:
        _pytree.register_pytree_node(Batch, lambda b: ([b.data, b.mask], b.sampler), _unflatten_batch,
                                     serialized_type_name="fundp.sampling.Batch")


_register_batch()


def gather(dataset: Any, indices: torch.Tensor, mask: torch.Tensor, *, sampler: Any = None) -> Batch:
    """The :class:`Batch` of the rows ``indices`` of ``dataset``, with ``mask`` and their sampler.

    ``dataset`` is a pytree of tensors of ``N`` rows each (``x``, ``(x, y)``, ``{"x": x, "y": y}``);
    ``indices`` (``LongTensor[P]``) and ``mask`` (``BoolTensor[P]``) are one batch a fundp sampler
    yielded (``indices, mask = batches[t]``).  Returns ``Batch({leaf[indices]}, mask, sampler)``
    (indices moved to each leaf's device; the mask to the first leaf's).  ``sampler`` defaults to
    the sampler that yielded ``mask`` (fundp's samplers tag their masks); a mask that no fundp
    sampler yielded (e.g. a copy, ``mask.to(device)``) needs ``sampler=`` (``ValueError``
    otherwise), and one that another sampler yielded is refused.

    Example:
      >>> import torch, fundp
      >>> batches = fundp.data.poisson_batches(6, 0.5, fundp.random.key(1), steps=1, pad_to_multiple=4)
      >>> indices, mask = batches[0]
      >>> batch = fundp.data.gather({"x": torch.arange(6.0)}, indices, mask)
      >>> batch.data["x"].tolist()  # padding rows: copies of example 0, masked
      [0.0, 1.0, 2.0, 4.0, 5.0, 0.0, 0.0, 0.0]
      >>> batch
      Batch(rows=8, real=5, sampler=PoissonBatches(num_examples=6, sample_rate=0.5, steps=1, pad_to_multiple=4))
    """
    import optree

    from fundp.guards import mask_source

    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype != torch.int64:
        raise ValueError(f"indices must be a LongTensor[P] that a fundp sampler yielded, got {indices!r}")
    tagged = mask_source(mask)
    if sampler is None:
        if tagged is None:
            raise ValueError("this mask was not yielded by a fundp sampler (or is a copy of one, e.g. mask.to(device)): "
                             "pass gather(..., sampler=batches) with the sampler that drew the indices")
        sampler = tagged
    elif tagged is not None and sampler_of(tagged) is not sampler_of(sampler):
        raise ValueError(f"the mask was yielded by {tagged!r}, not by sampler={sampler!r}")
    leaves = optree.tree_leaves(dataset)
    if not leaves or not all(isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 for leaf in leaves):
        raise ValueError("dataset must be a pytree of tensors of N rows each")
    data = optree.tree_map(lambda leaf: leaf[indices.to(leaf.device)], dataset)
    return Batch(data, mask.to(leaves[0].device), sampler)


class StepIndexedBatches:
    """A sequence of batches indexed by step: ``batches[t]`` is ``self.batch(t)``, iteration runs
    ``t = 0, 1, ...`` up to ``steps`` (forever when ``steps`` is None)."""

    steps: int | None

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.steps is not None and not 0 <= operator.index(step) < self.steps:
            raise IndexError(f"step {step} out of range for {self.steps} steps")
        return _tagged(self, self.batch(step))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = 0
        while self.steps is None or step < self.steps:
            yield _tagged(self, self.batch(step))
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError(f"an unbounded {type(self).__name__} (steps=None) has no length")
        return self.steps


class _RateSampledBatches(StepIndexedBatches):
    """What Poisson samplers share: ``num_examples``, ``sample_rate``, ``steps``, ``key``, ``device``
    and the divisor of the noisy sum, ``expected_batch_size``."""

    def __init__(self, num_examples: int, sample_rate: float, key: torch.Tensor, steps: int | None,
                 device: torch.device | str | None):
        self.num_examples = check_int("num_examples", num_examples, minimum=1, maximum=_MAX_EXAMPLES)
        self.sample_rate = check_sample_rate(sample_rate)
        self.steps = _check_steps(steps)
        self.key = _cpu_key(key)
        self.device = device

    @property
    def expected_batch_size(self) -> float:
        """``sample_rate * num_examples``: the divisor of the noisy gradient sum."""
        return self.sample_rate * self.num_examples


class PoissonBatches(_RateSampledBatches):
    """Iterable of padded Poisson batches ``(indices: LongTensor[P], mask: BoolTensor[P])``.

    Made by :func:`poisson_batches`; see it for the arguments.  Iterating again replays the same
    batches.  ``batches[t]`` (or ``batches.batch(t)``) recomputes step ``t`` alone, in O(q N)
    work: resume a run at step ``t`` with ``for s in range(t, steps): indices, mask = batches[s]``.

    Attributes: ``num_examples``, ``sample_rate``, ``steps`` (``None``: unbounded),
    ``pad_to_multiple``, ``expected_batch_size`` (``sample_rate * num_examples``), ``key`` and
    ``sampling == "poisson"`` (read by :func:`check_sampling_matches`).

    Example:
      >>> import fundp
      >>> batches = fundp.sampling.poisson_batches(10, 0.5, fundp.random.key(0), steps=2, pad_to_multiple=8)
      >>> indices, mask = batches[1]  # step 1 alone, as when resuming
      >>> indices[mask].tolist(), batches.expected_batch_size
      ([0, 1, 6, 7, 8], 5.0)
    """

    sampling = "poisson"

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        key: torch.Tensor,
        *,
        steps: int | None,
        pad_to_multiple: int = 32,
        device: torch.device | str | None = None,
    ):
        super().__init__(num_examples, sample_rate, key, steps, device)
        self.pad_to_multiple = check_int("pad_to_multiple", pad_to_multiple, minimum=1)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded batch of step ``step``, drawn from ``fold_in(key, step)``."""
        step = check_int("step", step, minimum=0, maximum=_MAX_STEPS - 1)
        indices = poisson_indices(self.num_examples, self.sample_rate, fundp_random.fold_in(self.key, step))
        return _pad(indices, self.pad_to_multiple, self.device)

    def __repr__(self) -> str:
        return (
            f"PoissonBatches(num_examples={self.num_examples}, sample_rate={self.sample_rate}, "
            f"steps={self.steps}, pad_to_multiple={self.pad_to_multiple})"
        )


def poisson_batches(
    num_examples: int,
    sample_rate: float,
    key: torch.Tensor,
    *,
    steps: int | None,
    pad_to_multiple: int = 32,
    device: torch.device | str | None = None,
) -> PoissonBatches:
    """Poisson-sampled batches, padded to fixed shapes, driven only by ``key``.

    Args:
      num_examples: ``N`` (``1 <= N < 2**31``).
      sample_rate: ``q`` in ``(0, 1]``: every example joins every step independently with
        probability ``q``.  Give the *same* ``q`` to ``dp_step(sample_rate=...)`` (the returned
        object carries it as ``.sample_rate``; :func:`check_sampling_matches` verifies it).
      key: a :mod:`fundp.random` key; step ``t`` uses ``fold_in(key, t)`` and nothing else.
        Use a key of its own (e.g. ``batch_key, train_key = fundp.random.split(key)``).
      steps: number of steps (``>= 0``); ``None`` for an unbounded stream.
      pad_to_multiple: ``P`` is a multiple of it and never 0.
      device: where to put ``indices`` and ``mask`` (computed on the CPU; default: stay there).

    Returns:
      A re-iterable :class:`PoissonBatches` yielding ``(indices: LongTensor[P], mask: BoolTensor[P])``
      per step: the ``B ~ Binomial(N, q)`` sampled indices in increasing order, then ``P - B``
      padding rows holding index 0 with ``mask`` False.  Empty batches are yielded
      (``P = pad_to_multiple``, all masked), never skipped.

    Example:
      >>> import fundp
      >>> from fundp.sampling import poisson_batches
      >>> batches = poisson_batches(10, 0.5, fundp.random.key(0), steps=2, pad_to_multiple=8)
      >>> for indices, mask in batches:
      ...     print(indices.tolist(), mask.sum().item())
      [3, 5, 6, 7, 0, 0, 0, 0] 4
      [0, 1, 6, 7, 8, 0, 0, 0] 5
    """
    return PoissonBatches(num_examples, sample_rate, key, steps=steps, pad_to_multiple=pad_to_multiple, device=device)


# --------------------------------------------------------------------------- truncated Poisson (one shape)


def truncation_probability(num_examples: int, sample_rate: float, max_batch_size: int) -> float:
    """``P[Binomial(num_examples + 1, sample_rate) > max_batch_size]``: the chance that one step of
    :func:`truncated_poisson_batches` truncates, on the dataset or on any add/remove neighbour.

    The ``+ 1`` covers the larger of two neighbouring datasets (the tail grows with the number of
    trials), so the bound holds for both sides of the adjacency.  Computed by scipy's regularised
    incomplete beta function (``binom.sf``), accurate to a few ulps of relative error.

    Example:
      >>> from fundp.sampling import truncation_probability
      >>> truncation_probability(9, 0.5, 9)  # 10 trials, all included: 2**-10
      0.0009765625
    """
    from scipy import stats  # type: ignore[import-untyped]

    num_examples = check_int("num_examples", num_examples, minimum=1, maximum=_MAX_EXAMPLES)
    sample_rate = check_sample_rate(sample_rate)
    max_batch_size = check_int("max_batch_size", max_batch_size, minimum=1)
    if max_batch_size >= num_examples + 1:
        return 0.0
    return float(stats.binom.sf(max_batch_size, num_examples + 1, sample_rate))


class TruncatedPoissonBatches(_RateSampledBatches):
    """Poisson batches truncated at ``max_batch_size`` and padded to exactly that size: one shape.

    Made by :func:`truncated_poisson_batches`; see it for the arguments and the accounting.
    Yields ``(indices: LongTensor[max_batch_size], mask: BoolTensor[max_batch_size])``.

    Attributes: ``num_examples``, ``sample_rate``, ``max_batch_size``, ``steps``, ``key``,
    ``expected_batch_size`` (``sample_rate * num_examples``, the divisor of the noisy sum, as for
    untruncated Poisson), ``truncation_probability`` (per step, see :func:`truncation_probability`),
    ``pad_to_multiple`` (``= max_batch_size``) and ``sampling == "truncated_poisson"``.
    """

    sampling = "truncated_poisson"

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        key: torch.Tensor,
        *,
        max_batch_size: int,
        steps: int | None,
        device: torch.device | str | None = None,
    ):
        super().__init__(num_examples, sample_rate, key, steps, device)
        self.max_batch_size = check_int("max_batch_size", max_batch_size, minimum=1)
        self.truncation_probability = truncation_probability(self.num_examples, self.sample_rate, self.max_batch_size)

    @property
    def pad_to_multiple(self) -> int:
        return self.max_batch_size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of step ``step``: Poisson draw from ``fold_in(fold_in(key, step), 0)``; if it
        holds more than ``max_batch_size`` examples, the ``max_batch_size`` with the smallest
        uniform priorities from ``fold_in(fold_in(key, step), 1)`` are kept (a uniform subset)."""
        step = check_int("step", step, minimum=0, maximum=_MAX_STEPS - 1)
        step_key = fundp_random.fold_in(self.key, step)
        indices = poisson_indices(self.num_examples, self.sample_rate, fundp_random.fold_in(step_key, 0))
        if indices.shape[0] > self.max_batch_size:
            priority = fundp_random.uniform(fundp_random.fold_in(step_key, 1), (indices.shape[0],), torch.float64)
            kept = torch.argsort(priority, stable=True)[: self.max_batch_size]
            indices = torch.sort(indices[kept]).values
        return _pad(indices, self.max_batch_size, self.device)

    def __repr__(self) -> str:
        return (
            f"TruncatedPoissonBatches(num_examples={self.num_examples}, sample_rate={self.sample_rate}, "
            f"max_batch_size={self.max_batch_size}, steps={self.steps})"
        )


def truncated_poisson_batches(
    num_examples: int,
    sample_rate: float,
    key: torch.Tensor,
    *,
    max_batch_size: int,
    steps: int | None,
    device: torch.device | str | None = None,
) -> TruncatedPoissonBatches:
    """Poisson-sampled batches truncated at ``max_batch_size`` and padded to exactly that size.

    Every step draws a Poisson batch (each example independently with probability ``q``); a draw
    of more than ``B_max = max_batch_size`` examples keeps a uniformly random ``B_max`` of them
    (from the step's key).  Every batch has exactly ``B_max`` rows, so a compiled step sees one
    shape for the whole run (production DP training does this: Chua et al. 2024, "Scalable DP-SGD:
    Shuffling vs. Poisson subsampling").

    Accounting.  Run the truncated mechanism ``M'`` and the untruncated one ``M`` on the same
    randomness: they differ only if some step truncates, so on any dataset of at most ``N + 1``
    examples their output distributions are within total variation ``T p`` over ``T`` steps, with
    ``p = P[Binomial(N + 1, q) > B_max]`` (:func:`truncation_probability`).  If ``M`` is
    ``(eps, delta)``-DP then for every event ``S`` and neighbours ``D, D'``::

        P[M'(D) in S] <= P[M(D) in S] + T p <= e^eps P[M(D') in S] + delta + T p
                      <= e^eps P[M'(D') in S] + delta + (1 + e^eps) T p,

    so ``M'`` is ``(eps, delta + (1 + e^eps) T p)``-DP.  :mod:`fundp.accounting.truncation`
    computes epsilon, delta, the noise calibration and the step budget with this term.  Pick
    ``B_max`` a few standard deviations above ``q N`` (``q N + 6 sqrt(q N)`` gives ``p`` around
    1e-9); the step's divisor stays ``q N`` (``expected_batch_size``), as for Poisson.

    Args:
      num_examples: ``N``.
      sample_rate: ``q`` in ``(0, 1]``.
      key: a :mod:`fundp.random` key; step ``t`` uses ``fold_in(key, t)`` only.
      max_batch_size: ``B_max >= 1``, the one batch size.
      steps: number of steps (``None``: unbounded).
      device: where to put ``indices`` and ``mask``.

    Example:
      >>> import fundp
      >>> from fundp.sampling import truncated_poisson_batches
      >>> batches = truncated_poisson_batches(1000, 0.05, fundp.random.key(0), max_batch_size=80, steps=3)
      >>> [(tuple(i.shape), int(m.sum())) for i, m in batches]
      [((80,), 44), ((80,), 58), ((80,), 48)]
      >>> batches.truncation_probability < 1e-4
      True
    """
    return TruncatedPoissonBatches(num_examples, sample_rate, key, max_batch_size=max_batch_size, steps=steps, device=device)


# --------------------------------------------------------------------------- shuffling (not Poisson)


class SamplingMismatchWarning(UserWarning):
    """The batches were not Poisson-sampled but are being accounted as if they were."""


class ShuffledBatches:
    """Fixed-size batches from keyed random permutations, one per epoch: **not** Poisson sampling.

    Yields ``(indices: LongTensor[batch_size], mask: BoolTensor[batch_size])`` (the mask is all
    True except for the padding of a last partial batch when ``drop_last=False``).  The ledger's
    Poisson-subsampled Gaussian analysis does not apply to these batches; no amplification
    analysis for shuffling is offered here.  :func:`check_sampling_matches` therefore refuses them
    for a Poisson-accounted step unless ``acknowledge_not_poisson=True`` is passed, and then
    warns.  ``sample_rate`` is ``None``; ``nominal_sample_rate`` is ``batch_size / N``.

    Example:
      >>> import fundp
      >>> batches = fundp.sampling.ShuffledBatches(5, 2, fundp.random.key(0), steps=3, drop_last=False)
      >>> [(indices.tolist(), mask.tolist()) for indices, mask in batches]
      [([4, 2], [True, True]), ([3, 1], [True, True]), ([0, 0], [True, False])]
      >>> batches.sample_rate is None, batches.nominal_sample_rate
      (True, 0.4)
    """

    sampling = "shuffle"
    sample_rate = None

    def __init__(self, num_examples: int, batch_size: int, key: torch.Tensor, *, steps: int, drop_last: bool = True):
        self.num_examples = check_int("num_examples", num_examples, minimum=1, maximum=_MAX_EXAMPLES)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, maximum=self.num_examples)
        self.steps = check_int("steps", steps, minimum=0, maximum=_MAX_STEPS)
        if not isinstance(drop_last, bool):
            raise TypeError("drop_last must be a bool")
        self.drop_last = drop_last
        self.key = _cpu_key(key)
        per_epoch = self.num_examples // self.batch_size if drop_last else -(-self.num_examples // self.batch_size)
        self.batches_per_epoch = per_epoch

    @property
    def nominal_sample_rate(self) -> float:
        return self.batch_size / self.num_examples

    def _permutation(self, epoch: int) -> torch.Tensor:
        scores = fundp_random.uniform(fundp_random.fold_in(self.key, epoch), (self.num_examples,), torch.float64)
        return torch.argsort(scores, stable=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        permutation: torch.Tensor | None = None
        epoch = -1
        for step in range(self.steps):
            if step // self.batches_per_epoch != epoch:
                epoch = step // self.batches_per_epoch
                permutation = self._permutation(epoch)
            start = (step % self.batches_per_epoch) * self.batch_size
            assert permutation is not None
            rows = permutation[start : start + self.batch_size]
            yield _tagged(self, _pad(rows, self.batch_size, None), padded=rows.shape[0] < self.batch_size)

    def __len__(self) -> int:
        return self.steps


def shuffled_batches(num_examples: int, batch_size: int, key: torch.Tensor, *, steps: int, drop_last: bool = True) -> ShuffledBatches:
    """Fixed-size shuffled batches (see :class:`ShuffledBatches`): not accountable as Poisson.

    Example:
      >>> import fundp
      >>> from fundp.sampling import shuffled_batches
      >>> [indices.tolist() for indices, _ in shuffled_batches(5, 2, fundp.random.key(0), steps=3)]
      [[4, 2], [3, 1], [3, 4]]
    """
    return ShuffledBatches(num_examples, batch_size, key, steps=steps, drop_last=drop_last)


# --------------------------------------------------------------------------- the guard


def sampler_of(sampler: Any) -> Any:
    """The object that says how ``sampler``'s batches are drawn (``.sampling``, ``.sample_rate``).

    Unwraps a ``DataLoader`` made by :func:`fundp.data.poisson_loader` and a
    :class:`fundp.data.PoissonBatchSampler` down to their :class:`PoissonBatches`.

    Example:
      >>> import fundp
      >>> batches = fundp.data.poisson_batches(100, 0.1, fundp.random.key(0), steps=5)
      >>> fundp.sampling.sampler_of(batches) is batches
      True
    """
    if isinstance(sampler, DataLoader):
        inner = sampler.batch_sampler
        if inner is None or not hasattr(inner, "sampling"):
            raise ValueError(
                "this DataLoader does not use a fundp batch sampler, so its sampling is unknown "
                "(a plain shuffled DataLoader is not Poisson sampling): use fundp.data.poisson_loader"
            )
        return sampler_of(inner)
    if isinstance(getattr(sampler, "batches", None), PoissonBatches):
        return sampler.batches
    if not hasattr(sampler, "sampling"):
        raise TypeError(
            f"cannot tell how {type(sampler).__name__} samples its batches: pass a "
            "fundp.data.PoissonBatches, PoissonBatchSampler, ShuffledBatches or a poisson_loader"
        )
    return sampler


def _check_poisson_rate(inner: Any, sample_rate: float | None, expected_batch_size: float | None) -> float:
    """Checks ``sample_rate`` (and ``expected_batch_size`` if given) against the rate of a
    Poisson-type sampler ``inner`` (plain, truncated or over users); returns that rate."""
    rate = float(inner.sample_rate)
    if sample_rate is None:
        raise ValueError(
            f"the batches are Poisson-sampled with sample_rate={rate} but the step records no "
            f"sample_rate: pass sample_rate={rate} (sampler.sample_rate)"
        )
    given = check_real("sample_rate", sample_rate)
    if not math.isclose(given, rate, rel_tol=1e-12, abs_tol=0.0):
        raise ValueError(
            f"the step accounts sample_rate={given} but the batches are Poisson-sampled with "
            f"sample_rate={rate}: the ledger would be wrong. Pass sample_rate=sampler.sample_rate"
        )
    if expected_batch_size is not None:
        expected = rate * inner.num_examples
        ebs = check_real("expected_batch_size", expected_batch_size)
        if not math.isclose(ebs, expected, rel_tol=1e-6):
            raise ValueError(
                f"expected_batch_size={ebs} but the batches have sample_rate * num_examples = "
                f"{rate} * {inner.num_examples} = {expected}"
            )
    return rate


def check_sampling_matches(
    sampler: Any,
    sample_rate: float | None,
    *,
    expected_batch_size: float | None = None,
    acknowledge_not_poisson: bool = False,
) -> float | None:
    """Checks that ``sample_rate`` (what the ledger will record) is how ``sampler`` samples.

    Args:
      sampler: a :class:`PoissonBatches`, :class:`PoissonBatchSampler`, a DataLoader made by
        :func:`poisson_loader`, or a :class:`ShuffledBatches`.
      sample_rate: the rate given to ``dp_step`` / the ledger.
      expected_batch_size: if given, must equal ``sample_rate * num_examples`` (relative
        tolerance 1e-6): dividing by another number rescales every gradient.
      acknowledge_not_poisson: for shuffled fixed-size batches, the explicit acknowledgement that
        the Poisson accounting will *not* describe them (a :class:`SamplingMismatchWarning` is
        still raised).

    Returns the sampler's sample rate (``None`` for acknowledged shuffled batches).

    Raises:
      ValueError: Poisson batches with a different (or missing) ``sample_rate``; a mismatched
        ``expected_batch_size``; shuffled batches without the acknowledgement.

    Example:
      >>> import fundp
      >>> batches = fundp.data.poisson_batches(100, 0.1, fundp.random.key(0), steps=5)
      >>> fundp.data.check_sampling_matches(batches, 0.1)
      0.1
      >>> fundp.data.check_sampling_matches(batches, 0.2)
      Traceback (most recent call last):
      ...
      ValueError: the step accounts sample_rate=0.2 but the batches are Poisson-sampled with sample_rate=0.1: ...
    """
    inner = sampler_of(sampler)
    if inner.sampling == "poisson":
        return _check_poisson_rate(inner, sample_rate, expected_batch_size)
    if inner.sampling == "truncated_poisson":
        raise ValueError(
            "truncated Poisson batches add their truncation probability to delta, which a plain "
            "sample_rate check cannot account: build the step with dp_step(..., sampler=batches) and "
            "report epsilon with fundp.accounting.truncation.epsilon(ledger, delta, batches)"
        )
    if inner.sampling == "shuffle":
        message = (
            "shuffled fixed-size batches are not Poisson sampling: the ledger's Poisson-subsampled "
            "accounting (sample_rate={}) does not describe them and the reported epsilon is not a "
            "valid guarantee for this run".format(sample_rate)
        )
        if not acknowledge_not_poisson:
            raise ValueError(message + "; use fundp.data.poisson_batches, or pass "
                             "acknowledge_not_poisson=True to proceed anyway")
        warnings.warn(message, SamplingMismatchWarning, stacklevel=2)
        return None
    raise ValueError(f"unknown sampling {inner.sampling!r}")
