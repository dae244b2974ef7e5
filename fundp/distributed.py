"""DP-SGD across processes with ``torch.distributed``: clipped sums all-reduced, noise drawn once.

Scheme for one logical step over ``W`` ranks:

1. every rank draws the *same* global Poisson batch from the shared key (so the sampling is
   exactly the single-process sampling) and keeps only its shard, rows ``rank, rank + W, ...``
   (:func:`shard`); it loads only those examples;
2. every rank computes ``sum_i c_i g_i`` over its shard and the sums are all-reduced (SUM);
3. every rank adds the *same* noise, drawn from the same key after the reduction, and divides by
   the global expected batch size.

All ranks then hold bit-identical gradients, equal to one process on the whole batch (noise
included), and every rank's ledger records the logical step once.  No DDP wrapper is needed:
``dp_step`` does the gradient reduction itself (DDP's hooks would never fire under
``torch.func.grad``, and reducing unclipped gradients would break the privacy analysis).
Tensor-sharded parameters (FSDP, DTensor) are not supported yet and are refused.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
import torch.distributed as dist

from fundp.step import ClippedSum

__all__ = ["rank_and_world_size", "all_reduce_sum", "all_reduce_clipped_sum", "broadcast_from_rank0", "shard", "check_not_sharded"]


def rank_and_world_size(group: Any = None) -> tuple[int, int]:
    """Returns ``(rank, world_size)`` in ``group``; raises if no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def check_not_sharded(params: Any) -> None:
    """Raises ``NotImplementedError`` for tensor-sharded (FSDP / DTensor) parameters."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return
    if any(isinstance(leaf, DTensor) for leaf in optree.tree_leaves(params)):
        raise NotImplementedError(
            "params holds DTensor (FSDP / tensor-parallel) shards; fundp's distributed step "
            "needs every rank to hold the full parameters (data parallelism)"
        )


def all_reduce_sum(tensors: list[torch.Tensor], group: Any = None) -> list[torch.Tensor]:
    """Returns the element-wise SUM over ranks of each tensor, one collective per dtype.

    Tensors are flattened into one buffer per dtype, reduced in place with
    ``torch.distributed.all_reduce``, and split back; the inputs are not modified.
    """
    by_dtype: dict[torch.dtype, list[int]] = {}
    for position, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(position)
    reduced: list[torch.Tensor | None] = [None] * len(tensors)
    for positions in by_dtype.values():
        flat = torch.cat([tensors[p].reshape(-1) for p in positions])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for p in positions:
            count = tensors[p].numel()
            reduced[p] = flat[offset : offset + count].view_as(tensors[p])
            offset += count
    return reduced  # type: ignore[return-value]


def all_reduce_clipped_sum(clipped: ClippedSum, group: Any = None) -> ClippedSum:
    """Sums a :class:`~fundp.step.ClippedSum` over ranks: gradient sums, loss sum and counts.

    ``norms`` and ``aux`` stay local (they describe this rank's rows).  Call it once per logical
    step, after accumulating the rank's physical chunks and before :func:`fundp.privatize`.
    """
    leaves, treedef = optree.tree_flatten(clipped.grads)
    stats = torch.stack([clipped.loss_sum.to(torch.float64), clipped.num_examples.to(torch.float64), clipped.num_nonfinite.to(torch.float64)])
    *grads, stats = all_reduce_sum(leaves + [stats], group)
    return ClippedSum(
        optree.tree_unflatten(treedef, grads),
        stats[0].to(clipped.loss_sum.dtype),
        stats[1].round().to(clipped.num_examples.dtype),
        clipped.norms,
        stats[2].round().to(clipped.num_nonfinite.dtype),
        clipped.aux,
    )


def broadcast_from_rank0(tree: Any, group: Any = None) -> Any:
    """Returns rank 0's values of a pytree of tensors on every rank (used for secure-mode noise)."""
    leaves, treedef = optree.tree_flatten(tree)
    copies = [leaf.clone() for leaf in leaves]
    source = dist.get_global_rank(group, 0) if group is not None else 0
    for leaf in copies:
        dist.broadcast(leaf, src=source, group=group)
    return optree.tree_unflatten(treedef, copies)


def shard(indices: torch.Tensor, mask: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns rank ``rank``'s rows ``rank::world_size`` of a padded global batch.

    The global batch is first padded (masked rows repeating its first index) to a multiple of
    ``world_size``, so every rank gets the same number of rows and a fixed shape.  The union of
    the shards' real rows is exactly the global batch's real rows.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if indices.shape != mask.shape or indices.dim() != 1:
        raise ValueError("indices and mask must be 1-D tensors of the same length")
    extra = (-indices.shape[0]) % world_size
    if extra:
        fill = indices[:1].expand(extra) if indices.numel() else torch.zeros(extra, dtype=indices.dtype)
        indices = torch.cat([indices, fill])
        mask = torch.cat([mask, torch.zeros(extra, dtype=torch.bool, device=mask.device)])
    return indices[rank::world_size], mask[rank::world_size]
