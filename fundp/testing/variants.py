"""Run the same function eagerly and under ``torch.compile``, with dynamo reset between the two.

An equality test written once checks both ways a user runs a step: ``for name, fn in
compiled_variants(step): ...``, or, in pytest, a fixture that yields a :class:`Variant` per
parameter (fundp's own ``tests/conftest.py`` defines ``variant`` this way).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Literal, TypeVar

import gc

import torch

__all__ = ["VARIANTS", "Variant", "compiled_variants", "reset_compiler"]

VariantName = Literal["eager", "compiled"]
VARIANTS: tuple[VariantName, ...] = ("eager", "compiled")

F = TypeVar("F", bound=Callable[..., Any])


class Variant:
    """One way to run a function: ``Variant("eager")`` returns it unchanged,
    ``Variant("compiled", **compile_kwargs)`` returns ``torch.compile(fn, **compile_kwargs)``.

    Dynamo keeps caches per code object across calls; call :func:`reset_compiler` between
    tests that compile the same code (the ``variant`` fixture and :func:`compiled_variants` do).

    Example:
      >>> import torch
      >>> from fundp.testing import Variant
      >>> from torch.nn.functional import softsign            # x / (1 + |x|)
      >>> [Variant(name, backend="eager")(softsign)(torch.ones(2)) for name in ("eager", "compiled")]
      [tensor([0.5000, 0.5000]), tensor([0.5000, 0.5000])]
      >>> Variant("compiled", backend="eager")
      Variant('compiled', backend='eager')
    """

    def __init__(self, name: VariantName, **compile_kwargs: Any) -> None:
        if name not in VARIANTS:
            raise ValueError(f"name must be one of {VARIANTS}, got {name!r}")
        self.name: VariantName = name
        self.compile_kwargs = dict(compile_kwargs)

    @property
    def compiled(self) -> bool:
        """Whether this variant compiles."""
        return self.name == "compiled"

    def __call__(self, fn: F) -> F:
        if self.name == "eager":
            return fn
        compiled: F = torch.compile(fn, **self.compile_kwargs)  # type: ignore[assignment]
        return compiled

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.compile_kwargs.items())
        return f"Variant({self.name!r}{options})"


def reset_compiler() -> None:
    """Clears dynamo's caches (:func:`torch.compiler.reset`) after collecting garbage.

    Collecting first lets dynamo's clean-up callbacks for code that is already dead run before
    the caches are cleared.  (Compiling a function defined inside a doctest prints a harmless
    ``KeyError`` from such a callback when doctest clears its globals; the examples here compile
    a library function for that reason.)

    Example:
      >>> import torch
      >>> from fundp.testing import reset_compiler
      >>> from torch.nn.functional import softsign
      >>> torch.compile(softsign, backend="eager")(torch.ones(1))
      tensor([0.5000])
      >>> reset_compiler()
    """
    gc.collect()
    torch.compiler.reset()


def compiled_variants(fn: F, **compile_kwargs: Any) -> Iterator[tuple[VariantName, F]]:
    """Yields ``("eager", fn)`` then ``("compiled", torch.compile(fn, **compile_kwargs))``.

    Dynamo's caches are reset (:func:`reset_compiler`) before each variant, so no compiled
    code from an earlier use is reused.

    Example:
      >>> import torch
      >>> from fundp.testing import compiled_variants
      >>> from torch.nn.functional import softsign
      >>> for name, f in compiled_variants(softsign, backend="eager"):
      ...     print(name, f(torch.tensor([1.0, -3.0])))
      eager tensor([ 0.5000, -0.7500])
      compiled tensor([ 0.5000, -0.7500])
    """
    for name in VARIANTS:
        reset_compiler()
        yield name, Variant(name, **compile_kwargs)(fn)
