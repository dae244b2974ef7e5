"""Exact DP-SGD with sharded parameters: FSDP2 (``fully_shard``) and other DTensor layouts.

With ``dp_step(..., distributed=True)`` a parameter may be a
:class:`~torch.distributed.tensor.DTensor` (what ``fully_shard`` leaves in
``model.named_parameters()``).  One logical step over ``W`` ranks, each rank holding its own
examples (rows ``rank::W`` of the global batch, :func:`fundp.distributed.shard`):

1. **unshard**: each sharded leaf is all-gathered to the full tensor (:func:`unshard`), so the
   per-example gradients and their norms are those of the whole model and need no communication
   (the data axes own whole examples); every engine and clip style works unchanged;
2. **clip and sum locally**, as one process would on the rank's rows;
3. **reduce-scatter** the clipped sum (:func:`reduce_clipped_sum`): each rank keeps the sum of
   the coordinates it owns, laid out like the parameter (a DTensor with the same placements);
   the loss sum and counts are all-reduced with the per-call fingerprint of
   :mod:`fundp.distributed` (with ``dp_step(..., reduction_slots=S)``: the full-size sums are
   added by the canonical tree of :mod:`fundp.distributed`, the same bits on any world size
   dividing ``S``, and each rank keeps its own coordinates, :func:`tree_reduce_sharded_clipped_sum`);
4. **noise once per coordinate, by its owner** (:func:`standard_normal_shards`): each rank draws
   only the noise of its own coordinates, from the counter-based key at their offsets in the
   single-process stream, so the gathered noisy gradient equals the single-process step bit for
   bit; no rank draws a full-size noise tensor.

The fundp noise stream (:func:`fundp.noise.standard_normal_chunks`) is one Box–Muller stream of
``n = sum_l numel(leaf_l)`` normals from :func:`fundp.random.normal`: with ``h = ceil(n / 2)``,
element ``i`` is ``sqrt(-2 ln u_j) cos(2 pi u_{h+j})`` for ``i < h`` (``j = i``) and
``sqrt(-2 ln u_j) sin(2 pi u_{h+j})`` otherwise (``j = i - h``), where ``u_c`` is the uniform of
Threefry counter ``c``.  Every element is thus a pure function of two counters, and
:func:`normal_at` computes any subset of the stream without the rest: the stream itself is
unchanged.

**Tensor parallelism** (``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel``
..., alone or under ``fully_shard``): the ranks of a tensor-parallel group share one batch, so
``dp_step(..., distributed=True, tensor_parallel_dim="tp")`` names the mesh dim(s) along which
they do (``"tp"`` of a ``("dp", "tp")`` mesh; every other dim of the parameters' root mesh is a
data dim).  The step stays the one above, on the gathered parameters: each rank of a TP group
computes the same clipped sum of the group's examples (one model key per group: the same
dropout), and each group's sum is counted once (the ranks at TP coordinate 0 contribute it, the
others zeros, which the sums add exactly), so only the data dims sum examples: counting the TP
ranks too would count each example once per TP rank.  Each rank then noises the coordinates it
holds, as above (a coordinate replicated over ``tp``, a row-parallel bias, is drawn bit for bit
the same on each of its holders).  Checked on every call: the ranks of a TP group pass the same
batch and mask (a digest), different groups different rows, and every parameter lives on one
named root mesh (or a submesh of it: ``fully_shard`` over ``mesh["dp"]`` of a layer tensor
parallelism left alone; a layer only tensor parallelism sharded, under plain data parallelism,
has its sum all-reduced over the data dims first).  Without ``tensor_parallel_dim`` two ranks
passing the same rows are refused.  This route keeps the per-example norms exact without any
communication on the ``[B]`` norms; the price is that each rank holds the gathered parameters
during the step, as under FSDP2 (summing squared norms over the TP group while the sharded
forward runs would not, and is not done).

Scope (refused otherwise, naming the reason): placements ``Shard(d)`` and ``Replicate()`` on a
mesh spanning the step's process group, of any dimension (FSDP2 on a 1-D mesh, HSDP's
``(Replicate(), Shard(0))`` on a 2-D one), and ``_StridedShard(d, sf)`` followed by ``Shard(d)``
over ``sf`` ranks (``fully_shard`` over ``"dp"`` of a ``"tp"``-sharded ``Shard(d)`` parameter);
without ``tensor_parallel_dim`` every rank is a data rank with examples of its own, whatever the
layout, because the model runs on the gathered parameters; i.i.d. Gaussian noise,
secure-mode noise and the correlated noise of :mod:`fundp.mf` (other ``noise_mechanism`` objects
are refused).  Tested: FSDP2 on 2 and 4 ranks, HSDP 2 x 2, tensor parallelism on 2 ranks,
FSDP2 x TP and DDP x TP on a 2 x 2 ``("dp", "tp")`` mesh.

The other noise of a step, sharded the same way:

* **correlated noise** (:mod:`fundp.mf`): the mechanism's state is sharded like the parameters,
  ``init`` giving each rank the buffers ``[m, *local_shape]`` of its own coordinates
  (:func:`stacked_shard`); the strategies' recurrences act on every coordinate independently, so
  each rank runs them on its block with the normals of its coordinates (:func:`on_local_blocks`):
  the gathered noise and state equal one process's bit for bit;
* **adaptive clipping**'s unclipped count is summed over the ranks exactly (int64) before its
  noise is added once, from the shared key, so every rank keeps the same clip state (as with
  replicated parameters); under tensor parallelism only the rank at TP coordinate 0 of each
  group contributes its count (:func:`counts_its_examples`), as for the clipped sum;
* **secure mode** draws from OS entropy, reproducible by nothing, so no rank could draw another's
  coordinates and no run equals another bit for bit (one process's included); each rank draws
  the secure noise of its own block only (:func:`map_local`), and copies of a coordinate on
  ``Replicate()`` mesh dimensions take their first copy's value (:func:`broadcast_replicas`): one
  draw per released coordinate, the same on every rank.

A model wrapped by ``fully_shard`` runs on the full parameters inside
:func:`fundp.functional_call`, which suspends FSDP2's forward hooks for the call
(:func:`fsdp_hooks_suspended`), and, for plain parameters, the layout hooks tensor parallelism
installed (:func:`tp_hooks_suspended`): fundp gathers the parameters itself, once per step, and
the model computes what the unparallelized model computes (its forward must hold for the full
tensors, as a tensor-parallel plan's module code does: e.g. ``view(..., -1, head_dim)`` rather
than a head count cut per rank).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, NamedTuple

import optree
import torch

from fundp import random as fundp_random

__all__ = [
    "is_sharded",
    "normal_at",
    "local_box",
    "box_indices",
    "standard_normal_shards",
    "ShardLayout",
    "unshard",
    "reduce_clipped_sum",
    "fsdp_hooks_suspended",
    "tp_hooks_suspended",
    "data_rank",
    "data_world_size",
    "counts_its_examples",
    "gathered_frozen",
    "stacked_shard",
    "on_local_blocks",
    "map_local",
    "broadcast_replicas",
    "tree_reduce_sharded_clipped_sum",
]


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_sharded(tree: Any) -> bool:
    """True when a leaf of ``tree`` is a :class:`~torch.distributed.tensor.DTensor`.

    Example:
      >>> import torch, fundp
      >>> fundp.sharding.is_sharded({"w": torch.ones(2)})
      False
    """
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(leaf, dtensor) for leaf in optree.tree_leaves(tree))


# --------------------------------------------------------------------------- noise at offsets


def normal_at(key: torch.Tensor, total: int, indices: torch.Tensor) -> torch.Tensor:
    """Elements ``indices`` of ``fundp.random.normal(key, (total,), torch.float64)``, without the rest.

    Each element ``i`` is computed from its two Threefry counters (``j`` and ``h + j`` with
    ``h = ceil(total / 2)``, ``j = i mod h``) with the same float64 operations as
    :func:`fundp.random.normal`, so the values are equal bit for bit; the cost is two counters per
    requested element (``indices.numel()`` values are allocated, never ``total``).

    Args:
      key: a fundp key.
      total: the length of the whole stream (``sum_l numel(leaf_l)`` for a tree's noise).
      indices: int64 tensor of positions in ``[0, total)``, any shape (the result has its shape).

    Example:
      >>> import torch, fundp
      >>> key = fundp.random.key(0)
      >>> full = fundp.random.normal(key, (7,), torch.float64)
      >>> bool(torch.equal(fundp.sharding.normal_at(key, 7, torch.tensor([5, 1])), full[[5, 1]]))
      True
    """
    fundp_random._check_key(key)
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be an int64 tensor, got {indices.dtype}")
    half = (total + 1) // 2
    flat = indices.reshape(-1).to(key.device)
    if flat.numel() and not torch.compiler.is_compiling():
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= total:
            raise ValueError(f"indices must lie in [0, total) = [0, {total}), got values in [{low}, {high}]")
    first = flat < half
    j = torch.where(first, flat, flat - half)
    counters = torch.cat([j, j + half])
    hi, lo = fundp_random._threefry2x32(key, counters >> 32, counters & fundp_random._MASK32)
    u = fundp_random._uniform_from_bits(hi, lo, torch.float64)
    count = flat.numel()
    # The same operations as fundp.random.normal (elementwise, so equal bits).
    radius, angle = fundp_random._box_muller(u[:count], u[count:])
    samples = torch.where(first, radius * torch.cos(angle), radius * torch.sin(angle))
    return samples.reshape(indices.shape)


def local_box(tensor: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(local_shape, global_offset)`` of this rank's block of a DTensor (plain tensor: the whole).

    Only ``Shard(d)`` and ``Replicate()`` placements are accepted, and ``_StridedShard(d, sf)``
    where a later mesh dimension of ``sf`` ranks holds ``Shard(d)`` (what ``fully_shard`` makes of
    a tensor-parallel ``Shard(d)`` parameter: dim ``d`` is cut in ``sf`` tensor-parallel chunks,
    each chunk cut again over the data ranks): their local block is a box of the global tensor
    (other ``_StridedShard`` layouts and ``Partial`` are refused).

    Example:
      >>> import torch, fundp
      >>> fundp.sharding.local_box(torch.ones(2, 3))
      ((2, 3), (0, 0))
    """
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return tuple(tensor.shape), (0,) * tensor.dim()
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for index, placement in enumerate(tensor.placements):
        if type(placement) not in (Shard, Replicate) and not _nested_strided_shard(tensor, index):
            raise NotImplementedError(
                f"a sharded parameter has placement {placement}: fundp's sharded step supports Shard(d) and "
                "Replicate() placements (FSDP2's fully_shard layout), and _StridedShard(d, sf) followed by "
                "Shard(d) over sf ranks (fully_shard over tensor-parallel shards) only"
            )
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(int(s) for s in shape), tuple(int(o) for o in offset)


def _nested_strided_shard(tensor: Any, index: int) -> bool:
    """``tensor.placements[index]`` is ``_StridedShard(d, sf)`` and exactly one later mesh dim, of
    ``sf`` ranks, holds ``Shard(d)``: the FSDP2-over-TP layout, whose local block is a box."""
    from torch.distributed.tensor import Shard

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - older torch
        return False
    placement = tensor.placements[index]
    if type(placement) is not _StridedShard:
        return False
    later = [i for i in range(index + 1, len(tensor.placements))
             if type(tensor.placements[i]) is Shard and tensor.placements[i].dim == placement.dim]
    return len(later) == 1 and tensor.device_mesh.size(later[0]) == placement.split_factor


def box_indices(global_shape: tuple[int, ...], local_shape: tuple[int, ...], offset: tuple[int, ...]) -> torch.Tensor:
    """Row-major flat indices (int64, shape ``local_shape``) of the box ``offset + [0, local_shape)``.

    Example:
      >>> import fundp
      >>> fundp.sharding.box_indices((3, 4), (2, 2), (1, 2)).tolist()
      [[6, 7], [10, 11]]
    """
    index = torch.zeros((), dtype=torch.int64)
    for size, local, start in zip(global_shape, local_shape, offset):
        index = index.unsqueeze(-1) * int(size) + torch.arange(int(start), int(start) + int(local), dtype=torch.int64)
    return index


def standard_normal_shards(leaves: list, key: torch.Tensor) -> list:
    """:func:`fundp.noise.standard_normal_chunks` for leaves that may be DTensors: each rank draws its blocks only.

    Leaf ``l``'s noise occupies positions ``[o_l, o_l + numel_l)`` of one stream of
    ``sum_l numel_l`` standard normals (``numel_l`` of the *global* shape, ``o_l`` the sum of the
    preceding ones), exactly as in one process; a DTensor leaf gets the values at its local block's
    positions (:func:`normal_at`), returned as a float64 DTensor with the leaf's mesh, placements
    and global shape; a plain leaf gets all of its values.  Gathered, the noise equals the
    single-process draw bit for bit.

    Example:
      >>> import torch, fundp
      >>> from fundp.noise import standard_normal_chunks
      >>> leaves = [torch.zeros(2, 3), torch.zeros(4)]
      >>> key = fundp.random.key(1)
      >>> all(torch.equal(a, b) for a, b in zip(fundp.sharding.standard_normal_shards(leaves, key),
      ...                                       standard_normal_chunks(leaves, key)))
      True
    """
    dtensor = _dtensor_type()
    total = sum(math.prod(leaf.shape) for leaf in leaves)
    chunks, start = [], 0
    for leaf in leaves:
        local_shape, offset = local_box(leaf)
        positions = start + box_indices(tuple(leaf.shape), local_shape, offset)
        device = leaf.to_local().device if dtensor is not None and isinstance(leaf, dtensor) else leaf.device
        local = normal_at(key.to(device), total, positions.to(device))
        if dtensor is not None and isinstance(leaf, dtensor):
            local = dtensor.from_local(local, leaf.device_mesh, leaf.placements, run_check=False,
                                       shape=leaf.shape, stride=_contiguous_stride(tuple(leaf.shape)))
        chunks.append(local)
        start += math.prod(leaf.shape)
    return chunks


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(stride))


