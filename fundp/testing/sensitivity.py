"""``empirical_sensitivity``: how much one example moves a clipped sum, measured on a batch.

The Gaussian mechanism's guarantee rests on the L2 sensitivity of what it noises: the largest
``||f(D) - f(D')||_2`` over neighbouring datasets ``D, D'``.  A clipping function that claims a
sensitivity ``S`` (``ClippedSum.sensitivity``, ``fundp.clip_sensitivity``) can be checked from
below: every measured change must be ``<= S``.  A measurement cannot prove the bound (it tries
the neighbours of one batch), but a single change above ``S`` disproves it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import optree
import torch

from fundp._validate import check_batch, check_mask

__all__ = ["empirical_sensitivity", "tree_distance"]


def _sum_of(out: Any) -> Any:
    grads = getattr(out, "grads", None)
    return out if grads is None else grads


def tree_distance(a: Any, b: Any) -> float:
    """``||a - b||_2`` over all leaves of two pytrees of the same structure, in float64.

    Complex leaves count with their modulus, ``sqrt(sum |a_j - b_j|^2)`` (real and imaginary parts).

    Returns ``inf`` when any difference is NaN or infinite (an unbounded change).

    Example:
      >>> import torch
      >>> from fundp.testing import tree_distance
      >>> tree_distance({"a": torch.tensor([3.0]), "b": torch.zeros(2)}, {"a": torch.zeros(1), "b": torch.tensor([0.0, 4.0])})
      5.0
    """
    a_leaves, a_spec = optree.tree_flatten(a)
    b_leaves, b_spec = optree.tree_flatten(b)
    if a_spec != b_spec:
        raise ValueError(f"the two trees differ in structure: {a_spec} vs {b_spec}")
    squares = []
    for x, y in zip(a_leaves, b_leaves):
        x, y = torch.as_tensor(x).detach(), torch.as_tensor(y).detach()
        # Complex leaves: the modulus |x - y| (a cast to float64 would drop the imaginary part).
        wide = torch.complex128 if (x.dtype.is_complex or y.dtype.is_complex) else torch.float64
        diff = (x.to(device="cpu", dtype=wide) - y.to(device="cpu", dtype=wide)).abs()
        if not bool(torch.isfinite(diff).all()):
            return math.inf
        squares.append(float(diff.square().sum()))
    return math.sqrt(math.fsum(squares))


def _replace_row(batch: Any, row: int, replacements: Any, source: int) -> Any:
    def swap(leaf: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        out = leaf.clone()
        out[row] = candidates[source].to(device=leaf.device, dtype=leaf.dtype)
        return out

    return optree.tree_map(swap, batch, replacements)


def empirical_sensitivity(
    clipped_sum_fn: Callable[..., Any],
    params: Any,
    batch: Any,
    *,
    mask: torch.Tensor | None = None,
    mode: Literal["remove", "replace"] = "remove",
    replacements: Any = None,
) -> float:
    """The largest L2 change of a clipped sum when one example is removed or replaced.

    ``clipped_sum_fn(params, batch, mask)`` returns a pytree or an object with ``.grads`` (a
    :class:`fundp.ClippedSum`, e.g. from ``fundp.clipped_grad_sum(loss_fn, max_norm=C)``).
    With ``S = clipped_sum_fn(params, batch, mask)``, returns

    * ``mode="remove"`` (add/remove adjacency, what Poisson-sampled DP-SGD uses): the largest
      ``||S - S_{-i}||_2`` over the real rows ``i``, where ``S_{-i}`` is the sum with
      ``mask[i]`` set to False;
    * ``mode="replace"`` (substitution adjacency): the largest ``||S - S_{i<-j}||_2`` over real rows
      ``i`` and candidate rows ``j``, where row ``i`` of the batch is replaced by row ``j`` of
      ``replacements`` (a batch-shaped pytree; default: the batch itself, every other real row).

    The distance is taken over the whole pytree, in float64; a NaN or Inf change counts as
    ``inf``.  Compare the result with the claimed sensitivity: for flat clipping at ``C`` it must
    be ``<= C`` (remove) and ``<= 2 C`` (replace).  The cost is one call per row (remove) or per
    pair of rows (replace).

    Example:
      >>> import torch, fundp
      >>> from fundp.testing import empirical_sensitivity
      >>> loss_fn = lambda p, x: x @ p["w"]                  # gradient of example i: x_i
      >>> x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, -2.0]])
      >>> params = {"w": torch.zeros(2)}
      >>> clipped = fundp.clipped_grad_sum(loss_fn, max_norm=1.0)
      >>> round(empirical_sensitivity(clipped, params, x), 6)
      1.0
      >>> round(empirical_sensitivity(clipped, params, x, mode="replace"), 6)  # [0.6, 0.8] vs [0, -1]
      1.897367
      >>> unclipped = lambda p, x, m: {"w": (x * m[:, None]).sum(0)}
      >>> round(empirical_sensitivity(unclipped, params, x), 6)
      5.0
    """
    if mode not in ("remove", "replace"):
        raise ValueError(f"mode must be 'remove' or 'replace', got {mode!r}")
    size = check_batch(batch)
    device = optree.tree_leaves(batch)[0].device
    if mask is None:
        mask = torch.ones(size, dtype=torch.bool, device=device)
    check_mask(mask, size)
    full = _sum_of(clipped_sum_fn(params, batch, mask))
    real_rows = [i for i in range(size) if bool(mask[i])]
    worst = 0.0
    if mode == "remove":
        for i in real_rows:
            neighbour = mask.clone()
            neighbour[i] = False
            worst = max(worst, tree_distance(full, _sum_of(clipped_sum_fn(params, batch, neighbour))))
        return worst
    if replacements is None:
        candidates, sources = batch, real_rows
    else:
        candidates, sources = replacements, list(range(check_batch(replacements, "replacements")))
        if optree.tree_structure(replacements) != optree.tree_structure(batch):
            raise ValueError("replacements must have the structure of batch")
    for i in real_rows:
        for j in sources:
            if replacements is None and j == i:
                continue
            neighbour_batch = _replace_row(batch, i, candidates, j)
            worst = max(worst, tree_distance(full, _sum_of(clipped_sum_fn(params, neighbour_batch, mask))))
    return worst
