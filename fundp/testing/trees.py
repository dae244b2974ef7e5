"""``assert_trees_close``: chex-style comparison of two pytrees of tensors.

A failure names the path of the first leaf that differs (``grads['fc.weight']``), how many of its
elements differ, the largest difference and where it is, so a failing test says what went wrong
without a debugger.
"""

from __future__ import annotations

import math
from typing import Any

import optree
import torch

__all__ = ["assert_trees_close", "leaf_names", "default_tolerances"]

# The defaults of torch.testing.assert_close, by dtype: (rtol, atol).
_DEFAULT_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}


def default_tolerances(*dtypes: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` of ``torch.testing.assert_close`` for the least precise of ``dtypes``.

    Integer and bool dtypes get ``(0, 0)``: they must be equal.

    Example:
      >>> import torch
      >>> from fundp.testing import default_tolerances
      >>> default_tolerances(torch.float64, torch.float32)
      (1.3e-06, 1e-05)
      >>> default_tolerances(torch.int64)
      (0.0, 0.0)
    """
    rtol, atol = 0.0, 0.0
    for dtype in dtypes:
        r, a = _DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))
        rtol, atol = max(rtol, r), max(atol, a)
    return rtol, atol


def leaf_names(tree: Any, root: str = "tree") -> list[str]:
    """Names of the leaves of ``tree`` in optree's order, as Python would index them.

    Example:
      >>> import torch
      >>> from fundp.testing import leaf_names
      >>> leaf_names({"w": torch.zeros(1), "b": (torch.zeros(1), torch.zeros(1))}, "grads")
      ["grads['b'][0]", "grads['b'][1]", "grads['w']"]
    """
    with_accessor = getattr(optree, "tree_flatten_with_accessor", None)
    if with_accessor is not None:
        accessors, _, _ = with_accessor(tree)
        return [accessor.codify(root) for accessor in accessors]
    paths, _, _ = optree.tree_flatten_with_path(tree)
    return [root + "".join(f"[{entry!r}]" for entry in path) for path in paths]


def _as_tensor(leaf: Any) -> torch.Tensor | None:
    if isinstance(leaf, torch.Tensor):
        return leaf.detach()
    if isinstance(leaf, (bool, int, float, complex)):
        return torch.tensor(leaf)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency of fundp
        return None
    if isinstance(leaf, (np.ndarray, np.generic)):
        return torch.as_tensor(leaf)
    return None


def _format_index(flat_index: int, shape: torch.Size) -> str:
    if not shape:
        return "()"
    index = []
    for size in reversed(shape):
        index.append(flat_index % size)
        flat_index //= size
    return str(tuple(reversed(index)))


def _compare_leaf(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, equal_nan: bool) -> str | None:
    """Returns a description of the difference, or ``None`` when the leaves are close."""
    if actual.numel() == 0:
        return None
    exact = not (expected.dtype.is_floating_point or expected.dtype.is_complex) and not (
        actual.dtype.is_floating_point or actual.dtype.is_complex
    )
    work = torch.complex128 if (actual.dtype.is_complex or expected.dtype.is_complex) else torch.float64
    a = actual.to(device="cpu", dtype=work).flatten()
    b = expected.to(device="cpu", dtype=work).flatten()
    diff = (a - b).abs()
    if exact:
        close = a == b
    else:
        # Finite values within the tolerance; an infinity only matches the same infinity.
        close = torch.isfinite(a) & torch.isfinite(b) & (diff <= atol + rtol * b.abs())
        close = close | (torch.isinf(a) & (a == b))
        if equal_nan:
            close = close | (torch.isnan(a) & torch.isnan(b))
    if bool(close.all()):
        return None
    bad = ~close
    num_bad = int(bad.sum())
    # The worst element: the largest difference, a NaN/Inf mismatch first.
    nonfinite_bad = bad & ~torch.isfinite(diff)
    if bool(nonfinite_bad.any()):
        worst = int(torch.nonzero(nonfinite_bad)[0, 0])
    else:
        worst = int(torch.argmax(torch.where(bad, diff, torch.zeros_like(diff)).real))
    finite_bad = bad & torch.isfinite(diff)
    max_diff = float(diff[finite_bad].max()) if bool(finite_bad.any()) else math.nan
    nonzero = finite_bad & (b != 0)
    max_rel = f"{float((diff[nonzero] / b[nonzero].abs()).max()):.3g}" if bool(nonzero.any()) else "n/a (expected 0)"
    return (
        f"{name}: {num_bad} of {a.numel()} elements differ (rtol={rtol:g}, atol={atol:g}); "
        f"worst at index {_format_index(worst, actual.shape)}: actual {a[worst].item()!r}, "
        f"expected {b[worst].item()!r}; max abs difference {max_diff:.3g}, max relative difference {max_rel}"
    )


def assert_trees_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    msg: str = "",
    check_dtype: bool = True,
    equal_nan: bool = True,
) -> None:
    """Asserts that two pytrees have the same structure, shapes, dtypes and close values.

    Every pair of leaves must satisfy ``|actual - expected| <= atol + rtol * |expected|``
    elementwise (NaN matches NaN with ``equal_nan=True``; an infinity matches only the same
    infinity; integer and bool leaves must be equal).  Without ``rtol`` and ``atol`` the
    tolerances are those of ``torch.testing.assert_close`` for the least precise dtype of the
    pair (float64: 1e-7; float32: 1.3e-6 and 1e-5); give only one and the other is 0.
    ``rtol=0, atol=0`` asks for exact equality.  Leaves may be tensors, Python numbers or NumPy
    arrays; dtypes are compared when both leaves are tensors and ``check_dtype`` is true.

    Raises:
      AssertionError: naming the path of the first leaf that differs (e.g. ``actual['w'][0]``),
        the number of differing elements, the worst element's index and values, and the largest
        absolute and relative differences; or the two tree structures, or the shapes or dtypes.
        ``msg`` is put in front.

    Example:
      >>> import torch
      >>> from fundp.testing import assert_trees_close
      >>> a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)}
      >>> assert_trees_close(a, {"w": torch.tensor([1.0, 2.0 + 1e-7]), "b": torch.tensor(0.5)})
      >>> assert_trees_close(a, {"w": torch.tensor([1.0, 2.1]), "b": torch.tensor(0.5)}, rtol=1e-3, atol=0)
      Traceback (most recent call last):
      ...
      AssertionError: actual['w']: 1 of 2 elements differ (rtol=0.001, atol=0); worst at index (1,): ...
    """
    prefix = f"{msg}: " if msg else ""
    actual_leaves, actual_spec = optree.tree_flatten(actual)
    expected_leaves, expected_spec = optree.tree_flatten(expected)
    if actual_spec != expected_spec:
        raise AssertionError(f"{prefix}tree structures differ:\n  actual:   {actual_spec}\n  expected: {expected_spec}")
    for name, a_leaf, b_leaf in zip(leaf_names(actual, "actual"), actual_leaves, expected_leaves):
        a, b = _as_tensor(a_leaf), _as_tensor(b_leaf)
        if a is None or b is None:
            if a_leaf != b_leaf:
                raise AssertionError(f"{prefix}{name}: {a_leaf!r} != {b_leaf!r}")
            continue
        if a.shape != b.shape:
            raise AssertionError(f"{prefix}{name}: shape {tuple(a.shape)} != expected {tuple(b.shape)}")
        if check_dtype and isinstance(a_leaf, torch.Tensor) and isinstance(b_leaf, torch.Tensor) and a.dtype != b.dtype:
            raise AssertionError(f"{prefix}{name}: dtype {a.dtype} != expected {b.dtype}")
        if rtol is None and atol is None:
            leaf_rtol, leaf_atol = default_tolerances(a.dtype, b.dtype)
        else:
            leaf_rtol, leaf_atol = float(rtol or 0.0), float(atol or 0.0)
        problem = _compare_leaf(name, a, b, leaf_rtol, leaf_atol, equal_nan)
        if problem is not None:
            raise AssertionError(prefix + problem)
