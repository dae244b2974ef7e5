"""Privacy loss distributions on a uniform grid: pessimistic discretisation, FFT composition, queries.

A pair of distributions ``(P, Q)`` is summarised by its privacy loss distribution (PLD): the law of
``L = log(P(x)/Q(x))`` for ``x ~ P``, plus an atom at ``+inf`` for the ``P``-mass where ``Q = 0``.
Its privacy profile is the hockey-stick divergence

    delta(eps) = sup_S P(S) - e^eps Q(S) = E[(1 - e^{eps - L})_+] + P(L = +inf),

and composing mechanisms adds independent losses, i.e. convolves PLDs.

**Why the result is an upper bound.**  We never approximate; we only replace a pair by one that
*dominates* it (``H_a(P'||Q') >= H_a(P||Q)`` for every ``a = e^eps >= 0``), and domination survives
composition (Zhu, Dong & Wang 2022); or we add a bound on what we leave out.  The moves:

* **connect the dots** (Doroshenko, Ghazi, Kamath, Kumar & Manurangsi 2022): the loss mass in a grid
  cell ``(t_i, t_{i+1}]`` is split between the two grid points, keeping both its ``P``-mass and its
  ``Q``-mass (``Q = P e^{-L}``).  Merging the two atoms again gives back the original, so the split
  pair dominates it (data processing).  Unlike rounding every loss up, which shifts the composed
  loss by ``T h / 2``, the split only adds ``<= h^2/4`` variance per step.
* **rounding a loss up** (the far lower tail onto the lowest grid point) and **moving mass to +inf**
  (the far upper tail): both keep ``P`` and shrink ``Q``, which can only raise ``H_a``.
* **wrap-around** of the circular FFT convolution: mass above the window would reappear at low
  losses and be under-counted, so a Chernoff bound on it, computed from the discretised PLD itself,
  is added to delta.  Mass below the window reappears near its top, which can only overstate delta
  (with tilting, see :func:`compose`, delta is trusted only from the window's start up).
* **round-off**: a *provable* bound on the floating-point error of every composed entry (derived
  below) is added to delta, untilted, for each atom above epsilon.

**The round-off bound.**  Notation: ``u = 2^-53``; ``x_s`` the computed tilted, normalised weights
of PLD ``s`` on the circle of ``N`` points (``||x_s||_1 <= 1`` up to ``N u``), composed ``c_s``
times; ``z_sk = (F x_s)_k`` the exact DFT, ``^`` marks computed values.

1. *Forward FFT, componentwise.*  A (mixed-radix) FFT computes each output ``y_k = sum_j x_j w^{jk}``
   through ``L <= ceil(log2 N)`` butterfly levels; along every path from ``x_j`` to ``y_k`` the
   coefficients have modulus 1 and each level applies one R-linear perturbation within ``eta`` of
   the identity (twiddle product and sum, Higham, *Accuracy and Stability*, 2nd ed., Thm 24.2:
   ``eta = mu + gamma_4 (sqrt 2 + mu) ~ 6.7 u`` for radix 2 with accurate twiddles ``mu ~ u``;
   radix-3/4/5 butterflies stay below ``eta`` per factor of 2 they cover).  Hence
   ``|z^_sk - z_sk| <= ((1 + eta)^L - 1) sum_j |x_sj| = gamma_N ||x_s||_1 =: e_s`` for *every* ``k``
   (the classical componentwise, L1 form; not the normwise L2 one, which bounds single entries
   only by ``sqrt(N)`` times the RMS).  We take ``eta = 8u`` and two extra levels for the real
   FFT's pre/post-processing: ``gamma_N = (1 + 8u)^(ceil(log2 N) + 2) - 1``
   (:func:`fft_error_constant`); the inverse transform obeys the same bound with ``||P||_1 / N``.
2. *Powers and products.*  With ``M_sk = max(|z^_sk|, min(|z^_sk| + e_s, ||x_s||_1)) >=
   max(|z_sk|, |z^_sk|)`` and ``|a^c - b^c| <= c |a - b| max(|a|, |b|)^{c-1}``, telescoping over
   ``s`` gives, for the product ``P_k = prod_s z_sk^{c_s}``, ::

       |prod_s z^_sk^{c_s} - P_k| <= A_k C_k,   A_k = prod_s M_sk^{c_s},   C_k = sum_s c_s e_s / M_sk.

3. *Evaluating the product* as ``exp(sum_s c_s (log|z^_sk| + i arg z^_sk))``: ``log|.|`` and
   ``arg`` are each within ``2u`` (relative, resp. ``2 pi u`` absolute) of exact, the sum over
   ``n`` PLDs adds ``(n + 2) u`` relative, so the exponent errs by at most
   ``d_k = 2u (1 + (n + 2) u) Lambda_k + 4u`` with ``Lambda_k = sum_s c_s (|log|z^_sk|| + pi + 1)``,
   and the computed ``P^_k`` is within ``|P^_k| (e^{d_k} - 1) e^{d_k}`` of the exact exponential.
4. *Dropped frequencies* (``A_k < 1e-25``, see :func:`compose`): every later factor has modulus
   ``<= ||x_s||_1``, so setting them to 0 errs by at most ``A_k prod_s max(1, ||x_s||_1)^{c_s}``.
5. *Inverse transform.*  Each entry of ``(1/N) F^* P`` is moved by at most the mean over all ``N``
   frequencies of the spectral error ``B_k`` (sum of 2.-4.), and the computed inverse adds at most
   ``(gamma_N + u) mean_k |P^_k|`` (step 1 applied to the inverse, whose input's L1 norm over
   ``N`` is ``mean_k |P^_k|``).  So every tilted entry satisfies ::

       |m^_j - m_j| <= entry_error = (1 + 4u) (mean_k B_k + (gamma_N + u) mean_k |P^_k|).

6. *Inputs and untilting.*  The tilted weights are computed with relative error
   ``rho <= u (max|peak| + 608)`` (an exponent of magnitude <= 600 below its peak and one
   division); all terms are non-negative, so the composed entries err relatively by
   ``<= (1 + rho)^T - 1``, and untilting ``exp(log_scale - tilt l)`` adds ``4u (|log_scale| + 8)``:
   ``relative_error`` scales the finite part and the allowances.

``tests/test_accounting_corners.py`` checks the bound against exact circular convolution in
extended precision, tilted and untilted.  It is rigorous but pessimistic (each ``e_s`` is a worst
case, where the actual error behaves like a random walk): it is ~``T u (8 log2 N + 10)`` of the
tilted spectrum's mean modulus, which is what limits tightness at very small delta when the heavy
tail of a small-``q`` PLD forbids a large tilt (:mod:`~fundp.accounting.prv` then splits the
composition).  Each entry's true mass lies within its allowance and is weighted by the same
``f(l) = 1 - e^{eps - l}`` in delta, so the allowances are weighted by ``f`` too.

Only the finite part of each single-step PLD is convolved; the ``+inf`` masses compose as
``1 - prod (1 - p_inf)^T``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np
from scipy import fft as sp_fft
from scipy import optimize

from fundp.accounting import subsampled_gaussian as sg

__all__ = ["DiscretePLD", "ComposedPLD", "choose_tilt", "compose", "discretize", "saddle_point", "saddle_point_epsilon"]

_EPS = np.finfo(float).eps
_U = _EPS / 2
# Losses beyond this go to +inf: e^{700} is near the float64 limit, and any epsilon the accountant
# is asked about is far below it.
_MAX_LOSS = 600.0
# Spectrum entries whose modulus is provably below this are dropped (see `compose`).
_NEGLIGIBLE = 1e-25


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # Not `a @ b`: a BLAS call on a 1-D vector can stall for milliseconds waking its thread pool.
    return float(np.sum(a * b))


@dataclasses.dataclass(frozen=True, eq=False)
class DiscretePLD:
    """A PLD with mass ``masses[j]`` at loss ``grid[j] * interval`` and ``infinity_mass`` at ``+inf``.

    ``grid`` is ``start + arange(len(masses))`` (dense), or the increasing lattice indices
    ``positions`` when given (sparse: see ``coarsen_above`` in :func:`discretize`).

    ``offset`` (only from ``discretize(..., optimistic=True)``): the mass at index ``k`` stands for
    the loss ``offset + k * interval``.  Everything here (``losses``, cumulants, composition) works
    in the frame ``k * interval``; a composition of ``T_s`` steps of PLDs with offsets ``o_s`` is
    that frame's sum shifted by ``sum_s T_s o_s`` (see :func:`~fundp.accounting.prv.epsilon_bounds`).
    """

    interval: float
    start: int
    masses: np.ndarray
    infinity_mass: float
    positions: np.ndarray | None = None
    offset: float = 0.0

    @functools.cached_property
    def grid(self) -> np.ndarray:
        if self.positions is not None:
            return self.positions
        return self.start + np.arange(self.masses.size)

    @functools.cached_property
    def losses(self) -> np.ndarray:
        return self.grid * self.interval

    @functools.cached_property
    def _log_masses(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.masses)

    def moments(self) -> tuple[float, float]:
        """Mean and variance of the finite part, normalised to a probability."""
        _, mean, variance = self.cumulants(0.0)
        return mean, variance

    def tilted(self, lam: float) -> tuple[np.ndarray, float, float]:
        """The finite part tilted by ``e^{lam * loss}`` and normalised, with ``K(lam)`` (the log of
        the normaliser: the cumulant generating function), and the tilted mean.

        """
        exponent = self._log_masses + lam * self.losses
        peak = float(exponent.max())
        # Clip at e^-600: weights below are irrelevant, and subnormal floats are ~10x slower.
        weights = np.exp(np.maximum(exponent - peak, -600.0))
        total = float(weights.sum())
        weights /= total
        centre = _dot(weights, self.losses)
        return weights, peak + math.log(total), centre

    def cumulants(self, lam: float) -> tuple[float, float, float]:
        """``K(lam)``, ``K'(lam)``, ``K''(lam)``: log-mass, mean and variance of the tilted finite part.

        (Clipping negligible weights at ``e^-600`` can only raise ``K``, which keeps every Chernoff
        bound built on it valid.)
        """
        weights, log_mgf, centre = self.tilted(lam)
        centred = self.losses - centre
        return log_mgf, centre, _dot(weights, centred * centred)

    def log_mgf(self, lam: float) -> float:
        """``log sum_j masses_j e^{lam * loss_j}``: the finite part's cumulant generating function."""
        exponent = self._log_masses + lam * self.losses
        peak = float(exponent.max())
        return peak + math.log(float(np.exp(np.maximum(exponent - peak, -600.0)).sum()))


