"""A weighted sum of compositions at one tilt, by one FFT: the split composition's terms ``|n| >= 1``.

:func:`~fundp.accounting.prv._split_composed` writes a small-``q`` ledger's composed PLD as ::

    prod_s x_s^{*T_s} = sum_n  prod_s C(T_s, n_s) b_s^{*(T_s - n_s)} * t_s^{*n_s}

(bulk ``b_s`` and tail ``t_s`` of each segment's step).  Composed term by term, each term needs its
own FFT over a window that spans its ``n`` tail pieces (at 10^6 steps: five FFTs of up to 5 10^6
points).  The terms with ``|n| >= 1`` have nearly the same saddle point at the loss of interest
(they are all "the bulk plus one to a few tail losses"), so :func:`compose_mixture` tilts them
all by one ``lam`` (aimed by their weighted sum's cumulants, :meth:`MixtureStack.cumulants`),
transforms each distinct piece once on the union of their windows, sums the terms' spectral
products ``w_n prod_p z_p^{c_np}`` pointwise and inverts once.

**Round-off of the sum.**  Notation as in :mod:`~fundp.accounting.pld` (steps 1-6 there): pieces
``p`` with computed tilted, normalised weights ``x_p``, exact DFTs ``z_pk``, computed ``z^_pk``
within ``e_p = gamma_N ||x_p||_1`` of them; term ``n`` has counts ``c_np`` and weight
``w_n = C_n prod_p s_p^{c_np}`` (``C_n`` the binomials, ``s_p`` the normaliser of piece ``p``:
``e^{peak_p} total_p``, exactly the floats used to normalise), stored as ``v_n = w_n / W``,
``W = e^{log_scale}``, ``log_scale = max_n fl(log w_n)``.  The exact (tilted, scaled) spectrum is
``S_k = sum_n v_n P_nk`` with ``P_nk = prod_p z_pk^{c_np}``; we compute
``S^_k = fl(sum_n exp(E^_nk))`` with ``E^_nk = fl(log v_n + sum_p c_np (log|z^_pk| + i arg z^_pk))``.

1. *One term.*  Step 2 of pld's derivation, scaled by ``v_n`` (exact real scaling commutes with
   everything): ``|v_n prod_p z^_pk^{c_np} - v_n P_nk| <= v_n A_nk C_nk`` with
   ``A_nk = prod_p M_pk^{c_np}``, ``C_nk = sum_p c_np e_p / M_pk``.  ``v_n`` itself is not exact:
   ``fl(log v_n)`` errs from ``log v_n`` by at most ``delta_n = 8u (|log C_n| + sum_p c_np
   (|peak_p| + |log total_p| + 1) + |log_scale| + 1)`` (a sum of ``O(P + 3)`` floats each with
   relative error ``<= 2u``, generously), so we use ``v_n <= e^{fl(log v_n) + delta_n}`` in the
   bound and count ``delta_n`` in the exponent error of step 3 below.
2. *Evaluation.*  As pld's step 3, the exponent ``E^_nk`` errs by at most
   ``d_nk = 2u (1 + (P + 2) u) Lambda_nk + 4u + delta_n`` with ``Lambda_nk = sum_p c_np
   (|log|z^_pk|| + pi + 1) + |fl(log v_n)| + 1``, so ``exp(E^_nk)`` is within
   ``|exp(E^_nk)| (e^{d_nk} - 1) e^{d_nk}`` of ``v_n prod_p z^_pk^{c_np}``; an exponential that
   underflows (to 0 or a subnormal) errs by less than ``2^-1000`` more.
3. *Dropped frequencies.*  With ``a_p = log max(1, ||x_p||_1)``, ``log M_pk <= a_p``, so for every
   term ``log(v_n A_nk) <= G_k = sum_p c^min_p log M_pk + max_n (sum_p (c_np - c^min_p) a_p +
   fl(log v_n) + delta_n)``, ``c^min_p = min_n c_np``.  Where ``G_k < log 1e-25`` every term's
   exact and computed products are below ``e^{G_k}`` (``|z^_pk| <= M_pk``): ``S^_k`` is set to 0,
   an error ``<= m e^{G_k}`` for ``m`` terms.
4. *The sum.*  By linearity the exact spectrum's error is at most the sum of the terms' errors:
   ``|sum_n exp(E^_nk) - S_k| <= sum_n (e^{fl(log v_n) + delta_n} A_nk C_nk + eval_nk)``, and
   adding ``m`` complex numbers in floating point errs by at most ``((1 + u)^{m-1} - 1) sum_n
   |exp(E^_nk)| <= 1.01 (m - 1) u sum_n |exp(E^_nk)|`` (each partial sum rounds with relative
   error ``<= u`` and its modulus is at most ``sum_n |.|``).  Call the total ``B_k``.
5. *Inverse transform.*  Unchanged from pld's step 5: every tilted entry satisfies
   ``|m^_j - m_j| <= entry_error = (1 + 4u) (mean_k B_k + (gamma_N + u) mean_k |S^_k|)``.
6. *Inputs and untilting.*  Every term composes ``T = sum_p c_np`` weights (the same ``T`` for all
   terms), each with relative error ``<= rho = u (max_p |peak_p| + 608)``: all terms are
   non-negative sums of products of ``T`` such weights, so the relative error of each, hence of
   their sum, is ``<= (1 + rho)^T - 1``; untilting by ``exp(log_scale - lam l)`` adds
   ``4u (|log_scale| + 8)`` as in pld's step 6.

So the result is a :class:`~fundp.accounting.pld.ComposedPLD` like :func:`~fundp.accounting.pld.compose`'s
(one tilt, one ``entry_error``), and every delta computed from it is a rigorous upper bound on the
sum's.  **Window.**  ``[lo, hi]`` is the union of the terms' windows at the common tilt, each sized
as in :func:`~fundp.accounting.pld.compose`: the untilted weighted mass of term ``n`` above ``hi``
is at most ``tail_mass / m`` (a Chernoff bound with the exact pieces; added to delta as
``missing_mass``), and its tilted mass outside is below ``1e-12`` of the sum's largest term.  The
window starts at ``lowest_loss`` even where tilted mass lies below it if ``lam (hi - lowest_loss)
>= -log tail_mass``: that mass reappears ``N h`` higher, untilted there by ``e^{-lam (l + N h)}``
instead of ``e^{-lam l}``, so it only adds at most ``e^{-lam N h} <= tail_mass`` to delta above the
window's start (from where delta is trusted).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import fft as sp_fft

from fundp.accounting.pld import (_EPS, _MAX_LOSS, _NEGLIGIBLE, ComposedPLD, DiscretePLD, _edge, _spectrum_mean_full,
                                  _Stack, fft_error_constant)

__all__ = ["MixtureStack", "compose_mixture"]


class MixtureStack(_Stack):
    """The weighted sum ``sum_n e^{log_weights[n]} conv_p pieces[p]^{*counts[n, p]}`` as a "stack":
    its cumulant generating function ``K(lam) = logsumexp_n (log_weights[n] + sum_p counts[n, p]
    K_p(lam))`` and derivatives (the mixture's tilted log-mass, mean and variance), so that
    :func:`~fundp.accounting.pld.saddle_point` finds the one tilt that centres the whole sum on a
    loss.  ``pieces``: distinct PLDs on one grid; ``counts``: ``(m, P)`` non-negative integers."""

    def __init__(self, pieces: Sequence[DiscretePLD], counts: np.ndarray, log_weights: np.ndarray):
        super().__init__([(piece, 1) for piece in pieces])
        self.term_counts = np.asarray(counts, dtype=float)
        self.log_weights = np.asarray(log_weights, dtype=float)

    def piece_cumulants(self, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per piece: ``K_p(lam)``, ``K_p'(lam)``, ``K_p''(lam)`` (weights below ``e^-600`` of each
        piece's peak raised to it, as in :class:`~fundp.accounting.pld._Stack`: ``K_p`` only rises)."""
        weights, peak, total = self._weights(lam)
        centre = np.add.reduceat(weights * self.losses, self.offsets) / total
        centred = self.losses - centre[self.member]
        variance = np.add.reduceat(weights * centred * centred, self.offsets) / total
        return peak + np.log(total), centre, variance

    def term_log_mgfs(self, lam: float) -> np.ndarray:
        """``K_n(lam) = sum_p counts[n, p] K_p(lam)`` for every term (without its weight)."""
        return self.term_counts @ self._log_mgfs(lam)

    def _log_mgfs(self, lam: float) -> np.ndarray:
        _, peak, total = self._weights(lam)
        return peak + np.log(total)

    def log_mgf(self, lam: float) -> float:
        exponents = self.log_weights + self.term_log_mgfs(lam)
        top = float(np.max(exponents))
        return top + math.log(float(np.sum(np.exp(exponents - top))))

    def cumulants(self, lam: float) -> tuple[float, float, float]:
        k, mean, variance = self.piece_cumulants(lam)
        exponents = self.log_weights + self.term_counts @ k
        top = float(np.max(exponents))
        shares = np.exp(exponents - top)
        total = float(np.sum(shares))
        shares /= total
        means = self.term_counts @ mean
        centre = float(shares @ means)
        spread = float(shares @ (self.term_counts @ variance + (means - centre) ** 2))
        return top + math.log(total), centre, spread


def _term_edges(fine: MixtureStack, aim: MixtureStack, tilt: float, log_budget: float, max_lam: float
                ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """The window ``[lo, hi]`` (losses) holding every term at the common ``tilt``, and per term its
    support's top and whether it reaches above ``hi`` (see the module docstring, *Window*)."""
    k_tilt = aim.term_log_mgfs(tilt)
    log_share = aim.log_weights + k_tilt - float(np.max(aim.log_weights + k_tilt))  # log v_n at the aim
    _, means, variances = aim.piece_cumulants(0.0)
    firsts = np.array([fine.positions[o] for o in fine.offsets], dtype=float)
    lasts = np.array([fine.positions[o - 1] for o in [*fine.offsets[1:], fine.positions.size]], dtype=float)
    his, los = [], []
    for n, counts in enumerate(fine.term_counts):
        mean = float(counts @ means)
        spread = math.sqrt(max(float(counts @ variances), 1e-300))

        def exact(lam: float, counts: np.ndarray = counts) -> float:
            return float(counts @ fine._log_mgfs(lam))

        def stand_in(lam: float, counts: np.ndarray = counts) -> float:
            return float(counts @ aim._log_mgfs(lam))

        def tilted(lam: float, counts: np.ndarray = counts, n: int = n) -> float:
            return float(counts @ aim._log_mgfs(tilt + lam)) - float(k_tilt[n])

        # Untilted: weighted mass above hi <= budget; tilted: outside <= 1e-12 of the largest term
        # (nothing to hold for a term whose whole tilted mass is far below that).
        his.append(_edge(exact, mean, spread, log_budget - float(fine.log_weights[n]), +1, max_lam, stand_in))
        log_rel = math.log(1e-12) - float(log_share[n])
        if log_rel < math.log(1e-3):
            his[-1] = max(his[-1], _edge(tilted, mean, spread, log_rel, +1, max_lam))
            los.append(_edge(tilted, mean, spread, log_rel, -1, max_lam))
    return min(los), max(his), fine.term_counts @ firsts, fine.term_counts @ lasts


def compose_mixture(pieces: Sequence[DiscretePLD], counts: Sequence[Sequence[int]], log_weights: Sequence[float],
                    tail_mass: float, tilt: float, lowest_loss: float = math.inf, max_size: int = 1 << 24,
                    aim: Sequence[DiscretePLD] | None = None) -> ComposedPLD:
    """``sum_n e^{log_weights[n]} conv_p pieces[p]^{*counts[n][p]}`` (finite parts only), every term
    tilted by the same ``tilt``, by one FFT per piece and one inverse (module docstring).

    ``pieces``: distinct PLDs on one grid; every term composes the same number ``T`` of them
    (``sum_p counts[n][p]``); ``log_weights``: the terms' weights (e.g. log binomial coefficients);
    ``tail_mass``: the untilted weighted mass allowed above the window, all terms together (counted
    in ``missing_mass``); ``aim``: cheap stand-ins for ``pieces`` (same order) to search the window
    with (the untilted edge's Chernoff bound is evaluated with the exact pieces).  Raises
    ``MemoryError`` if the window needs more than ``max_size`` points.
    """
    h = pieces[0].interval
    count_matrix = np.asarray(counts, dtype=np.int64)
    terms, width = count_matrix.shape
    totals_per_term = count_matrix.sum(axis=1)
    if width != len(pieces) or np.any(count_matrix < 0) or np.any(totals_per_term != totals_per_term[0]):
        raise ValueError("counts must be an (m, len(pieces)) array of non-negative integers with equal row sums")
    total_steps = int(totals_per_term[0])
    weights_in = np.asarray(log_weights, dtype=float)
    fine = MixtureStack(pieces, count_matrix, weights_in)
    coarse = fine if aim is None else MixtureStack(aim, count_matrix, weights_in)
    max_lam = 1e300 / (_MAX_LOSS * max(total_steps, 1))
    lo, hi, support_lo, support_hi = _term_edges(fine, coarse, tilt, math.log(tail_mass / terms), max_lam)
    if lo < lowest_loss and tilt * (hi - lowest_loss) >= -math.log(tail_mass):
        # Tilted mass below the window reappears ``N h`` higher, untilted there by ``e^{-tilt (l + N h)}``
        # instead of ``e^{-tilt l}``: it overstates delta by at most ``e^{-tilt N h} <= tail_mass``
        # (true masses total <= 1), so the window need not hold it (delta is trusted from its start).
        lo = lowest_loss
    lo = max(min(lo, lowest_loss), float(np.min(support_lo)) * h)
    hi = min(hi, float(np.max(support_hi)) * h)
    missing = tail_mass / terms * int(np.sum(support_hi * h > hi))
    start = math.floor(lo / h)
    size = sp_fft.next_fast_len(max(math.ceil(hi / h) - start + 1, 16), real=True)
    if size > max_size:
        raise MemoryError(f"composed PLD window needs {size} points (> {max_size})")
    _, mean, variance = coarse.cumulants(0.0)

    # Tilted, normalised pieces and their spectra (pld's steps 1 and 6).
    weights_all, peaks, totals = fine._weights(tilt)
    weights_all /= totals[fine.member]
    piece_log_scale = peaks + np.log(totals)
    signals = np.bincount(fine.member.astype(np.int64) * size + fine.positions % size, weights=weights_all,
                          minlength=width * size).reshape(width, size)
    spectra = sp_fft.rfft(signals, axis=1)
    del signals
    gamma = fft_error_constant(size)
    l1 = np.add.reduceat(weights_all, fine.offsets) * (1 + size * _EPS)
    pointwise = gamma * l1  # e_p

    def moduli(rows: np.ndarray, which: slice) -> tuple[np.ndarray, np.ndarray]:
        """``|z^_pk|`` and ``M_pk = max(|z^_pk|, min(|z^_pk| + e_p, ||x_p||_1))`` of the spectra
        ``rows`` of the pieces ``which``."""
        modulus = np.abs(rows)
        return modulus, np.maximum(np.minimum(modulus + pointwise[which, None], l1[which, None]), modulus)

    # Term weights v_n = w_n / W and their error delta_n (step 1).
    log_w = weights_in + count_matrix @ piece_log_scale
    log_scale = float(np.max(log_w))
    log_v = log_w - log_scale
    magnitudes = np.abs(peaks) + np.abs(np.log(totals)) + 1.0
    delta_w = 8 * _EPS * (np.abs(weights_in) + count_matrix @ magnitudes + abs(log_scale) + 1.0)

    # Dropped frequencies (step 3), from the pieces every term raises to a power (the bulks).
    least = count_matrix.min(axis=0)
    slack = np.log(np.maximum(l1, 1.0))
    half = size // 2 + 1
    g = np.full(half, float(np.max((count_matrix - least) @ slack + log_v + delta_w)))
    for p in np.flatnonzero(least > 0):
        g += least[p] * np.log(moduli(spectra[p], slice(p, p + 1))[1][0])
    alive = np.flatnonzero(g >= math.log(_NEGLIGIBLE))
    # (Clipped at e^-700, above the true bound, to keep exp off its slow subnormal path.)
    spectral = terms * np.exp(np.maximum(g, -700.0))
    del g

    # Live frequencies: every term's product, its error bound (steps 1, 2, 4).
    z = spectra[:, alive]
    live_modulus, live_bound = moduli(z, slice(None))
    with np.errstate(divide="ignore"):
        # A zero |z^_pk| makes every product that uses it exactly 0: a finite stand-in keeps
        # ``0 * log 0`` out of the counts' sums and still underflows ``exp`` to 0 (when ``c_np >= 1``).
        live_log_modulus = np.where(live_modulus > 0, np.log(live_modulus), -1e4)
    live_log_bound = np.log(live_bound)
    ratio = pointwise[:, None] / live_bound  # e_p / M_pk
    phase = np.angle(z)
    del spectra, z
    magnitude_log = np.abs(live_log_modulus) + (math.pi + 1.0)
    cf = count_matrix.astype(float)
    total = np.zeros(alive.size, dtype=complex)
    absolute = np.zeros(alive.size)
    error = np.zeros(alive.size)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        for n in range(terms):
            c = cf[n]
            real = c @ live_log_modulus + log_v[n]
            term = np.exp(real + 1j * (c @ phase))
            size_n = np.abs(term)
            propagated = np.exp(c @ live_log_bound + log_v[n] + delta_w[n]) * (c @ ratio)
            exponent_error = 2 * _EPS * (1 + (width + 2) * _EPS) * (c @ magnitude_log + abs(log_v[n]) + 1.0) \
                + 4 * _EPS + delta_w[n]
            evaluation = np.where(size_n > 0, size_n * np.expm1(exponent_error) * np.exp(exponent_error), 0.0) + 2.0**-1000
            total += term
            absolute += size_n
            error += propagated + evaluation
        error += 1.01 * (terms - 1) * _EPS * absolute
    spectral[alive] = np.nan_to_num(error, nan=np.inf)
    full = np.zeros(half, dtype=complex)
    full[alive] = total
    masses = np.roll(sp_fft.irfft(full, n=size), -(start % size))
    modulus_sum = np.zeros(half)
    modulus_sum[alive] = np.abs(total)
    entry_error = (1 + 4 * _EPS) * (_spectrum_mean_full(spectral, size)
                                    + (gamma + _EPS) * _spectrum_mean_full(modulus_sum, size))
    relative = _EPS * (float(np.max(np.abs(peaks))) + 600.0 + 8.0)
    relative_error = math.expm1(min(total_steps * relative + 4 * _EPS * (abs(log_scale) + 8), 700.0))
    return ComposedPLD(h, start, masses, tilt, log_scale, 0.0, missing, entry_error, mean, variance, relative_error)
