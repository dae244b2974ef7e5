"""The default accountant (``accountant="prv"``): PLD composition by FFT with a relative error budget.

For each adjacency direction (:mod:`~fundp.accounting.subsampled_gaussian`), each segment's step is
discretised on a grid of spacing ``h`` and all steps are composed by one FFT
(:mod:`~fundp.accounting.pld`).  Every approximation made there is *pessimistic* (it replaces the
mechanism by one that dominates it), so the answer is a **rigorous upper bound** on epsilon (or
delta) whatever ``h`` is.  ``h`` only decides how *tight* the bound is, and that is what this
module chooses, aiming at a relative excess of ``RELATIVE_ERROR = 1e-4`` (ten times inside the
0.1% promise); :func:`delta` aims at ``6e-4`` of delta (over ten times inside its 1% promise), or
``2e-3`` where its passes must be split (small ``q`` at small delta, see below).

**Choosing h.**  Connect-the-dots keeps each grid cell's ``P``- and ``Q``-mass and adds at most
``h^2/4`` variance per step, so the composed loss stays close to a valid PLD whose mean is raised by
``<= T h^2/8``: to first order, the composition with a small Gaussian mechanism ``N(v/2, v)``,
``v = T h^2/4``.  That changes ``delta(eps) = E[f(L)]`` by ``(v/2) p(eps)`` (``p`` the density of
the composed loss; ``f' + f''`` is the unit mass at ``eps``), so ``d_eps = (T h^2/8) d eps/d mean``
with ``d eps/d mean = p(eps) / |d delta/d eps|``; on delta, ``d log delta = d_eps |d log delta /
d eps|``.  ``h`` is the largest grid meeting the budget.  For the Gaussian PLD ``N(V/2, V)``

    d eps / d mean = phi(eps/s - s/2) / (s e^eps Phi(-eps/s - s/2)),    s = sqrt(V),

(``~ eps/V + 1/2`` when ``eps >> s``, ``~0.8/s`` when ``eps << s``; :func:`_sensitivity`).  That
model is far too pessimistic for a small-``q`` ledger at small delta (``V`` tiny, ``eps`` reached by
a few rare large single-step losses: grids ~30x too fine, 10^6-point single steps, minutes per
query), so the coarse grid is sized by the saddle-point form of the same ratio
(:func:`_saddle_sensitivity`, on an aiming grid of at most ``_AIM_POINTS`` cells per step), and the
fine grid by the ratio read off the coarse pass itself (:func:`_measured_sensitivity`); neither
is ever taken above the Gaussian model's.  None of this affects rigour, only tightness, which the
Richardson check below verifies.

**Passes.**  A coarse pass (budget ``16 rho``: a quarter of the points) gives ``eps``, ``V``, the
density and the delta slope for the fine pass.  Both are bounds, so the smaller is kept; and since
the discretisation excess shrinks like ``h^2``, the difference of their values *without* round-off
allowances estimates the fine pass's own excess (Richardson) - if the model was optimistic, one
more refinement follows.

**Tilting.**  FFT round-off is relative to the largest entry; each pass therefore tilts the PLD
towards the epsilon of interest (see :func:`~fundp.accounting.pld.compose`), aimed by a
saddle-point estimate on an aiming grid (at most ``_AIM_POINTS`` cells per step; a pass on a finer
grid searches its tilt and windows there too, and only its final Chernoff bounds use the exact
PLDs), and re-aimed if the answer lands far from the aim.

**Split composition** (small ``q`` at small delta).  The composed loss of a small-``q`` ledger is
a mixture of a narrow bulk and rare large single-step losses; at small delta the epsilon of
interest lies in the valley between them, where no single tilt makes the mass large against the
tilted peak, and the provable round-off allowance (a fraction ``~T u log N`` of that peak per
entry) would dominate.  Where it costs more than ``2 RELATIVE_ERROR`` on a ledger of at most
``_SPLIT_SEGMENTS = 4`` segments, each segment's step is cut into bulk and tail and the
(multi)binomial expansion of the composition is summed: the bulk-only term at its own tilt, and
the terms with tail steps (the bulk plus a few rare large losses: their saddle points lie close
together) at one common tilt by one FFT per distinct piece and one inverse transform, with the
provable round-off bound of a weighted sum of spectral products derived in
:mod:`~fundp.accounting.mixture` (:func:`_split_composed`; its lower-bound twin for
``bounds=True`` composes every term on its own).  Where the coarse pass had to be split, the fine
passes are split at once.  If that cannot be done (more
segments, more than ``_SPLIT_TERMS`` terms, or a term's window over the point budget), the answer
is still a rigorous bound and a ``UserWarning`` says how much the allowance may cost.

**Both directions.**  epsilon is the larger of the "remove" and "add" epsilons.  The fine pass runs
first on the direction with the larger coarse bound; the other is refined only if its coarse bound
(an upper bound) could still exceed the answer.  At ``q = 1`` they coincide and one is computed.

**Tails.**  The tails cut off each step total ``<= 1e-7 delta (1 - delta)``; the mass above the
composed window, as much again, is added to delta.  (For delta queries the budget follows the
answer, tightened until it is negligible.)  Past ``eps = 400`` the PLD's float range ends and the
RDP bound is used where it is smaller, with a warning.

**q = 1.**  Unsampled Gaussian steps compose exactly into one Gaussian mechanism with
``mu = sqrt(sum T / sigma^2)``; its profile is evaluated in closed form (log space, any epsilon)
and nudged up by a relative ``1e-9`` against ``log_ndtr``'s round-off.

**Lower bounds** (:func:`epsilon_bounds`, :func:`delta_bounds`; ``fundp.epsilon(..., bounds=True)``).
For one adjacency direction, with ``S`` the composed loss (the sum of the steps' independent
losses under ``P``),

    delta(eps) = E[f(S)],    f(s) = (1 - e^{eps - s})_+,  f(+inf) = 1,  f(-inf) = 0,

and ``f`` is non-decreasing.  Every approximation of the lower pass is *optimistic*:

1. *Dominated steps.*  Each step's pair is replaced by a post-processing of it (merging pieces
   of the loss line, whole or in random fractions, into outputs, see
   :func:`~fundp.accounting.pld._dominated_step` and :func:`~fundp.accounting.pld._merged_onto_grid`);
   post-processing is dominated (data processing) and so is a composition of dominated pairs, so
   the composed ``E[f]`` can only drop.
2. *Rounding down.*  Each output's loss is replaced by a loss at or below it on the step's grid
   ``o_s + h Z`` (the offset ``o_s`` in ``(-h, 0]`` puts a grid point at the merged loss of the
   bulk next to the support's edge: without it a small-``q`` step's bulk, narrower than a cell,
   fell a whole cell per step), and the two tails beyond the outer cells by ``-inf`` (dropped):
   every step's loss is then pointwise smaller, hence so is ``S``, and ``f`` non-decreasing makes
   ``E[f(S)]`` smaller.  A step's mass at ``o_s + k h`` is stored at index ``k``, so the FFT
   composes the *frame* sum ``S' = S - c`` with ``c = sum_s T_s o_s <= 0`` exactly; the lower pass
   answers ``delta'(eps - c)`` for delta and ``eps' + c`` for an epsilon ``eps'`` of the frame
   (:func:`_lower_shift`; ``c <= 0`` keeps every ``eps >= 0`` at a frame loss ``>= 0``, where the
   composed PLD keeps its atoms).
3. *Wrap-around.*  The circular FFT moves mass from above the window's top to its bottom (a
   smaller loss: ``f`` drops, but untilting amplifies the tilted weight by ``e^{tilt (l - l')}``)
   and from below its start to its top (``f`` may rise; untilting damps it by ``e^{-tilt N h}``).
   Chernoff bounds on both (evaluated with the same single-step PLDs) are *subtracted*
   (:meth:`~fundp.accounting.pld.ComposedPLD.delta_lower`).
4. *Round-off.*  Each computed entry is lowered by the provable per-entry bound of
   :mod:`~fundp.accounting.pld` (``max(m - entry_error, 0)``, since true masses are ``>= 0``), and
   the untilted masses divided by ``1 + relative_error``.

So the lower pass's delta is below each direction's true delta, hence below the true delta (the
larger of the two).  The true epsilon at ``delta`` is the larger of the directions' epsilons, and
each direction's epsilon is at least ``sup {eps : delta_lower(eps) > delta}`` (delta is
non-increasing in eps): that sup in the direction of the upper bound is the lower bound.  It
reuses the upper pass's grid, direction and tilt (one more FFT), and while the two bounds are more
than 0.1% apart it is recomputed on grids 2, 4, 8 and 16 times finer (each pass is a lower bound; the
largest is kept; also while more than 0.02% apart if the pass had at most 2^19 points).  Merging
removes ~``h^2/12`` of each step's variance where connect-the-dots adds ~``h^2/6``, so the gap is
~1.5x the upper bound's own excess where the per-step density is smooth on the grid's scale; next
to the edge of a step's support (``log(1 - q)``, within a few cells when ``q <= 1e-3``) the exact
merge of :func:`~fundp.accounting.pld._dominated_step` keeps each output's merged loss at its grid
point (the mean loss per step is within ~1e-4 of a cell of the exact one, where neighbour
balancing alone lost up to a cell); in the corners where the round-off allowance dominates the gap
is that allowance (subtracted here as it is added there).  At ``q = 1`` the closed form is nudged
down by ``_CLOSED_FORM_MARGIN``.

Cost: ``O(N log N)`` for ``N ~ (window / h)`` points, independent of the number of steps (``N``
grows like ``sqrt(T)``): ~0.05 s for ``10^5`` steps, ~0.1 s for ``10^6`` on one CPU core.

**Schedules** (more than ``_AIM_SEGMENTS = 64`` distinct ``(sigma, q)`` segments): every distinct
segment still gets its own pessimistic PLD on the one shared grid and its own FFT, raised to its
step count in the frequency domain, so the result is the same kind of rigorous bound.  What
changes is what each costs (about ``O(N log N)`` per distinct segment):

* *wide tail cells*: above the loss that leaves ``0.05/16^2`` of a step's ``P``-mass above it, the
  connect-the-dots cells are 16 grid steps wide, and 256 wide above ``0.05/256^2``.  Cells of any
  width with end points on the grid are still a dominating discretisation (the split keeps each
  cell's ``P`` and ``Q`` mass); a cell of width ``w`` adds at most ``w^2/4`` variance per unit of
  its mass, so each level adds at most 5% to the ``h^2/4`` per step that ``h`` was sized for
  (``RELATIVE_ERROR`` is 10x inside the 0.1% promise).  The single-step PLDs shrink ~20x.
* *negligible frequencies*: all ``|F_s| <= 1``, so once the running product of the spectra's
  moduli (each enlarged by its FFT error bound) is below ``1e-25`` at a frequency it stays there;
  those frequencies are dropped (set to 0), which moves each composed entry by at most ``1e-25``,
  added to the entry error that every delta counts.  Logarithms are then taken only where the
  spectrum still matters (a few hundred of ``N/2`` frequencies after the first batch).
* *aiming by stand-ins*: tilts and precision windows are chosen from 64 stand-in segments (the
  largest-variance member of each run of segments sorted by ``(q, sigma)``, with the run's total
  variance) on an 8x coarser grid.  Aiming is not part of the bound: each pass is exact for the
  tilt it is given, and the Chernoff bound on the mass wrapping around the window is evaluated
  with the exact PLDs (at the stand-ins' best ``lambda``; any ``lambda`` gives a valid bound).
* PLDs are batched (one 2-D FFT per ~100 segments; cumulants by ``reduceat`` over the
  concatenated PLDs) and cached per ledger.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Sequence

import numpy as np
from scipy import optimize, special, stats

from fundp.accounting import gdp, rdp
from fundp.accounting import subsampled_gaussian as sg
from fundp.accounting.mixture import MixtureStack, compose_mixture
from fundp.accounting.pld import ComposedPLD, DiscretePLD, _Stack, choose_tilt, compose, discretize, saddle_point, saddle_point_epsilon

__all__ = ["epsilon", "delta", "epsilon_bounds", "delta_bounds", "RELATIVE_ERROR"]

#: Target relative error of the final pass (the promise is 0.1%).
RELATIVE_ERROR = 1e-4
_COARSE_RELATIVE_ERROR = 16 * RELATIVE_ERROR
#: Target relative error (on delta) of :func:`delta`'s final pass: over ten times inside its 1% promise.
_DELTA_RELATIVE_ERROR = 6e-4
#: ... and where its coarse pass had to be split (small ``q`` at small delta, where every split
#: term's FFT spans the tail pieces' whole support: up to ~5 10^6 points at 10^6 steps): ``2e-3``,
#: still five times inside the promise (the measured excess is about half the aim, <= 0.12%).
_SPLIT_DELTA_RELATIVE_ERROR = 2e-3
#: Tail mass cut off per step (all steps together), and mass allowed above the composed window
#: (added to delta in full), each as a fraction of ``delta (1 - delta)``: ``1 - delta`` bounds
#: ``|d delta / d eps|`` from above, so near ``delta = 1`` the budget shrinks with the slope.
_TAIL_FRACTION = 1e-7
#: Losses are represented up to e^600 (``pld._MAX_LOSS``); past this epsilon both the PLD bound and
#: the RDP bound are computed, and the smaller returned (both are upper bounds).
_LARGEST_EPSILON = 400.0
#: delta queries past this epsilon use the RDP bound alone (with a warning): time- and memory-bounded.
_LARGEST_PLD_DELTA_EPSILON = 1.25 * _LARGEST_EPSILON
#: Largest composed grid (points); beyond it the grid is coarsened (still a bound) with a warning.
_MAX_POINTS = 1 << 23

Segments = Sequence[tuple[float, float, int]]


def _quantize(h: float) -> float:
    """Round ``h`` down to a power of 2^(1/4): a finer grid than asked, and repeat queries share caches."""
    return 2.0 ** (math.floor(4 * math.log2(h)) / 4)


def _guess_moments(segments: Segments) -> tuple[float, float]:
    """Rough mean and variance of the composed loss, to size the coarse grid.

    Small ``q``: ``Var L ~ q^2 (e^{1/sigma^2} - 1)`` (the CLT's); ``q = 1``: exactly ``1/sigma^2``.
    The mean of a PLD is about half its variance (exactly for a Gaussian PLD).
    """
    variance = 0.0
    for sigma, q, steps in segments:
        exponent = min(1 / sigma**2, 700.0)
        variance += steps * min(q * q * math.expm1(exponent), 1 / sigma**2)
    return variance / 2, variance


def _sensitivity(eps: float, variance: float) -> float:
    """``d eps / d mean`` at fixed delta for the Gaussian PLD ``N(V/2, V)`` through ``(eps, delta)``.

    With ``s = sqrt(V)``: ``d delta/d s = phi(eps/s - s/2)`` and ``d delta/d eps = -e^eps Phi(-eps/s - s/2)``
    (Balle & Wang 2018), and ``ds/dmean = 1/s``.  It tends to ``eps/V + 1/2`` for ``eps >> s`` and
    to ``~0.8/s`` for ``eps << s``.
    """
    s = math.sqrt(max(variance, 1e-300))
    x = eps / s
    log_ratio = special.log_ndtr(-x - s / 2) + eps - (-0.5 * (x - s / 2) ** 2 - 0.5 * math.log(2 * math.pi))
    return math.exp(-log_ratio) / s


def _saddle_sensitivity(stack: _Stack, eps: float, variance: float) -> float:
    """``d eps / d mean`` at ``eps`` of the composed loss whose single steps are ``stack``, from its
    saddle point: what sizes the grid (an estimate; no bound depends on it).

    Composing with a small Gaussian mechanism, the PLD ``N(v/2, v)`` (what connect-the-dots
    adds, to first order, with ``v/2`` its mean raise), changes ``delta = E[f(L)]``,
    ``f(l) = (1 - e^{eps - l})_+``, by ``(v/2) E[f'(L) + f''(L)] = (v/2) p(eps)`` (``f' + f''`` is the
    unit mass at ``eps``), so ``d eps / d mean = p(eps) / s(eps)`` with ``p`` the loss density and
    ``s = -d delta/d eps = E[e^{eps - L}; L > eps]``.  Near ``eps`` the loss is ``e^{-lam l}`` times
    the tilted law, ``~N(eps, K''(lam))`` at the saddle point ``K'(lam) = eps``; then, with
    ``c = 1 + lam`` and ``t = sqrt(K''(lam))``,

        p(eps) / s(eps) = sqrt(2/pi) / (t erfcx(c t / sqrt 2)),

    ``~ c = 1 + lam`` when ``c t >> 1``.  For the Gaussian PLD (``lam = eps/V - 1/2``, ``K'' = V``) it is
    :func:`_sensitivity`; for a small-``q`` ledger at small delta, where ``eps`` is reached by a
    few rare large single-step losses, it is ``~1 + lam`` with a moderate ``lam``, where the
    Gaussian model's ``eps/V`` (``V`` tiny) asked for grids ~30x too fine.  At or below the mean
    (``lam = 0``) or past the support of the loss, the Gaussian model with ``variance``; never more
    than it (a near-degenerate tilted law, one atom, would ask for absurdly fine grids).
    """
    lam = saddle_point(stack, eps)
    _, first, second = stack.cumulants(lam)
    if not lam > 0 or abs(first - eps) > 1e-2 * max(eps, 1e-2):  # at or below the mean, or past the support
        return _sensitivity(eps, variance)
    t = math.sqrt(max(second, 1e-300))
    saddle = math.sqrt(2 / math.pi) / (t * float(special.erfcx((1 + lam) * t / math.sqrt(2))))
    return min(saddle, _sensitivity(eps, variance)) if math.isfinite(saddle) else _sensitivity(eps, variance)


def _measured_sensitivity(pld: ComposedPLD, eps: float) -> float | None:
    """``d eps / d mean = p(eps) / s(eps)`` (see :func:`_saddle_sensitivity`) read off a composed PLD
    (a coarse pass): ``p`` from its untilted mass within two cells of ``eps``, ``s`` its
    :meth:`~fundp.accounting.pld.ComposedPLD.delta_slope`.  Sizes the next pass's grid where the loss
    near ``eps`` is a mixture (a narrow bulk's steep tail and rare large single-step losses) that no
    single saddle point describes; ``None`` if either is not positive.  At most the Gaussian model's."""
    losses, masses, _ = pld._positive_part()
    near = np.abs(losses - eps) <= 2 * pld.interval
    density = float(np.sum(masses[near])) / (4 * pld.interval)
    slope = pld.delta_slope(eps)
    if not (density > 0 and slope > 0 and math.isfinite(density / slope)):
        return None
    return min(density / slope, _sensitivity(eps, pld.variance))


def _saddle_point_delta(stack: _Stack, eps: float) -> float | None:
    """A saddle-point *estimate* (not a bound) of delta at ``eps``, as in
    :func:`~fundp.accounting.pld.saddle_point_epsilon`: ``e^{K(lam) - lam eps} / (sqrt(2 pi K''(lam))
    lam (1 + lam))`` at ``K'(lam) = eps``; ``None`` at or below the mean (``lam = 0``)."""
    lam = saddle_point(stack, eps)
    k, first, second = stack.cumulants(lam)
    if not lam > 0 or abs(first - eps) > 1e-2 * max(eps, 1e-2):
        return None
    log_delta = k - lam * eps - 0.5 * math.log(2 * math.pi * max(second, 1e-300)) - math.log(lam * (1 + lam))
    return math.exp(min(log_delta, 0.0))


def _interval_for_epsilon(eps: float, sensitivity: float, steps: int, rho: float) -> float:
    """Largest ``h`` with ``(T h^2/8) d eps/d mean <= rho eps`` (``sensitivity = d eps/d mean``)."""
    eps = max(eps, 1e-2)  # below 0.01, an absolute error of 1e-6 is plenty
    return math.sqrt(8 * rho * eps / (steps * sensitivity))


def _interval_for_delta(sensitivity: float, steps: int, rho: float, log_slope: float) -> float:
    """Largest ``h`` with ``(T h^2/8) (d eps/d mean) |d log delta/d eps| <= rho``."""
    return math.sqrt(8 * rho / (steps * sensitivity * max(log_slope, 1.0)))


#: Aiming (tilts, grid sizes) uses single-step PLDs of at most ~this many points.
_AIM_POINTS = 1 << 15


def _aim_interval(segments: tuple, h: float, direction: str, log10_tail: int, cap: bool = True) -> float:
    """The aiming grid (:func:`_aim_stack`) for an accurate grid ``h``: ``h`` quantised (times
    ``_AIM_COARSENING`` for a schedule), doubled until the widest stand-in step's loss range spans at
    most ``_AIM_POINTS`` cells (``cap=False``: not doubled)."""
    width = max(float(np.subtract(*sg.loss_range(q, sigma, direction, 10.0**log10_tail)[::-1]))
                for sigma, q, _ in _aim_segments(segments))
    # (The nudge keeps an already quantised h from rounding down.)
    aim_h = _quantize(h * (1 + 1e-9)) * (_AIM_COARSENING if len(segments) > _AIM_SEGMENTS else 1)
    while cap and width / aim_h > _AIM_POINTS:
        aim_h *= 2
    return aim_h


def _affordable(segments: tuple, h: float, direction: str, tail: float) -> bool:
    """Whether the grid ``h`` (the Gaussian model's) needs no coarsening for aiming, i.e. its
    single steps have at most ``_AIM_POINTS`` cells: then the coarse pass is sized by the Gaussian
    model as it always was (cheap, and the standard queries keep their grids); otherwise by the
    saddle point (:func:`_saddle_sensitivity`)."""
    log10_tail = math.floor(math.log10(_rounded_tail(tail)))
    return _aim_interval(segments, h, direction, log10_tail) <= _aim_interval(segments, h, direction, log10_tail,
                                                                             cap=False)


def _aim_stack(segments: tuple, h: float, direction: str, tail: float) -> _Stack:
    """Single-step PLDs for aiming (choosing tilts, windows and grids; no bound depends on them): the
    stand-ins (:func:`_aim_segments`) on the grid of :func:`_aim_interval`, so that cumulants stay
    cheap when the accurate grid is very fine (each costs a pass over every point)."""
    log10_tail = math.floor(math.log10(_rounded_tail(tail)))
    return _stack(_aim_segments(segments), _aim_interval(segments, h, direction, log10_tail), direction, log10_tail)


@functools.lru_cache(maxsize=16)
def _step_pld(sigma: float, q: float, h: float, direction: str, log10_tail: int, optimistic: bool = False):
    return discretize(sigma, q, h, direction, 10.0**log10_tail, optimistic=optimistic)


def _step_plds(segments: tuple, h: float, direction: str, tail: float, optimistic: bool = False) -> list:
    return _step_plds_cached(segments, h, direction, math.floor(math.log10(tail)), optimistic)


@functools.lru_cache(maxsize=8)
def _step_plds_cached(segments: tuple, h: float, direction: str, log10_tail: int, optimistic: bool = False) -> list:
    # ``optimistic``: dominated single-step PLDs, for the certified lower bound (see `epsilon_bounds`).
    # Per-step tails: a step's cut-off mass can reach delta at most once per step, and there are
    # two tails per segment.
    tail = 10.0**log10_tail
    if len(segments) <= _AIM_SEGMENTS:  # few segments: share single-step PLDs across ledgers
        return [
            (_step_pld(sigma, q, h, direction, math.floor(math.log10(tail / (2 * len(segments) * steps))), optimistic), steps)
            for sigma, q, steps in segments
        ]
    # A schedule: its PLDs are cached together, here, and their sparse upper tails (cells
    # D = _TAIL_COARSENING grid steps wide above the loss that leaves 0.05/D^2 of the step's mass
    # above it) cut their size ~10x: the extra connect-the-dots spread, <= (0.05/D^2) (D h)^2/4
    # per step and level, is 5% of the h^2/4 the grid was sized for.
    plds = []
    for sigma, q, steps in segments:
        log10_step_tail = math.floor(math.log10(tail / (2 * len(segments) * steps)))
        above = [sg.loss_range(q, sigma, direction, mass)[1] for mass in _TAIL_MASSES]
        plds.append((discretize(sigma, q, h, direction, 10.0**log10_step_tail, above, _TAIL_COARSENING, optimistic), steps))
    return plds


# Two levels: cells 16 steps wide above the loss with 0.05/16^2 of a step's mass above it, and 256
# wide above 0.05/256^2: each level's extra spread is <= 5% of the h^2/4 the grid is sized for.
_TAIL_COARSENING = (16, 256)
_TAIL_MASSES = tuple(0.05 / width**2 for width in _TAIL_COARSENING)


#: Ledgers with more distinct segments aim their tilts with this many stand-ins (see `_aim_segments`),
#: discretised on a grid this many times coarser.
_AIM_SEGMENTS = 64
_AIM_COARSENING = 8


def _aim_segments(segments: tuple) -> tuple:
    """Stand-ins for many segments, used only to *aim* (choose tilts and precision windows).

    Segments sorted by ``(q, sigma)`` are cut into ``_AIM_SEGMENTS`` consecutive groups; each is
    represented by its member with the largest share of the privacy loss's variance (the CLT's
    ``q^2 (e^{1/sigma^2} - 1)`` per step), with the step count that gives the group's total
    variance, discretised on a coarser grid.  Aiming needs only rough cumulants, and no bound
    depends on it: every pass is exact for whatever tilt and window it is given, and the window's
    wrapped-mass bound is evaluated with the exact PLDs.
    """
    if len(segments) <= _AIM_SEGMENTS:
        return segments

    def variance(segment) -> float:
        sigma, q, _ = segment
        return min(q * q * math.expm1(min(1 / sigma**2, 700.0)), 1 / sigma**2)

    ordered = sorted(segments, key=lambda segment: (segment[1], segment[0]))
    stand_ins = []
    for i in range(_AIM_SEGMENTS):
        group = ordered[round(i * len(ordered) / _AIM_SEGMENTS): round((i + 1) * len(ordered) / _AIM_SEGMENTS)]
        if not group:
            continue
        shares = [variance(segment) * segment[2] for segment in group]
        sigma, q, _ = group[max(range(len(group)), key=shares.__getitem__)]
        per_step = variance((sigma, q, 1))
        steps = max(1, round(sum(shares) / per_step)) if per_step > 0 else sum(s for *_, s in group)
        stand_ins.append((sigma, q, steps))
    return tuple(stand_ins)


@functools.lru_cache(maxsize=4)
def _composed_cached(segments: tuple, h: float, direction: str, log10_tail: int, at_loss: float,
                     optimistic: bool = False, tilt: float | None = None) -> ComposedPLD:
    tail = 10.0**log10_tail
    plds = _step_plds(segments, h, direction, tail, optimistic)
    stack = _stack(segments, h, direction, log10_tail, optimistic)
    aim_h = _aim_interval(segments, h, direction, log10_tail)
    aim = _stack(_aim_segments(segments), aim_h, direction, log10_tail) if aim_h != h else None
    # Trust delta from half the loss of interest up: the answer lies near it.
    if tilt is None:
        tilt = choose_tilt(stack if aim is None else aim, at_loss)
    return compose(plds, tail, tilt=tilt, lowest_loss=at_loss / 2, max_size=_MAX_POINTS, aim=aim, stack=stack,
                   optimistic=optimistic)


#: The split composition (:func:`_split_composed`) cuts each step's loss where the expected number
#: of steps with a loss above the cut, over the whole run, is this.
_SPLIT_TAIL_STEPS = 1e-3
_U = 2.0**-53


def _coarsened(pld: DiscretePLD, factor: int) -> DiscretePLD:
    """``pld`` on the grid ``factor * interval``, each mass split linearly between the two coarse
    points around it (the mean is kept, which matters when many steps add up): a cheap stand-in
    for aiming only."""
    blocks, offsets = np.divmod(pld.grid, factor)
    first = int(blocks[0])
    above = pld.masses * (offsets / factor)
    masses = np.bincount(blocks - first, weights=pld.masses - above, minlength=int(blocks[-1]) - first + 2)
    masses[1:] += np.bincount(blocks - first, weights=above, minlength=masses.size - 1)[:masses.size - 1]
    return DiscretePLD(pld.interval * factor, first, masses, 0.0)


#: Ledgers of at most this many segments are split (:func:`_split_composed`): the expansion has
#: ``C(n_max + k, k)`` terms for ``k`` segments.
_SPLIT_SEGMENTS = 4
#: ... and at most this many terms.
_SPLIT_TERMS = 128


def _count_vectors(n_max: int, k: int):
    """All ``(n_1, ..., n_k)`` of non-negative integers with ``sum <= n_max``."""
    if k == 0:
        yield ()
        return
    for first in range(n_max + 1):
        for rest in _count_vectors(n_max - first, k - 1):
            yield (first, *rest)


class _SummedPLD(ComposedPLD):
    """The split composition's sum (:func:`_split_composed`): untilted, so its positive part (the
    untilted masses and allowances, read by every delta, slope and density query on it, a pass over
    up to millions of entries) is computed once."""

    @functools.cached_property
    def _parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return super()._positive_part()

    def _positive_part(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._parts


@functools.lru_cache(maxsize=4)
def _split_composed(segments: tuple, h: float, direction: str, log10_tail: int, at_loss: float,
                    optimistic: bool = False) -> ComposedPLD | None:
    """The composed PLD of ``k <= _SPLIT_SEGMENTS`` segments ``(sigma_s, q_s, T_s)`` as a sum of terms
    composed with their own tilts.

    Each step's (pessimistic) PLD ``x_s`` is cut at a loss ``c_s`` into a bulk ``b_s`` (losses
    ``< c_s``) and a tail ``t_s`` (``>= c_s``, holding ``p_s <= _SPLIT_TAIL_STEPS / T`` of its mass,
    ``T = sum_s T_s``), and

        prod_s x_s^{*T_s} = sum_{n} prod_s C(T_s, n_s) b_s^{*(T_s - n_s)} * t_s^{*n_s}

    over count vectors ``n = (n_1, ..., n_k)``.  The terms with ``|n| = sum_s n_s <= n_max`` are
    composed with provable round-off and wrap-around bounds: ``n = 0`` by
    :func:`~fundp.accounting.pld.compose` tilted for precision at ``at_loss`` by its own saddle
    point, the terms ``|n| >= 1`` together by :func:`_tail_terms` at one tilt (each by ``compose``
    at its own saddle point if ``optimistic``).  The rest
    has mass ``prod_s ||x_s||_1^{T_s} P(sum_s N_s > n_max)`` with independent ``N_s ~ Bin(T_s,
    p_s)``, at most ``prod_s ||x_s||_1^{T_s} P(Bin(T, max_s p_s) > n_max)`` (stochastic order), and
    since ``f(l) = (1 - e^{eps - l})_+ <= 1`` it adds at most that to delta: it is counted with the
    wrapped mass.  Nothing is approximated, so every delta of the sum is an upper bound as before.

    Why: for small ``q`` the composed loss is a mixture of a narrow bulk and rare large single-step
    losses; at small delta the epsilon of interest lies in the valley between them, where *no* one
    tilt makes the mass large against the peak, and the round-off allowance (a fraction of the
    tilted peak per entry) dominates.  Term by term each distribution is unimodal and a tilt at its
    own saddle point makes the mass at ``at_loss`` large again.  ``None`` if no step has a tail to
    split off, or the expansion needs more than ``_SPLIT_TERMS`` terms.

    ``optimistic``: the same expansion of the *dominated* steps (:func:`epsilon_bounds`), a lower
    bound: the terms ``|n| > n_max`` are dropped (``f >= 0``), each term's entries are lowered by its
    round-off bound, and what may have wrapped around each term's window (its
    ``wrap_above_log``, ``wrap_below``) is subtracted as one constant, evaluated at the loss
    ``at_loss / 2`` (it decreases with epsilon): the result's delta and epsilon are lower bounds
    for ``eps >= at_loss / 2`` (``trusted_from``; :func:`_split_lower` voids them below).
    """
    tail = 10.0**log10_tail
    total_steps = sum(count for _, _, count in segments)
    if len(segments) > _SPLIT_SEGMENTS or total_steps < 2:
        return None
    # Per segment: (bulk, tail or None, steps, ||x||_1, p, the step PLD).
    pieces: list[tuple[DiscretePLD, DiscretePLD | None, int, float, float, DiscretePLD]] = []
    for sigma, q, steps in segments:
        step = _step_pld(sigma, q, h, direction, math.floor(math.log10(tail / (2 * len(segments) * steps))),
                         optimistic)
        masses = np.asarray(step.masses)
        suffix = np.cumsum(masses[::-1])[::-1]
        cut = int(np.searchsorted(-suffix, -_SPLIT_TAIL_STEPS / total_steps))  # first index with suffix <= target
        total = float(np.sum(masses))
        if 0 < cut < masses.size:
            bulk = DiscretePLD(h, step.start, masses[:cut], 0.0)
            upper = DiscretePLD(h, step.start + cut, masses[cut:], 0.0)
            pieces.append((bulk, upper, steps, total, float(np.sum(upper.masses)) / total, step))
        else:
            pieces.append((DiscretePLD(h, step.start, masses, 0.0), None, steps, total, 0.0, step))
    if all(upper is None for _, upper, *_ in pieces):
        return None
    p = max(piece[4] for piece in pieces)
    log_total = sum(steps * math.log(total) for _, _, steps, total, _, _ in pieces)
    # The terms |n| > n_max: <= prod ||x_s||_1^{T_s} P(Bin(T, p) > n_max) <= tail / 2 (logsf nudged up by 1e-6).
    budget = tail / 2
    n_max = 0
    while n_max < total_steps and stats.binom.logsf(n_max, total_steps, p) + log_total + 1e-6 > math.log(budget):
        n_max += 1
    remainder = math.exp(stats.binom.logsf(n_max, total_steps, p) + log_total + 1e-6) if n_max < total_steps else 0.0
    ranges = [min(n_max, steps) if upper is not None else 0 for _, upper, steps, *_ in pieces]
    vectors = [n for n in _count_vectors(n_max, len(pieces)) if all(a <= b for a, b in zip(n, ranges))]
    if len(vectors) > _SPLIT_TERMS:
        return None
    # Tilts and windows are aimed with the pieces summed over blocks of ``factor`` cells (cheap
    # cumulants; no bound depends on aiming, see `compose`).
    factor = max(1, -(-max(piece[5].masses.size for piece in pieces) // _AIM_POINTS))
    coarse = {id(pld): _coarsened(pld, factor) for piece in pieces for pld in piece[:2] if pld is not None}
    terms, binomials = [], []
    # The terms |n| >= 1 at one tilt in one FFT (`mixture`, after the loop); the bulk-only term
    # n = 0 (far narrower, tilted much harder) on its own.  Each term may leave budget / #terms.
    summed = vectors[1:] if not optimistic and len(vectors) > 1 else []
    for n in vectors[:len(vectors) - len(summed)]:
        plds: list[tuple[DiscretePLD, int]] = []
        log_binom = 0.0
        for (bulk, cut_off, steps, *_), count in zip(pieces, n):
            plds += [(bulk, steps - count)] if steps > count else []
            plds += [(cut_off, count)] if count > 0 and cut_off is not None else []
            log_binom += math.lgamma(steps + 1) - math.lgamma(count + 1) - math.lgamma(steps - count + 1)
        stack = _Stack(plds)
        aim = _Stack([(coarse[id(pld)], c) for pld, c in plds]) if factor > 1 else None
        term = compose(plds, budget / len(vectors) * math.exp(-log_binom),
                       tilt=saddle_point(stack if aim is None else aim, at_loss), lowest_loss=at_loss / 2,
                       max_size=_MAX_POINTS, aim=aim, stack=stack, optimistic=optimistic)
        binomials.append(math.exp(log_binom))
        # Scaled by prod_s C(T_s, n_s) through its untilting factor (whose round-off grows by 4u |log C|).
        terms.append(dataclasses.replace(
            term, log_scale=term.log_scale + log_binom, missing_mass=term.missing_mass * math.exp(log_binom),
            relative_error=term.relative_error + 4 * _U * (abs(log_binom) + 1) * (1 + term.relative_error)))
    if summed:
        terms.append(_tail_terms(pieces, summed, coarse if factor > 1 else None, budget / len(vectors) * len(summed),
                                 at_loss, terms[0].delta_parts(at_loss)[0]))
    top = max(term.start + term.masses.size for term in terms)
    merged = np.zeros(max(top - 1, 1))  # losses 1 .. top - 1 (times h)
    allowances = np.zeros_like(merged)
    moments = [piece[5].moments() for piece in pieces]
    mean = sum(piece[2] * m for piece, (m, _) in zip(pieces, moments))
    variance = sum(piece[2] * v for piece, (_, v) in zip(pieces, moments))
    if optimistic:
        floor = at_loss / 2
        wrapped = 0.0
        for term, binomial in zip(terms, binomials):
            _, lower = term._lower_part()
            index = term.start + max(0, 1 - term.start) - 1
            merged[index:index + lower.size] += lower
            wrapped += binomial * (float(term._wrapped_above(floor)) + term.wrap_below)
        return ComposedPLD(h, 1, merged, 0.0, 0.0, 0.0, 0.0, 0.0, mean, variance, optimistic=True,
                           wrap_below=wrapped, trusted_from=floor)
    for term in terms:
        losses, term_masses, allowance = term._positive_part()
        index = term.start + max(0, 1 - term.start) - 1
        merged[index:index + term_masses.size] += term_masses
        allowances[index:index + term_masses.size] += allowance
    log_finite = sum(piece[2] * math.log1p(-piece[5].infinity_mass) if piece[5].infinity_mass < 1 else -math.inf
                     for piece in pieces)
    infinity = -math.expm1(log_finite)
    return _SummedPLD(
        h, 1, merged, 0.0, 0.0, infinity, sum(term.missing_mass for term in terms) + remainder, 0.0,
        mean, variance, max(term.relative_error for term in terms), allowances=allowances,
        trusted_from=max(term.lowest_trusted_loss for term in terms))


#: The split composition's terms ``|n| >= 1`` are tilted by the least tilt whose precision at the
#: loss of interest is within this factor of their saddle point's (:func:`~fundp.accounting.pld.choose_tilt`):
#: a lighter tilted tail, hence a window ~2x smaller (at 10^6 steps); at the saddle point itself
#: if that leaves the round-off allowance above ``RELATIVE_ERROR`` of the terms' delta.
_MIXTURE_HEADROOM = 10.0


def _tail_terms(pieces: list, vectors: list, coarse: dict | None, tail: float, at_loss: float, others: float
                ) -> ComposedPLD:
    """The split composition's terms ``vectors`` (count vectors, each ``|n| >= 1``) summed by
    :func:`~fundp.accounting.mixture.compose_mixture`: all at one tilt aimed at ``at_loss`` by their
    weighted sum's cumulants (their own saddle points lie close together: each is the bulk plus a
    few tail losses), one FFT per distinct piece on the union of their windows, and one inverse; its
    provable round-off bound is derived in :mod:`~fundp.accounting.mixture`.  ``pieces`` as in
    :func:`_split_composed`; ``coarse`` maps each piece's ``id`` to its aiming stand-in (or ``None``);
    ``tail``: the weighted mass allowed above the window; ``others``: the rest of delta at ``at_loss``
    (the term ``n = 0``), against which the allowance is weighed."""
    plds = [pld for bulk, cut_off, *_ in pieces for pld in (bulk, cut_off) if pld is not None]
    counts, log_weights = [], []
    for n in vectors:
        row, log_binom = [], 0.0
        for (_, cut_off, steps, *_), count in zip(pieces, n):
            row += [steps - count] + ([count] if cut_off is not None else [])
            log_binom += math.lgamma(steps + 1) - math.lgamma(count + 1) - math.lgamma(steps - count + 1)
        counts.append(row)
        log_weights.append(log_binom)
    aim = None if coarse is None else [coarse[id(pld)] for pld in plds]
    stack = MixtureStack(aim or plds, np.array(counts), np.array(log_weights))
    for headroom in (_MIXTURE_HEADROOM, 1.0):
        tilt = choose_tilt(stack, at_loss, headroom) if headroom > 1 else saddle_point(stack, at_loss)
        summed = compose_mixture(plds, counts, log_weights, tail, tilt, lowest_loss=at_loss / 2,
                                 max_size=_MAX_POINTS, aim=aim)
        finite, allowances = summed.delta_parts(at_loss)
        if allowances - summed.missing_mass <= RELATIVE_ERROR * (finite + others):
            break
    return summed


def _without_round_off(pld: ComposedPLD) -> ComposedPLD:
    """``pld`` without its round-off allowances: an *estimate* (not a bound) of what they cost."""
    return dataclasses.replace(pld, entry_error=0.0, relative_error=0.0, allowances=None)


#: Grids (multiples of the plain pass's) on which the split composition is tried, in order, while
#: a term's window exceeds the point budget.
_SPLIT_COARSENINGS = (1, 2, 4, 8)


def _split_if_round_off_dominates(segments: tuple, bound: float, pld: ComposedPLD, direction: str, tail: float,
                                  at_loss: float, query) -> tuple[float, ComposedPLD]:
    """The better of ``(bound, pld)`` and the split composition (:func:`_split_composed`) on the same
    grid, tried only where the round-off allowance costs more than ``2 RELATIVE_ERROR``
    (``query(pld)`` with and without it) and the ledger has at most ``_SPLIT_SEGMENTS`` segments.  Both are
    bounds."""
    if len(segments) > _SPLIT_SEGMENTS or pld.allowances is not None:
        return bound, pld
    core = query(_without_round_off(pld))
    if not (math.isfinite(bound) and bound > core * (1 + 2 * RELATIVE_ERROR)):
        return bound, pld
    split = _split_pass(segments, pld.interval, direction, tail, at_loss, query)
    if split is None:  # keep the plain pass (and its warning)
        return bound, pld
    return split if split[0] < bound else (bound, pld)


def _split_pass(segments: tuple, h: float, direction: str, tail: float, at_loss: float,
                query) -> tuple[float, ComposedPLD] | None:
    """``(query(split), split)`` for the split composition (:func:`_split_composed`) on the grid ``h``
    (quantised), or on a 2-8x coarser one where a term's window exceeds the point budget (any grid
    gives a bound); ``None`` where the ledger cannot be split."""
    for coarsening in _SPLIT_COARSENINGS:
        try:
            split = _split_composed(segments, h * coarsening, direction,
                                    math.floor(math.log10(_rounded_tail(tail))), float(f"{at_loss:.3g}"))
        except MemoryError:  # a term's window exceeds the point budget: a coarser grid
            continue
        return None if split is None else (query(split), split)
    return None


@functools.lru_cache(maxsize=8)
def _stack(segments: tuple, h: float, direction: str, log10_tail: int, optimistic: bool = False) -> _Stack:
    """The single-step PLDs of ``segments``, concatenated for vectorised cumulants."""
    return _Stack(_step_plds_cached(segments, h, direction, log10_tail, optimistic))


def _rounded_tail(tail: float) -> float:
    return 10.0 ** max(math.floor(math.log10(tail)), -300)


def _composed(segments: tuple, h: float, direction: str, tail: float, at_loss: float,
              optimistic: bool = False, tilt: float | None = None) -> ComposedPLD:
    """The composed PLD on grid ~``h``, tilted for precision at losses near ``at_loss`` (by ``tilt``
    if given; from dominated steps if ``optimistic``: its delta and epsilon are then certified
    lower bounds)."""
    h = _quantize(h)
    log10_tail = max(math.floor(math.log10(tail)), -300)
    at_loss = float(f"{at_loss:.3g}")  # the tilt need not be exact; rounding lets repeats hit the cache
    while True:
        try:
            return _composed_cached(segments, h, direction, log10_tail, at_loss, optimistic, tilt)
        except MemoryError:
            h *= 2
            warnings.warn(
                f"the PRV grid for this ledger would exceed {_MAX_POINTS} points; using interval {h:.3g} "
                "instead (still a rigorous bound, but possibly looser than 0.1%)",
                UserWarning,
                stacklevel=6,
            )


def _directions(segments: Segments) -> tuple[str, ...]:
    # At q = 1 the two directions are mirror images (both are the Gaussian mechanism's PLD).
    return (sg.REMOVE,) if all(q == 1 for _, q, _ in segments) else sg.DIRECTIONS


def _epsilon_pass(segments: tuple, h: float, direction: str, tail: float, delta: float, aim: float):
    """epsilon bound on grid ~``h``, tilted at ``aim``; re-aimed (at most twice) while the answer lands
    far from the aim, where the tilt leaves less precision.  Every pass is a bound: keep the least."""
    best, best_pld = math.inf, None
    for _ in range(3):
        pld = _composed(segments, h, direction, tail, aim)
        value = pld.epsilon(delta)
        if value < best:
            best, best_pld = value, pld
        if not math.isfinite(value) or abs(value - aim) <= 0.02 * max(value, 1e-2):
            break
        aim = value
    return best, best_pld


#: Relative margin on the closed form of the Gaussian mechanism (q = 1): covers scipy's
#: ``log_ndtr`` round-off (~1e-15 relative) with a wide berth.
_CLOSED_FORM_MARGIN = 1e-9


def _gaussian_mu(segments: Segments) -> float | None:
    """``mu = sqrt(sum T / sigma^2)`` when every step is an unsampled Gaussian mechanism (q = 1):
    their composition *is* the Gaussian mechanism with sensitivity/noise ``mu`` (Dong, Roth & Su
    2022), whose profile is known in closed form; ``None`` otherwise."""
    if not all(q == 1 for _, q, _ in segments):
        return None
    return math.sqrt(math.fsum(steps / sigma**2 for sigma, _, steps in segments))


def _gaussian_log_delta(mu: float, eps: float) -> float:
    """``log delta(eps)`` of the Gaussian mechanism, ``delta = Phi(-eps/mu + mu/2) - e^eps
    Phi(-eps/mu - mu/2)`` (Balle & Wang 2018), in log space: accurate at any eps (no cancellation
    between the two terms, whose log ratio is formed first)."""
    log_first = special.log_ndtr(-eps / mu + mu / 2)
    log_ratio = min(eps + special.log_ndtr(-eps / mu - mu / 2) - log_first, 0.0)
    if log_ratio == 0.0:
        return -math.inf
    return float(log_first + math.log(-math.expm1(log_ratio)))


def _gaussian_epsilon(mu: float, delta: float, side: int = +1) -> float:
    """Closed-form epsilon of the Gaussian mechanism at ``delta``, nudged up (``side=+1``) or down
    (``side=-1``, for the lower bound) by ``_CLOSED_FORM_MARGIN``."""
    target = math.log(delta)
    if _gaussian_log_delta(mu, 0.0) <= target:
        return 0.0
    high = mu * mu / 2 + 2 * mu + 1.0
    while _gaussian_log_delta(mu, high) > target:
        high *= 2
    root = optimize.brentq(lambda e: _gaussian_log_delta(mu, e) - target, 0.0, high, xtol=1e-300, rtol=1e-14)
    return float(root * (1 + side * _CLOSED_FORM_MARGIN))


def _rdp_fallback(value: float, segments: tuple, compute) -> float:
    """Past ``_LARGEST_EPSILON`` the PLD's float range ends: the RDP bound is used where smaller,
    and said so (never silently)."""
    fallback = compute(segments)
    if fallback < value:
        warnings.warn(
            f"the PRV accountant's float range ends at epsilon {_LARGEST_EPSILON:g}; this answer is the "
            "RDP bound (a rigorous upper bound, but not within 0.1% of the exact value)",
            UserWarning,
            stacklevel=5,
        )
        return fallback
    return value


#: Past this relative gap between the bound and the same PLD's epsilon without its round-off
#: allowance, the answer says that the 0.1% promise may not hold.
_PROMISE = 1e-3


def _warn_if_round_off_dominates(answer: float, pld: ComposedPLD, delta: float) -> None:
    """Never silently loose: the provable round-off allowance (``pld`` module docstring) can be a
    large part of a very small delta when the heavy tail of a small-``q`` PLD limits the tilt.
    The same PLD without the allowance estimates what the bound would be without it; if the gap
    exceeds the 0.1% promise, warn with its size (the answer is still a rigorous upper bound)."""
    core = _without_round_off(pld).epsilon(delta)
    if core > 0 and answer > core * (1 + _PROMISE):
        warnings.warn(
            f"epsilon {answer:.6g} at delta {delta:.3g} is a rigorous upper bound, but the FFT round-off "
            f"allowance may make it up to {100 * (answer / core - 1):.2g}% above the exact value (the 0.1% "
            "promise is not met at this small delta; a larger delta or the 'rdp' accountant may be tighter)",
            UserWarning,
            stacklevel=5,
        )


def epsilon(segments: Segments, delta: float) -> float:
    """Upper bound on epsilon at ``delta`` for the composed ``segments`` ``(sigma, q, steps)``."""
    segments = tuple(segments)
    if not segments:
        return 0.0
    mu = _gaussian_mu(segments)
    if mu is not None:
        return _gaussian_epsilon(mu, delta)
    return _epsilon_search(segments, delta)[0]


def _epsilon_search(segments: tuple, delta: float) -> tuple[float, str, ComposedPLD | None]:
    """:func:`epsilon` for ``q < 1``: the bound, the direction it came from, and the PLD that gave it."""
    steps = sum(count for _, _, count in segments)
    tail = _TAIL_FRACTION * delta * (1 - delta)
    _, variance = _guess_moments(segments)
    guess = gdp.gaussian_epsilon(math.sqrt(variance), delta)
    h_guess = _interval_for_epsilon(min(guess, 50.0), _sensitivity(min(guess, 50.0), variance), steps,
                                    _COARSE_RELATIVE_ERROR)
    coarse, aim_stacks = {}, {}
    for direction in _directions(segments):
        # Aim the coarse tilt and size the coarse grid with the saddle-point estimate on an aiming
        # grid (cheap, and far better than the CLT guess for heavy-tailed losses).
        aim_stacks[direction] = aim_stack = _aim_stack(segments, h_guess, direction, tail)
        aim = saddle_point_epsilon(aim_stack, delta)
        aim = aim if math.isfinite(aim) else guess
        h_coarse = h_guess
        if not _affordable(segments, h_guess, direction, tail):
            sized = min(aim, 50.0)
            h_coarse = _interval_for_epsilon(sized, _saddle_sensitivity(aim_stack, sized, variance), steps,
                                             _COARSE_RELATIVE_ERROR)
        coarse[direction] = _epsilon_pass(segments, h_coarse, direction, tail, delta, aim)
    answer, answer_pld, answer_direction = 0.0, None, sg.REMOVE
    for direction in sorted(coarse, key=lambda d: -coarse[d][0]):
        bound, pld = coarse[direction]
        if bound <= answer or not math.isfinite(bound):
            if bound > answer:
                answer, answer_pld, answer_direction = bound, pld, direction
            continue
        sensitivity = _measured_sensitivity(pld, bound) or _saddle_sensitivity(aim_stacks[direction], bound,
                                                                                pld.variance)
        h_fine = _interval_for_epsilon(bound, sensitivity, steps, RELATIVE_ERROR)
        query = lambda composed: composed.epsilon(delta)  # noqa: E731
        # Where round-off dominates the coarse pass it dominates every finer one too (the allowance,
        # relative to the tilted peak, grows with the window): those are split at once, aimed at the
        # coarse value without its allowance, not after plain passes that would be discarded (on
        # the 10^6-step corner three of them cost over half the query).
        core = query(_without_round_off(pld))
        split = len(segments) <= _SPLIT_SEGMENTS and math.isfinite(bound) and bound > core * (1 + 2 * RELATIVE_ERROR)

        def refined(h: float, aim: float) -> tuple[float, ComposedPLD]:
            # A pass on grid ~h, split where its round-off allowance dominates (on that grid).
            if split:
                for _ in range(3):  # re-aimed while the answer lands far from the aim, as `_epsilon_pass`
                    direct = _split_pass(segments, _quantize(h), direction, tail, aim, query)
                    if direct is None or abs(direct[0] - aim) <= 0.02 * max(direct[0], 1e-2):
                        break
                    aim = direct[0]
                if direct is not None:
                    return direct
            value, composed = _epsilon_pass(segments, h, direction, tail, delta, aim)
            return _split_if_round_off_dominates(segments, value, composed, direction, tail, value, query)

        if _quantize(h_fine) < pld.interval:
            fine, fine_pld = refined(h_fine, core if split else bound)
            # The pessimism of connect-the-dots shrinks like h^2, so the drop from the coarse to
            # the fine bound estimates the fine bound's own excess (Richardson; on the values
            # without round-off allowances, which do not shrink with h).  If the error model that
            # sized h was too optimistic, refine once more.
            ratio = (pld.interval / fine_pld.interval) ** 2  # 1 if the grid cap kept h from shrinking
            drop = query(_without_round_off(pld)) - query(_without_round_off(fine_pld))
            excess = drop / (ratio - 1) if ratio > 1.01 else 0.0
            target = RELATIVE_ERROR * max(fine, 1e-2)
            if math.isfinite(fine) and excess > 2 * target:
                h_again = fine_pld.interval * max(math.sqrt(target / excess), 0.25)
                again, again_pld = refined(h_again, fine)
                if again < fine:
                    fine, fine_pld = again, again_pld
            if fine < bound:
                bound, pld = fine, fine_pld
        else:
            bound, pld = _split_if_round_off_dominates(segments, bound, pld, direction, tail, bound, query)
        if bound > answer:
            answer, answer_pld, answer_direction = bound, pld, direction
    if answer_pld is not None and math.isfinite(answer):
        _warn_if_round_off_dominates(answer, answer_pld, delta)
    if answer > _LARGEST_EPSILON:  # beyond float64's e^-eps: fall back on the RDP bound if lower
        answer = _rdp_fallback(answer, segments, lambda s: rdp.epsilon(s, delta))
    return answer, answer_direction, answer_pld


def delta(segments: Segments, epsilon: float) -> float:
    """Upper bound on delta at ``epsilon`` for the composed ``segments`` ``(sigma, q, steps)``."""
    segments = tuple(segments)
    if not segments:
        return 0.0
    mu = _gaussian_mu(segments)
    if mu is not None:
        return float(min(1.0, math.exp(_gaussian_log_delta(mu, epsilon)) * (1 + _CLOSED_FORM_MARGIN)))
    if epsilon > _LARGEST_PLD_DELTA_EPSILON:
        # Far past the PLD's float range a grid aimed at epsilon grows without bound (eps = 1e6
        # ran 120 s and 6 GB): the RDP bound is time- and memory-bounded; say so.
        return _rdp_fallback(math.inf, segments, lambda s: rdp.delta(s, epsilon))
    return _delta_search(segments, epsilon)[0]


def _delta_search(segments: tuple, epsilon: float) -> tuple[float, str, ComposedPLD | None]:
    """:func:`delta` for ``q < 1`` and ``epsilon <= _LARGEST_PLD_DELTA_EPSILON``: the bound, the
    direction it came from, and the finest-grid PLD computed for that direction."""
    steps = sum(count for _, _, count in segments)
    _, variance = _guess_moments(segments)
    # Tails are budgeted relative to the unknown answer: start from the CLT guess (clipped: it can
    # be far off either way) and tighten until they are negligible against what comes out.
    clt = min(max(gdp.gaussian_delta(math.sqrt(variance), epsilon), 1e-8), 1.0)
    h_guess = _interval_for_epsilon(epsilon, _sensitivity(epsilon, variance), steps, _COARSE_RELATIVE_ERROR)
    # Per direction: the saddle-point estimate of delta on an aiming grid (a 100x margin: too small
    # a tail only widens the window), and the coarse grid sized by the saddle-point sensitivity.
    start_tail, h_coarse, sensitivity = {}, {}, {}
    for direction in _directions(segments):
        if _affordable(segments, h_guess, direction, _TAIL_FRACTION * clt):
            start_tail[direction], h_coarse[direction] = _TAIL_FRACTION * clt, h_guess
            sensitivity[direction] = _sensitivity(epsilon, variance)
            continue
        aim_stack = _aim_stack(segments, h_guess, direction, _TAIL_FRACTION * clt)
        estimate = _saddle_point_delta(aim_stack, epsilon)
        start_tail[direction] = _TAIL_FRACTION * (clt if estimate is None else min(max(estimate / 100, 1e-290), 1.0))
        sensitivity[direction] = _saddle_sensitivity(aim_stack, epsilon, variance)
        h_coarse[direction] = _interval_for_epsilon(epsilon, sensitivity[direction], steps, _COARSE_RELATIVE_ERROR)

    def query(h: float, direction: str, tail: float, floor: float) -> tuple[float, ComposedPLD]:
        for _ in range(10):
            pld = _composed(segments, h, direction, tail, epsilon)
            finite, allowances = pld.delta_parts(epsilon)
            value = min(1.0, finite + allowances)
            # What delta is made of once the tail allowances are negligible: the finite atoms, and
            # any mass at +inf beyond what the truncation (<= tail) put there.
            core = finite + max(pld.infinity_mass - tail, 0.0)
            if core * _TAIL_FRACTION >= tail or tail <= floor:
                break
            tail = max(_TAIL_FRACTION * core if core > 0 else tail * 1e-30, floor)
        return value, pld

    answer, coarse = 0.0, {}
    for direction in _directions(segments):
        # A direction far below the other cannot matter: its tails need only be small against
        # the answer so far.
        floor = max(_TAIL_FRACTION * answer, 1e-300)
        coarse[direction] = query(h_coarse[direction], direction, max(start_tail[direction], floor), floor)
        answer = max(answer, coarse[direction][0])
    answer, answer_direction, answer_pld = 0.0, sg.REMOVE, None
    for direction in sorted(coarse, key=lambda d: -coarse[d][0]):
        bound, pld = coarse[direction]
        if bound <= answer:
            continue
        floor = max(_TAIL_FRACTION * answer, 1e-300)
        tail = max(_TAIL_FRACTION * bound, floor)
        delta_query = lambda composed: min(1.0, composed.delta(epsilon))  # noqa: E731
        # Split the coarse pass too where round-off dominates it: the slope, the density and the
        # Richardson check below need values that the allowance does not swamp.
        bound, pld = _split_if_round_off_dominates(segments, bound, pld, direction, tail, epsilon, delta_query)
        slope = pld.delta_slope(epsilon) / max(bound, 1e-300)
        aim = _DELTA_RELATIVE_ERROR if pld.allowances is None else _SPLIT_DELTA_RELATIVE_ERROR
        h_fine = _interval_for_delta(_measured_sensitivity(pld, epsilon) or sensitivity[direction], steps, aim, slope)

        def refined(h: float, tail: float = tail, floor: float = floor, split: bool = pld.allowances is not None
                    ) -> tuple[float, ComposedPLD]:
            # A pass on grid ~h, split where its round-off allowance dominates (on that grid).  Where
            # the coarse pass had to be split, so would this one (the allowance, relative to the
            # tilted peak, grows with the window): split at once, not after a plain pass that would
            # be discarded (on the 10^6-step corner it cost a third of the query).
            if split and (direct := _split_pass(segments, _quantize(h), direction, tail, epsilon, delta_query)):
                return direct
            value, composed = query(h, direction, tail, floor)
            return _split_if_round_off_dominates(segments, value, composed, direction, tail, epsilon, delta_query)

        if _quantize(h_fine) < pld.interval:
            fine, fine_pld = refined(h_fine)
            # Richardson check of the error model, as in `epsilon` (here on log delta, without the
            # round-off allowances, which do not shrink with h).
            ratio = (pld.interval / fine_pld.interval) ** 2
            core, fine_core = pld.delta_parts(epsilon)[0], fine_pld.delta_parts(epsilon)[0]
            excess = math.log(core / fine_core) / (ratio - 1) if core > 0 and fine_core > 0 and ratio > 1.01 else 0.0
            if excess > 2 * aim:
                h_again = fine_pld.interval * max(math.sqrt(aim / excess), 0.25)
                again, again_pld = refined(h_again)
                if again < fine:
                    fine, fine_pld = again, again_pld
            if fine < bound:
                bound, pld = fine, fine_pld
        if bound > answer:
            answer, answer_direction, answer_pld = bound, direction, pld
    if epsilon > _LARGEST_EPSILON:
        answer = _rdp_fallback(answer, segments, lambda s: rdp.delta(s, epsilon))
    return answer, answer_direction, answer_pld



def _lower_shift(segments: tuple, h: float, direction: str, tail: float) -> float:
    """``sum_s T_s offset_s``: the dominated steps live on grids ``offset_s + h Z``
    (:func:`~fundp.accounting.pld._dominated_step`) and are composed in the frame ``h Z``; this is
    the composed loss's shift back (the same single-step PLDs as :func:`_composed` uses)."""
    plds = _step_plds(segments, _quantize(h), direction, 10.0 ** max(math.floor(math.log10(tail)), -300), True)
    return math.fsum(steps * pld.offset for pld, steps in plds)


def _lower_pass(segments: tuple, like: ComposedPLD, direction: str, tail: float, at_loss: float,
                refine: float) -> tuple[ComposedPLD | None, float]:
    """The optimistic composition (dominated steps) on ``like``'s grid (``refine = 1``, with its tilt)
    or on one ``refine`` times finer (its own tilt), for losses near ``at_loss``, and its shift
    (:func:`_lower_shift`); ``None`` if its window would not fit."""
    # ``like.interval`` is already quantised: the nudge keeps `_quantize` from rounding it down.
    h = like.interval / refine * (1 + 1e-9)
    tail = _rounded_tail(tail)
    shift = _lower_shift(segments, h, direction, tail)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no silent coarsening of the lower pass
            return _composed(segments, h, direction, tail, at_loss - shift, optimistic=True,
                             tilt=like.tilt if refine == 1 and like.allowances is None else None), shift
    except UserWarning:
        return None, shift


#: Grid refinements tried, in order, by the lower bound until it is within ``_PROMISE`` of the upper.
_LOWER_REFINEMENTS = (1, 2, 4, 8, 16)


def _split_lower(segments: tuple, like: ComposedPLD, direction: str, tail: float, at_loss: float, query,
                 refine: float = 1) -> tuple[float, int]:
    """``query(pld, shift)`` of the optimistic split composition (:func:`_split_composed`) on
    ``like``'s grid (or one ``refine`` times finer), and its number of points; ``(0, 0)`` if there
    is nothing to split, ``(0, -1)`` if a window would not fit."""
    h = _quantize(like.interval / refine * (1 + 1e-9))
    shift = _lower_shift(segments, h, direction, _rounded_tail(tail))
    try:
        pld = _split_composed(segments, h, direction, math.floor(math.log10(_rounded_tail(tail))),
                              float(f"{at_loss - shift:.3g}"), optimistic=True)
    except MemoryError:
        return 0.0, -1
    if pld is None:
        return 0.0, 0
    return query(pld, shift), pld.masses.size


def _lower(segments: tuple, like: ComposedPLD | None, direction: str, tail: float, at_loss: float, upper: float,
           query) -> float:
    """The largest ``query(pld, shift)`` over the optimistic passes of :func:`_lower_pass` (or
    :func:`_split_lower` where the upper bound was split; each a certified lower bound) on the upper
    bound's grid, then on grids 2 to 16 times finer while the bounds are more than ``_PROMISE``
    apart, or more than ``_LOWER_PROMISE`` while a pass has at most ``_LOWER_EXTRA_POINTS`` points
    (a cheap refinement); if the upper bound's grid does not fit, on the first of up to 4 times
    coarser grids that does.  0 if none fits."""
    if like is None:
        return 0.0

    def attempt(refine: float) -> tuple[float, int]:
        """(value, points) of the pass ``refine`` times finer; points ``<= 0`` if it did not fit."""
        if like.allowances is not None:  # the upper bound came from the split composition: so does the lower
            return _split_lower(segments, like, direction, tail, at_loss, query, refine)
        pld, shift = _lower_pass(segments, like, direction, tail, at_loss, refine)
        return (0.0, -1) if pld is None else (query(pld, shift), pld.masses.size)

    best = 0.0
    for refine in _LOWER_REFINEMENTS:
        value, size = attempt(refine)
        if size == -1 and refine == 1:  # the upper bound's grid does not fit: a coarser one may
            for coarser in _LOWER_COARSENINGS:
                value, size = attempt(coarser)
                if size != -1:
                    break
            best = max(best, value)
            break
        if size <= 0:  # nothing to split, or a window did not fit: finer grids would not either
            break
        best = max(best, value)
        if upper - best <= _PROMISE * upper and (upper - best <= _LOWER_PROMISE * upper or size > _LOWER_EXTRA_POINTS):
            break
    return min(best, upper)


#: Coarser grids (steps of 2^(1/4), to 4x) tried by :func:`_lower` where the upper bound's does not
#: fit (the optimistic steps' windows can be a little wider): any grid gives a lower bound.
_LOWER_COARSENINGS = tuple(2.0 ** (-k / 4) for k in range(1, 9))


#: See :func:`_lower`.
_LOWER_PROMISE, _LOWER_EXTRA_POINTS = 2e-4, 2**19


def _epsilon_lower(pld: ComposedPLD, shift: float, delta: float) -> float:
    """A certified lower bound on epsilon from an optimistic composition in the frame shifted by
    ``-shift``: its own (a sup over ``eps' >= 0``, 0 if void; at or above ``trusted_from``) plus
    ``shift``, clipped at 0."""
    value = pld.epsilon(delta)
    if value <= 0 or value < pld.trusted_from:
        return 0.0
    return max(value + shift, 0.0)


def _delta_lower(pld: ComposedPLD, shift: float, epsilon: float) -> float:
    """A certified lower bound on delta at ``epsilon`` from an optimistic composition in the frame
    shifted by ``-shift``: its delta at ``epsilon - shift`` (0 below ``trusted_from``)."""
    at = epsilon - shift
    return pld.delta(at) if at >= pld.trusted_from else 0.0


def epsilon_bounds(segments: Segments, delta: float) -> tuple[float, float]:
    """``(lower, upper)``: certified bounds on epsilon at ``delta``; ``upper`` is :func:`epsilon`.

    ``lower`` comes from more passes in the adjacency direction of the pass that gave ``upper``, on
    its grid and (while the two are more than 0.1% apart) on grids 2 to 16 times finer, composed
    from *dominated* steps (the derivation is in the module docstring): the true epsilon is the larger of the two directions' epsilons, and each
    direction's optimistic value is below its own.  At ``q = 1``, the closed form nudged each way.
    Past the PLD's float range (single-step losses above ``pld._MAX_LOSS = 600`` are dropped, so
    epsilons of several hundred, where ``upper`` is the RDP bound) ``lower`` may be 0: certified,
    but void.
    """
    segments = tuple(segments)
    if not segments:
        return 0.0, 0.0
    mu = _gaussian_mu(segments)
    if mu is not None:
        return _gaussian_epsilon(mu, delta, -1), _gaussian_epsilon(mu, delta, +1)
    upper, direction, pld = _epsilon_search(segments, delta)
    aim = upper if math.isfinite(upper) or pld is None else pld.mean
    tail = _TAIL_FRACTION * delta * (1 - delta)
    return _lower(segments, pld, direction, tail, aim, upper, lambda lower, shift: _epsilon_lower(lower, shift, delta)), upper


def delta_bounds(segments: Segments, epsilon: float) -> tuple[float, float]:
    """``(lower, upper)``: certified bounds on delta at ``epsilon``; ``upper`` is :func:`delta`.

    ``lower`` as in :func:`epsilon_bounds` (optimistic passes on the grid and in the direction of
    the upper bound); 0 past ``epsilon = 500``, where :func:`delta` uses the RDP bound alone.
    """
    segments = tuple(segments)
    if not segments:
        return 0.0, 0.0
    mu = _gaussian_mu(segments)
    if mu is not None:
        log_delta = _gaussian_log_delta(mu, epsilon)
        return (float(min(1.0, math.exp(log_delta) * (1 - _CLOSED_FORM_MARGIN))),
                float(min(1.0, math.exp(log_delta) * (1 + _CLOSED_FORM_MARGIN))))
    if epsilon > _LARGEST_PLD_DELTA_EPSILON:
        return 0.0, delta(segments, epsilon)
    upper, direction, pld = _delta_search(segments, epsilon)
    tail = max(_TAIL_FRACTION * upper, 1e-300)
    return _lower(segments, pld, direction, tail, epsilon, upper, lambda lower, shift: _delta_lower(lower, shift, epsilon)), upper
