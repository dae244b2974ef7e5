"""Prefix-sum error of a strategy, and strategies that minimise it (banded Toeplitz, BLT).

For the prefix-sum workload ``A`` (``A[i, j] = 1`` for ``j <= i``, what SGD's parameters follow)
and the factorisation ``A = B C`` with ``B = A C^{-1}``, the noise in the ``i``-th noisy prefix sum
per unit noise is ``(B Z)_i``, whose expected squared norm per coordinate is ``||B[i, :]||^2``.
With noise scaled by the sensitivity (so that the privacy is that of a fixed noise multiplier),
the quantity to minimise is the **loss**

    loss(C) = sens(C)^2 * error(C),   error(C) = mean_i ||B[i, :]||^2  (or max_i),

which is invariant to rescaling ``C``.  DP-SGD (``C = I``) has ``loss = (n + 1) / 2`` (mean).

For a lower-triangular Toeplitz ``C`` with first column ``c`` the inverse is Toeplitz with first
column ``v = C^{-1} e_0`` (one IIR filter pass, :func:`scipy.signal.lfilter`), ``B`` is Toeplitz
with first column ``w = cumsum(v)``, and ``error = sum_k a_k w_k^2`` with ``a_k = (n - k) / n``
(mean) or ``1`` (max: the last row is the worst).  Its gradient follows from
``dv = -C^{-1} (dC) v``: ``d error / d c_j = -sum_t u_t v_{t-j}`` with ``u = C^{-T} (d error / d v)``
(another filter pass, on the reversed vector).  :func:`scipy.optimize.minimize` (L-BFGS-B) uses
these exact gradients; single-participation sensitivity ``sens^2 = ||c||^2``.  A banded
strategy optimised this way is also optimal for ``b``-min-sep participation with ``b >= bands``
(the sensitivity then scales by a constant, up to the last, truncated columns).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.optimize  # type: ignore[import-untyped]
import scipy.signal  # type: ignore[import-untyped]

from fundp._validate import check_int
from fundp.mf.sensitivity import column_norms
from fundp.mf.strategies import BandedToeplitz, BufferedToeplitz, Strategy

__all__ = ["prefix_error", "prefix_loss", "optimize_banded_toeplitz", "optimize_blt", "sqrt_toeplitz_coefs"]

_OBJECTIVES = ("mean", "max")


def _check_objective(objective: Any) -> str:
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {_OBJECTIVES}, got {objective!r}")
    return str(objective)


def prefix_error(strategy: Strategy | Any, objective: str = "mean") -> float:
    """``mean_i`` (or ``max_i``) of ``||(A C^{-1})[i, :]||^2``: prefix-sum noise variance per unit noise.

    ``strategy`` is a :class:`~fundp.mf.strategies.Strategy` or a dense lower-triangular ``C``.
    Dense ``O(n^3)``: for analysis and tests.

    Example:
      >>> import fundp
      >>> fundp.mf.prefix_error(fundp.mf.identity(4))  # mean of 1, 2, 3, 4
      2.5
    """
    objective = _check_objective(objective)
    if isinstance(strategy, Strategy):
        inverse = strategy.noise_matrix()
    else:
        import scipy.linalg  # type: ignore[import-untyped]

        c = np.asarray(strategy, dtype=np.float64)
        inverse = scipy.linalg.solve_triangular(c, np.eye(c.shape[0]), lower=True)
    b = np.cumsum(inverse, axis=0)  # A C^{-1}
    per_query = np.sum(b * b, axis=1)
    return float(per_query.mean() if objective == "mean" else per_query.max())


def prefix_loss(strategy: Strategy | Any, objective: str = "mean") -> float:
    """``sens(C)^2 * prefix_error(C)`` under single participation (largest column norm).

    The prefix-sum noise variance per unit of noise multiplier; lower is better.  Compare
    strategies for other participation patterns with ``fundp.mf.mechanism(...).sensitivity``.

    Example:
      >>> import fundp
      >>> fundp.mf.prefix_loss(fundp.mf.identity(64))  # DP-SGD: (n + 1) / 2
      32.5
    """
    c = strategy.matrix() if isinstance(strategy, Strategy) else np.asarray(strategy, dtype=np.float64)
    return float(np.max(column_norms(c)) ** 2 * prefix_error(strategy, objective))


def _weights(n: int, objective: str) -> np.ndarray:
    if objective == "mean":
        return (n - np.arange(n)) / n
    return np.ones(n)


def _error_and_grad(
    c: np.ndarray, n: int, weights: np.ndarray, inverse_filter: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[float, np.ndarray]:
    """Prefix error of the Toeplitz ``C`` with first column ``c`` (``len(c) <= n``) and its gradient.

    ``inverse_filter = (num, den)``: a rational form of ``C^{-1}`` as an IIR filter (ascending
    powers), used instead of the ``len(c)``-tap one when given (BLTs: ``O(n m)`` instead of ``O(n^2)``).
    """
    num, den = inverse_filter if inverse_filter is not None else (np.ones(1), c)
    impulse = np.zeros(n)
    impulse[0] = 1.0
    v = scipy.signal.lfilter(num, den, impulse)
    w = np.cumsum(v)
    error = float(np.sum(weights * w * w))
    grad_w = 2.0 * weights * w
    grad_v = np.cumsum(grad_w[::-1])[::-1]
    u = scipy.signal.lfilter(num, den, grad_v[::-1])[::-1]  # C^{-T} grad_v (flip C flip = C^T for Toeplitz)
    m = c.size
    # d error / d c_j = -sum_{t >= j} u_t v_{t - j}
    corr = scipy.signal.fftconvolve(u[::-1], v)[n - 1 - np.arange(m)] if m > 64 else np.array(
        [np.dot(u[j:], v[: n - j]) for j in range(m)]
    )
    return error, -corr


def _toeplitz_log_loss(c: np.ndarray, n: int, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """``log(||c||^2 * error(c))`` and its gradient in ``c`` (``inf`` where ``C^{-1}`` overflows)."""
    with np.errstate(all="ignore"):  # trial points of the line search may make C^{-1} blow up
        error, grad_error = _error_and_grad(c, n, weights)
        sens2 = float(c @ c)
        value = float(np.log(sens2) + np.log(error))
        grad = 2.0 * c / sens2 + grad_error / error
    if not (np.isfinite(value) and np.all(np.isfinite(grad))):
        return np.inf, np.zeros_like(c)
    return value, grad


def sqrt_toeplitz_coefs(n: int) -> np.ndarray:
    """Coefficients of ``1 / sqrt(1 - x)``: ``r_0 = 1``, ``r_k = r_{k-1} (2k - 1) / (2k)``.

    The Toeplitz strategy ``C = A^{1/2}`` (the square root of the prefix-sum matrix), optimal for
    the max error among Toeplitz strategies as ``n`` grows (Fichtenberger et al. 2023); the
    starting point of the optimisers here.

    Example:
      >>> import fundp
      >>> fundp.mf.sqrt_toeplitz_coefs(4)
      array([1.    , 0.5   , 0.375 , 0.3125])
    """
    n = check_int("n", n, minimum=1)
    k = np.arange(1, n, dtype=np.float64)
    return np.concatenate([[1.0], np.cumprod((2 * k - 1) / (2 * k))])


def optimize_banded_toeplitz(
    n: int, bands: int, *, objective: str = "mean", max_iterations: int = 1000
) -> BandedToeplitz:
    """The ``bands``-banded Toeplitz strategy for ``n`` steps with the least prefix loss.

    Minimises ``log(||c||^2 error(c))`` over ``c_1..c_{b-1}`` with ``c_0 = 1`` (the loss does not
    depend on the scale of ``c``) by L-BFGS-B with exact gradients, from the truncated
    coefficients of ``1 / sqrt(1 - x)``.  ``bands=1`` is DP-SGD.  Use it under single
    participation, ``b``-min-sep participation with ``b >= bands`` or cyclic Poisson sampling with
    ``bands <= num_partitions`` (see :func:`fundp.mf.mechanism`).

    Example:
      >>> import fundp
      >>> strategy = fundp.mf.optimize_banded_toeplitz(64, 8)
      >>> fundp.mf.prefix_loss(strategy) < fundp.mf.prefix_loss(fundp.mf.identity(64))
      True
    """
    n = check_int("n", n, minimum=1)
    bands = check_int("bands", bands, minimum=1, maximum=n)
    objective = _check_objective(objective)
    max_iterations = check_int("max_iterations", max_iterations, minimum=1)
    if bands == 1:
        return BandedToeplitz((1.0,), n)
    weights = _weights(n, objective)

    def fun(tail: np.ndarray) -> tuple[float, np.ndarray]:
        c = np.concatenate([[1.0], tail])
        value, grad = _toeplitz_log_loss(c, n, weights)
        return value, grad[1:]

    start = sqrt_toeplitz_coefs(bands)[1:]
    result = scipy.optimize.minimize(fun, start, jac=True, method="L-BFGS-B", options={"maxiter": max_iterations})
    best = result.x if result.fun <= fun(start)[0] else start
    return BandedToeplitz(np.concatenate([[1.0], best]), n)


def _blt_inverse_filter(d: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``C(x) = 1 + sum_j s_j x / (1 - d_j x) = P(x) / Q(x)``; returns ``(Q, P)``, the filter of ``C^{-1}``.

    ``Q = prod_j (1 - d_j x)`` and ``P = Q + x sum_j s_j prod_{i != j} (1 - d_i x)``, coefficients
    in ascending powers of ``x`` (a delay), as :func:`scipy.signal.lfilter` takes them.
    """
    q = np.ones(1)
    for value in d:
        q = np.convolve(q, [1.0, -value])
    p = np.concatenate([q, [0.0]])
    for j in range(d.size):
        others = np.ones(1)
        for i, value in enumerate(d):
            if i != j:
                others = np.convolve(others, [1.0, -value])
        p[1 : others.size + 1] += s[j] * others
    return q, p


