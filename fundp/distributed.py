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
Tensor-sharded parameters (FSDP2, DTensor) are gathered, and the clipped sum reduce-scattered
and noised per shard, by :mod:`fundp.sharding`.

Step 2's float sum groups the rows by world size (each rank sums its own, then the ranks' sums
are added), so the same batch on 2 and 4 ranks agrees only to rounding.  With
``dp_step(..., reduction_slots=S)`` (``S`` a power of two, ``W`` a power of two dividing it) the
sum is the same bits on every such world size: the global batch is cut into ``S`` slots (slot
``s``: global rows ``i = s (mod S)``; rank ``r`` holds the slots ``s = r (mod W)``,
:func:`slot_rows`), each slot's clipped sum is one call of the engine
(:func:`slotted_clipped_sum`), and the slot sums are added by one fixed binary tree
(:func:`canonical_tree_sum`), its last ``log2(W)`` levels across ranks by recursive doubling
(:func:`tree_all_reduce`, :func:`tree_reduce_clipped_sum`).  Cost: ``S / W`` engine calls per
rank and ``log2(W)`` full-size exchanges instead of one all-reduce.

The scheme is only private if every rank holds the same key, settings and parameters: a rank
that calls ``fundp.random.os_key()`` on its own adds different noise, and the all-reduced sum
then carries noise of the wrong scale on no rank.  :func:`check_consistent` compares them across
ranks (one small all-gather of 64-bit fingerprints) and raises :class:`RankMismatchError` naming
what differs; ``dp_step(distributed=True)`` runs it on its first call.  Draw a production key
once for all ranks with :func:`shared_os_key`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Iterable

import optree
import torch
import torch.distributed as dist

from fundp import random as fundp_random
from fundp._validate import check_batch, check_int
from fundp.types import ClippedSum

__all__ = [
    "rank_and_world_size",
    "all_reduce_sum",
    "all_reduce_clipped_sum",
    "broadcast_from_rank0",
    "shard",
    "check_not_sharded",
    "shared_os_key",
    "check_consistent",
    "first_call_check",
    "RankMismatchError",
    "check_reduction_slots",
    "slot_rows",
    "canonical_tree_sum",
    "slotted_clipped_sum",
    "tree_all_reduce",
    "tree_reduce_clipped_sum",
]