# --------------------------------------------------------------------------- the step's hooks


class _LeafSpec(NamedTuple):
    mesh: Any
    placements: tuple
    shape: tuple[int, ...]


class ShardLayout(NamedTuple):
    """How a parameter tree is sharded: per leaf (optree order) a spec or ``None`` (a plain, replicated leaf).

    Made by :func:`unshard`; used by :func:`reduce_clipped_sum` to give the clipped sum the
    parameters' layout.  ``tensor_parallel``: the tensor-parallel plan (root mesh, TP dims, this
    rank's coordinates) when ranks share batches, else ``None``.

    Example:
      >>> from fundp.sharding import ShardLayout
      >>> ShardLayout(specs=(None,)).specs
      (None,)
    """

    specs: tuple
    tensor_parallel: Any = None


def _describe(leaf: Any) -> str:
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(leaf, dtensor):
        return (f"{leaf.dtype} {list(leaf.shape)} placements {tuple(str(p) for p in leaf.placements)} "
                f"mesh {tuple(leaf.device_mesh.shape)}")
    return f"{leaf.dtype} {list(leaf.shape)} (not sharded)"


_REFUSED_OPTIONS = {
    "noise_mechanism": "a mechanism other than fundp.mf's CorrelatedNoise would receive sharded gradients and "
                       "state it was not written for; fundp.mf mechanisms keep their state sharded like the params",
}


