"""Hypothesis strategies for DP property tests: per-example gradient pytrees, masks, small models.

Needs ``hypothesis`` (``pip install hypothesis``); the rest of :mod:`fundp.testing` does not.

* :func:`per_example_grad_trees` — pytrees (dicts, nested dicts/tuples, lists) whose leaves share a
  leading batch dimension ``B``, float32/float64 (or any float dtypes you pass), with one scale
  ``10^k`` per example so the norms span many orders of magnitude, optionally with NaN/Inf rows;
* :func:`masks` and :func:`grad_trees_with_masks` — padding masks;
* :func:`model_cases` — ``(loss_fn, params, batch)`` triples of a small MLP, convolutional or
  embedding model in float64, with per-example input scales spanning several orders of magnitude
  (some examples are clipped, others not).

Nothing here draws from torch's global RNG: models are built on the ``meta`` device and filled
from a ``torch.Generator`` seeded by hypothesis, so a failing example replays exactly.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import optree
import torch
import torch.nn.functional as F
from torch import nn

try:
    import numpy as np
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays
except ImportError as error:  # pragma: no cover - exercised in a subprocess by tests/test_testing.py
    raise ImportError(
        "fundp.testing.strategies needs hypothesis: pip install hypothesis (the rest of fundp.testing works without it)"
    ) from error

import fundp

__all__ = ["ModelCase", "per_example_grad_trees", "masks", "grad_trees_with_masks", "model_cases", "MODEL_KINDS"]

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
MODEL_KINDS: tuple[str, ...] = ("mlp", "conv", "embedding")
_NONFINITE = (math.nan, math.inf, -math.inf)


def _exponent_range(dtype: torch.dtype, low: int, high: int) -> tuple[int, int]:
    """Clamps ``[low, high]`` so ``10^k`` times values in ``[-1, 1]`` stay finite and normal in ``dtype``."""
    info = torch.finfo(dtype)
    return max(low, math.ceil(math.log10(info.tiny)) + 1), min(high, math.floor(math.log10(info.max)) - 1)


@st.composite
def per_example_grad_trees(
    draw: st.DrawFn,
    *,
    batch_size: int | None = None,
    min_batch: int = 1,
    max_batch: int = 6,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    max_leaves: int = 4,
    max_rank: int = 3,
    max_side: int = 4,
    min_exponent: int = -6,
    max_exponent: int = 6,
    nonfinite: bool = False,
) -> Any:
    """Per-example gradient pytrees: every leaf ``[B, *shape]``, one dtype per tree.

    Args:
      batch_size: a fixed ``B``; else drawn from ``[min_batch, max_batch]``.
      dtypes: the dtypes to draw from (float32 and float64 by default).
      max_leaves, max_rank, max_side: 1 to ``max_leaves`` leaves of 0 to ``max_rank`` trailing
        dimensions of size 1 to ``max_side``.
      min_exponent, max_exponent: example ``i`` is scaled by ``10^k_i`` with ``k_i`` drawn from this
        range (clamped to what the dtype represents), so norms span many orders of magnitude.
        Values below the dtype's smallest normal number become 0 (no subnormals).
      nonfinite: put a NaN, +Inf or -Inf at a drawn position of at least one drawn row.

    The containers are drawn too: a flat dict, a dict of tuples/dicts, or a list.

    Example:
      >>> import torch, fundp
      >>> from hypothesis import given, settings
      >>> from fundp.testing.strategies import per_example_grad_trees
      >>> @settings(max_examples=20, deadline=None, derandomize=True)
      ... @given(per_example_grad_trees(), )
      ... def clipped_norms_are_at_most_c(grads):
      ...     norms = fundp.per_sample_norms(fundp.clip(grads, 1.0)).double()
      ...     assert bool((norms <= 1 + 1e-5).all()), norms
      >>> clipped_norms_are_at_most_c()
    """
    size = batch_size if batch_size is not None else draw(st.integers(min_batch, max_batch))
    dtype = draw(st.sampled_from(list(dtypes)))
    low, high = _exponent_range(dtype, min_exponent, max_exponent)
    exponents = draw(st.lists(st.integers(low, high), min_size=size, max_size=size))
    row_scale = np.array([10.0**k for k in exponents], dtype=np.float64)
    num_leaves = draw(st.integers(1, max_leaves))
    elements = st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False, width=32)
    tiny = torch.finfo(dtype).tiny
    leaves = []
    for _ in range(num_leaves):
        shape = (size, *draw(st.lists(st.integers(1, max_side), min_size=0, max_size=max_rank)))
        values = draw(arrays(np.float64, shape, elements=elements))
        values = values * row_scale.reshape((size,) + (1,) * (len(shape) - 1))
        values = np.where(np.abs(values) < tiny, 0.0, values)  # no subnormals in the target dtype
        leaves.append(torch.tensor(values, dtype=torch.float64).to(dtype))
    if nonfinite:
        rows = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=size, unique=True))
        for row in rows:
            leaf = leaves[draw(st.integers(0, num_leaves - 1))]
            flat = leaf[row].reshape(-1)
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(_NONFINITE))
    layout = draw(st.sampled_from(["dict", "nested", "list"]))
    if layout == "dict":
        return {f"leaf{k}": leaf for k, leaf in enumerate(leaves)}
    if layout == "list":
        return leaves
    # nested: consecutive pairs become layers holding a (weight, bias) tuple or a dict
    tree: dict[str, Any] = {}
    for k in range(0, num_leaves, 2):
        pair = leaves[k : k + 2]
        tree[f"layer{k // 2}"] = tuple(pair) if k % 4 == 0 else {f"p{j}": leaf for j, leaf in enumerate(pair)}
    return tree


@st.composite
def masks(draw: st.DrawFn, batch_size: int, *, min_real: int = 0) -> torch.Tensor:
    """``BoolTensor[batch_size]`` padding masks with at least ``min_real`` True rows.

    Example:
      >>> from hypothesis import given, settings
      >>> from fundp.testing.strategies import masks
      >>> @settings(max_examples=10, deadline=None, derandomize=True)
      ... @given(masks(5, min_real=2))
      ... def has_two_real_rows(mask):
      ...     assert mask.shape == (5,) and int(mask.sum()) >= 2
      >>> has_two_real_rows()
    """
    if not 0 <= min_real <= batch_size:
        raise ValueError(f"min_real must be in [0, batch_size] = [0, {batch_size}], got {min_real}")
    real = draw(st.lists(st.integers(0, batch_size - 1), min_size=min_real, max_size=batch_size, unique=True)) if batch_size else []
    mask = torch.zeros(batch_size, dtype=torch.bool)
    mask[list(real)] = True
    return mask


@st.composite
def grad_trees_with_masks(draw: st.DrawFn, *, min_real: int = 0, **tree_kwargs: Any) -> tuple[Any, torch.Tensor]:
    """``(grads, mask)``: a tree from :func:`per_example_grad_trees` (same keyword arguments) and a mask for it.

    Example:
      >>> import fundp
      >>> from hypothesis import given, settings
      >>> from fundp.testing.strategies import grad_trees_with_masks
      >>> @settings(max_examples=10, deadline=None, derandomize=True)
      ... @given(grad_trees_with_masks(nonfinite=True))
      ... def masked_rows_are_zero(case):
      ...     grads, mask = case
      ...     clipped = fundp.clip(grads, 1.0, mask=mask)
      ...     assert float(fundp.per_sample_norms(clipped)[~mask].abs().sum()) == 0.0
      >>> masked_rows_are_zero()
    """
    tree = draw(per_example_grad_trees(**tree_kwargs))
    size = optree.tree_leaves(tree)[0].shape[0]
    return tree, draw(masks(size, min_real=min(min_real, size)))


class ModelCase(NamedTuple):
    """A small model as a ``(loss_fn, params, batch)`` triple (unpacks like one)."""

    loss_fn: Callable[[Any, Any], torch.Tensor]
    """``loss_fn(params, batch) -> Tensor[B]``, per-example cross-entropy."""
    params: dict[str, torch.Tensor]
    """The model's parameters by name."""
    batch: dict[str, torch.Tensor]
    """``{"x": inputs [B, ...], "y": labels [B]}``."""


