"""The one place argument checks live: each error names the argument at fault.

Every public function checks its arguments with these, so the words a user reads are the same
everywhere: ``"<name> must be > 0, got -1.0"``.  Numbers may be Python numbers, NumPy scalars or
one-element real tensors; they come back as plain ``float`` / ``int``, so nothing stored (a
ledger, a config) drags a tensor or a traced value along.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import optree
import torch

__all__ = [
    "check_real",
    "check_positive",
    "check_nonnegative",
    "check_int",
    "check_sample_rate",
    "check_delta",
    "check_epsilon",
    "check_batch",
    "check_mask",
    "batch_size",
    "check_params",
]


def check_real(name: str, value: Any) -> float:
    """Returns ``float(value)`` after checking it is a finite real number."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor of shape {tuple(value.shape)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    # Comparisons, not math.isnan/isinf: under torch.compile a float may be traced as a symbolic
    # number (after a second value was seen), and dynamo can guard on a comparison but not call those.
    if number != number or number in (math.inf, -math.inf):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def check_positive(name: str, value: Any) -> float:
    """Returns ``float(value)`` after checking ``0 < value < inf``."""
    number = check_real(name, value)
    if not number > 0:
        raise ValueError(f"{name} must be > 0, got {number}")
    return number


def check_nonnegative(name: str, value: Any) -> float:
    """Returns ``float(value)`` after checking ``0 <= value < inf``."""
    number = check_real(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {number}")
    return number


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Returns ``int(value)`` after checking it is a whole number in ``[minimum, maximum]``.

    Accepts ints, NumPy integers, 0-d integer tensors and floats that are whole numbers.
    """
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value}")
        value = int(value)
    try:
        number = operator.index(value)
    except TypeError:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point \
                and value.dtype != torch.bool and not value.dtype.is_complex:
            number = int(value)
        else:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")
    return int(number)


def check_sample_rate(value: Any, name: str = "sample_rate") -> float:
    """Returns the Poisson sampling rate ``q`` after checking ``0 < q <= 1``."""
    q = check_real(name, value)
    if not 0 < q <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {q}")
    return q


def check_delta(value: Any, name: str = "delta") -> float:
    """Returns ``delta`` after checking ``0 < delta < 1``."""
    d = check_real(name, value)
    if not 0 < d < 1:
        raise ValueError(f"{name} must be in (0, 1), got {d}")
    return d


def check_epsilon(value: Any, name: str = "epsilon") -> float:
    """Returns ``epsilon`` after checking ``0 < epsilon < inf``."""
    return check_positive(name, value)


def check_number(name: str, value: Any, *, positive: bool = False, allow_zero: bool = True) -> float:
    """Deprecated spelling kept for call sites not yet moved: use the functions above.

    ``positive=True`` means ``>= 0`` (``> 0`` with ``allow_zero=False``).
    """
    if not positive:
        return check_real(name, value)
    return check_nonnegative(name, value) if allow_zero else check_positive(name, value)


def batch_size(batch: Any) -> int:
    """Returns the shared leading dimension ``B`` of every tensor leaf of ``batch``."""
    return check_batch(batch)


def check_batch(batch: Any, name: str = "batch") -> int:
    """Checks that ``batch`` is a non-empty pytree of tensors sharing a leading dimension; returns it."""
    leaves = optree.tree_leaves(batch)
    if not leaves:
        raise ValueError(f"{name} must contain at least one tensor")
    sizes = []
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"every leaf of {name} must be a tensor, got {type(leaf).__name__}")
        if leaf.dim() == 0:
            raise ValueError(f"every leaf of {name} needs a leading batch dimension, got a scalar tensor")
        sizes.append(leaf.shape[0])
    if any(size != sizes[0] for size in sizes):
        raise ValueError(f"all leaves of {name} must share the leading batch dimension, got sizes {sizes}")
    return int(sizes[0])


def check_mask(mask: Any, size: int) -> None:
    """Checks that ``mask`` is a bool tensor of shape ``[size]``."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (size,):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape [B] = [{size}], got {got}")


def _byte_range(tensor: torch.Tensor) -> tuple[int, int, int]:
    """``(storage address, first byte, one past the last byte)`` that ``tensor`` can read."""
    size = tensor.element_size()
    low = high = tensor.storage_offset()
    for length, stride in zip(tensor.shape, tensor.stride()):
        if length == 0:
            return tensor.untyped_storage().data_ptr(), 0, 0
        if stride >= 0:
            high += (length - 1) * stride
        else:
            low += (length - 1) * stride
    return tensor.untyped_storage().data_ptr(), int(low) * size, (int(high) + 1) * size


class AliasedParametersError(ValueError):
    """Two parameter leaves share memory: per-example clipping cannot treat them as independent."""


def check_params(params: Any, name: str = "params") -> None:
    """Refuses parameters that per-example gradients cannot treat as independent leaves.

    * two leaves sharing memory (``{"a": W, "b": W}``, or ``W`` and a view of it): the model's
      real parameter receives both leaves' gradients, so per-example norms taken leaf by leaf
      miss the cross terms and clipping does not bound an example's contribution;
    * complex leaves: the engines clip real gradients (a complex one would lose its imaginary
      part or be clipped with the wrong norm).

    Example:
      >>> import torch
      >>> from fundp._validate import check_params
      >>> w = torch.zeros(2, 2)
      >>> check_params({"a": w, "b": w.clone()})
      >>> check_params({"a": w, "b": w[0]})
      Traceback (most recent call last):
      ...
      fundp._validate.AliasedParametersError: params['a'] and params['b'] share memory (the same tensor or views of one): ...
    """
    paths = optree.tree_paths(params)
    leaves = optree.tree_leaves(params)

    def leaf_name(index: int) -> str:  # formatted only for an error: this runs on every step
        return name + "".join(f"[{p!r}]" for p in paths[index])

    # Byte ranges seen so far, per storage: only leaves of one storage can overlap, so the usual
    # case (every parameter its own storage) is linear in the number of leaves.
    seen: dict[int, list[tuple[int, int, int]]] = {}
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        if type(leaf).__name__ == "DTensor":
            raise TypeError(f"{leaf_name(index)} is a DTensor shard (FSDP2 / tensor parallel): only dp_step(..., distributed=True) "
                            "takes sharded parameters (it gathers them, see fundp.sharding); elsewhere pass full tensors "
                            "(DTensor.full_tensor())")
        if leaf.is_complex():
            raise TypeError(f"{leaf_name(index)} is complex ({leaf.dtype}): fundp clips real gradients; write the parameter "
                             "as two real tensors (real and imaginary parts) and build the complex value in loss_fn")
        if leaf.device.type == "meta" or leaf.numel() == 0:
            continue
        address, low, high = _byte_range(leaf)
        for other, other_low, other_high in seen.get(address, ()):
            if low < other_high and other_low < high:
                raise AliasedParametersError(
                    f"{leaf_name(other)} and {leaf_name(index)} share memory (the same tensor or views of one): their per-example "
                    "gradients would be clipped apart although they update one parameter. Pass the tensor once and "
                    "reuse it inside loss_fn (weight tying is handled exactly), or pass independent copies")
        seen.setdefault(address, []).append((index, low, high))