def discretize(
    noise_multiplier: float,
    sample_rate: float,
    interval: float,
    direction: str,
    tail_mass: float,
    coarsen_above: float | Sequence[float] = math.inf,
    coarsening: int | Sequence[int] = 1,
    optimistic: bool = False,
) -> DiscretePLD:
    """A dominating PLD of one subsampled Gaussian step on the grid ``interval * Z``.

    With ``optimistic=True``, a *dominated* one on the same grid points instead (for certified
    lower bounds; see :func:`_merged_onto_grid`).

    The loss is kept on ``[t_lo, t_hi]`` where each tail has ``P``-mass ``<= tail_mass``; the lower
    tail is rounded up onto the lowest grid point, the upper tail goes to ``+inf``, and each cell in
    between is split between its end points (connect the dots):

        up_i = (P_i - e^{t_i} Q_i) / (1 - e^{-h}),   down_i = P_i - up_i,

    the unique split of the cell's ``(P_i, Q_i)`` onto ``t_i`` and ``t_{i+1} = t_i + h``.

    Above the loss ``coarsen_above`` the cells are ``coarsening`` grid steps wide (their end
    points still on the grid, the PLD then sparse): connect-the-dots dominates for any cells, and
    on a cell of width ``w`` it adds at most ``w^2/4`` variance per unit of mass, so cells that
    hold little mass can be wide at little cost in tightness and far fewer points.
    """
    h = interval
    t_lo, t_hi = sg.loss_range(sample_rate, noise_multiplier, direction, tail_mass)
    t_hi = min(t_hi, _MAX_LOSS)
    k_lo = math.floor(t_lo / h)
    k_hi = max(math.ceil(t_hi / h), k_lo + 1)
    positions = None
    # Levels of ever wider cells: (loss above which, width in grid steps), widths dividing each other.
    levels = [(float(a), int(c)) for a, c in zip(np.atleast_1d(coarsen_above), np.atleast_1d(coarsening))
              if c > 1 and a / h < k_hi - 2 * c]
    if levels:
        pieces, k = [], k_lo
        for index, (above, width) in enumerate(levels):
            k_next = max(k + 1, math.ceil(max(above / h, k) / width) * width)
            step = levels[index - 1][1] if index else 1
            pieces.append(np.arange(k, k_next, step))
            k = k_next
        width = levels[-1][1]
        k_top = max(math.ceil(k_hi / width) * width, k + width)
        pieces.append(np.arange(k, k_top + 1, width))
        positions = np.concatenate(pieces)
        thresholds = positions * h
        widths = np.diff(thresholds)
    else:
        thresholds = np.arange(k_lo, k_hi + 1) * h
        widths = np.full(thresholds.size - 1, h)
    if optimistic:
        if positions is None and 0 < sample_rate < 1:
            return _dominated_step(h, sample_rate, noise_multiplier, direction, t_lo, t_hi)
        points = positions if positions is not None else np.arange(k_lo, k_hi + 1)
        masses = _merged_onto_grid(points, h, sample_rate, noise_multiplier, direction)
        return DiscretePLD(h, k_lo, masses, 0.0, positions)
    p_below, p_cells, q_cells, p_above = sg.interval_masses(thresholds, sample_rate, noise_multiplier, direction)
    with np.errstate(over="ignore", invalid="ignore"):
        up = (p_cells - np.exp(thresholds[:-1]) * q_cells) / -np.expm1(-widths)
    # Exactly, 0 <= up_i <= P_i (the cell's mean of e^{-(L - t_i)} lies in [e^{-h}, 1]); clipping
    # only removes float round-off.
    up = np.clip(np.nan_to_num(up, nan=0.0), 0.0, p_cells)
    masses = np.zeros(thresholds.size)
    masses[:-1] += p_cells - up
    masses[1:] += up
    masses[0] += p_below
    masses.setflags(write=False)
    return DiscretePLD(h, k_lo, masses, float(p_above), positions)


#: Balancing margins of :func:`_merged_onto_grid`: every output is over-balanced by a relative
#: ``_BALANCE_RELATIVE`` of what it corrects plus ``_BALANCE_ABSOLUTE`` of its cell's ``P + e^t Q``,
#: and donations are sized as if each donating cell's ``P + e^t Q`` were off by ``_MASS_ERROR`` (the
#: normal-CDF cell masses are accurate to ~1e-13 relative).
_BALANCE_RELATIVE, _BALANCE_ABSOLUTE, _MASS_ERROR = 1e-6, 1e-10, 1e-12