def _refuse_options(options: dict[str, bool]) -> None:
    used = [name for name, flag in options.items() if flag]
    if used:
        raise NotImplementedError(
            f"sharded (DTensor / FSDP2) params with {', '.join(used)}: not supported yet ("
            + "; ".join(f"{name}: {_REFUSED_OPTIONS.get(name, 'not supported')}" for name in used) + ")"
        )


def _refuse_meshes(leaves: list, paths: list, group: Any) -> None:
    """Every sharded leaf's mesh must span the step's process group: each rank is a data rank
    (its rows are its own examples), so the clipped sums are reduced over every mesh axis."""
    import torch.distributed as dist

    dtensor = _dtensor_type()
    world = sorted(dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size()))
    for leaf, path in zip(leaves, paths):
        if isinstance(leaf, dtensor):
            ranks = sorted(int(r) for r in leaf.device_mesh.mesh.reshape(-1).tolist())
            if ranks != world:
                raise NotImplementedError(
                    f"params{''.join(f'[{p!r}]' for p in path)} lives on a mesh of ranks {ranks[:8]} but the step's "
                    f"process group has ranks {world[:8]}: fundp's sharded step needs every parameter's mesh to span "
                    "the group (every rank a data rank; for tensor parallelism pass dp_step(..., tensor_parallel_dim=...))"
                )
        local_box(leaf)  # refuses placements other than Shard / Replicate


