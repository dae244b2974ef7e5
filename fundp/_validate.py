"""Argument checks shared by the public functions: each error names the argument at fault."""

from __future__ import annotations

import math
from typing import Any

import optree
import torch


def check_number(name: str, value: Any, *, positive: bool = False, allow_zero: bool = True) -> float:
    """Returns ``float(value)`` after checking it is a finite real number (>= 0, or > 0 if asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
        isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if positive and (number < 0 or (number == 0 and not allow_zero)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {number}")
    return number


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
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (size,):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape [B] = [{size}], got {got}")