def _merged_onto_grid(points: np.ndarray, h: float, sample_rate: float, noise_multiplier: float,
                      direction: str) -> np.ndarray:
    """``P``-masses at the grid losses ``t_j = points[j] * h`` of a pair *dominated* by one step's.

    **Merge.**  The loss line is cut at the midpoints between grid points: cell ``j`` around
    ``t_j`` holds ``(P_j, Q_j)``, an atom of loss ``lam_j = log(P_j / Q_j)`` inside the cell
    (merging the outcomes of a cell is a post-processing, so the merged pair is dominated: data
    processing).  Its *excess* ``E_j = P_j - e^{t_j} Q_j`` is ``>= 0`` iff ``lam_j >= t_j``.

    **Balance.**  A randomised post-processing then mixes neighbouring atoms so that each output
    ``j`` has loss at least, and close to, ``t_j``.  Atom ``j`` keeps a fraction ``x_j`` for output
    ``j``, sends ``d_j`` down to output ``j - 1`` and ``u_j`` up to output ``j + 1``:

    * ``lam_j < t_j`` (``need_j = -E_j (1 + r) + a S_j > 0``, ``S_j = P_j + e^{t_j} Q_j``): output
      ``j`` asks atom ``j + 1`` (loss above ``t_j``: ``F_j = P_{j+1} - e^{t_j} Q_{j+1} > 0``) for
      ``d_{j+1} = need_j / F_j``; then its excess ``x_j E_j + d_{j+1} F_j >= -r E_j + a S_j > 0``.
      If ``d_{j+1} > 1`` (the top of the support) it gets nothing and is *unbalanced*.
    * otherwise output ``j`` asks atom ``j - 1`` (loss below ``t_j``: ``G_j = P_{j-1} - e^{t_j}
      Q_{j-1} < 0``) for ``u_{j-1} = ((1 - r) x_j^- E_j - a S_j) / |G_j|`` (clipped to
      ``[0, 1 - d_{j-1}]``), where ``x_j^- = 1 - d_j - E_{j+1} / |G_{j+1}|`` bounds ``x_j`` from
      below; its excess ``x_j E_j + u_{j-1} G_j >= r x_j^- E_j + a S_j > 0``.

    ``r = 1e-6``, ``a = 1e-10``, and ``F`` is shrunk, ``|G|`` enlarged, by ``1e-12`` of the donor's
    ``P + e^t Q`` (round-off of the cell masses).  So every output but the unbalanced ones has
    loss ``>= t_j``, and its ``P'``-mass goes to ``t_j``; an unbalanced output is atom ``j``'s share
    alone (loss above the cell's lower cut ``> t_{j-1}``) and goes to ``t_{j-1}`` (output 0: dropped).
    The two tails beyond the outer cells are dropped (mass to ``-inf``).

    Placing every output's mass at a grid loss *at or below* its loss is what a lower bound allows
    (see :mod:`~fundp.accounting.prv`); the ``Q``-masses are not kept (the result is not itself a
    PLD, only a stochastically smaller loss).  Merging cells of width ``w`` removes ~``w^2/12`` of
    the loss variance per step, against the ``~w^2/6`` connect-the-dots adds: the lower bound's
    gap is about half the upper's where the density is smooth.  Not so next to the edge of the
    support (``log(1 - q)`` for "remove", ``-log(1 - q)`` for "add"): the outermost cell has no
    neighbour beyond to balance with, and up to a fraction of ``h`` of its mass's loss is lost per
    step; that mass shrinks fast with ``h`` (see :func:`~fundp.accounting.prv.epsilon_bounds`).

    ``points``: increasing lattice indices (dense or sparse); returns masses of the same length.
    """
    t = points * h
    edges = np.concatenate([[points[0] - 0.5], (points[:-1] + points[1:]) / 2, [points[-1] + 0.5]]) * h
    _, p, q, _ = sg.interval_masses(edges, sample_rate, noise_multiplier, direction)
    outputs, balanced = _balanced_cells(t, p, q)
    # Balanced outputs stay at t_j; the others go one grid point down (output 0: dropped).
    index = np.arange(points.size) - ~balanced
    keep = index >= 0
    return np.bincount(index[keep], weights=outputs[keep], minlength=points.size)