def _batch_shapes(batch: Any, mask: Any) -> str:
    shapes = [list(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__ for leaf in optree.tree_leaves(batch)]
    return repr(shapes) + ("" if mask is None else f" mask {list(mask.shape)}")


def _batch_digest(batch: Any, mask: Any) -> str:
    """Digest of the batch's real rows (ranks holding the same rows share a batch: not data ranks)."""
    from fundp.distributed import _canonical

    if mask is not None and not bool(mask.any()):
        return "no real rows"
    return _canonical([batch, mask])


@torch.compiler.disable
def unshard(params: Any, group: Any = None, *, key: torch.Tensor, batch: Any, mask: Any = None,
            options: dict[str, bool] | None = None, tensor_parallel_dim: Any = None) -> tuple[Any, ShardLayout | None]:
    """Returns ``(full_params, layout)``: each DTensor leaf all-gathered to a plain tensor.

    Plain trees come back unchanged with ``layout=None``.  Before any collective on the
    parameters, every rank's parameter layout (dtype, global shape, placements, mesh) and batch
    shapes are compared with :func:`fundp.distributed.check_consistent`, on every call, so a rank
    with another model or batch shape raises :class:`~fundp.distributed.RankMismatchError` naming
    what differs instead of hanging in an all-gather.  Two ranks passing the same real rows are
    refused too (their examples would be counted once per rank), unless ``tensor_parallel_dim``
    names the mesh dims along which ranks share a batch: then the ranks of each tensor-parallel
    group must pass the same batch and different groups different rows (checked on every call),
    and the layout carries the plan (:class:`ShardLayout`).  ``options``: ``{name: in use}`` of
    step options the sharded step does not support yet (refused).

    Example:
      >>> import torch, fundp
      >>> fundp.sharding.unshard({"w": torch.ones(2)}, key=fundp.random.key(0), batch=torch.ones(1, 2))
      ({'w': tensor([1., 1.])}, None)
    """
    leaves, treedef = optree.tree_flatten(params)
    dims = _tensor_parallel_dims(tensor_parallel_dim)
    if not is_sharded(params):
        if dims is not None:
            raise ValueError(
                f"tensor_parallel_dim={tensor_parallel_dim!r} but no parameter is a DTensor: pass the parameters of the "
                "model parallelize_module sharded (model.named_parameters())")
        return params, None
    _refuse_options(options or {})
    from fundp import distributed as fundp_distributed

    paths = optree.tree_paths(params)
    plan = None if dims is None else _tensor_parallel_plan(leaves, paths, group, dims)
    if plan is None:
        _refuse_meshes(leaves, paths, group)
    settings = [("params" + "".join(f"[{p!r}]" for p in path), _describe(leaf)) for path, leaf in zip(paths, leaves)]
    settings.append(("batch shapes", _batch_shapes(batch, mask)))
    fundp_distributed.check_consistent(key, settings, group)
    if plan is None:
        _refuse_shared_batches(_batch_digest(batch, mask), group)
    else:
        _check_tensor_parallel_batches(_batch_digest(batch, mask), group, plan)
    dtensor = _dtensor_type()
    specs = tuple(
        _LeafSpec(leaf.device_mesh, tuple(leaf.placements), tuple(leaf.shape)) if isinstance(leaf, dtensor) else None
        for leaf in leaves
    )
    full = [leaf.full_tensor() if isinstance(leaf, dtensor) else leaf for leaf in leaves]
    return optree.tree_unflatten(treedef, full), ShardLayout(specs, plan)


def _gathered_digests(digest: str, group: Any, world_size: int) -> list[int | None]:
    """Every group rank's batch digest (:func:`_batch_digest`) fingerprinted, ``None`` for a rank
    with no real rows (it shares no examples).  A collective: every rank calls it, an empty one too."""
    import torch.distributed as dist

    from fundp.distributed import _fingerprint

    empty = digest == "no real rows"
    mine = torch.tensor([0 if empty else _fingerprint(digest), int(empty)], dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    return [None if int(t[1]) else int(t[0]) for t in gathered]


def _refuse_shared_batches(digest: str, group: Any) -> None:
    from fundp.distributed import RankMismatchError, rank_and_world_size

    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return
    values = _gathered_digests(digest, group, world_size)
    same = [r for r, value in enumerate(values) if value is not None and values.count(value) > 1]
    if same:
        raise RankMismatchError(
            f"ranks {same} pass the same batch rows: with sharded params every rank's rows must be its own "
            "examples (fundp.distributed.shard); for tensor parallelism, where ranks share a batch, name the mesh's "
            "tensor-parallel dims: dp_step(..., tensor_parallel_dim=\"tp\")"
        )


def reduce_clipped_sum(clipped: Any, layout: ShardLayout, group: Any = None, *, fingerprint: Any = None) -> Any:
    """Sums a :class:`~fundp.types.ClippedSum` over ranks, each rank keeping its own coordinates.

    Sharded leaves (``layout.specs[l]`` not ``None``) are reduce-scattered: the local full-size
    sum becomes a ``Partial`` DTensor redistributed to the parameter's placements, so the result
    is a float64 DTensor laid out like the parameter.  Plain leaves, the loss sum and the counts
    are all-reduced with :func:`fundp.distributed.all_reduce_clipped_sum` (``fingerprint``: the
    per-call check of key and settings).  ``norms`` stay local.  Under tensor parallelism
    (``layout.tensor_parallel``) the ranks of a TP group hold the same sum: each group's is
    counted once, so only the data ranks' sums add up.

    Example:
      >>> import os, tempfile, torch, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> f = fundp.clipped_grad_sum(lambda p, b: b @ p["w"], max_norm=1.0, grad_method="vmap")
      >>> clipped = f({"w": torch.zeros(2)}, torch.eye(2))
      >>> fundp.sharding.reduce_clipped_sum(clipped, fundp.sharding.ShardLayout((None,))).grads["w"]
      tensor([1., 1.], dtype=torch.float64)
      >>> dist.destroy_process_group()
    """
    from torch.distributed.tensor import DTensor, Partial

    from fundp.distributed import all_reduce_clipped_sum

    leaves, treedef = optree.tree_flatten(clipped.grads)
    if len(leaves) != len(layout.specs):
        raise ValueError(f"the clipped sum has {len(leaves)} leaves but the layout describes {len(layout.specs)}")
    if layout.tensor_parallel is not None:
        clipped = _tensor_parallel_shares(clipped, layout)
        leaves = optree.tree_leaves(clipped.grads)
    plain = [leaf for leaf, spec in zip(leaves, layout.specs) if spec is None]
    reduced = all_reduce_clipped_sum(clipped._replace(grads=plain), group, fingerprint=fingerprint)
    plain_iter: Iterator[torch.Tensor] = iter(reduced.grads)
    out = []
    for leaf, spec in zip(leaves, layout.specs):
        if spec is None:
            out.append(next(plain_iter))
            continue
        partial = DTensor.from_local(leaf.contiguous(), spec.mesh, [Partial("sum")] * spec.mesh.ndim, run_check=False,
                                     shape=leaf.shape, stride=leaf.stride())
        out.append(partial.redistribute(spec.mesh, spec.placements))
    return reduced._replace(grads=optree.tree_unflatten(treedef, out))


# --------------------------------------------------------------------------- FSDP2 modules


@contextlib.contextmanager
def fsdp_hooks_suspended(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the FSDP2 forward hooks of ``model``'s ``fully_shard`` modules are removed.

    fundp's sharded step gathers the parameters itself and calls the model functionally on the
    full tensors (:func:`fundp.functional_call` enters this block for FSDP2 models); FSDP2's own
    hooks would swap its sharded parameters back in and all-gather them inside ``vmap``.  The
    hooks (and their order) are restored on exit, so ordinary FSDP2 training is unaffected.
    A module without ``fully_shard`` is left as it is.

    Example:
      >>> import torch, fundp
      >>> with fundp.sharding.fsdp_hooks_suspended(torch.nn.Linear(2, 1)):
      ...     pass
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        yield
        return

    def fsdp_hook_ids(module: torch.nn.Module) -> set:
        if not isinstance(module, FSDPModule):
            return set()
        state = module._get_fsdp_state()
        ids = set()
        for handle in (getattr(state, "_pre_forward_hook_handle", None), getattr(state, "_post_forward_hook_handle", None)):
            if handle is None or not hasattr(handle, "id"):
                raise NotImplementedError(
                    "fully_shard over a group of modules (fully_shard([a, b])) is not supported by fundp's sharded step")
            ids.add(handle.id)
        return ids

    with _hooks_removed(model, fsdp_hook_ids):
        yield


@contextlib.contextmanager
def _hooks_removed(model: torch.nn.Module, hook_ids: Any) -> Iterator[None]:
    """Within the block, the forward (pre-)hooks ``hook_ids(module)`` of each module of ``model``
    are removed; every hook dict is restored (contents and order) on exit."""
    saved: list[tuple[dict, dict]] = []
    try:
        for module in model.modules():
            ids = hook_ids(module)
            for name in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                         "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                hooks = getattr(module, name)
                if any(i in hooks for i in ids):
                    saved.append((hooks, dict(hooks)))
                    for i in ids:
                        hooks.pop(i, None)
        yield
    finally:
        for hooks, copy in saved:
            hooks.clear()
            hooks.update(copy)


def gathered_frozen(model: torch.nn.Module, params: dict) -> dict:
    """The full values (detached) of ``model``'s DTensor parameters that ``params`` leaves out.

    Frozen parameters (a LoRA adapter's base weights) are used as the module holds them; under
    FSDP2 it holds shards, so they are all-gathered at each forward of the call: a collective, so
    every rank must run the same number of forwards (fundp's engines do, for batches of one shape
    on every rank; a rank that does not is caught by the process group's timeout).  Plain
    parameters are not included.

    Example:
      >>> import torch, fundp
      >>> fundp.sharding.gathered_frozen(torch.nn.Linear(2, 1), {})
      {}
    """
    dtensor = _dtensor_type()
    frozen = [(name, p) for name, p in model.named_parameters()
              if name not in params and dtensor is not None and isinstance(p, dtensor)]
    if not frozen:
        return {}
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._dtensor_spec import DTensorSpec
    from torch.distributed.tensor._redistribute import redistribute_local_tensor

    gathered = {}
    # Called inside vmap / grad: the all-gather runs on the raw local shards, outside the
    # transforms and autograd (DTensor.full_tensor is an autograd.Function, which they refuse);
    # the gathered values are constants of the call.
    with torch._C._DisableFuncTorch(), torch.no_grad():
        for name, p in frozen:
            spec = p._spec
            target = DTensorSpec(spec.mesh, (Replicate(),) * spec.mesh.ndim, tensor_meta=spec.tensor_meta)
            gathered[name] = redistribute_local_tensor(p._local_tensor, spec, target)
    return gathered


def _has_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


# --------------------------------------------------------------------------- tensor parallelism


class _TensorParallel(NamedTuple):
    """The tensor-parallel plan of one step: the parameters' root mesh and its TP dims.

    ``coordinates[g]``: the root-mesh coordinate of group rank ``g``; ``data_rank``: this rank's
    TP group, the row-major index of its coordinates over the data dims (the other dims)."""

    root: Any
    dims: tuple[str, ...]
    coordinates: tuple[tuple[int, ...], ...]
    rank: int
    data_rank: int

    @property
    def data_dims(self) -> tuple[str, ...]:
        return tuple(name for name in self.root.mesh_dim_names if name not in self.dims)

    def coordinate(self, rank: int, dims: tuple[str, ...]) -> tuple[int, ...]:
        names = self.root.mesh_dim_names
        return tuple(self.coordinates[rank][names.index(name)] for name in dims)


def _tensor_parallel_dims(value: Any) -> tuple[str, ...] | None:
    """``dp_step``'s ``tensor_parallel_dim`` as a tuple of mesh dim names (``None``: no tensor parallelism).

    Example:
      >>> import fundp
      >>> fundp.sharding._tensor_parallel_dims("tp")
      ('tp',)
    """
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (tuple, list)) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"tensor_parallel_dim must be a mesh dim name or a tuple of them, got {value!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"tensor_parallel_dim names a mesh dim twice: {value!r}")
    return tuple(names)


def _tensor_parallel_plan(leaves: list, paths: list, group: Any, dims: tuple[str, ...]) -> _TensorParallel:
    """Checks the DTensor leaves for a tensor-parallel step and returns its plan.

    Every DTensor leaf lives on one root mesh (or a named submesh of it: ``fully_shard`` over
    ``mesh["dp"]`` of a parameter tensor parallelism left alone), that root spans the step's
    process group and names every dim of ``dims``."""
    import torch.distributed as dist

    dtensor = _dtensor_type()
    world = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    root = None
    for leaf, path in zip(leaves, paths):
        if not isinstance(leaf, dtensor):
            continue
        name = "params" + "".join(f"[{p!r}]" for p in path)
        mesh = leaf.device_mesh
        leaf_root = mesh._get_root_mesh()
        if root is None:
            root = leaf_root
            names = root.mesh_dim_names or ()
            missing = [d for d in dims if d not in names]
            if missing:
                raise ValueError(
                    f"tensor_parallel_dim names {missing} but {name} lives on a mesh with dims {tuple(names) or 'unnamed'}: "
                    "name the tensor-parallel dims of the DeviceMesh the model was parallelized on "
                    "(init_device_mesh(..., mesh_dim_names=(\"dp\", \"tp\")))")
            ranks = sorted(int(r) for r in root.mesh.reshape(-1).tolist())
            if ranks != sorted(world):
                raise NotImplementedError(
                    f"{name} lives on a mesh of ranks {ranks[:8]} but the step's process group has ranks {sorted(world)[:8]}: "
                    "the parameters' (root) mesh must span the group")
        elif leaf_root != root:
            raise NotImplementedError(
                f"{name} lives on another root mesh ({tuple(leaf_root.mesh_dim_names or ())} {tuple(leaf_root.shape)}) than "
                f"the other parameters ({tuple(root.mesh_dim_names)} {tuple(root.shape)}): one DeviceMesh for the whole model")
        if mesh.mesh_dim_names is None or not set(mesh.mesh_dim_names) <= set(root.mesh_dim_names):
            raise NotImplementedError(f"{name} lives on an unnamed mesh: a submesh of the named root mesh is needed")
        local_box(leaf)  # refuses placements other than Shard / Replicate / FSDP2-over-TP strided shards
    assert root is not None, "called with DTensor leaves"
    layout = root.mesh
    coordinates = tuple(tuple(int(c) for c in (layout == rank).nonzero()[0].tolist()) for rank in world)
    rank = dist.get_rank(group)
    names = root.mesh_dim_names
    data_rank = 0
    for name in names:
        if name not in dims:
            data_rank = data_rank * root.size(names.index(name)) + coordinates[rank][names.index(name)]
    return _TensorParallel(root, dims, coordinates, rank, data_rank)


def _check_tensor_parallel_batches(digest: str, group: Any, plan: _TensorParallel) -> None:
    """Ranks of one tensor-parallel group pass the same batch; ranks of different groups, different rows."""
    from fundp.distributed import RankMismatchError

    values = _gathered_digests(digest, group, len(plan.coordinates))
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank in range(len(plan.coordinates)):
        groups.setdefault(plan.coordinate(rank, plan.data_dims), []).append(rank)
    for coordinate, ranks in groups.items():
        if len({values[r] for r in ranks}) > 1:
            raise RankMismatchError(
                f"ranks {ranks} form one tensor-parallel group (mesh dims {plan.dims}"
                + (f", data coordinate {dict(zip(plan.data_dims, coordinate))}" if plan.data_dims else "")
                + ") but pass different batches: the ranks of a tensor-parallel group "
                "compute one forward together and must pass the same rows and mask")
    heads = {coordinate: ranks[0] for coordinate, ranks in groups.items() if values[ranks[0]] is not None}
    seen: dict[int, tuple[int, ...]] = {}
    for coordinate, rank in heads.items():
        value = values[rank]
        assert value is not None
        if value in seen:
            raise RankMismatchError(
                f"the tensor-parallel groups of ranks {groups[seen[value]]} and {groups[coordinate]} pass the same batch rows: "
                f"along the data dims {plan.data_dims} every group must pass its own examples (fundp.distributed.shard "
                "with the group's data rank and the number of groups)")
        seen[value] = coordinate


def _tensor_parallel_shares(clipped: Any, layout: ShardLayout) -> Any:
    """Each TP group's clipped sum, counted once: the shares the reductions over the mesh add up.

    The ranks of a tensor-parallel group hold the same clipped sum (same examples, same full
    parameters).  A sharded leaf is summed (``Partial``) over every dim of its mesh, so it keeps
    its value on the ranks at coordinate 0 of the leaf's TP dims and is zero elsewhere (``x + 0``
    is exact); data dims its mesh lacks (a parameter that only tensor parallelism sharded, under
    DDP) are all-reduced first.  Plain leaves, the loss sum and the counts are all-reduced over
    the process group: they keep their values on the ranks at TP coordinate 0 only."""
    import torch.distributed as dist

    plan: _TensorParallel = layout.tensor_parallel
    leaves, treedef = optree.tree_flatten(clipped.grads)
    out = []
    for leaf, spec in zip(leaves, layout.specs):
        mesh_dims = plan.dims if spec is None else tuple(spec.mesh.mesh_dim_names)
        if spec is not None:
            for name in plan.data_dims:
                if name not in mesh_dims:
                    leaf = leaf.clone()
                    dist.all_reduce(leaf, group=plan.root.get_group(name))
        tp_here = tuple(d for d in plan.dims if d in mesh_dims)
        counted = not any(plan.coordinate(plan.rank, tp_here))
        out.append(leaf if counted else torch.zeros_like(leaf))
    head = not any(plan.coordinate(plan.rank, plan.dims))
    keep = (lambda t: t) if head else torch.zeros_like  # noqa: E731
    return clipped._replace(grads=optree.tree_unflatten(treedef, out), loss_sum=keep(clipped.loss_sum),
                            num_examples=keep(clipped.num_examples), num_nonfinite=keep(clipped.num_nonfinite))


def data_rank(layout: ShardLayout | None, group: Any = None) -> int:
    """The index of this rank's examples: its rank, or under tensor parallelism its TP group's data rank.

    The model key is folded with it, so the ranks of a tensor-parallel group (one forward
    together) draw the same dropout.

    Example:
      >>> import os, tempfile, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> fundp.sharding.data_rank(None)
      0
      >>> dist.destroy_process_group()
    """
    if layout is not None and layout.tensor_parallel is not None:
        return layout.tensor_parallel.data_rank
    import torch.distributed as dist

    return dist.get_rank(group)


def data_world_size(params: Any, group: Any = None, tensor_parallel_dim: Any = None) -> int:
    """The number of ranks with examples of their own: the group's size over the TP dims' sizes.

    With ``tensor_parallel_dim`` the sizes of those dims of the DTensor leaves' root mesh divide
    the group's size (a rank's batch is its TP group's); otherwise the group's size.

    Example:
      >>> import os, tempfile, torch, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> fundp.sharding.data_world_size({"w": torch.ones(2)})
      1
      >>> dist.destroy_process_group()
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    dims = _tensor_parallel_dims(tensor_parallel_dim)
    root = _root_mesh(params)
    if dims is None or root is None:
        return world
    names = root.mesh_dim_names or ()
    return world // math.prod(root.size(names.index(d)) for d in dims if d in names)


def counts_its_examples(params: Any, tensor_parallel_dim: Any = None) -> bool:
    """Whether this rank's count of its examples is the one its tensor-parallel group contributes.

    The ranks of a TP group share one batch: as for the clipped sum (:func:`reduce_clipped_sum`),
    the rank at coordinate 0 of the TP dims counts for the group and the others contribute 0, so
    a reduction over the ranks counts each example once.  Without ``tensor_parallel_dim``: True.

    Example:
      >>> import torch, fundp
      >>> fundp.sharding.counts_its_examples({"w": torch.ones(2)})
      True
    """
    dims = _tensor_parallel_dims(tensor_parallel_dim)
    root = _root_mesh(params)
    if dims is None or root is None:
        return True
    names, coordinate = root.mesh_dim_names or (), root.get_coordinate()
    return not any(coordinate[names.index(d)] for d in dims if d in names)


def _root_mesh(params: Any) -> Any:
    """The root ``DeviceMesh`` of the first DTensor leaf of ``params``, or ``None``."""
    dtensor = _dtensor_type()
    leaf = next((leaf for leaf in optree.tree_leaves(params) if dtensor is not None and isinstance(leaf, dtensor)), None)
    return None if leaf is None else leaf.device_mesh._get_root_mesh()


def _is_tensor_parallel_hook(hook: Any) -> bool:
    """A forward (pre-)hook installed by ``parallelize_module`` (``distribute_module``'s input /
    output layout hooks, ``PrepareModuleInput`` / ``PrepareModuleOutput``, ...)."""
    module = getattr(hook, "__module__", None) or getattr(getattr(hook, "func", None), "__module__", None) or ""
    return module.startswith("torch.distributed.tensor")


@contextlib.contextmanager
def tp_hooks_suspended(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the forward hooks that tensor parallelism installed on ``model`` are removed.

    ``parallelize_module`` makes a module's inputs and outputs DTensors and redistributes them
    (hooks from :mod:`torch.distributed.tensor`); fundp's sharded step calls the model on the
    gathered, plain parameters (:func:`fundp.functional_call` enters this block), where those
    hooks would mix DTensors with plain tensors: without them the model computes what the
    unparallelized model computes.  The hooks are restored on exit.

    Example:
      >>> import torch, fundp
      >>> with fundp.sharding.tp_hooks_suspended(torch.nn.Linear(2, 1)):
      ...     pass
    """
    def tp_hook_ids(module: torch.nn.Module) -> set:
        return {i for hooks in (module._forward_pre_hooks, module._forward_hooks)
                for i, hook in hooks.items() if _is_tensor_parallel_hook(hook)}

    with _hooks_removed(model, tp_hook_ids):
        yield


def _has_tensor_parallel(model: torch.nn.Module) -> bool:
    return any(getattr(module, "_distribute_module_applied", False) for module in model.modules()) or any(
        _is_tensor_parallel_hook(hook) for module in model.modules()
        for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()))



# --------------------------------------------------------------------------- correlated-noise state


def _stacked_placements(placements: tuple) -> tuple:
    """Placements of ``[m, *shape]`` stacked over a tensor of ``shape``: ``Shard(d)`` becomes ``Shard(d + 1)``
    (``_StridedShard(d, sf)``, FSDP2 over tensor-parallel shards, ``_StridedShard(d + 1, sf)``)."""
    from torch.distributed.tensor import Shard

    from torch.distributed.tensor import placement_types

    strided = getattr(placement_types, "_StridedShard", None)  # absent from older torch

    def moved(p: Any) -> Any:
        if strided is not None and isinstance(p, strided):
            return strided(p.dim + 1, split_factor=p.split_factor)
        return Shard(p.dim + 1) if isinstance(p, Shard) else p

    return tuple(moved(p) for p in placements)


def stacked_shard(leaf: Any, local: torch.Tensor) -> Any:
    """This rank's block ``local`` (``[m, *local_shape]``) of a tensor ``[m, *leaf.shape]``, laid out like ``leaf``.

    For a DTensor ``leaf`` the result is a DTensor of global shape ``[m, *leaf.shape]`` on
    ``leaf``'s mesh whose trailing dims are placed as ``leaf`` (``Shard(d)`` becomes
    ``Shard(d + 1)``, ``Replicate()`` stays): the state of a correlated-noise mechanism
    (:meth:`fundp.mf.CorrelatedNoise.init`) for sharded parameters, ``m`` buffers of the rank's own
    coordinates and nothing else.  A plain ``leaf``: ``local`` itself.

    Example:
      >>> import torch, fundp
      >>> fundp.sharding.stacked_shard(torch.zeros(3), torch.zeros(2, 3)).shape
      torch.Size([2, 3])
    """
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(leaf, dtensor):
        return local
    local_shape, _ = local_box(leaf)
    if tuple(local.shape[1:]) != local_shape:
        raise ValueError(f"the block has shape {list(local.shape)} but the leaf's local shape is {list(local_shape)}")
    shape = (int(local.shape[0]), *leaf.shape)
    return dtensor.from_local(local, leaf.device_mesh, _stacked_placements(tuple(leaf.placements)), run_check=False,
                              shape=shape, stride=_contiguous_stride(shape))


def on_local_blocks(fn: Any, buffer: Any, chunk: Any, leaf: Any) -> tuple[Any, Any]:
    """``fn(buffer, chunk, leaf) -> (noise, new_buffer)`` run on this rank's blocks when ``chunk`` is a DTensor.

    The online recurrences of :mod:`fundp.mf.strategies` act on every coordinate independently,
    so a rank runs them on its own block: ``buffer`` (``[m, *shape]``, :func:`stacked_shard`),
    the standard normals ``chunk`` of its coordinates (:func:`standard_normal_shards`) and the
    gradient ``leaf`` are replaced by their local tensors, and ``noise`` / ``new_buffer`` come
    back as DTensors laid out like ``leaf`` / ``buffer``: the same float64 operations on the same
    values as one process, so the gathered noise is bit-identical.  A buffer not laid out like
    the leaf (a state from :meth:`~fundp.mf.CorrelatedNoise.init` of unsharded parameters, or of
    another layout) raises ``ValueError``.  Plain ``chunk``: ``fn`` as it is.

    Example:
      >>> import torch, fundp
      >>> fundp.sharding.on_local_blocks(lambda b, z, g: (z, b), torch.zeros(1, 2), torch.ones(2), torch.zeros(2))
      (tensor([1., 1.]), tensor([[0., 0.]]))
    """
    dtensor = _dtensor_type()
    sharded = dtensor is not None and isinstance(chunk, dtensor)
    if not sharded:
        if dtensor is not None and isinstance(buffer, dtensor):
            raise ValueError(f"the noise state holds a sharded buffer ({_describe(buffer)}) for an unsharded gradient: "
                             "build the state with mechanism.init(params) from the params the step receives")
        return fn(buffer, chunk, leaf)
    expected = _stacked_placements(tuple(chunk.placements))
    if not isinstance(buffer, dtensor) or tuple(buffer.placements) != expected or buffer.device_mesh != chunk.device_mesh \
            or tuple(buffer.shape[1:]) != tuple(chunk.shape):
        raise ValueError(
            f"the noise state's buffer ({_describe(buffer)}) is not laid out like the sharded gradient ({_describe(chunk)}; "
            f"its buffers need placements {tuple(str(p) for p in expected)}): build the state with mechanism.init(params) "
            "from the sharded params (each rank then keeps the buffers of its own coordinates)")
    noise, updated = fn(buffer.to_local(), chunk.to_local(), leaf.to_local() if isinstance(leaf, dtensor) else leaf)
    noise = dtensor.from_local(noise, chunk.device_mesh, chunk.placements, run_check=False, shape=chunk.shape,
                               stride=_contiguous_stride(tuple(chunk.shape)))
    updated = dtensor.from_local(updated, buffer.device_mesh, buffer.placements, run_check=False, shape=buffer.shape,
                                 stride=_contiguous_stride(tuple(buffer.shape)))
    return noise, updated


# --------------------------------------------------------------------------- secure-mode noise


def map_local(fn: Any, tree: Any) -> Any:
    """``fn`` applied to the tree of this rank's local tensors; DTensor leaves come back laid out as they were.

    For elementwise functions of each leaf (the secure-mode noise of :mod:`fundp.secure` is drawn
    leaf by leaf, value by value): each rank computes its own block only.  A plain tree: ``fn(tree)``.

    Example:
      >>> import torch, fundp
      >>> fundp.sharding.map_local(lambda t: {"w": t["w"] + 1}, {"w": torch.zeros(2)})
      {'w': tensor([1., 1.])}
    """
    dtensor = _dtensor_type()
    if not is_sharded(tree):
        return fn(tree)
    leaves, treedef = optree.tree_flatten(tree)
    local = fn(optree.tree_unflatten(treedef, [leaf.to_local() if isinstance(leaf, dtensor) else leaf for leaf in leaves]))
    out = []
    for leaf, value in zip(leaves, treedef.flatten_up_to(local)):
        if isinstance(leaf, dtensor):
            value = dtensor.from_local(value, leaf.device_mesh, leaf.placements, run_check=False, shape=leaf.shape,
                                       stride=_contiguous_stride(tuple(leaf.shape)))
        out.append(value)
    return optree.tree_unflatten(treedef, out)


@torch.compiler.disable
def broadcast_replicas(tree: Any, group: Any = None) -> Any:
    """Every copy of a coordinate takes the value of its first copy: secure-mode noise drawn by its owner.

    Secure-mode noise comes from OS entropy (:mod:`fundp.secure`), so ranks holding the same
    coordinate draw different values.  For a DTensor leaf, the local block is broadcast along
    each mesh dimension the leaf is ``Replicate()`` on, from the rank at index 0 of that dimension
    (``Shard`` dimensions hold disjoint coordinates: nothing to do; FSDP2 on a 1-D mesh sends
    nothing); a plain leaf is broadcast from rank 0 of ``group``
    (:func:`fundp.distributed.broadcast_from_rank0`).  Each released coordinate thus carries one
    draw, the same on every rank that holds it.

    Example:
      >>> import os, tempfile, torch, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> fundp.sharding.broadcast_replicas({"w": torch.ones(2)})
      {'w': tensor([1., 1.])}
      >>> dist.destroy_process_group()
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate

    from fundp.distributed import broadcast_from_rank0

    dtensor = _dtensor_type()
    leaves, treedef = optree.tree_flatten(tree)
    out = []
    for leaf in leaves:
        if dtensor is None or not isinstance(leaf, dtensor):
            out.append(broadcast_from_rank0([leaf], group)[0])
            continue
        mesh, local = leaf.device_mesh, leaf.to_local().contiguous().clone()
        coordinate = mesh.get_coordinate()
        for dim, placement in enumerate(leaf.placements):
            if isinstance(placement, Replicate) and mesh.size(dim) > 1:
                first = list(coordinate)
                first[dim] = 0
                dist.broadcast(local, src=int(mesh.mesh[tuple(first)]), group=mesh.get_group(dim))
        out.append(dtensor.from_local(local, mesh, leaf.placements, run_check=False, shape=leaf.shape,
                                      stride=_contiguous_stride(tuple(leaf.shape))))
    return optree.tree_unflatten(treedef, out)


_SLOTS_WITH_TENSOR_PARALLEL = ("reduction_slots with tensor_parallel_dim: not supported (the ranks of a tensor-parallel "
                               "group share their examples, which the slots' tree does not count once)")


def tree_reduce_sharded_clipped_sum(clipped: Any, layout: ShardLayout, group: Any = None, *, fingerprint: Any = None) -> Any:
    """:func:`reduce_clipped_sum` with the sums grouped by the canonical tree (``reduction_slots``).

    The full-size sums are added by :func:`fundp.distributed.tree_reduce_clipped_sum` (the same
    bits on every rank and on every world size dividing the slots), then each sharded leaf keeps
    the coordinates its rank owns: a replicated DTensor redistributed to the parameter's
    placements (a local slice, no communication).  Tensor-parallel layouts are refused.

    Example:
      >>> import os, tempfile, torch, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> f = fundp.clipped_grad_sum(lambda p, b: b @ p["w"], max_norm=1.0, grad_method="vmap")
      >>> clipped = fundp.distributed.slotted_clipped_sum(f, 2)({"w": torch.zeros(2)}, torch.eye(2))
      >>> fundp.sharding.tree_reduce_sharded_clipped_sum(clipped, fundp.sharding.ShardLayout((None,))).grads["w"]
      tensor([1., 1.], dtype=torch.float64)
      >>> dist.destroy_process_group()
    """
    from torch.distributed.tensor import DTensor, Replicate

    from fundp.distributed import tree_reduce_clipped_sum

    if layout.tensor_parallel is not None:
        raise NotImplementedError(_SLOTS_WITH_TENSOR_PARALLEL)
    leaves = optree.tree_leaves(clipped.grads)
    if len(leaves) != len(layout.specs):
        raise ValueError(f"the clipped sum has {len(leaves)} leaves but the layout describes {len(layout.specs)}")
    total = tree_reduce_clipped_sum(clipped, group, fingerprint=fingerprint)
    leaves, treedef = optree.tree_flatten(total.grads)
    out = []
    for leaf, spec in zip(leaves, layout.specs):
        if spec is not None:
            leaf = DTensor.from_local(leaf.contiguous(), spec.mesh, [Replicate()] * spec.mesh.ndim, run_check=False,
                                      shape=leaf.shape, stride=leaf.stride()).redistribute(spec.mesh, spec.placements)
        out.append(leaf)
    return total._replace(grads=optree.tree_unflatten(treedef, out))
