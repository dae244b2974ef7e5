"""Tensors looked up by identity (``is``), never by value."""

from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["IdentityMap", "is_compiling"]


def is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False


class IdentityMap:
    """``tensor -> value`` by identity.

    Eagerly a dict ``id -> (weakref, value)``: O(1) lookups, a tensor that dies is not kept alive
    (the forward's temporaries are freed as usual) and a reused id is caught because its weakref
    no longer points at the tensor.  While ``torch.compile`` traces, a list scanned with ``is``:
    ``id()`` of an input tensor would make dynamo guard on that very object and recompile for every
    new batch.
    """

    def __init__(self) -> None:
        self.compiling = is_compiling()
        self.by_id: dict = {}
        self.items: list = []

    def set(self, tensor: torch.Tensor, value: Any) -> None:
        if self.compiling:
            for position, (known, _) in enumerate(self.items):
                if known is tensor:
                    self.items[position] = (tensor, value)
                    return
            self.items.append((tensor, value))
        else:
            self.by_id[id(tensor)] = (weakref.ref(tensor), value)

    def setdefault(self, tensor: torch.Tensor, value: Any) -> None:
        if self.get(tensor) is None:
            self.set(tensor, value)

    def get(self, tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor):
            return None
        if self.compiling:
            for known, value in self.items:
                if known is tensor:
                    return value
            return None
        found = self.by_id.get(id(tensor))
        if found is None or found[0]() is not tensor:
            return None
        return found[1]