def _balanced_cells(t: np.ndarray, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The balancing of :func:`_merged_onto_grid`: cells with masses ``(p_j, q_j)`` (increasing losses,
    cell ``j``'s lower cut above ``t_{j-1}``) mixed with their neighbours onto the grid losses ``t_j``.

    Returns each output's ``P``-mass and whether its loss is ``>= t_j`` (balanced); an unbalanced
    output's loss is above ``t_{j-1}``.
    """
    r, a, tau = _BALANCE_RELATIVE, _BALANCE_ABSOLUTE, _MASS_ERROR
    scaled = np.exp(t) * q  # e^{t_j} Q_j (t <= _MAX_LOSS + h: finite)
    excess, size = p - scaled, p + scaled
    need = -excess * (1 + r) + a * size
    down = need > 0
    # F_j shrunk (a donation from above must cover ``need`` whatever the round-off), |G_j| enlarged
    # (a donation from below must not overdraw the excess).
    donor_up = p[1:] - np.exp(t[:-1]) * q[1:] - tau * (p[1:] + np.exp(t[:-1]) * q[1:])
    donor_down = np.exp(t[1:]) * q[:-1] - p[:-1] + tau * (p[:-1] + np.exp(t[1:]) * q[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        asked = np.where(donor_up > 0, need[:-1] / np.where(donor_up > 0, donor_up, 1.0), np.inf)
    granted = down[:-1] & (asked <= 1)
    d = np.zeros(p.size)
    d[1:] = np.where(granted, asked, 0.0)
    balanced = ~down
    balanced[:-1] |= granted
    asks_below = ~down[1:] & (donor_down > 0)
    safe_down = np.where(asks_below, donor_down, 1.0)
    u_max = np.zeros(p.size)  # most that output j + 1 can ask of atom j
    u_max[:-1] = np.where(asks_below, np.maximum(excess[1:], 0.0) / safe_down, 0.0)
    x_low = np.clip(1 - d - u_max, 0.0, 1.0)
    u = np.zeros(p.size)
    u[:-1] = np.where(asks_below, ((1 - r) * x_low[1:] * excess[1:] - a * size[1:]) / safe_down, 0.0)
    u = np.clip(u, 0.0, 1 - d)
    outputs = (1 - d - u) * p
    outputs[:-1] += d[1:] * p[1:]
    outputs[1:] += u[:-1] * p[:-1]
    return outputs, balanced


#: :func:`_dominated_step` merges exactly, in pieces ``_EXACT_PIECES`` times finer than the grid, the
#: cells next to the support's finite edge that hold ``_EXACT_SHARE`` of the step's mass (at least
#: ``_EXACT_CELLS_MIN``, at most ``_EXACT_CELLS_MAX`` cells); each exact output is over-balanced by
#: ``_EXACT_MARGIN`` of its ``P + e^t Q``.
_EXACT_CELLS_MIN, _EXACT_CELLS_MAX, _EXACT_PIECES, _EXACT_SHARE = 16, 4096, 8, 1 - 1e-6
_EXACT_MARGIN = 1e-11


def _dominated_step(h: float, sample_rate: float, noise_multiplier: float, direction: str,
                    t_lo: float, t_hi: float) -> DiscretePLD:
    """A dominated single step (``0 < q < 1``) on the *shifted* grid ``offset + h Z``, rounded down.

    **Why shift.**  For small ``q`` nearly all of a step's mass lies within ``~q`` of the finite edge
    of its support (``log(1 - q)`` for "remove", ``-log(1 - q)`` for "add"), often inside one grid
    cell.  No dominated pair can put that bulk on a grid point above its merged loss: relative to
    any ``t >= 0`` the excess ``P - e^t Q`` of the whole support is ``<= 0``, so lifting the bulk to
    a grid point above it would take (nearly) every cell above it, and flooring it to the grid point
    below costs up to ``h`` per step, ``T h`` in all (22% of epsilon at ``q = 1e-5``, ``T = 10^5``).
    The grid's offset is free, though: each step may live on ``offset + h Z`` and a composition of
    ``T`` of them on ``T offset + h Z``.  The offset is chosen so that a grid point sits at the
    merged loss of the edge's cell (of width ``h``), in ``(-h, 0]``: a composition in the frame
    ``h Z`` then lies at or above the true one, so epsilons ``>= 0`` stay ``>= 0`` in the frame.

    **Exact merge near the edge.**  From the edge inward (upward for "remove", downward for "add"),
    the loss line is cut into pieces ``_EXACT_PIECES`` times finer than the grid, and each output
    ``k`` (grid loss ``t_k``, taken in turn away from the edge) collects whole pieces and at most
    one fraction of a piece (a randomised post-processing of the pieces): going up, every piece
    below ``t_k`` (excess ``<= 0``) and then pieces above it until its excess ``P - e^{t_k} Q``
    reaches ``_EXACT_MARGIN`` of ``P + e^{t_k} Q``; going down, every piece above ``t_k`` and then
    pieces below as long as the excess stays at that margin.  Nothing is shifted beyond the
    grid: each output's merged loss is at (just above) its grid point, which is what a lower bound
    wants, and unlike the neighbour balancing of :func:`_merged_onto_grid` it draws on as many
    cells as it needs (a balanced output of the neighbour balancing also keeps its surplus
    ``lam_j - t_j``, first order in ``h`` where the density is steep on the grid's scale).  The
    exact region covers the cells next to the edge that hold all but 1e-6 of the mass (16 to 4096
    cells); beyond, :func:`_balanced_cells` takes over with cells cut at the midpoints between grid
    points, the first one holding what the exact merge left of its last pieces.

    **Rigour.**  The pieces partition the loss line, the outputs are a randomised post-processing
    of them (data processing: the pair is dominated), and every output's ``P``-mass is placed at
    the highest grid loss ``t`` at which its computed excess is provably non-negative (at least
    ``1e-12`` of its ``P + e^t Q`` plus the summation's round-off, see :func:`_exact_outputs`; the
    interval masses are accurate to ~1e-13 relative), hence at or below its true loss; the
    neighbour-balanced region places its outputs as :func:`_merged_onto_grid` does; the tails
    beyond ``[t_lo, t_hi]`` are dropped (loss ``-inf``).  The composition
    in the frame ``k h`` plus ``sum_s T_s offset_s`` is then a sum of losses each at or below a
    dominated step's (:mod:`~fundp.accounting.prv`).
    """
    ascending = direction == sg.REMOVE  # the finite edge is the support's bottom (remove) or top (add)
    edge = t_lo if ascending else t_hi

    def cells_of(offset: float):
        """Grid points ``offset + k h`` and the masses of the cells cut at their midpoints."""
        points = np.arange(math.floor((t_lo - offset) / h), math.ceil((t_hi - offset) / h) + 1)
        cuts = offset + np.concatenate([points - 0.5, points[-1:] + 0.5]) * h
        _, p, q, _ = sg.interval_masses(cuts, sample_rate, noise_multiplier, direction)
        return points, p, q

    points, p, q = cells_of(0.0)
    # The exact region (its size changes no bound): the cells from the edge holding all but
    # ``1 - _EXACT_SHARE`` of the mass, within the limits.
    cumulative = np.cumsum(p if ascending else p[::-1])
    cells = int(np.searchsorted(cumulative, _EXACT_SHARE * cumulative[-1])) + 2
    cells = min(max(cells, _EXACT_CELLS_MIN), _EXACT_CELLS_MAX, points.size - 1)
    # The offset: 0, or one that puts a grid point at the merged loss of the support's first
    # ``w`` next to the edge, whichever loses least to rounding down in the exact region (0 unless
    # another halves that: a shifted frame costs the composition's windows a little).
    best_lost, best_offset = math.inf, 0.0
    probe = min(cells, _EXACT_CELLS_MIN)  # the offset matters next to the edge: compared there
    for width in (0.0, *_ANCHOR_WIDTHS):
        offset = 0.0
        if width:
            _, anchor_p, anchor_q, _ = sg.interval_masses(
                np.array([edge, edge + width * h] if ascending else [edge - width * h, edge]),
                sample_rate, noise_multiplier, direction)
            if not (anchor_p[0] > 0 and anchor_q[0] > 0):
                continue
            anchor = math.log(anchor_p[0] / anchor_q[0])
            offset = anchor - math.ceil(anchor / h) * h  # in (-h, 0]: see the frame's shift in `prv`
        k_probe = int(points[probe - 1] if ascending else points[-probe])
        exact, _ = _exact_region(h, offset, k_probe, ascending, edge, sample_rate, noise_multiplier, direction)
        lost = math.fsum(mass * (math.log(mass / mass_q) - offset - k * h) for mass, mass_q, k in exact if mass_q > 0)
        if lost < 0.5 * best_lost - 1e-12 * h:
            best_lost, best_offset = lost, offset
    offset = best_offset
    if offset != 0.0:
        points, p, q = cells_of(offset)
    k_end = int(points[cells - 1] if ascending else points[-cells])
    exact, leftover = _exact_region(h, offset, k_end, ascending, edge, sample_rate, noise_multiplier, direction)
    # The rest: neighbour balancing; unbalanced outputs one grid point down.
    region = points > k_end + 1 if ascending else points < k_end - 1
    rest_points, rest_p, rest_q = points[region], p[region], q[region]
    if leftover is not None:  # its cut lies beyond t_{k_end}: an unbalanced output may go there
        first = k_end + 1 if ascending else k_end - 1
        join = (lambda a, b: np.concatenate([a, b])) if ascending else (lambda a, b: np.concatenate([b, a]))
        rest_points = join(np.array([first]), rest_points)
        rest_p, rest_q = join(np.array([leftover[0]]), rest_p), join(np.array([leftover[1]]), rest_q)
    outputs, balanced = _balanced_cells(offset + rest_points * h, rest_p, rest_q)
    indices = rest_points - ~balanced
    lowest = min([k for *_, k in exact] + indices[:1].tolist())
    highest = max([k for *_, k in exact] + indices[-1:].tolist())
    masses = np.zeros(highest - lowest + 1)
    np.add.at(masses, indices - lowest, outputs)
    for mass, _, k in exact:
        masses[k - lowest] += mass
    masses.setflags(write=False)
    return DiscretePLD(h, lowest, masses, 0.0, None, offset)


#: Widths (in grid steps) of the edge's stretch whose merged loss may fix the offset (see
#: :func:`_dominated_step`).
_ANCHOR_WIDTHS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


def _exact_region(h: float, offset: float, k_end: int, ascending: bool, edge: float, sample_rate: float,
                  noise_multiplier: float, direction: str):
    """The exact merge of :func:`_dominated_step` from the edge to output ``k_end`` on the grid
    ``offset + h Z``: pieces ``_EXACT_PIECES`` times finer than the grid from the edge to the cut
    half a cell beyond ``t_{k_end +- 1}``; returns :func:`_exact_outputs`' outputs and leftover."""
    pieces = _EXACT_PIECES
    if ascending:
        j = np.arange(math.floor((edge - offset) / h * pieces) + 1, (k_end + 1) * pieces + pieces // 2 + 1)
        bounds = np.concatenate([[edge], offset + j * (h / pieces)])
    else:
        j = np.arange((k_end - 1) * pieces - pieces // 2, math.ceil((edge - offset) / h * pieces))
        bounds = np.concatenate([offset + j * (h / pieces), [edge]])
    _, piece_p, piece_q, _ = sg.interval_masses(bounds, sample_rate, noise_multiplier, direction)
    if not ascending:  # walk from the edge down; ``j``: each piece's end nearer the next output
        piece_p, piece_q, j = piece_p[::-1], piece_q[::-1], j[::-1]
    return _exact_outputs(piece_p.tolist(), piece_q.tolist(), j.tolist(), offset, h, pieces, ascending, k_end)


def _exact_outputs(p: list, q: list, index: list, offset: float, h: float, pieces: int, ascending: bool,
                   last: int) -> tuple[list, tuple[float, float] | None]:
    """The exact merge of :func:`_dominated_step`: pieces ``(p_i, q_i)`` in order away from the edge,
    ``index[i]`` the lattice index of each piece's end nearer the next output's grid point (upper
    end going up, lower end going down), collected into outputs at ``t_k = offset + k h`` up to
    ``k = last``; returns them and the ``(P, Q)``-masses of the pieces left over (the rest of the
    piece split by output ``last`` and those beyond; ``None`` if the pieces ran out first).  Each
    output is returned as ``(P-mass, Q-mass, k)`` with ``k`` the highest grid point where its computed excess
    is at least ``_MASS_ERROR + u (4 n + |t_k| + 2)`` of its computed ``P + e^{t_k} Q`` (``n``
    pieces summed, each scaled by a fraction: ``4 u`` relative each; ``e^{t_k}`` within
    ``u (|t_k| + 2)``; the pieces' masses within ``_MASS_ERROR``), hence its true excess is ``>= 0``."""
    margin = _EXACT_MARGIN
    step = 1 if ascending else -1
    # The first output: the grid point nearest the edge on the far side of the first piece's end.
    k = (index[0] + pieces - 1) // pieces if ascending else index[0] // pieces
    scale = math.exp(offset + k * h)
    big_p = big_q = 0.0
    count = 0
    collected = []
    i, fraction = 0, 1.0
    while i < len(p):
        p_i, q_i = fraction * p[i], fraction * q[i]
        # A piece on the edge's side of t_k: going up it lies below t_k, going down above it.
        if (index[i] <= k * pieces) if ascending else (index[i] >= k * pieces):
            big_p, big_q, i, fraction, count = big_p + p_i, big_q + q_i, i + 1, 1.0, count + 1
            continue
        e, s = p_i - scale * q_i, p_i + scale * q_i
        excess, size = big_p - scale * big_q, big_p + scale * big_q
        if ascending and e > margin * s and excess + e >= margin * (size + s):
            share = max((margin * size - excess) / (e - margin * s), 0.0)  # just enough to balance
        elif not ascending and excess + e < margin * (size + s):
            share = min(max((excess - margin * size) / (margin * s - e), 0.0), 1.0)  # as much as stays balanced
        else:
            big_p, big_q, i, fraction, count = big_p + p_i, big_q + q_i, i + 1, 1.0, count + 1
            continue
        if big_p + share * p_i > 0:
            collected.append((big_p + share * p_i, big_q + share * q_i, k, count + 1))
        big_p = big_q = 0.0
        count = 0
        fraction *= 1 - share
        if k == last:
            break
        k += step
        scale = math.exp(offset + k * h)
    leftover = None
    if i < len(p):
        leftover = (fraction * p[i] + math.fsum(p[i + 1:]), fraction * q[i] + math.fsum(q[i + 1:]))
    elif big_p > 0:
        collected.append((big_p, big_q, k, count))
    placed = []
    for big_p, big_q, k, count in collected:
        if big_q > 0:
            k = min(k, math.floor((math.log(big_p / big_q) - offset) / h))
            while True:
                loss = offset + k * h
                tau = _MASS_ERROR + _U * (4 * count + abs(loss) + 2)
                if big_p - math.exp(loss) * big_q >= tau * (big_p + math.exp(loss) * big_q):
                    break
                k -= 1
        placed.append((big_p, big_q, k))
    return placed, leftover


@dataclasses.dataclass(frozen=True, eq=False)
class ComposedPLD:
    """A composed PLD on the window ``loss_j = (start + j) * interval``, stored exponentially tilted.

    The mass at ``loss_j`` is ``masses[j] * exp(log_scale - tilt * loss_j)``: ``masses`` is the
    composed PLD tilted by ``e^{tilt * L}`` and normalised (see :func:`compose` for why).  Also:

    * ``infinity_mass``: the composed mass at ``+inf``;
    * ``missing_mass``: a bound on the mass that wrapped from above the window to below it; it is
      counted in full in every delta;
    * ``entry_error``: a bound on the floating-point error of each entry of ``masses`` (the
      provable round-off bound of the module docstring); it is counted (untilted) for every atom
      above epsilon;
    * ``mean``, ``variance``: of the untilted composed loss (finite part), for sizing grids;
    * ``relative_error``: a bound on the relative error of the untilted masses from the round-off
      of the tilted input weights and of the untilting factors (the finite part of delta and the
      allowances are scaled by ``1 + relative_error``).

    ``optimistic``: composed from dominated steps (``discretize(..., optimistic=True)``), so that
    :meth:`delta` and :meth:`epsilon` are certified *lower* bounds (:meth:`delta_lower`); then
    ``wrap_above_log`` and ``wrap_below`` bound what wrapped around the window (see there).
    """

    interval: float
    start: int
    masses: np.ndarray
    tilt: float
    log_scale: float
    infinity_mass: float
    missing_mass: float
    entry_error: float
    mean: float
    variance: float
    relative_error: float = 0.0
    optimistic: bool = False
    wrap_above_log: float = -math.inf
    wrap_below: float = 0.0
    #: Per-entry untilted round-off allowances (same length as ``masses``), used instead of
    #: ``entry_error`` when given (a sum of terms composed with different tilts: see
    #: :func:`~fundp.accounting.prv._split_composed`), and the loss from which delta is trusted
    #: (``-inf``: everywhere, or the window's start if tilted).
    allowances: np.ndarray | None = None
    trusted_from: float = -math.inf

    def _positive_part(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Losses ``> 0`` with their untilted masses and error allowances."""
        first = max(0, 1 - self.start)
        losses = (self.start + first + np.arange(max(self.masses.size - first, 0))) * self.interval
        # Where untilting multiplies by more than e^600 the entry (and its allowance) is useless:
        # the allowance then exceeds 1 and delta saturates, which is the pessimistic answer.
        exponent = np.minimum(self.log_scale - self.tilt * losses, 600.0)
        scale = np.exp(exponent)
        if self.allowances is not None:
            return losses, self.masses[first:] * scale, self.allowances[first:] * scale
        with np.errstate(divide="ignore"):
            allowance = np.exp(np.minimum(math.log(self.entry_error) + exponent, 600.0)) if self.entry_error > 0 else np.zeros_like(losses)
        return losses, self.masses[first:] * scale, allowance

    @property
    def lowest_trusted_loss(self) -> float:
        """Below the window, tilted mass that wrapped to its top was down-weighted by untilting, so
        delta is only bounded for eps at or above the window's start (untilted: everywhere)."""
        return max(self.trusted_from, self.start * self.interval if self.tilt > 0 else -math.inf)

    def delta(self, epsilon: float) -> float:
        """Upper bound on ``delta(eps) = E[(1 - e^{eps - L})_+] + P(L = inf)`` for ``eps >= 0``
        (a lower bound if ``optimistic``: :meth:`delta_lower`)."""
        if self.optimistic:
            return self.delta_lower(epsilon)
        finite, allowances = self.delta_parts(epsilon)
        return float(min(1.0, max(finite + allowances, 0.0)))

    def delta_parts(self, epsilon: float) -> tuple[float, float]:
        """``delta(eps)`` split into the finite atoms' part and the allowances (``+inf`` mass, mass
        above the window, round-off) that scale with the tail budget rather than with delta."""
        if epsilon < self.lowest_trusted_loss:
            return 0.0, 1.0
        losses, masses, allowance = self._positive_part()
        above = losses > epsilon
        scale = 1 + self.relative_error
        # Each true mass is within its allowance of the computed one and is weighted, like it, by
        # ``f(l) = 1 - e^{eps - l}`` in ``[0, 1]``: the allowances count with the same weights.
        weight = -np.expm1(epsilon - losses[above])
        finite = float(np.sum(masses[above] * weight))
        return scale * finite, self.infinity_mass + self.missing_mass + scale * float(np.sum(allowance[above] * weight))

    def delta_slope(self, epsilon: float) -> float:
        """``-d delta / d eps = e^eps sum_{l > eps} m_l e^{-l}``: used to size grids."""
        losses, masses, _ = self._positive_part()
        above = losses > epsilon
        return float(max((masses[above] * np.exp(epsilon - losses[above])).sum(), 0.0))

    def _lower_part(self) -> tuple[np.ndarray, np.ndarray]:
        """Losses ``> 0`` with a lower bound on each one's mass in the linear (uncircled) composition
        of the computed input weights, before the wrap-around allowances:
        ``max(m^_j - entry_error, 0) e^{log_scale - tilt l_j} / (1 + relative_error)`` (the untilting
        factor clipped at ``e^600``, which can only lower it)."""
        first = max(0, 1 - self.start)
        losses = (self.start + first + np.arange(max(self.masses.size - first, 0))) * self.interval
        scale = np.exp(np.minimum(self.log_scale - self.tilt * losses, 600.0))
        lower = np.maximum(self.masses[first:] - self.entry_error, 0.0) * scale / (1 + self.relative_error)
        return losses, lower

    def _wrapped_above(self, epsilon) -> np.ndarray:
        """Bound on the untilted, delta-weighted mass that wrapped from above the window onto atoms
        above ``epsilon``: ``exp(wrap_above_log - tilt max(eps, window start))`` (see :meth:`delta_lower`)."""
        with np.errstate(over="ignore"):  # +inf: the bound is void and delta_lower is 0
            return np.exp(self.wrap_above_log - self.tilt * np.maximum(epsilon, self.start * self.interval))

    def delta_lower(self, epsilon: float) -> float:
        """Certified lower bound on delta at ``epsilon`` from an ``optimistic`` composition.

        Each stored entry ``m^_j`` is the circular composition, so it holds the linear mass at
        ``l_j`` plus mass that wrapped: from above the window's top (true loss ``l > l_j``, tilted
        weight ``e^{tilt l}`` untilted at ``l_j``: amplified by ``e^{tilt (l - l_j)}``) and from
        below its start (true loss ``l < l_j``: damped).  With ``f(l) = (1 - e^{eps - l})_+ <= 1``,

            delta_lower = sum_{l_j > eps} max(m^_j - entry_error, 0) s_j f(l_j) / (1 + relative_error)
                          - e^{K(tilt + lam) - lam top - tilt max(eps, start)} - wrap_below,

        where ``s_j`` untilts and the middle term bounds ``E[e^{tilt (L - max(eps, start))}; L > top]``
        for any ``lam > 0`` (Chernoff; its log is ``wrap_above_log - tilt max(eps, start)``), and
        ``wrap_below`` bounds the untilted mass below the window's start times ``e^{-tilt N h}``
        (it lands ``N h`` or more higher, where untilting damps it by at least that; ``f <= 1``).
        Clipped at 0; ``+ infinity_mass`` (exact composition).
        """
        losses, lower = self._lower_part()
        above = losses > epsilon
        finite = float(np.sum(lower[above] * -np.expm1(epsilon - losses[above])))
        value = finite + self.infinity_mass - float(self._wrapped_above(epsilon)) - self.wrap_below
        return float(min(max(value, 0.0), 1.0))

    def epsilon(self, delta: float) -> float:
        """The smallest ``eps >= 0`` with ``self.delta(eps) <= delta`` (``inf`` if none).

        Between consecutive atoms ``delta(eps) = A - e^eps B`` with ``A``, ``B`` tail sums of
        ``masses`` (plus allowances) and ``masses * e^{-loss}``, so the crossing is solved exactly.
        If ``optimistic``, a certified lower bound instead: :meth:`epsilon_lower`.
        """
        if self.optimistic:
            return self.epsilon_lower(delta)
        extra = self.infinity_mass + self.missing_mass
        if extra >= delta:
            return math.inf
        losses, masses, allowance = self._positive_part()
        # Suffix sums accumulate from the smallest terms, so the tails we care about are not
        # swamped by the bulk.
        # Every true mass lies in [0, m_l + allowance_l] (round-off, module docstring), enlarged by
        # the relative round-off of the inputs and the untilting: ``u_l = scale * max(m_l + a_l, 0)``.
        # Since ``f(l) = 1 - e^{eps - l} >= 0`` above eps, ``sum u_l f(l)`` bounds the true delta,
        # and on each piece it is ``A - e^eps B`` with both sums taken over ``u``.
        scale = 1 + self.relative_error
        upper_masses = scale * np.maximum(masses + allowance, 0.0)
        a = np.concatenate([np.cumsum(upper_masses[::-1])[::-1], [0.0]])
        b = np.concatenate([np.cumsum((upper_masses * np.exp(-losses))[::-1])[::-1], [0.0]])
        # Piece k covers [left_k, losses[k]) where only atoms j >= k lie strictly above eps.
        left = np.concatenate([[0.0], losses])
        with np.errstate(invalid="ignore", over="ignore"):
            at_left = extra + a - np.exp(left) * b
        at_left = np.where(np.isnan(at_left) | (left < self.lowest_trusted_loss), np.inf, at_left)
        if at_left[0] <= delta:
            return 0.0
        # The last piece whose left end still exceeds delta holds the crossing (pessimistic if
        # round-off made the sequence wiggle).
        k = int(np.flatnonzero(at_left > delta)[-1])
        upper = losses[k] if k < losses.size else math.inf
        if b[k] <= 0 or extra + a[k] <= delta:
            return float(upper)
        eps = math.log((extra + a[k] - delta) / b[k])
        return float(min(max(eps, left[k]), upper))

    def epsilon_lower(self, delta: float) -> float:
        """``sup {eps >= 0 : delta_lower'(eps) > delta}`` (0 if empty): a certified lower bound on
        epsilon, since the true delta exceeds ``delta`` wherever a lower bound on it does, and it
        is non-increasing (and continuous) in ``eps``.

        ``delta_lower'`` is :meth:`delta_lower` with the wrapped-above term frozen at the left end of
        each piece between atoms (it only decreases in ``eps``: a lower value still), so on every
        piece it is ``A - e^eps B - c`` and the crossing is solved exactly, then nudged down by a
        relative ``1e-12`` for the logarithm's round-off.
        """
        losses, lower = self._lower_part()
        a = np.concatenate([np.cumsum(lower[::-1])[::-1], [0.0]]) + self.infinity_mass
        b = np.concatenate([np.cumsum((lower * np.exp(-losses))[::-1])[::-1], [0.0]])
        left = np.concatenate([[0.0], losses])
        c = self._wrapped_above(left) + self.wrap_below
        with np.errstate(invalid="ignore", over="ignore"):
            at_left = a - c - np.exp(left) * b
        exceeds = np.flatnonzero(np.nan_to_num(at_left, nan=-np.inf) > delta)
        if exceeds.size == 0:
            return 0.0
        k = int(exceeds[-1])
        upper = losses[k] if k < losses.size else math.inf
        if b[k] <= 0:
            return float(upper)
        eps = math.log((a[k] - c[k] - delta) / b[k]) * (1 - 1e-12)
        return float(min(max(eps, left[k]), upper))


def _edge(log_mgf, mean: float, sd: float, log_tail: float, sign: int, max_lam: float, search_mgf=None) -> float:
    """Chernoff bound: a loss ``u`` with ``mass(sign * L >= sign * u) <= e^log_tail``.

    ``mass(L >= u) <= e^{K(lam) - lam u}`` for any ``lam > 0`` with ``K`` the cumulant generating
    function (and the mirror for the lower tail), so ``u(lam) = (K(lam) - log_tail) / lam``, which
    is unimodal in ``lam``.  We start from the Gaussian optimum ``lam = z / sd`` and walk by factors
    of 2, then refine once: any ``lam`` gives a valid bound, a good one a tight window.
    """

    def u(log_lam: float) -> float:
        lam = sign * math.exp(log_lam)
        return (log_mgf(lam) - log_tail) / lam

    if search_mgf is not None:
        # Search with the cheap stand-in, then bound with the exact K at (and around) its optimum:
        # any lam gives a valid bound, so only tightness depends on the stand-in.
        return u(min(math.log(abs(_edge_lam(search_mgf, mean, sd, log_tail, sign, max_lam))), math.log(max_lam)))
    return _edge_search(u, sd, log_tail, sign, max_lam)[1]


def _edge_lam(log_mgf, mean: float, sd: float, log_tail: float, sign: int, max_lam: float) -> float:
    """The ``lam`` at which :func:`_edge`'s search ends (its bound is best there)."""

    def u(log_lam: float) -> float:
        lam = sign * math.exp(log_lam)
        return (log_mgf(lam) - log_tail) / lam

    return sign * math.exp(_edge_search(u, sd, log_tail, sign, max_lam)[0])


def _edge_search(u, sd: float, log_tail: float, sign: int, max_lam: float) -> tuple[float, float]:
    z = math.sqrt(-2 * log_tail)
    x0 = min(math.log(z / max(sd, 1e-300)), math.log(max_lam))
    values = {x0: u(x0)}
    step = math.log(2.0)
    for direction in (-1, 1):
        x = x0
        while len(values) < 40:
            nxt = x + direction * step
            if nxt > math.log(max_lam):
                break
            values[nxt] = u(nxt)
            if sign * values[nxt] >= sign * values[x]:
                break
            x = nxt
    best = min(values, key=lambda key: sign * values[key])
    for offset in (-step / 2, step / 2):
        if best + offset <= math.log(max_lam):
            values[best + offset] = u(best + offset)
    chosen = min(values, key=lambda key: sign * values[key])
    return chosen, values[chosen]


def _chernoff(log_bound, sd: float, max_lam: float) -> float:
    """``min`` over ``lam > 0`` of the convex ``log_bound(lam)`` (a Chernoff exponent), by
    :func:`_edge_search`'s walk from the Gaussian scale ``1 / sd``; any ``lam`` gives a valid bound."""
    return _edge_search(lambda log_lam: log_bound(math.exp(log_lam)), sd, -0.5, +1, max_lam)[1]


def _spectrum_mean_full(half_spectrum: np.ndarray, size: int) -> float:
    """Mean over all ``size`` frequencies of a real signal's (symmetric) spectrum given its ``rfft``
    half (``size // 2 + 1`` entries; the Nyquist entry, present when ``size`` is even, counts once)."""
    total = half_spectrum[0] + 2 * half_spectrum[1:].sum()
    if size % 2 == 0:
        total -= half_spectrum[-1]
    return float(total / size)


def fft_error_constant(size: int) -> float:
    """``gamma_N``: componentwise bound on a length-``size`` FFT's error relative to ``||x||_1``.

    ``|fl(FFT x)_k - (FFT x)_k| <= gamma_N ||x||_1`` for every ``k`` (and the same for the inverse
    with its ``1/N``), with ``gamma_N = (1 + 8u)^(ceil(log2 N) + 2) - 1``: see the module docstring.
    """
    levels = math.ceil(math.log2(max(size, 2))) + 2
    return math.expm1(levels * math.log1p(8 * _EPS))


class _Stack:
    """Many single-step PLDs (one grid) concatenated, so that the composed cumulant generating
    function ``K(lam) = sum_s count_s log sum_j m_sj e^{lam l_sj}`` and its derivatives are a few
    vectorised passes (``reduceat`` per PLD) instead of a Python loop over PLDs.  Weights below
    ``e^-600`` of a PLD's peak are raised to it, as in :meth:`DiscretePLD.tilted` (which can only
    raise ``K``)."""

    def __init__(self, plds: Sequence[tuple[DiscretePLD, int]]):
        self.counts = np.array([count for _, count in plds], dtype=float)
        sizes = np.array([pld.masses.size for pld, _ in plds])
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.member = np.repeat(np.arange(len(plds), dtype=np.int32), sizes)
        self.positions = np.concatenate([pld.grid for pld, _ in plds])
        self.losses = self.positions * plds[0][0].interval
        with np.errstate(divide="ignore"):
            self.log_masses = np.log(np.concatenate([pld.masses for pld, _ in plds]))

    def _weights(self, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        exponent = self.log_masses + lam * self.losses
        peak = np.maximum.reduceat(exponent, self.offsets)
        weights = np.exp(np.maximum(exponent - peak[self.member], -600.0))
        return weights, peak, np.add.reduceat(weights, self.offsets)

    def log_mgf(self, lam: float) -> float:
        _, peak, total = self._weights(lam)
        return float(np.sum(self.counts * (peak + np.log(total))))

    def cumulants(self, lam: float) -> tuple[float, float, float]:
        weights, peak, total = self._weights(lam)
        centre = np.add.reduceat(weights * self.losses, self.offsets) / total
        centred = self.losses - centre[self.member]
        variance = np.add.reduceat(weights * centred * centred, self.offsets) / total
        return (float(np.sum(self.counts * (peak + np.log(total)))), float(np.sum(self.counts * centre)),
                float(np.sum(self.counts * variance)))


def _as_stack(plds: Sequence[tuple[DiscretePLD, int]] | _Stack) -> _Stack:
    return plds if isinstance(plds, _Stack) else _Stack(plds)


def _composed_log_mgf(plds):
    return _as_stack(plds).log_mgf


def _cumulants(plds, lam: float) -> tuple[float, float, float]:
    """``K(lam)``, ``K'(lam)``, ``K''(lam)`` of the composed finite part (its tilted log-mass, mean, variance)."""
    return _as_stack(plds).cumulants(lam)


def saddle_point(plds: Sequence[tuple[DiscretePLD, int]] | _Stack, loss: float) -> float:
    """The tilt ``lam >= 0`` whose tilted composed PLD has mean ``loss`` (``K'(lam) = loss``); 0 if
    ``loss`` is at or below the mean.  Safeguarded Newton on the convex ``K``; approximate is fine."""
    _, first, second = _cumulants(plds, 0.0)
    if first >= loss:
        return 0.0
    # Bracket the root of K'(lam) = loss (K' increases; it can turn very steep in heavy tails).
    low, high = 0.0, max((loss - first) / max(second, 1e-300), 1e-6)
    while _cumulants(plds, high)[1] < loss and high < 1e12:
        low, high = high, high * 2
    lam = high
    for _ in range(60):  # Newton steps kept inside the bracket, else bisection ("rtsafe")
        _, first, second = _cumulants(plds, lam)
        if abs(first - loss) <= 1e-3 * max(abs(loss), 1e-3) or high - low <= 1e-9 * high:
            break
        if first < loss:
            low = lam
        else:
            high = lam
        newton = lam + (loss - first) / max(second, 1e-300)
        lam = newton if low < newton < high and abs(newton - lam) < (high - low) / 2 else (low + high) / 2
    return max(lam, 0.0)


def choose_tilt(plds: Sequence[tuple[DiscretePLD, int]] | _Stack, loss: float, headroom: float = 1e3) -> float:
    """The least tilt whose precision at ``loss`` is within ``headroom`` of the saddle point's.

    Untilted, the composed mass near ``loss`` sits ``~e^{-(lam* loss - K(lam*))}`` below the peak
    (``lam*`` the saddle point); tilted by ``lam`` it sits ``e^{(K(lam) - lam loss) - (K(lam*) -
    lam* loss)}`` times worse off than at ``lam*``.  That excess is convex in ``lam`` with minimum 0
    at ``lam*``; we take the smallest ``lam`` where it is ``log(headroom)``: enough precision, and
    the lightest possible tilted upper tail (tilting fattens the subsampled loss's heavy tail, and
    the window must hold it).  Newton from ``lam = 0`` approaches a convex decreasing function's
    root monotonically from the left.
    """
    plds = _as_stack(plds)
    best = saddle_point(plds, loss)
    if best == 0.0:
        return 0.0
    k_best = _cumulants(plds, best)[0] - best * loss
    lam = 0.0
    for _ in range(50):
        k, first, _ = _cumulants(plds, lam)
        excess = k - lam * loss - k_best - math.log(headroom)
        if excess <= 1e-3 or first >= loss:
            break
        lam = min(lam + excess / (loss - first), best)
    return lam


def saddle_point_epsilon(plds: Sequence[tuple[DiscretePLD, int]] | _Stack, delta: float) -> float:
    """A quick *estimate* (not a bound) of epsilon at ``delta``, used only to aim the tilt.

    Tilting by the saddle point ``K'(lam) = eps`` and treating the tilted loss as ``N(eps, K'')``:

        delta(eps) ~ e^{K(lam) - lam eps} / (sqrt(2 pi K''(lam)) lam (1 + lam)),

    which is monotone in ``lam``; we solve it for ``lam`` (Brent on ``log lam``) and return ``K'(lam)``.
    """
    plds = _as_stack(plds)

    def excess(log_lam: float) -> float:
        lam = math.exp(log_lam)
        k, first, second = _cumulants(plds, lam)
        log_delta = k - lam * first - 0.5 * math.log(2 * math.pi * max(second, 1e-300)) - math.log(lam * (1 + lam))
        return log_delta - math.log(delta)

    low, high = math.log(1e-3), math.log(1.0)
    if excess(low) <= 0:  # delta is reached near the mean already
        return max(_cumulants(plds, 0.0)[1], 0.0)
    while excess(high) > 0:
        if high > math.log(1e8):
            return math.inf
        low, high = high, high + math.log(8.0)
    lam = math.exp(optimize.brentq(excess, low, high, xtol=1e-3))
    return max(_cumulants(plds, lam)[1], 0.0)


def compose(
    plds: Sequence[tuple[DiscretePLD, int]],
    tail_mass: float,
    tilt: float = 0.0,
    lowest_loss: float = math.inf,
    max_size: int = 1 << 24,
    aim: Sequence[tuple[DiscretePLD, int]] | _Stack | None = None,
    stack: _Stack | None = None,
    optimistic: bool = False,
) -> ComposedPLD:
    """Composes ``count`` copies of each ``pld`` (all on one grid) by one FFT.

    **Tilting.**  An FFT's round-off is ~1e-16 of the *largest* entry, which would swamp a delta of
    1e-12 sitting far in the tail.  Convolution commutes with exponential tilting
    (``(m e^{lam l})^{*T} = m^{*T} e^{lam L}``), so each PLD is tilted by ``e^{tilt * l}`` and
    normalised before the FFT; with ``tilt`` near the saddle point of the epsilon of interest
    (:func:`choose_tilt`) the tilted composed PLD is large there, and round-off is relative to the
    mass that matters.  A conservative per-entry bound on that round-off is carried along and
    added back, untilted, to every delta.

    **Window.**  The circle of ``N`` points covers ``[lo, hi]``.  Above ``hi`` lies at most
    ``tail_mass`` of the untilted PLD (a Chernoff bound); it wraps to low losses, so it is added to
    delta.  ``hi`` is also high enough (and ``lo`` low enough, and at most ``lowest_loss``) that
    the tilted mass outside is below 1e-12, which keeps the window from cutting into the part that
    matters.  Mass wrapping up from below ``lo`` only overstates delta when untilted; tilted, it is
    down-weighted, so delta is then trusted only from ``lo`` up (and reported as 1 below it).

    Each PLD is folded onto the circle, transformed once, raised to its count in Fourier space and
    multiplied with the others: ``O(N log N)`` whatever the number of steps.

    **Optimistic** (``plds`` from ``discretize(..., optimistic=True)``, for lower bounds): the same
    window, but what wraps around is bounded the other way (:meth:`ComposedPLD.delta_lower`):
    ``wrap_above_log = min_lam K(tilt + lam) - lam top`` and ``wrap_below = min_lam e^{K(-lam) +
    lam start} e^{-tilt N h}`` (Chernoff, ``top``/``start`` the window's ends; ``-inf`` / 0 when the
    support fits).
    """
    h = plds[0][0].interval
    plds = [(pld, count) for pld, count in plds if count > 0]
    if stack is None:
        stack = _Stack(plds)
    # The composed mean and variance only size grids: the stand-ins' will do.
    _, mean, variance = (stack if aim is None else _as_stack(aim)).cumulants(0.0)
    if len(plds) == 1 and plds[0][1] == 1:  # nothing to compose: the discretised PLD is exact
        pld = plds[0][0]
        dense = np.zeros(int(pld.grid[-1] - pld.grid[0]) + 1)
        dense[pld.grid - pld.grid[0]] = pld.masses
        return ComposedPLD(h, int(pld.grid[0]), dense, 0.0, 0.0, pld.infinity_mass, 0.0, 0.0, mean, variance,
                           optimistic=optimistic)

    log_mgf = stack.log_mgf
    weights_all, peaks, totals = stack._weights(tilt)
    log_scale = float(np.sum(stack.counts * (peaks + np.log(totals))))  # K(tilt), as log_mgf(tilt)
    # The tilted edges only decide how much of the window is spent on precision; they may use a
    # cheaper stand-in for the PLDs (``aim``).  The untilted upper edge bounds the wrapped mass:
    # it always uses the exact PLDs.
    aim_mgf = log_mgf if aim is None else _as_stack(aim).log_mgf
    aim_scale = log_scale if aim is None else aim_mgf(tilt)
    tilted_mgf = lambda lam: aim_mgf(tilt + lam) - aim_scale  # noqa: E731
    total_steps = sum(count for _, count in plds)
    max_lam = 1e300 / (_MAX_LOSS * total_steps)
    # The untilted spread only seeds the Chernoff searches.
    spread = math.sqrt(max(variance, 1e-300))
    support_lo = sum(count * pld.grid[0] for pld, count in plds) * h
    support_hi = sum(count * pld.grid[-1] for pld, count in plds) * h
    log_rel = math.log(1e-12)
    hi = max(_edge(log_mgf, mean, spread, math.log(tail_mass), +1, max_lam, None if aim is None else aim_mgf),
             _edge(tilted_mgf, mean, spread, log_rel, +1, max_lam))
    lo = min(_edge(tilted_mgf, mean, spread, log_rel, -1, max_lam), lowest_loss)
    hi, lo = min(hi, support_hi), max(lo, support_lo)
    missing = tail_mass if hi < support_hi else 0.0
    start = math.floor(lo / h)
    size = sp_fft.next_fast_len(max(math.ceil(hi / h) - start + 1, 16), real=True)
    if size > max_size:
        raise MemoryError(f"composed PLD window needs {size} points (> {max_size})")
    wrap_above_log, wrap_below = -math.inf, 0.0
    if optimistic:
        missing = 0.0
        top, bottom = (start + size - 1) * h, start * h
        if top < support_hi:
            wrap_above_log = _chernoff(lambda lam: log_mgf(tilt + lam) - lam * top, spread, max_lam)
        if bottom > support_lo:
            # Mass below the window reappears N h (or more) higher, its tilted weight untilted there:
            # damped by e^{-tilt N h} at least.
            wrap_below = math.exp(min(_chernoff(lambda lam: log_mgf(-lam) + lam * bottom, spread, max_lam), 0.0)
                                  - tilt * size * h)

    gamma = fft_error_constant(size)
    log_spectrum = np.zeros(size // 2 + 1, dtype=complex)
    upper = np.zeros(size // 2 + 1)  # log A_k: log of a bound on |exact product so far| (see module docstring)
    propagated = np.zeros(size // 2 + 1)  # C_k = sum_s c_s e_s / M_sk
    log_weight = np.zeros(size // 2 + 1)  # Lambda_k = sum_s c_s (|log|z_sk|| + pi + 1)
    dead_bound = np.zeros(size // 2 + 1)  # for dropped frequencies: a bound on |exact product|
    alive = np.ones(size // 2 + 1, dtype=bool)
    weights_all /= totals[stack.member]  # each PLD's tilted weights sum to 1
    positions_all = stack.positions % size
    # Relative error of the computed tilted weights (exponent error <= u (|exponent - peak| + |peak|
    # + 4), clipped at 600 below the peak, and the division by the total): composing multiplies
    # the relative errors of non-negative terms, and untilting adds one more exponent's error.
    relative_error = _EPS * (float(np.max(np.abs(peaks))) + 600.0 + 8.0)
    l1_excess = 0.0  # sum_s c_s log max(1, ||x_s||_1) (computed ||x_s||_1 may exceed 1 by round-off)
    batch = max(1, (1 << 22) // size)  # PLDs per batched FFT (~32 MB of spectra)
    for first in range(0, len(plds), batch):
        last = min(first + batch, len(plds))
        lo_index = stack.offsets[first]
        hi_index = stack.offsets[last] if last < len(plds) else stack.losses.size
        rows = stack.member[lo_index:hi_index] - first
        weights = weights_all[lo_index:hi_index]
        signals = np.bincount(rows * size + positions_all[lo_index:hi_index], weights=weights,
                              minlength=(last - first) * size).reshape(last - first, size)
        f = sp_fft.rfft(signals, axis=1)
        counts = stack.counts[first:last]
        # f**count as exp(count log f): the segments' powers then multiply as one sum of logs and
        # one complex exp at the end (phase count*arg f stays exact to ~count*eps).
        modulus = np.abs(f)
        l1 = np.add.reduceat(weights, stack.offsets[first:last] - lo_index) * (1 + size * _EPS)
        l1_excess += float(counts @ np.log(np.maximum(l1, 1.0)))
        pointwise = gamma * l1  # e_s: componentwise forward error bound, gamma_N ||x_s||_1
        live = np.flatnonzero(alive) if not alive.all() else slice(None)
        live_modulus = modulus[:, live]
        bound = np.minimum(live_modulus + pointwise[:, None], l1[:, None])
        np.maximum(bound, live_modulus, out=bound)
        with np.errstate(divide="ignore"):
            log_modulus = np.log(live_modulus)
            upper[live] += counts @ np.log(bound)
        propagated[live] += (counts * pointwise) @ np.reciprocal(bound, out=bound)
        log_weight[live] += counts @ np.abs(log_modulus)  # + (pi + 1) sum c_s, added below
        log_spectrum[live] += counts @ log_modulus + 1j * (counts @ np.angle(f[:, live]))
        # Frequencies whose bound A_k is below ``_NEGLIGIBLE`` stay there (every later factor is
        # <= ||x_s||_1 <= 1 + l1_excess): they are dropped (set to 0), an error <= A_k e^{l1_excess}.
        dying = alive & (upper <= math.log(_NEGLIGIBLE))
        dead_bound[dying] = np.exp(upper[dying])
        alive &= ~dying
    spectrum = np.where(alive, np.exp(np.where(alive, log_spectrum, 0.0)), 0.0)
    masses = np.roll(sp_fft.irfft(spectrum, n=size), -(start % size))
    # Spectral error bound B_k (module docstring): propagated forward error A_k C_k, evaluation
    # error of exp(sum c log z), and the dropped frequencies.
    growth = math.exp(l1_excess)
    log_weight = np.minimum(log_weight + (math.pi + 1.0) * total_steps, 1e300)
    with np.errstate(over="ignore", invalid="ignore"):
        phase_error = 2 * _EPS * (1 + (len(plds) + 2) * _EPS) * log_weight + 4 * _EPS
        evaluation = np.abs(spectrum) * np.expm1(phase_error) * np.exp(phase_error)
        spectral = np.where(alive, np.exp(upper) * propagated + evaluation, dead_bound * growth)
    spectral = np.nan_to_num(spectral, nan=np.inf)
    # The inverse transform (with its 1/N) moves each entry by at most the mean of B_k over all N
    # frequencies, and adds its own componentwise error gamma_N * mean |P_k|.
    entry_error = (1 + 4 * _EPS) * (_spectrum_mean_full(spectral, size) + (gamma + _EPS) * _spectrum_mean_full(np.abs(spectrum), size))
    log_finite = sum(count * math.log1p(-pld.infinity_mass) if pld.infinity_mass < 1 else -math.inf
                     for pld, count in plds)
    infinity_mass = -math.expm1(log_finite)
    composed_relative_error = math.expm1(min(float(total_steps * relative_error) + 4 * _EPS * (abs(log_scale) + 8), 700.0))
    return ComposedPLD(h, start, masses, tilt, log_scale, infinity_mass, missing, entry_error, mean, variance,
                       composed_relative_error, optimistic, wrap_above_log, wrap_below)
