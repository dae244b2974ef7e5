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
* **round-off**: a conservative bound on the floating-point error of every FFT entry (standard FFT
  error analysis with a safety factor, not a machine-checked proof) is added to delta for each atom
  above epsilon.

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
    """

    interval: float
    start: int
    masses: np.ndarray
    infinity_mass: float
    positions: np.ndarray | None = None

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
) -> DiscretePLD:
    """A dominating PLD of one subsampled Gaussian step on the grid ``interval * Z``.

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


@dataclasses.dataclass(frozen=True, eq=False)
class ComposedPLD:
    """A composed PLD on the window ``loss_j = (start + j) * interval``, stored exponentially tilted.

    The mass at ``loss_j`` is ``masses[j] * exp(log_scale - tilt * loss_j)``: ``masses`` is the
    composed PLD tilted by ``e^{tilt * L}`` and normalised (see :func:`compose` for why).  Also:

    * ``infinity_mass``: the composed mass at ``+inf``;
    * ``missing_mass``: a bound on the mass that wrapped from above the window to below it; it is
      counted in full in every delta;
    * ``entry_error``: a bound on the floating-point error of each entry of ``masses``; it is
      counted (untilted) for every atom above epsilon;
    * ``mean``, ``variance``: of the untilted composed loss (finite part), for sizing grids.
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

    def _positive_part(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Losses ``> 0`` with their untilted masses and error allowances."""
        first = max(0, 1 - self.start)
        losses = (self.start + first + np.arange(max(self.masses.size - first, 0))) * self.interval
        # Where untilting multiplies by more than e^600 the entry (and its allowance) is useless:
        # the allowance then exceeds 1 and delta saturates, which is the pessimistic answer.
        exponent = np.minimum(self.log_scale - self.tilt * losses, 600.0)
        scale = np.exp(exponent)
        with np.errstate(divide="ignore"):
            allowance = np.exp(np.minimum(math.log(self.entry_error) + exponent, 600.0)) if self.entry_error > 0 else np.zeros_like(losses)
        return losses, self.masses[first:] * scale, allowance

    @property
    def lowest_trusted_loss(self) -> float:
        """Below the window, tilted mass that wrapped to its top was down-weighted by untilting, so
        delta is only bounded for eps at or above the window's start (untilted: everywhere)."""
        return self.start * self.interval if self.tilt > 0 else -math.inf

    def delta(self, epsilon: float) -> float:
        """Upper bound on ``delta(eps) = E[(1 - e^{eps - L})_+] + P(L = inf)`` for ``eps >= 0``."""
        finite, allowances = self.delta_parts(epsilon)
        return float(min(1.0, max(finite + allowances, 0.0)))

    def delta_parts(self, epsilon: float) -> tuple[float, float]:
        """``delta(eps)`` split into the finite atoms' part and the allowances (``+inf`` mass, mass
        above the window, round-off) that scale with the tail budget rather than with delta."""
        if epsilon < self.lowest_trusted_loss:
            return 0.0, 1.0
        losses, masses, allowance = self._positive_part()
        above = losses > epsilon
        finite = float(np.sum(masses[above] * -np.expm1(epsilon - losses[above])))
        return finite, self.infinity_mass + self.missing_mass + float(np.sum(allowance[above]))

    def delta_slope(self, epsilon: float) -> float:
        """``-d delta / d eps = e^eps sum_{l > eps} m_l e^{-l}``: used to size grids."""
        losses, masses, _ = self._positive_part()
        above = losses > epsilon
        return float(max((masses[above] * np.exp(epsilon - losses[above])).sum(), 0.0))

    def epsilon(self, delta: float) -> float:
        """The smallest ``eps >= 0`` with ``self.delta(eps) <= delta`` (``inf`` if none).

        Between consecutive atoms ``delta(eps) = A - e^eps B`` with ``A``, ``B`` tail sums of
        ``masses`` (plus allowances) and ``masses * e^{-loss}``, so the crossing is solved exactly.
        """
        extra = self.infinity_mass + self.missing_mass
        if extra >= delta:
            return math.inf
        losses, masses, allowance = self._positive_part()
        # Suffix sums accumulate from the smallest terms, so the tails we care about are not
        # swamped by the bulk.
        a = np.concatenate([np.cumsum((masses + allowance)[::-1])[::-1], [0.0]])
        b = np.concatenate([np.cumsum((masses * np.exp(-losses))[::-1])[::-1], [0.0]])
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