def rank_and_world_size(group: Any = None) -> tuple[int, int]:
    """Returns ``(rank, world_size)`` in ``group``; raises if no process group is initialised.

    Example:
      >>> import os, tempfile, torch, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> fundp.distributed.rank_and_world_size()
      (0, 1)
      >>> dist.destroy_process_group()
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def check_not_sharded(params: Any) -> None:
    """Raises ``NotImplementedError`` for tensor-sharded (FSDP / DTensor) parameters.

    Example:
      >>> import torch, fundp
      >>> fundp.distributed.check_not_sharded({"w": torch.ones(2)})  # plain tensors pass
    """
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

    Example:
      >>> import os, tempfile, torch, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> fundp.distributed.all_reduce_sum([torch.ones(2), torch.arange(3)])
      [tensor([1., 1.]), tensor([0, 1, 2])]
      >>> dist.destroy_process_group()
    """
    def reduce(flat: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        return flat

    return _by_dtype(tensors, reduce)


def _by_dtype(tensors: list[torch.Tensor], reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """``reduce`` applied to one flat buffer per dtype (a fresh concatenation), split back into the shapes."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for position, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(position)
    reduced: list[torch.Tensor | None] = [None] * len(tensors)
    for positions in by_dtype.values():
        flat = reduce(torch.cat([tensors[p].reshape(-1) for p in positions]))
        offset = 0
        for p in positions:
            count = tensors[p].numel()
            reduced[p] = flat[offset : offset + count].view_as(tensors[p])
            offset += count
    return reduced  # type: ignore[return-value]


def all_reduce_clipped_sum(clipped: ClippedSum, group: Any = None, *, fingerprint: Any = None) -> ClippedSum:
    """Sums a :class:`~fundp.step.ClippedSum` over ranks: gradient sums, loss sum and counts.

    ``norms`` and ``aux`` stay local (they describe this rank's rows).  Call it once per logical
    step, after accumulating the rank's physical chunks and before :func:`fundp.privatize`.

    ``fingerprint`` (from :func:`call_fingerprint`): this call's key and settings, folded into the
    same collective (two float64 words ``f`` and ``f^2`` per hash).  The ranks agree exactly when
    ``W * sum(f^2) == sum(f)^2`` for each hash (all ``f`` equal); otherwise every rank raises
    :class:`RankMismatchError` on this call, before any noise is added.  Cost: a few more words in
    the all-reduce and one scalar read.

    Example:
      >>> import os, tempfile, torch, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> summed = fundp.clipped_grad_sum(lambda p, b: b @ p["w"], max_norm=1.0, grad_method="vmap")
      >>> clipped = summed({"w": torch.zeros(2)}, torch.eye(2), None, fundp.random.key(0))
      >>> fundp.distributed.all_reduce_clipped_sum(clipped).grads["w"]  # clipped sums are float64
      tensor([1., 1.], dtype=torch.float64)
      >>> dist.destroy_process_group()
    """
    leaves, treedef = optree.tree_flatten(clipped.grads)
    stats = torch.stack([clipped.loss_sum.to(torch.float64), clipped.num_examples.to(torch.float64), clipped.num_nonfinite.to(torch.float64)])
    if fingerprint is not None:
        words = torch.as_tensor(fingerprint, dtype=torch.float64).to(stats.device)
        stats = torch.cat([stats, words, words * words])
    *grads, stats = all_reduce_sum(leaves + [stats], group)
    if fingerprint is not None:
        _check_fingerprint(stats[3:], group)
    # _replace keeps every other field, the clipped sum's sensitivity included.
    return clipped._replace(
        grads=optree.tree_unflatten(treedef, grads),
        loss_sum=stats[0].to(clipped.loss_sum.dtype),
        num_examples=stats[1].round().to(clipped.num_examples.dtype),
        num_nonfinite=stats[2].round().to(clipped.num_nonfinite.dtype),
    )


_FINGERPRINT_BITS = 20  # f^2 * world_size stays exact in float64 for up to 2^12 ranks


@torch.compiler.disable
def call_fingerprint(key: torch.Tensor, settings: Any) -> torch.Tensor:
    """Two 20-bit hashes of one call's ``key`` and ``settings`` (``(name, value)`` pairs: sigma,
    the clipping threshold, the ledger's step count, ...), as a float64 tensor ``[2]``.

    Values are read on the host (a CPU key, floats: no device sync; a 0-d accelerator tensor: one).

    Example:
      >>> import fundp
      >>> a = fundp.distributed.call_fingerprint(fundp.random.key(0), (("max_norm", 1.0),))
      >>> b = fundp.distributed.call_fingerprint(fundp.random.key(0), (("max_norm", 50.0),))
      >>> bool((a == b).all())
      False
    """
    import hashlib

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return tuple(value.detach().reshape(-1).tolist())
        if isinstance(value, float):
            return value.hex()
        leaves = optree.tree_leaves(value) if not isinstance(value, (int, str, bool, type(None))) else None
        return tuple(plain(v) for v in leaves) if leaves is not None else value

    text = repr((plain(key), tuple((name, plain(value)) for name, value in settings)))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    mask = (1 << _FINGERPRINT_BITS) - 1
    first, second = int.from_bytes(digest[:4], "little") & mask, int.from_bytes(digest[4:], "little") & mask
    return torch.tensor([first, second], dtype=torch.float64)


@torch.compiler.disable
def _check_fingerprint(reduced: torch.Tensor, group: Any) -> None:
    _, world_size = rank_and_world_size(group)
    half = reduced.numel() // 2
    sums, squares = reduced[:half].tolist(), reduced[half:].tolist()
    if any(world_size * sq != total * total for total, sq in zip(sums, squares)):
        raise RankMismatchError(
            "ranks disagree on this call's key, noise_multiplier, max_norm or ledger step count "
            "(checked on every call): every rank must pass the same key and settings at every step, "
            "or the noise would be sized for one rank's settings and not the others'"
        )


def broadcast_from_rank0(tree: Any, group: Any = None) -> Any:
    """Returns rank 0's values of a pytree of tensors on every rank (secure-mode noise; initial params).

    Example:
      >>> import os, tempfile, torch, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> fundp.distributed.broadcast_from_rank0({"w": torch.ones(2)})
      {'w': tensor([1., 1.])}
      >>> dist.destroy_process_group()
    """
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

    Example:
      >>> import torch, fundp
      >>> rows, mask = fundp.distributed.shard(torch.arange(5), torch.ones(5, dtype=torch.bool), 1, 2)
      >>> rows.tolist(), mask.tolist()
      ([1, 3, 0], [True, True, False])
    """
    world_size = check_int("world_size", world_size, minimum=1)
    rank = check_int("rank", rank, minimum=0, maximum=world_size - 1)
    if indices.shape != mask.shape or indices.dim() != 1:
        raise ValueError("indices and mask must be 1-D tensors of the same length")
    extra = (-indices.shape[0]) % world_size
    if extra:
        fill = indices[:1].expand(extra) if indices.numel() else torch.zeros(extra, dtype=indices.dtype)
        indices = torch.cat([indices, fill])
        mask = torch.cat([mask, torch.zeros(extra, dtype=torch.bool, device=mask.device)])
    return indices[rank::world_size], mask[rank::world_size]


# --------------------------------------------------------------------------- consistency across ranks


class RankMismatchError(ValueError):
    """Ranks of a distributed step disagree on the key, a setting or the parameters.

    Raised by :func:`check_consistent`.

    Example:
      >>> from fundp.distributed import RankMismatchError
      >>> try:
      ...     raise RankMismatchError("ranks disagree on the key")
      ... except ValueError as error:
      ...     print(type(error).__name__, error)
      RankMismatchError ranks disagree on the key
    """


def shared_os_key(group: Any = None, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Returns one key from the OS entropy of group rank 0, the same on every rank.

    The production key of a distributed run: never call :func:`fundp.random.os_key` on each rank
    (each would draw its own).  ``device`` is where the key is returned (the broadcast itself
    runs on the CPU for gloo/MPI and on the current accelerator otherwise).

    Example:
      >>> import os, tempfile, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> key = fundp.distributed.shared_os_key()
      >>> key.shape, key.dtype
      (torch.Size([2]), torch.int64)
      >>> dist.destroy_process_group()
    """
    rank_and_world_size(group)
    key = fundp_random.os_key().to(_collective_device(group, None))
    key = broadcast_from_rank0(key, group)
    return key.to(device if device is not None else "cpu")


def _collective_device(group: Any, hint: torch.Tensor | None) -> torch.device:
    backend = str(dist.get_backend(group))
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    if hint is not None and hint.device.type != "cpu":
        return hint.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")  # pragma: no cover - another accelerator backend with a CPU hint


def _canonical(value: Any) -> str:
    """A text form of ``value`` that is equal across processes exactly when the values are."""
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        return repr(value)  # shortest text that round-trips: equal exactly when the floats are
    if isinstance(value, torch.Tensor):
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        return f"tensor({value.dtype}, {list(value.shape)}, {digest})"
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, dict):
        items = sorted((_canonical(k), _canonical(v)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}(" + ", ".join(_canonical(v) for v in value) + ")"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"<{getattr(value, '__module__', '?')}.{value.__qualname__}>"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))  # no memory addresses: they differ across processes


def _fingerprint(text: str) -> int:
    """A signed 64-bit integer from SHA-256 of ``text`` (collisions: ~2**-64)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


_CHUNK = 1 << 22  # bytes per step of the parameter fingerprint (a 32 MiB int64 temporary)


def _tensor_sums(leaves: list[torch.Tensor]) -> list[int]:
    """Exact position-weighted byte sums of each leaf, computed where the leaf lives, one sync.

    ``sum_i b_i (i mod 251 + 1)`` over the leaf's bytes ``b_i``, in int64 (no overflow below
    ~10**14 bytes per leaf): integer arithmetic, so equal tensors give equal sums on any device.
    """
    sums = []
    for leaf in leaves:
        flat = leaf.detach().contiguous().reshape(-1).view(torch.uint8)
        total = torch.zeros((), dtype=torch.int64, device=flat.device)
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start : start + _CHUNK].to(torch.int64)
            weights = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=flat.device).remainder_(251).add_(1)
            total = total + (chunk * weights).sum()
        sums.append(total.to("cpu"))
    return [int(value) for value in torch.stack(sums).tolist()] if sums else []


def _named_settings(settings: Any) -> list[tuple[str, Any]]:
    items: Iterable[Any] = settings.items() if isinstance(settings, dict) else settings
    named = []
    for index, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            named.append(item)
        else:
            named.append((f"settings[{index}]", item))
    return named


@torch.compiler.disable
def check_consistent(key: torch.Tensor, settings: Any = (), group: Any = None, *, params: Any = None) -> None:
    """Raises :class:`RankMismatchError` unless every rank of ``group`` holds the same key, settings and params.

    Every rank must call it (it is a collective).  Each rank reduces its values to 64-bit
    fingerprints — SHA-256 of the key's words and of each setting's canonical text, and an exact
    integer checksum of each parameter tensor computed on its device — and the fingerprints are
    all-gathered (two small collectives; one host sync).  On a mismatch every rank raises the
    same error, naming each differing item with the ranks' values (settings) or fingerprints
    (the key, which is secret; the params).

    Args:
      key: this rank's fundp key.
      settings: ``(name, value)`` pairs or a dict (plain values are named ``settings[i]``):
        numbers, strings, bools, None, tensors, dtypes, ledgers and containers of them.
        Floats are compared exactly.
      group: the process group (default: the world).
      params: optional pytree of tensors compared leaf by leaf (path, dtype, shape, bytes).

    Example:
      >>> import os, tempfile, torch, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> fundp.distributed.check_consistent(fundp.random.key(0), (("noise_multiplier", 1.1),), params={"w": torch.ones(2)})
      >>> dist.destroy_process_group()
    """
    rank, world_size = rank_and_world_size(group)
    if not isinstance(key, torch.Tensor):
        raise TypeError(f"key must be a fundp key tensor, got {type(key).__name__}")
    fundp_random._check_key(key.detach().to("cpu"))
    names, texts = ["key"], ["key:" + repr(tuple(key.detach().to("cpu").tolist()))]
    shown: dict[str, str] = {}
    for name, value in _named_settings(settings):
        names.append(name)
        texts.append(name + ":" + _canonical(value))
        shown[name] = _canonical(value)
    if params is not None:
        leaves, _ = optree.tree_flatten(params, none_is_leaf=False)
        paths = optree.tree_paths(params, none_is_leaf=False)
        for leaf, path in zip(leaves, paths):
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"params must be a pytree of tensors, got a {type(leaf).__name__} at {path}")
        for leaf, path, total in zip(leaves, paths, _tensor_sums(leaves)):
            name = "params" + "".join(f"[{p!r}]" for p in path)
            names.append(name)
            texts.append(f"{name}:{leaf.dtype}:{list(leaf.shape)}:{total}")
    if world_size == 1:
        return
    device = _collective_device(group, key)
    header = torch.tensor([len(names), _fingerprint("\n".join(names))], dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(world_size)]
    dist.all_gather(headers, header, group=group)
    header_rows = torch.stack(headers).to("cpu")
    if not bool((header_rows == header_rows[0]).all()):
        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, names, group=group)
        differing = sorted(set().union(*map(set, everyone)) - set.intersection(*map(set, everyone)))
        raise RankMismatchError(
            "ranks disagree on what they check: the settings or the params' structure differ "
            f"(items not held by every rank: {differing[:10]}); every rank must build the same step "
            "and hold the same parameter tree"
        )
    mine = torch.tensor([_fingerprint(text) for text in texts], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    rows = torch.stack(gathered).to("cpu")
    differs = (rows != rows[0]).any(dim=0).tolist()
    if not any(differs):
        return
    bad = [name for name, flag in zip(names, differs) if flag]
    # The key is secret: only 32 bits of its fingerprint are shown.
    described = {name: shown.get(name, f"fingerprint {int(rows[rank, names.index(name)]) & 0xFFFFFFFF:08x}") for name in bad}
    everyone_described: list[Any] = [None] * world_size
    dist.all_gather_object(everyone_described, described, group=group)
    lines = []
    for name in bad:
        values = ", ".join(f"rank {r} has {everyone_described[r][name][:120]}" for r in range(world_size))
        lines.append(f"{name}: {values}")
    hints = []
    if "key" in bad:
        hints.append(
            "every rank must pass the same key: draw it once with fundp.distributed.shared_os_key() "
            "(never fundp.random.os_key() on each rank) or use the same fundp.random.key(seed)"
        )
    if any(name.startswith("params") for name in bad):
        hints.append(
            "every rank must start from the same parameters: seed the initialisation identically or "
            "use params = fundp.distributed.broadcast_from_rank0(params)"
        )
    raise RankMismatchError(
        f"the {world_size} ranks of the distributed step disagree on {', '.join(bad[:10])}"
        + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        + ":\n  " + "\n  ".join(lines[:10]) + ("\n" + "\n".join(hints) if hints else "")
    )


class _FirstCallCheck:
    """Runs :func:`check_consistent` on the first call, then nothing (see :func:`first_call_check`)."""

    def __init__(self, settings: Any, group: Any) -> None:
        self.settings = _named_settings(settings)
        self.group = group
        self.done = False

    @torch.compiler.disable
    def __call__(self, key: torch.Tensor, params: Any = None, per_call: Any = ()) -> None:
        if self.done:
            return
        check_consistent(key, self.settings + _named_settings(per_call), self.group, params=params)
        self.done = True


def first_call_check(settings: Any, group: Any = None) -> Callable[..., None]:
    """Returns ``check(key, params=None, per_call=())`` that runs :func:`check_consistent` once.

    The first call compares ``key``, ``settings`` (fixed when the step is built), ``per_call``
    (``(name, value)`` pairs known only at call time, e.g. the ledger) and ``params`` across the
    ranks; once that succeeds later calls return at once (one attribute read; the function is
    excluded from ``torch.compile``, so it adds no guard and no recompile).  A failed check is
    retried on the next call.

    Example:
      >>> import fundp
      >>> check = fundp.distributed.first_call_check((("noise_multiplier", 1.1),))
      >>> check.done
      False
    """
    return _FirstCallCheck(settings, group)


# --------------------------------------------------------------------------- world-size-invariant sums


def check_reduction_slots(slots: Any, world_size: int = 1) -> int:
    """Returns ``slots`` checked: a power of two that ``world_size`` (a power of two) divides.

    Example:
      >>> import fundp
      >>> fundp.distributed.check_reduction_slots(8, 2)
      8
    """
    slots = check_int("reduction_slots", slots, minimum=1)
    if slots & (slots - 1):
        raise ValueError(f"reduction_slots must be a power of two, got {slots}")
    if world_size & (world_size - 1) or slots % world_size:
        raise ValueError(f"reduction_slots={slots} needs a world size that is a power of two dividing it, "
                         f"got {world_size} ranks: use reduction_slots a multiple of every world size the run may take")
    return slots


def slot_rows(size: int, slots: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, torch.Tensor]]:
    """``[(s, rows), ...]``: the reduction slots ``s`` rank ``rank`` holds and their rows in its batch.

    The global batch (``size * world_size`` rows, sharded ``rank::world_size`` by :func:`shard`)
    is cut into ``slots`` slots, slot ``s`` holding the global rows ``i = s (mod slots)`` in
    order.  Rank ``r`` holds the slots ``s = r + t * world_size`` for ``t < L = slots / world_size``,
    slot ``s`` being its local rows ``t, t + L, t + 2L, ...``.  Raises ``ValueError`` unless ``L``
    divides ``size`` (pad the global batch to a multiple of ``slots`` before sharding).

    Example:
      >>> import fundp
      >>> [(s, rows.tolist()) for s, rows in fundp.distributed.slot_rows(4, 4, rank=1, world_size=2)]
      [(1, [0, 2]), (3, [1, 3])]
    """
    slots = check_reduction_slots(slots, world_size)
    local = slots // world_size
    if size == 0 or size % local:
        raise ValueError(f"the batch has {size} rows on this rank, not a positive multiple of reduction_slots / world_size "
                         f"= {slots} / {world_size} = {local}: pad the global batch to a multiple of reduction_slots "
                         "(masked rows) before sharding it")
    return [(rank + t * world_size, torch.arange(t, size, local)) for t in range(local)]