def _blt_coefs(d: np.ndarray, s: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Toeplitz coefficients ``c`` of the BLT and the powers ``P[j, k] = d_j^k`` (``k < n - 1``)."""
    powers = d[:, None] ** np.arange(n - 1, dtype=np.float64)[None, :]
    return np.concatenate([[1.0], s @ powers]), powers


def _minsep_sens2_and_grad(c: np.ndarray, b: int, k: int) -> tuple[float, np.ndarray]:
    """Squared Toeplitz min-sep sensitivity (:func:`fundp.mf.toeplitz_sensitivity`) of ``c >= 0`` and a gradient.

    ``c`` is first made non-increasing (running maximum from the right); the gradient of each
    projected coefficient goes to the coefficient it copies.  Then ``sens^2 = ||M c||^2`` with
    ``(M c)_t = sum_{m < k} c_{t - m b}``.
    """
    n = c.size
    reverse = c[::-1]
    running = np.maximum.accumulate(reverse)
    source_reversed = np.maximum.accumulate(np.where(reverse >= running, np.arange(n), 0))
    source = (n - 1 - source_reversed)[::-1]
    projected = running[::-1]
    u = np.zeros(n)
    u[0 : b * k : b] = 1.0
    y = np.convolve(projected, u)[:n]
    grad_projected = np.zeros(n)
    for m in range(k):
        grad_projected[: n - m * b] += y[m * b :]
    grad = np.zeros(n)
    np.add.at(grad, source, 2.0 * grad_projected)
    return float(y @ y), grad


def optimize_blt(
    n: int,
    buffers: int,
    *,
    objective: str = "mean",
    min_sep: int | None = None,
    max_participations: int | None = None,
    max_iterations: int = 1000,
) -> BufferedToeplitz:
    """The BLT with ``buffers`` buffers for ``n`` steps with the least prefix loss.

    Single participation by default (``sens^2 = ||c||^2``).  With ``min_sep`` (and optionally
    ``max_participations``, default as many as fit) the loss uses the ``b``-min-sep sensitivity of
    :func:`fundp.mf.toeplitz_sensitivity` instead, as for multi-epoch training (McMahan et al.
    2024): the strategy to pair with ``fundp.mf.min_separation(min_sep, max_participations)``.

    Parameters ``d_j = sigmoid(alpha_j)`` in ``(0, 1)`` and ``s_j = exp(beta_j) > 0`` (positive
    parameters keep the Toeplitz coefficients positive, as the min-sep sensitivity bound
    prefers); L-BFGS-B on ``log(||c||^2 error(c))`` with exact gradients through
    ``c_k = sum_j s_j d_j^{k-1}``.  Starting point: decays spread geometrically towards 1 and
    scales fitted by non-negative least squares to the coefficients of ``1 / sqrt(1 - x)``.
    ``C^{-1}`` is applied as the rational filter ``Q / P`` of the BLT (``O(n m)``), the gradient in
    the Toeplitz coefficients by one FFT correlation: ``n = 10^5`` steps take seconds.

    Example:
      >>> import fundp
      >>> strategy = fundp.mf.optimize_blt(64, 2)
      >>> strategy.num_buffers, fundp.mf.prefix_loss(strategy) < fundp.mf.prefix_loss(fundp.mf.tree(64))
      (2, True)
    """
    n = check_int("n", n, minimum=2)
    buffers = check_int("buffers", buffers, minimum=1)
    objective = _check_objective(objective)
    max_iterations = check_int("max_iterations", max_iterations, minimum=1)
    weights = _weights(n, objective)
    pattern = None
    if min_sep is not None:
        sep = check_int("min_sep", min_sep, minimum=1)
        cap = -(-n // sep)
        k = cap if max_participations is None else min(cap, check_int("max_participations", max_participations, minimum=1))
        pattern = (sep, k)
    elif max_participations is not None:
        raise ValueError("max_participations needs min_sep")

    def log_loss(c: np.ndarray, inverse_filter: tuple[np.ndarray, np.ndarray]) -> tuple[float, np.ndarray]:
        with np.errstate(all="ignore"):  # trial points of the line search may make C^{-1} blow up
            error, grad_error = _error_and_grad(c, n, weights, inverse_filter)
            if pattern is None:
                sens2, grad_sens2 = float(c @ c), 2.0 * c
            else:
                sens2, grad_sens2 = _minsep_sens2_and_grad(c, *pattern)
            value = float(np.log(sens2) + np.log(error))
            grad = grad_sens2 / sens2 + grad_error / error
        if not (np.isfinite(value) and np.all(np.isfinite(grad))):
            return np.inf, np.zeros_like(c)
        return value, grad

    target = sqrt_toeplitz_coefs(n)[1:]
    decay0 = 1.0 - np.geomspace(0.5, 1.0 / n, buffers) if buffers > 1 else np.array([1.0 - 1.0 / np.sqrt(n)])
    basis = decay0[:, None] ** np.arange(n - 1, dtype=np.float64)[None, :]
    scale0 = scipy.optimize.nnls(basis.T, target)[0]
    scale0 = np.maximum(scale0, 1e-6)

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(over="ignore"):  # far trial points: d -> 0 or s -> inf, rejected by the loss
            return 1.0 / (1.0 + np.exp(-theta[:buffers])), np.exp(theta[buffers:])

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        d, s = unpack(theta)
        c, powers = _blt_coefs(d, s, n)
        value, grad_c = log_loss(c, _blt_inverse_filter(d, s))
        if not np.isfinite(value):
            return np.inf, np.zeros_like(theta)
        g = grad_c[1:]  # d loss / d c_k, k >= 1
        k = np.arange(n - 1, dtype=np.float64)
        # d c_k / d s_j = d_j^{k-1};  d c_k / d d_j = s_j (k-1) d_j^{k-2}
        grad_s = powers @ g
        shifted = np.zeros_like(powers)
        shifted[:, 1:] = powers[:, :-1]
        grad_d = s * ((shifted * k[None, :]) @ g)
        return value, np.concatenate([grad_d * d * (1.0 - d), grad_s * s])

    theta0 = np.concatenate([np.log(decay0 / (1.0 - decay0)), np.log(scale0)])
    result = scipy.optimize.minimize(fun, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iterations})
    theta = result.x if np.isfinite(result.fun) and result.fun <= fun(theta0)[0] else theta0
    d, s = unpack(theta)
    return BufferedToeplitz(d, s, n)
