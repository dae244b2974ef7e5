"""Strategy matrices ``C`` of correlated-noise (matrix factorization, DP-FTRL) mechanisms.

The matrix mechanism privatises the ``n`` clipped gradient sums ``G = (g_0, ..., g_{n-1})`` (rows)
by releasing ``C G + Z`` for a lower-triangular ``n x n`` strategy ``C`` and i.i.d. Gaussian rows
``Z``; a workload ``A = B C`` (``A`` the prefix sums for SGD, Kairouz et al. 2021; Denisov et al.
2022) is then estimated as ``B (C G + Z) = A G + B Z``.  In "noise on each gradient" form, which
is what a training step needs, the noisy gradient of step ``t`` is

    g_t + (C^{-1} Z)_t,

so SGD on these gradients follows the noisy prefix sums exactly.  Everything here is float64
NumPy (the strategy is a public, data-independent object); only :meth:`Strategy.next` runs on
tensors, inside the training step.

Strategies (each knows its horizon ``n``, its dense matrix, and an *online* generator of
``(C^{-1} Z)_t`` from ``Z_t`` with a small state):

* :func:`identity` — ``C = I``: DP-SGD's independent noise (1 band, no state).
* :func:`banded_toeplitz` — ``C[t, t - j] = c_j`` for ``j < b`` (``b`` bands): banded MF
  (Choquette-Choo et al. 2023); state: the last ``b - 1`` noise vectors.
* :func:`banded` — any lower-triangular ``b``-banded ``C`` given densely; same state.
* :func:`blt` — buffered linear Toeplitz (Dvijotham, McKenna et al. 2024): ``c_0 = 1`` and
  ``c_k = sum_j s_j d_j^{k-1}`` (``k >= 1``); state: one buffer per ``d_j``.
* :func:`tree` — binary-tree aggregation (Kairouz et al. 2021) as a square lower-triangular
  ``C`` (one tree node completes per step); state: one node noise per tree level, ``O(log n)``.

The state of a generator is a tensor ``[m, *shape]`` per parameter leaf (``m`` =
:attr:`Strategy.num_buffers`), so memory is ``m`` copies of the parameters.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

import numpy as np
import scipy.linalg  # type: ignore[import-untyped]
import torch

from fundp._validate import check_int

__all__ = [
    "Strategy",
    "BandedToeplitz",
    "BandedMatrix",
    "BufferedToeplitz",
    "TreeAggregation",
    "identity",
    "banded_toeplitz",
    "banded",
    "blt",
    "tree",
]


def _check_n(n: Any) -> int:
    return check_int("n", n, minimum=1, maximum=2**31 - 1)


class Strategy(abc.ABC):
    """A lower-triangular strategy ``C`` (``n x n``) with an online generator of ``C^{-1} Z``.

    Subclasses define :meth:`matrix` (dense ``C``, float64), :attr:`num_buffers` and
    :meth:`next` (one step of ``x = C^{-1} z`` on tensors).  :meth:`noise_matrix` is ``C^{-1}``.

    Example:
      >>> import numpy as np, torch, fundp
      >>> strategy = fundp.mf.banded_toeplitz([1.0, 0.5], 4)
      >>> z = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
      >>> buffers, xs = strategy.init_buffers(z[0], torch.float64), []
      >>> for t in range(4):  # online, one step at a time
      ...     x, buffers = strategy.next(buffers, z[t], torch.tensor(t))
      ...     xs.append(float(x))
      >>> np.allclose(xs, strategy.noise_matrix() @ z.numpy())  # = C^{-1} z
      True
    """

    n: int

    @property
    def bands(self) -> int | None:
        """``b`` when ``C[i, j] = 0`` for ``i - j >= b`` (``b`` bands, diagonal included), else ``None``."""
        return None

    @property
    @abc.abstractmethod
    def num_buffers(self) -> int:
        """``m``: the generator keeps ``m`` tensors shaped like each parameter."""

    @abc.abstractmethod
    def matrix(self) -> np.ndarray:
        """Dense ``C``, ``float64[n, n]``, lower-triangular with a nonzero diagonal."""

    def noise_matrix(self) -> np.ndarray:
        """Dense ``C^{-1}``, ``float64[n, n]``: the noise of step ``t`` is ``(C^{-1} Z)_t``."""
        return scipy.linalg.solve_triangular(self.matrix(), np.eye(self.n), lower=True)

    def toeplitz_coefs(self) -> np.ndarray | None:
        """``[c_0, ..., c_{n-1}]`` when ``C`` is Toeplitz (``C[i, j] = c_{i-j}``), else ``None``."""
        return None

    def init_buffers(self, leaf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Zeros ``[num_buffers, *leaf.shape]`` of ``dtype`` on ``leaf``'s device: the state at step 0."""
        return torch.zeros((self.num_buffers, *leaf.shape), dtype=dtype, device=leaf.device)

    @abc.abstractmethod
    def next(self, buffers: torch.Tensor, z: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One online step: ``(x_t, new_buffers)`` with ``x_t = (C^{-1} Z)_t``.

        ``z`` is ``Z_t`` (float64, any shape ``S``), ``buffers`` the state ``[m, *S]`` after steps
        ``0..t-1`` and ``step`` the 0-d int64 tensor ``t``.  ``x_t`` is float64; the buffers keep
        their dtype.  The same linear recurrence acts on every coordinate independently.
        """


def _shift_in(buffers: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[x, buffers[0], ..., buffers[m-2]]``: the newest noise first, the oldest dropped."""
    if buffers.shape[0] == 0:
        return buffers
    return torch.cat([x.to(buffers.dtype).unsqueeze(0), buffers[:-1]])


class BandedToeplitz(Strategy):
    """``C[t, t - j] = c_j`` for ``0 <= j < b``, zero below: a ``b``-banded Toeplitz strategy.

    Online: ``x_t = (z_t - sum_{j=1}^{b-1} c_j x_{t-j}) / c_0`` with ``x_{<0} = 0``; the state
    holds ``x_{t-1}, ..., x_{t-b+1}`` (``b - 1`` buffers).  ``coefs = (1.0,)`` is DP-SGD.

    Example:
      >>> import fundp
      >>> strategy = fundp.mf.banded_toeplitz([1.0, 0.5], 3)
      >>> strategy.matrix()
      array([[1. , 0. , 0. ],
             [0.5, 1. , 0. ],
             [0. , 0.5, 1. ]])
      >>> strategy.num_buffers
      1
    """

    def __init__(self, coefs: Sequence[float] | np.ndarray, n: int):
        self.n = _check_n(n)
        array = np.asarray(coefs, dtype=np.float64).reshape(-1)
        if array.size < 1:
            raise ValueError("coefs must hold at least one coefficient (bands >= 1)")
        if not np.all(np.isfinite(array)):
            raise ValueError("coefs must be finite")
        if array[0] == 0:
            raise ValueError("coefs[0] (the diagonal of C) must be nonzero")
        if array.size > self.n:
            raise ValueError(f"bands must be <= n = {self.n}, got {array.size} coefficients")
        self.coefs = array
        self._coefs = tuple(float(c) for c in array)

    @property
    def bands(self) -> int:
        return int(self.coefs.size)

    @property
    def num_buffers(self) -> int:
        return self.bands - 1

    def matrix(self) -> np.ndarray:
        c = np.zeros((self.n, self.n))
        for j, value in enumerate(self.coefs):
            c += value * np.eye(self.n, k=-j)
        return c

    def toeplitz_coefs(self) -> np.ndarray:
        out = np.zeros(self.n)
        out[: self.bands] = self.coefs
        return out

    def next(self, buffers: torch.Tensor, z: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = z
        for j in range(1, self.bands):
            x = x - self._coefs[j] * buffers[j - 1].to(torch.float64)
        if self._coefs[0] != 1.0:
            x = x / self._coefs[0]
        return x, _shift_in(buffers, x)

    def __repr__(self) -> str:
        return f"BandedToeplitz(coefs={self._coefs}, n={self.n})"


class BandedMatrix(Strategy):
    """A general lower-triangular ``b``-banded ``C`` (not necessarily Toeplitz), stored as its bands.

    ``rows[t, j] = C[t, t - j]`` for ``j < b``.  Online: ``x_t = (z_t - sum_{j>=1} C[t, t-j]
    x_{t-j}) / C[t, t]``; ``b - 1`` buffers.  Steps ``t >= n`` are out of range.

    Example:
      >>> import fundp
      >>> strategy = fundp.mf.banded([[2.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, 1.0, 2.0]])
      >>> type(strategy).__name__, strategy.bands, strategy.num_buffers
      ('BandedMatrix', 2, 1)
    """

    def __init__(self, matrix: np.ndarray, bands: int | None = None):
        c = np.asarray(matrix, dtype=np.float64)
        if c.ndim != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(f"matrix must be square, got shape {c.shape}")
        if not np.all(np.isfinite(c)):
            raise ValueError("matrix must be finite")
        self.n = _check_n(c.shape[0])
        if np.any(np.triu(c, 1) != 0):
            raise ValueError("matrix must be lower-triangular")
        if np.any(np.diag(c) == 0):
            raise ValueError("matrix must have a nonzero diagonal (C invertible)")
        below = [j for j in range(self.n) if np.any(np.diag(c, -j) != 0)]
        needed = max(below) + 1
        if bands is None:
            bands = needed
        bands = check_int("bands", bands, minimum=1, maximum=self.n)
        if bands < needed:
            raise ValueError(f"bands must be >= {needed}: matrix has nonzeros {needed - 1} below the diagonal")
        self._bands = bands
        rows = np.zeros((self.n, bands))
        for j in range(bands):
            rows[j:, j] = np.diag(c, -j)
        self.rows = rows
        self._rows = torch.from_numpy(rows.copy())
        self._c = c

    @property
    def bands(self) -> int:
        return self._bands

    @property
    def num_buffers(self) -> int:
        return self._bands - 1

    def matrix(self) -> np.ndarray:
        return self._c.copy()

    def next(self, buffers: torch.Tensor, z: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        row = torch.index_select(self._rows.to(z.device), 0, step.to(device=z.device, dtype=torch.int64).reshape(1))[0]
        x = z
        for j in range(1, self._bands):
            x = x - row[j] * buffers[j - 1].to(torch.float64)
        x = x / row[0]
        return x, _shift_in(buffers, x)

    def __repr__(self) -> str:
        return f"BandedMatrix(n={self.n}, bands={self._bands})"


class BufferedToeplitz(Strategy):
    """Buffered linear Toeplitz (BLT) ``C``: ``c_0 = 1``, ``c_k = sum_j s_j d_j^{k-1}`` for ``k >= 1``.

    ``d`` = ``buf_decay`` and ``s`` = ``output_scale`` (``m`` each).  Online (McMahan et al. 2024,
    Alg. 3): ``x_t = z_t - sum_j s_j buf_j`` then ``buf_j <- d_j buf_j + x_t``, where
    ``buf_j = sum_{k>=1} d_j^{k-1} x_{t-k}``; ``m`` buffers whatever ``n`` is.

    Example:
      >>> import fundp
      >>> strategy = fundp.mf.blt([0.5], [0.25], 4)  # c_k = 0.25 * 0.5^(k-1)
      >>> strategy.matrix()[:, 0], strategy.num_buffers
      (array([1.    , 0.25  , 0.125 , 0.0625]), 1)
    """

    def __init__(self, buf_decay: Sequence[float] | np.ndarray, output_scale: Sequence[float] | np.ndarray, n: int):
        self.n = _check_n(n)
        d = np.asarray(buf_decay, dtype=np.float64).reshape(-1)
        s = np.asarray(output_scale, dtype=np.float64).reshape(-1)
        if d.size < 1:
            raise ValueError("buf_decay must hold at least one buffer")
        if d.shape != s.shape:
            raise ValueError(f"buf_decay and output_scale must have the same length, got {d.size} and {s.size}")
        if not (np.all(np.isfinite(d)) and np.all(np.isfinite(s))):
            raise ValueError("buf_decay and output_scale must be finite")
        if np.any(np.abs(d) > 1):
            raise ValueError(f"buf_decay must lie in [-1, 1], got {d.tolist()}")
        self.buf_decay = d
        self.output_scale = s
        self._d = tuple(float(v) for v in d)
        self._s = tuple(float(v) for v in s)

    @property
    def num_buffers(self) -> int:
        return int(self.buf_decay.size)

    def toeplitz_coefs(self) -> np.ndarray:
        k = np.arange(self.n - 1, dtype=np.float64)
        out = np.empty(self.n)
        out[0] = 1.0
        out[1:] = (self.output_scale[:, None] * self.buf_decay[:, None] ** k[None, :]).sum(axis=0)
        return out

    def matrix(self) -> np.ndarray:
        return scipy.linalg.toeplitz(self.toeplitz_coefs(), np.zeros(self.n))

    def next(self, buffers: torch.Tensor, z: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = z
        for j in range(self.num_buffers):
            x = x - self._s[j] * buffers[j].to(torch.float64)
        decay = torch.tensor(self._d, dtype=torch.float64, device=z.device).reshape(-1, *([1] * z.dim()))
        new = (decay * buffers + x.unsqueeze(0)).to(buffers.dtype)
        return x, new

    def __repr__(self) -> str:
        return f"BufferedToeplitz(buf_decay={self._d}, output_scale={self._s}, n={self.n})"


class TreeAggregation(Strategy):
    """Binary-tree aggregation (Kairouz et al. 2021) as a square lower-triangular ``C``.

    With 1-indexed steps ``t``, the dyadic node completed at step ``t`` covers steps
    ``(t - 2^l, t]`` where ``l`` is the number of trailing zero bits of ``t``: row ``t`` of ``C``
    sums those gradients.  The noisy prefix sum of steps ``1..t`` adds the noisy nodes of the
    binary decomposition of ``t`` (``B`` = that 0/1 selection, ``A = B C``), so each gradient
    receives ``x_t = Z_t - sum_{levels < l} Z_node``: the new node's noise minus that of the
    nodes it replaces.  State: one node noise per level, ``floor(log2 n) + 1`` buffers.
    Single-participation sensitivity: ``sqrt(floor(log2 n) + 1)``.

    Example:
      >>> import fundp
      >>> strategy = fundp.mf.tree(4)
      >>> strategy.matrix()
      array([[1., 0., 0., 0.],
             [1., 1., 0., 0.],
             [0., 0., 1., 0.],
             [1., 1., 1., 1.]])
      >>> strategy.num_buffers
      3
    """

    def __init__(self, n: int):
        self.n = _check_n(n)
        self.levels = self.n.bit_length()

    @property
    def num_buffers(self) -> int:
        return self.levels

    def matrix(self) -> np.ndarray:
        c = np.zeros((self.n, self.n))
        for t in range(1, self.n + 1):
            width = t & -t  # 2^(trailing zeros of t)
            c[t - 1, t - width : t] = 1.0
        return c

    def next(self, buffers: torch.Tensor, z: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        one_based = step.to(device=z.device, dtype=torch.int64) + 1
        powers = torch.tensor([(1 << k) - 1 for k in range(1, self.levels)], dtype=torch.int64, device=z.device)
        level = ((one_based & powers) == 0).sum()  # trailing zero bits of t (all levels below are complete)
        ranks = torch.arange(self.levels, device=z.device)
        below = (ranks < level).to(torch.float64)
        x = z
        for l in range(self.levels):
            x = x - below[l] * buffers[l].to(torch.float64)
        shape = (self.levels,) + (1,) * z.dim()
        kept = torch.where((ranks < level).reshape(shape), torch.zeros_like(buffers), buffers)
        new = torch.where((ranks == level).reshape(shape), z.to(buffers.dtype).unsqueeze(0), kept)
        return x, new

    def __repr__(self) -> str:
        return f"TreeAggregation(n={self.n})"


def identity(n: int) -> BandedToeplitz:
    """``C = I`` for ``n`` steps: independent noise, i.e. DP-SGD.

    Example:
      >>> import fundp
      >>> fundp.mf.identity(3).matrix()
      array([[1., 0., 0.],
             [0., 1., 0.],
             [0., 0., 1.]])
    """
    return BandedToeplitz((1.0,), n)


def banded_toeplitz(coefs: Sequence[float] | np.ndarray, n: int) -> BandedToeplitz:
    """The ``b``-banded Toeplitz strategy with ``C[t, t - j] = coefs[j]`` (``b = len(coefs)``).

    Use :func:`fundp.mf.optimize_banded_toeplitz` for the coefficients that minimise the
    prefix-sum error.

    Example:
      >>> import fundp
      >>> fundp.mf.banded_toeplitz([1.0, 0.5], n=3).matrix()
      array([[1. , 0. , 0. ],
             [0.5, 1. , 0. ],
             [0. , 0.5, 1. ]])
    """
    return BandedToeplitz(coefs, n)


def banded(matrix: Any, bands: int | None = None) -> BandedMatrix:
    """A general lower-triangular banded strategy from its dense ``n x n`` matrix.

    ``bands`` defaults to the smallest ``b`` with ``C[i, j] = 0`` for ``i - j >= b``.

    Example:
      >>> import numpy as np, fundp
      >>> fundp.mf.banded(np.array([[2.0, 0.0], [1.0, 1.0]])).bands
      2
    """
    return BandedMatrix(np.asarray(matrix, dtype=np.float64), bands)


def blt(buf_decay: Sequence[float] | np.ndarray, output_scale: Sequence[float] | np.ndarray, n: int) -> BufferedToeplitz:
    """The BLT strategy with decays ``buf_decay`` and scales ``output_scale`` for ``n`` steps.

    Use :func:`fundp.mf.optimize_blt` for parameters that minimise the prefix-sum error.

    Example:
      >>> import fundp
      >>> fundp.mf.blt([0.5], [0.5], n=4).toeplitz_coefs()
      array([1.   , 0.5  , 0.25 , 0.125])
    """
    return BufferedToeplitz(buf_decay, output_scale, n)


def tree(n: int) -> TreeAggregation:
    """Binary-tree aggregation (DP-FTRL, Kairouz et al. 2021) for ``n`` steps.

    Example:
      >>> import fundp
      >>> fundp.mf.tree(4).matrix()
      array([[1., 0., 0., 0.],
             [1., 1., 0., 0.],
             [0., 0., 1., 0.],
             [1., 1., 1., 1.]])
    """
    return TreeAggregation(n)