def canonical_tree_sum(values: list) -> Any:
    """The sum of ``L`` (a power of two) pytrees of tensors by the canonical binary tree.

    Level by level, ``v[i] <- v[i] + v[i + L/2]`` for ``i < L/2``, then on the ``L/2`` results,
    down to one: the grouping depends on ``L`` only.  Float addition is commutative, so a pair's
    sum is the same bits whichever side computes it.

    Example:
      >>> import torch, fundp
      >>> fundp.distributed.canonical_tree_sum([torch.tensor(1e16), torch.tensor(1.0), torch.tensor(-1e16), torch.tensor(1.0)])
      tensor(2.)
    """
    if not values or len(values) & (len(values) - 1):
        raise ValueError(f"canonical_tree_sum needs a power-of-two number of values, got {len(values)}")
    while len(values) > 1:
        half = len(values) // 2
        values = [optree.tree_map(torch.add, values[i], values[i + half]) for i in range(half)]
    return values[0]


def slotted_clipped_sum(clipped_sum_fn: Callable[..., ClippedSum], slots: int, rank: int = 0,
                        world_size: int = 1) -> Callable[..., ClippedSum]:
    """Transform of a clipped-sum function: the rank's sum, slot by slot (see :func:`slot_rows`).

    Returns ``f(params, batch, mask=None, key=None, **kwargs) -> ClippedSum``: one call of
    ``clipped_sum_fn`` per slot ``s`` the rank holds, on the slot's rows in order (model key
    ``fold_in(key, s)``: the same on any world size), the ``L = slots / world_size`` slot sums
    (gradients and loss sum) added by :func:`canonical_tree_sum`, counts added exactly, ``norms``
    and ``aux`` back in the batch's row order.  Since clipping is per example, a slot's clipped
    sum is a function of its rows only, so the result is too: with :func:`tree_reduce_clipped_sum`
    the total is the same bits on every world size dividing ``slots``.  Cost: ``L`` calls of
    ``clipped_sum_fn`` on ``B / L`` rows each.

    Example:
      >>> import torch, fundp
      >>> f = fundp.clipped_grad_sum(lambda p, b: b @ p["w"], max_norm=1.0, grad_method="vmap")
      >>> g = fundp.distributed.slotted_clipped_sum(f, 2)
      >>> g({"w": torch.zeros(2)}, torch.tensor([[3.0, 4.0], [0.3, 0.4]])).grads["w"]
      tensor([0.9000, 1.2000], dtype=torch.float64)
    """
    slots = check_reduction_slots(slots, world_size)

    def f(params: Any, batch: Any, mask: torch.Tensor | None = None, key: torch.Tensor | None = None, **kwargs: Any) -> ClippedSum:
        size = check_batch(batch)
        parts = []
        for slot, rows in slot_rows(size, slots, rank, world_size):
            part_key = None if key is None else fundp_random.fold_in(key, slot)
            parts.append(clipped_sum_fn(params, optree.tree_map(lambda leaf: leaf[rows], batch),
                                        None if mask is None else mask[rows], part_key, **kwargs))
        grads, loss_sum = canonical_tree_sum([(part.grads, part.loss_sum) for part in parts])

        def interleaved(*per_slot: torch.Tensor) -> torch.Tensor:  # slot t's k-th row is local row t + k * L
            return torch.stack(per_slot, dim=1).reshape(size, *per_slot[0].shape[1:])

        first = parts[0]
        aux = None if first.aux is None else optree.tree_map(interleaved, *[part.aux for part in parts])
        return first._replace(grads=grads, loss_sum=loss_sum, num_examples=torch.stack([p.num_examples for p in parts]).sum(),
                              norms=interleaved(*[part.norms for part in parts]),
                              num_nonfinite=torch.stack([p.num_nonfinite for p in parts]).sum(), aux=aux)

    return f