def _spectrum_mean(half_spectrum: np.ndarray) -> float:
    """Mean over all ``N`` frequencies of a real signal's spectrum given its ``rfft`` half."""
    return float((half_spectrum[0] + 2 * half_spectrum[1:].sum()) / (2 * half_spectrum.size - 1))


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


def _spectrum_means(half_spectra: np.ndarray) -> np.ndarray:
    """:func:`_spectrum_mean` of each row."""
    return (half_spectra[:, 0] + 2 * half_spectra[:, 1:].sum(axis=1)) / (2 * half_spectra.shape[1] - 1)


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
        return ComposedPLD(h, int(pld.grid[0]), dense, 0.0, 0.0, pld.infinity_mass, 0.0, 0.0, mean, variance)

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

    log2n = math.log2(size)
    log_spectrum = np.zeros(size // 2 + 1, dtype=complex)
    upper = np.zeros(size // 2 + 1)  # log of a bound on the modulus of the product so far
    alive = np.ones(size // 2 + 1, dtype=bool)
    forward_error = 0.0  # mean over frequencies of a bound on the composed spectrum's error
    weights_all /= totals[stack.member]  # each PLD's tilted weights sum to 1
    positions_all = stack.positions % size
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
        norms = np.sqrt(np.add.reduceat(weights * weights, stack.offsets[first:last] - lo_index))
        live = np.flatnonzero(alive) if not alive.all() else slice(None)
        with np.errstate(divide="ignore"):
            log_modulus = np.log(modulus[:, live])
            # |F| itself is <= 1 (weights sum to 1); the computed one may be off by the FFT's error,
            # at most sqrt(N) times its RMS at any one frequency.
            pointwise = 4 * _EPS * log2n * math.sqrt(size) * norms
            upper[live] += counts @ np.log(np.minimum(modulus[:, live] + pointwise[:, None], 1.0))
        log_spectrum[live] += counts @ log_modulus + 1j * (counts @ np.angle(f[:, live]))
        # Frequencies where the product so far is below ``_NEGLIGIBLE`` stay there (every later
        # factor is <= 1): they are dropped from the spectrum, which moves each entry of the
        # inverse transform by at most ``_NEGLIGIBLE`` (added to the entry error below).
        alive &= upper > math.log(_NEGLIGIBLE)
        # Round-off: the forward FFT errs by ~eps log2(N) ||x||_2 per frequency, which z -> z**T
        # multiplies by T |z|^{T-1}; the power itself errs by ~eps (T pi + 1) |z|^T (phase and
        # modulus of exp(T log z)).  An inverse FFT puts the spectrum's mean error into each entry.
        single = counts == 1  # |z|^0 = 1 and |z|^1 = |z|: no powers to take
        if single.all():
            forward_error += float(np.sum(log2n * norms + (math.pi + 1) * _spectrum_means(modulus)))
        elif single.any():
            forward_error += float(np.sum(log2n * norms[single] + (math.pi + 1) * _spectrum_means(modulus[single])))
        for row in np.flatnonzero(~single):
            count = counts[row]
            with np.errstate(divide="ignore"):
                log_row = np.log(modulus[row])
            mean_power = _spectrum_mean(np.exp((count - 1) * log_row))
            forward_error += count * log2n * norms[row] * mean_power
            forward_error += (count * math.pi + 1) * _spectrum_mean(np.exp(count * log_row))
    spectrum = np.where(alive, np.exp(np.where(alive, log_spectrum, 0.0)), 0.0)
    masses = np.roll(sp_fft.irfft(spectrum, n=size), -(start % size))
    inverse_error = log2n * math.sqrt(_dot(masses, masses) / size)
    entry_error = 4 * _EPS * (forward_error + inverse_error) + (0.0 if alive.all() else _NEGLIGIBLE)
    log_finite = sum(count * math.log1p(-pld.infinity_mass) if pld.infinity_mass < 1 else -math.inf
                     for pld, count in plds)
    infinity_mass = -math.expm1(log_finite)
    return ComposedPLD(h, start, masses, tilt, log_scale, infinity_mass, missing, entry_error, mean, variance)
