"""L2 sensitivity of a strategy ``C`` under a participation pattern.

An example that participates in the steps of a set ``S`` changes the clipped gradient sums by
``g_i`` (``||g_i|| <= 1`` after dividing by the clip norm) at each ``i`` in ``S``, so ``C G``
changes by ``sum_{i in S} C[:, i] g_i^T``, whose squared Frobenius norm is
``sum_{i, j in S} X[i, j] <g_i, g_j>`` with the Gram matrix ``X = C^T C``.  The sensitivity is the
largest such norm over the allowed sets ``S`` and unit ``g_i``:

* single participation (``|S| <= 1``): the largest column norm of ``C`` (exact);
* ``k`` participations at least ``b`` steps apart ("``b``-min-sep", e.g. ``k`` epochs of cyclic
  batches): when columns ``i, j`` with ``|i - j| >= b`` are orthogonal (``C`` has at most ``b``
  bands), ``X`` is diagonal on every allowed ``S`` and ``sens^2 = max_S sum_{i in S} ||C[:, i]||^2``
  exactly (Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization", Thm 2), found by
  a dynamic program (their Alg. 3); otherwise ``sum_{i,j in S} |X[i, j]|`` maximised row by row is
  an upper bound (exact when ``X >= 0`` and one ``S`` attains every row's maximum).  For a
  Toeplitz ``C`` with non-negative non-increasing coefficients the worst ``S`` is ``0, b, 2b, ...``
  (Kalinin & Lampert 2024, Thm 2), computed in ``O(n)``.

All computations are float64 NumPy.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from fundp._validate import check_int

__all__ = [
    "column_norms",
    "max_participations",
    "max_participation_sum",
    "sensitivity",
    "toeplitz_sensitivity",
    "sensitivity_brute_force",
]


def _as_matrix(c: Any) -> np.ndarray:
    matrix = np.asarray(c, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"C must be a square matrix, got shape {matrix.shape}")
    return matrix


def _check_pattern(n: int, min_sep: Any, max_participations: Any) -> tuple[int, int]:
    b = check_int("min_sep", min_sep, minimum=1)
    cap = -(-n // b)  # at most ceil(n / b) steps fit at separation b
    k = cap if max_participations is None else check_int("max_participations", max_participations, minimum=1)
    return b, min(k, cap)


def column_norms(c: Any) -> np.ndarray:
    """``||C[:, j]||_2`` for every column ``j`` of a matrix.

    Example:
      >>> import numpy as np, fundp
      >>> fundp.mf.column_norms(np.array([[3.0, 0.0], [4.0, 1.0]]))
      array([5., 1.])
    """
    return np.linalg.norm(np.asarray(c, dtype=np.float64), axis=0)


def max_participations(n: int, min_sep: int, max_participations: int | None = None) -> int:
    """``min(k, ceil(n / b))``: how many steps one example can really join in ``n`` steps.

    Example:
      >>> import fundp
      >>> fundp.mf.max_participations(10, 4), fundp.mf.max_participations(10, 4, 2)
      (3, 2)
    """
    n = check_int("n", n, minimum=1)
    return _check_pattern(n, min_sep, max_participations)[1]


def max_participation_sum(x: Any, min_sep: int = 1, max_participations: int | None = None) -> float:
    """``max_S sum_{i in S} x_i`` over sets ``S`` of at most ``k`` indices pairwise ``>= b`` apart.

    Dynamic program in ``O(len(x) k)`` (Choquette-Choo et al. 2023, Alg. 3 "VecSens"):
    ``F_k[i] = max(x_i + F_{k-1}[i + b], F_k[i + 1])`` over the suffix ``x[i:]``.  The empty set
    counts, so the result is ``>= 0``.

    Example:
      >>> import fundp
      >>> fundp.mf.max_participation_sum([3.0, 5.0, 4.0, 1.0], min_sep=2)
      7.0
    """
    values = np.asarray(x, dtype=np.float64).reshape(-1)
    n = values.size
    b, k = _check_pattern(n, min_sep, max_participations)
    f = np.zeros(n + b)
    for _ in range(k):
        g = np.zeros(n + b)
        g[:n] = values + f[b : n + b]
        f = np.maximum.accumulate(g[::-1])[::-1]
    return float(f[0])


def _max_participation_sum_rows(rows: np.ndarray, b: int, k: int) -> np.ndarray:
    """:func:`max_participation_sum` of every row of ``rows`` at once."""
    m, n = rows.shape
    f = np.zeros((m, n + b))
    for _ in range(k):
        g = np.zeros((m, n + b))
        g[:, :n] = rows + f[:, b : n + b]
        f = np.maximum.accumulate(g[:, ::-1], axis=1)[:, ::-1]
    return f[:, 0]


def sensitivity(c: Any, *, min_sep: int = 1, max_participations: int | None = 1) -> float:
    """L2 sensitivity of ``C`` for ``<= k`` participations at least ``b = min_sep`` steps apart.

    ``max_participations=1`` (default): the largest column norm (single participation).
    ``max_participations=None``: as many as fit, ``ceil(n / b)``.  Exact when columns ``b`` or more
    apart are orthogonal (e.g. ``C`` with at most ``b`` bands); otherwise the upper bound
    ``sqrt(max_S sum_{i in S} max_{S'} sum_{j in S'} |X[i, j]|)`` of Choquette-Choo et al. 2023
    (a valid sensitivity for the privacy guarantee, possibly loose).

    Example:
      >>> import numpy as np, fundp
      >>> round(fundp.mf.sensitivity(np.eye(6), min_sep=2, max_participations=None) ** 2, 12)
      3.0
    """
    matrix = _as_matrix(c)
    n = matrix.shape[0]
    b, k = _check_pattern(n, min_sep, max_participations)
    gram = matrix.T @ matrix
    if k == 1:
        return float(np.sqrt(np.max(np.diag(gram))))
    far = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) >= b
    if not np.any(gram[far] != 0):
        return float(np.sqrt(max_participation_sum(np.diag(gram), b, k)))
    row_best = _max_participation_sum_rows(np.abs(gram), b, k)
    return float(np.sqrt(max_participation_sum(row_best, b, k)))


def toeplitz_sensitivity(coefs: Any, n: int, *, min_sep: int = 1, max_participations: int | None = 1) -> float:
    """Sensitivity of the ``n x n`` lower-triangular Toeplitz ``C`` with first column ``coefs``.

    The coefficients are first replaced by their running maximum of absolute values from the
    right (``|c|`` made non-increasing), which leaves non-negative non-increasing coefficients
    unchanged (then the result is exact) and otherwise only increases the sensitivity (an upper
    bound).  The worst case is then ``k`` participations at ``0, b, ..., (k-1) b``: the result is
    ``||C u||`` for that indicator ``u`` (Kalinin & Lampert 2024, Thm 2; JAX-Privacy's
    ``minsep_sensitivity_squared``).  ``O(n)`` time: use it for BLTs with large ``n``.

    Example:
      >>> import fundp
      >>> round(fundp.mf.toeplitz_sensitivity([1.0, 0.5], 4, min_sep=2, max_participations=None), 6)
      1.581139
    """
    n = check_int("n", n, minimum=1)
    c = np.zeros(n)
    given = np.abs(np.asarray(coefs, dtype=np.float64).reshape(-1))[:n]
    c[: given.size] = given
    c = np.maximum.accumulate(c[::-1])[::-1]
    b, k = _check_pattern(n, min_sep, max_participations)
    u = np.zeros(n)
    u[0 : b * k : b] = 1.0
    # (C u)_t = sum_{i <= t} c_{t - i} u_i: a truncated convolution.
    cu = np.convolve(c, u)[:n]
    return float(np.sqrt(cu @ cu))


def sensitivity_brute_force(c: Any, *, min_sep: int = 1, max_participations: int | None = 1) -> float:
    """``max_u ||C u||_2`` over every 0/1 participation indicator ``u`` allowed (small ``n`` only).

    Enumerates all sets of ``<= k`` steps pairwise ``>= b`` apart (``n <= 20``).  This is the
    sensitivity whenever the Gram matrix ``C^T C`` is non-negative on the allowed sets (all
    gradients equal is then the worst case), e.g. for the tree, BLTs with positive parameters
    and banded strategies with ``b <= min_sep``; in general it is a lower bound.  For tests.

    Example:
      >>> import numpy as np, fundp
      >>> round(fundp.mf.sensitivity_brute_force(np.tri(4), min_sep=2, max_participations=2) ** 2, 12)
      10.0
    """
    matrix = _as_matrix(c)
    n = matrix.shape[0]
    if n > 20:
        raise ValueError(f"sensitivity_brute_force enumerates patterns: C must be at most 20 x 20, got n = {n}")
    b, k = _check_pattern(n, min_sep, max_participations)
    best = 0.0
    for size in range(1, k + 1):
        for steps in itertools.combinations(range(n), size):
            if any(later - earlier < b for earlier, later in zip(steps, steps[1:])):
                continue
            value = float(np.linalg.norm(matrix[:, list(steps)].sum(axis=1)))
            best = max(best, value)
    return best