def tree_all_reduce(tensors: list[torch.Tensor], group: Any = None) -> list[torch.Tensor]:
    """The element-wise SUM over the ``W`` ranks (a power of two), grouped by the canonical tree.

    Recursive doubling: for ``h = W/2, W/4, ..., 1`` every rank exchanges its running sums with
    rank ``rank XOR h`` (point-to-point) and adds the two; ranks ``r`` and ``r + h`` (``r < h``)
    thus both hold ``v_r + v_{r+h}`` (the same bits: addition is commutative), and after
    ``log2(W)`` rounds every rank holds :func:`canonical_tree_sum` of the ranks' values in rank
    order.  One flat buffer per dtype; the inputs are not modified.  Cost: ``log2(W)`` exchanges
    of the full tensors (an all-reduce moves about two).

    Example:
      >>> import os, tempfile, torch, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> fundp.distributed.tree_all_reduce([torch.ones(2)])
      [tensor([1., 1.])]
      >>> dist.destroy_process_group()
    """
    rank, world_size = rank_and_world_size(group)
    if world_size & (world_size - 1):
        raise ValueError(f"a tree all-reduce needs a power-of-two world size, got {world_size} ranks")

    def reduce(flat: torch.Tensor) -> torch.Tensor:
        half = world_size // 2
        while half:
            partner = rank ^ half
            peer = dist.get_global_rank(group, partner) if group is not None else partner
            theirs = torch.empty_like(flat)
            ops = [dist.P2POp(dist.isend, flat, peer, group), dist.P2POp(dist.irecv, theirs, peer, group)]
            for request in dist.batch_isend_irecv(ops):
                request.wait()
            flat = flat + theirs
            half //= 2
        return flat

    return _by_dtype(tensors, reduce)