class _EmbeddingClassifier(nn.Module):
    def __init__(self, vocab: int, dim: int, classes: int, *, device: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, device=device, dtype=dtype)
        self.head = nn.Linear(dim, classes, device=device, dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(dim=1))


def _model_and_inputs(kind: str, draw: st.DrawFn, size: int, classes: int, dtype: torch.dtype, g: torch.Generator) -> tuple[nn.Module, torch.Tensor]:
    meta: dict[str, Any] = {"device": "meta", "dtype": dtype}
    model: nn.Module
    if kind == "mlp":
        d_in, hidden = draw(st.integers(1, 6)), draw(st.integers(1, 8))
        model = nn.Sequential(nn.Linear(d_in, hidden, **meta), nn.Tanh(), nn.Linear(hidden, classes, **meta))
        x = torch.randn(size, d_in, generator=g, dtype=dtype)
    elif kind == "conv":
        channels, out_channels, side = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(3, 6))
        model = nn.Sequential(
            nn.Conv2d(channels, out_channels, 3, padding=1, **meta),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(out_channels * side * side, classes, **meta),
        )
        x = torch.randn(size, channels, side, side, generator=g, dtype=dtype)
    elif kind == "embedding":
        vocab, dim, length = draw(st.integers(2, 10)), draw(st.integers(1, 6)), draw(st.integers(1, 5))
        model = _EmbeddingClassifier(vocab, dim, classes, device="meta", dtype=dtype)
        x = torch.randint(0, vocab, (size, length), generator=g)
    else:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    return model.to_empty(device="cpu"), x


@st.composite
def model_cases(
    draw: st.DrawFn,
    *,
    kinds: Sequence[str] = MODEL_KINDS,
    batch_size: int | None = None,
    min_batch: int = 1,
    max_batch: int = 5,
    dtype: torch.dtype = torch.float64,
    min_exponent: int = -2,
    max_exponent: int = 2,
) -> ModelCase:
    """Small models with a batch: :class:`ModelCase` ``(loss_fn, params, batch)`` triples.

    ``kinds`` picks among ``"mlp"`` (Linear-Tanh-Linear), ``"conv"`` (Conv2d-ReLU-Linear) and
    ``"embedding"`` (Embedding, mean over tokens, Linear); sizes, parameters and data are drawn.
    Real-valued inputs of example ``i`` are scaled by ``10^k_i``, ``k_i`` in
    ``[min_exponent, max_exponent]``, and parameters by ``10^k`` for one drawn ``k``, so
    per-example gradient norms span several orders of magnitude.  ``loss_fn`` is the per-example
    cross-entropy through :func:`fundp.functional_call`.

    Example:
      >>> from hypothesis import given, settings
      >>> from fundp.testing import assert_matches_vmap
      >>> from fundp.testing.strategies import model_cases
      >>> @settings(max_examples=3, deadline=None, derandomize=True)  # fixed draws: a doctest must not be flaky
      ... @given(model_cases())
      ... def dp_step_matches_micro_batching(case):
      ...     assert_matches_vmap(case.loss_fn, case.params, case.batch, max_norm=1.0, grad_method="vmap")
      >>> dp_step_matches_micro_batching()
    """
    kind = draw(st.sampled_from(list(kinds)))
    size = batch_size if batch_size is not None else draw(st.integers(min_batch, max_batch))
    classes = draw(st.integers(2, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    model, x = _model_and_inputs(kind, draw, size, classes, dtype, g)
    param_scale = 10.0 ** draw(st.integers(-1, 1))
    params = {
        name: torch.randn(p.shape, generator=g, dtype=dtype) * (param_scale / math.sqrt(math.prod(p.shape[1:])))
        for name, p in model.named_parameters()
    }
    if x.is_floating_point():
        exponents = draw(st.lists(st.integers(min_exponent, max_exponent), min_size=size, max_size=size))
        scale = torch.tensor([10.0**k for k in exponents], dtype=dtype)
        x = x * scale.reshape((size,) + (1,) * (x.dim() - 1))
    y = torch.randint(0, classes, (size,), generator=g)
    model.requires_grad_(False)

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(fundp.functional_call(model, p, (b["x"],)), b["y"], reduction="none")

    return ModelCase(loss_fn, params, {"x": x, "y": y})