def tree_reduce_clipped_sum(clipped: ClippedSum, group: Any = None, *, fingerprint: Any = None) -> ClippedSum:
    """:func:`all_reduce_clipped_sum` with the gradient and loss sums grouped by the canonical tree.

    Gradient sums and the loss sum go through :func:`tree_all_reduce`; the counts (integers,
    exact whatever the grouping) and ``fingerprint`` through :func:`all_reduce_clipped_sum`.
    After :func:`slotted_clipped_sum` on each rank, the result is the same bits on every
    power-of-two world size dividing the slots (:func:`canonical_tree_sum` of all slots).

    Example:
      >>> import os, tempfile, torch, torch.distributed as dist, fundp
      >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
      >>> summed = fundp.clipped_grad_sum(lambda p, b: b @ p["w"], max_norm=1.0, grad_method="vmap")
      >>> clipped = fundp.distributed.slotted_clipped_sum(summed, 2)({"w": torch.zeros(2)}, torch.eye(2))
      >>> fundp.distributed.tree_reduce_clipped_sum(clipped).grads["w"]
      tensor([1., 1.], dtype=torch.float64)
      >>> dist.destroy_process_group()
    """
    leaves, treedef = optree.tree_flatten(clipped.grads)
    *grads, loss_sum = tree_all_reduce(leaves + [clipped.loss_sum], group)
    counted = all_reduce_clipped_sum(clipped._replace(grads=[]), group, fingerprint=fingerprint)
    return counted._replace(grads=optree.tree_unflatten(treedef, grads), loss_sum=loss_sum)
