"""Inverting the accountant: the least noise, or the most steps, that fit an epsilon target.

Both searches use epsilon's monotonicity (more noise -> less epsilon; more steps -> more) and keep
a bracket whose "safe" end always satisfies the target, so the answer returned is always feasible:

* :func:`calibrate_noise`: Brent's method (``scipy.optimize.brentq``) on ``log sigma`` locates the
  crossing to a relative ``1e-6``, then the result is nudged up until ``epsilon(result) <= target``
  is verified; it is within ``NOISE_RTOL`` (relative ``1e-5``) above the smallest feasible sigma.
* :func:`calibrate_noise_schedule`: the same for the scale ``s`` of a schedule ``sigma_t = s * profile_t``;
* :func:`max_steps`: exponential search from the CLT guess, then integer bisection; exact.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

from scipy import optimize

from fundp.accounting import _checks, gdp
from fundp.accounting._checks import UnreachableTargetError
from fundp.accounting.accountants import epsilon
from fundp.accounting.ledger import Ledger, accountant_step

__all__ = ["calibrate_noise", "calibrate_noise_schedule", "max_steps", "MAX_NOISE_MULTIPLIER", "NOISE_RTOL"]

#: The largest noise multiplier :func:`calibrate_noise` considers.
MAX_NOISE_MULTIPLIER = 1e4
#: The smallest: below it the losses exceed what the PRV grid represents.
MIN_NOISE_MULTIPLIER = 1e-2
#: ``calibrate_noise`` returns a sigma at most this much (relatively) above the exact smallest one.
NOISE_RTOL = 1e-5
#: ``max_steps`` searches no further than this.
MAX_STEPS = 1 << 40


def _base(ledger) -> Ledger:
    if ledger is None:
        return Ledger()
    if not isinstance(ledger, Ledger):
        raise TypeError(f"ledger must be a fundp.Ledger or None, got {type(ledger).__name__}")
    return ledger


def _gdp_mu(target: float, delta: float) -> float:
    """The ``mu`` whose ``mu``-GDP epsilon at ``delta`` is ``target`` (a starting guess only)."""
    high = 1.0
    while gdp.gaussian_epsilon(high, delta) < target and high < 1e6:
        high *= 2
    return optimize.brentq(lambda mu: gdp.gaussian_epsilon(mu, delta) - target, 1e-12, high, xtol=1e-9)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    *,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    ledger: Ledger | None = None,
) -> float:
    """The smallest noise multiplier ``sigma`` with ``epsilon <= target_epsilon`` at ``delta``.

    Accounts ``steps`` Poisson-subsampled Gaussian steps at ``sample_rate`` (on top of ``ledger``,
    if given).  Guaranteed: ``epsilon(result) <= target_epsilon`` (checked), and
    ``result <= sigma* (1 + NOISE_RTOL)`` for the exact smallest ``sigma*`` (up to the accountant's
    own 0.1% smoothness).  Raises :class:`UnreachableTargetError` if even ``sigma = 1e4`` overspends.

    Example:
      >>> import fundp
      >>> sigma = fundp.calibrate_noise(1.0, 1e-5, sample_rate=0.01, steps=100)
      >>> round(sigma, 2)
      0.9
      >>> ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=sigma, sample_rate=0.01, steps=100)
      >>> fundp.epsilon(ledger, 1e-5) <= 1.0
      True
    """
    target = _checks.epsilon(target_epsilon, "target_epsilon")
    delta = _checks.delta(delta)
    q = _checks.sample_rate(sample_rate)
    count = _checks.steps(steps)
    if count == 0:
        raise ValueError("steps must be >= 1 to calibrate a noise multiplier, got 0")
    accountant = _checks.accountant(accountant)
    base = _base(ledger)

    def spent(sigma: float) -> float:
        with warnings.catch_warnings():  # probes far from the answer may warn; the answer is what counts
            warnings.simplefilter("ignore")
            return epsilon(accountant_step(base, noise_multiplier=sigma, sample_rate=q, steps=count), delta, accountant=accountant)

    if spent(MAX_NOISE_MULTIPLIER) > target:
        raise UnreachableTargetError(
            f"target_epsilon={target:g} at delta={delta:g} is unreachable: even noise_multiplier="
            f"{MAX_NOISE_MULTIPLIER:g} spends {spent(MAX_NOISE_MULTIPLIER):.6g} over {count} steps at sample_rate={q:g}"
        )
    mu = _gdp_mu(target, delta)
    low = MIN_NOISE_MULTIPLIER
    if q == 1.0:
        # Without subsampling the T steps are the Gaussian mechanism composed T times, exactly
        # mu-GDP with mu = sqrt(T) / sigma: no accountant's epsilon is below that one's, so no
        # sigma below sqrt(T) / mu(target) meets the target.  Starting there also keeps the PRV
        # accountant off noise levels its grid cannot represent (sigma = 0.01 at q = 1 failed).
        low = min(max(low, math.sqrt(count) / mu / 1.001), MAX_NOISE_MULTIPLIER)
    if spent(low) <= target:
        return low
    # Bracket from the CLT guess: mu = q sqrt(T (e^{1/sigma^2} - 1))  =>  sigma = 1/sqrt(log1p(mu^2/(q^2 T))).
    guess = 1 / math.sqrt(math.log1p(mu * mu / (q * q * count)))
    # spent(low) > target >= spent(MAX), checked above.
    return _least_meeting(spent, target, guess, low, MAX_NOISE_MULTIPLIER)


def _least_meeting(spent: Callable[[float], float], target: float, guess: float, low: float, high: float) -> float:
    """The least ``x`` in ``[low, high]`` (to ``NOISE_RTOL``) with ``spent(x) <= target``, verified.

    Needs ``spent`` decreasing, ``spent(low) > target >= spent(high)``.  Brackets the crossing from
    ``guess`` by factors of 1.25, finds it by Brent's method in ``log x``, then steps up from the
    root until the target is verified (never past ``high``, which is known to satisfy it).
    """
    guess = min(max(guess, low), high)
    if spent(guess) > target:
        low = guess
        while low * 1.25 < high and spent(low * 1.25) > target:
            low *= 1.25
        high = min(high, low * 1.25)
    else:
        high = guess
        while high / 1.25 > low and spent(high / 1.25) <= target:
            high /= 1.25
        low = max(low, high / 1.25)
    root = optimize.brentq(lambda log_x: spent(math.exp(log_x)) - target, math.log(low), math.log(high),
                           xtol=1e-6, rtol=1e-12)
    # brentq's root is within 1e-6 (in log x) of the crossing, on either side.
    for k in range(8):
        candidate = math.exp(root) * (1 + NOISE_RTOL * 2.0 ** (k - 4))
        if candidate >= high:
            break
        if spent(candidate) <= target:
            return candidate
    return high


def max_steps(
    target_epsilon: float,
    delta: float,
    *,
    noise_multiplier: float,
    sample_rate: float,
    accountant: str = "prv",
    ledger: Ledger | None = None,
) -> int:
    """The largest number of steps with ``epsilon <= target_epsilon`` at ``delta`` (exact integer search).

    Raises :class:`UnreachableTargetError` if even one step (on top of ``ledger``) overspends.

    Example:
      >>> import fundp
      >>> n = fundp.max_steps(1.0, 1e-5, noise_multiplier=1.0, sample_rate=0.01)
      >>> def eps(steps):
      ...     ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, steps=steps)
      ...     return fundp.epsilon(ledger, 1e-5)
      >>> eps(n) <= 1.0 < eps(n + 1)
      True
    """
    target = _checks.epsilon(target_epsilon, "target_epsilon")
    delta = _checks.delta(delta)
    sigma = _checks.noise_multiplier(noise_multiplier)
    q = _checks.sample_rate(sample_rate)
    accountant = _checks.accountant(accountant)
    base = _base(ledger)

    def fits(steps: int) -> bool:
        ledger_after = accountant_step(base, noise_multiplier=sigma, sample_rate=q, steps=steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return epsilon(ledger_after, delta, accountant=accountant) <= target

    if not fits(1):
        raise UnreachableTargetError(
            f"target_epsilon={target:g} at delta={delta:g} is unreachable: one step at noise_multiplier="
            f"{sigma:g}, sample_rate={q:g} already spends more"
        )
    mu = _gdp_mu(target, delta)
    per_step = q * q * math.expm1(min(1 / sigma**2, 700.0))
    guess = int(min(max(mu * mu / per_step, 1), MAX_STEPS))
    low, high = 1, None  # invariant: fits(low), and not fits(high) once high is known
    if guess > 1:
        if fits(guess):
            low = guess
        else:  # the guess overshot: halve down to a feasible count
            high, candidate = guess, guess // 2
            while candidate > 1 and not fits(candidate):
                high, candidate = candidate, candidate // 2
            low = max(candidate, 1)
    while high is None:  # the guess undershot: double up to an infeasible count
        if low >= MAX_STEPS:
            return MAX_STEPS
        candidate = min(low * 2, MAX_STEPS)
        if fits(candidate):
            low = candidate
        else:
            high = candidate
    return _bisect(fits, low, high)


def _bisect(fits, low: int, high: int) -> int:
    """Largest ``n`` in ``[low, high)`` with ``fits(n)``, given ``fits(low)`` and not ``fits(high)``."""
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def _profile(noise_profile, steps) -> list[float]:
    if callable(noise_profile):
        if steps is None:
            raise ValueError("steps is required when noise_profile is a callable t -> relative noise")
        count = _checks.steps(steps)
        values = [noise_profile(t) for t in range(count)]
    else:
        if steps is not None:
            raise ValueError("steps is only for a callable noise_profile; a sequence gives one value per step")
        try:
            values = list(noise_profile)
        except TypeError:
            raise TypeError(
                f"noise_profile must be a sequence of relative noise multipliers or a callable, got {type(noise_profile).__name__}"
            ) from None
    if not values:
        raise ValueError("noise_profile must have at least one step")
    return [_checks.noise_multiplier(v, f"noise_profile[{t}]") for t, v in enumerate(values)]


def calibrate_noise_schedule(
    target_epsilon: float,
    delta: float,
    *,
    sample_rate: float,
    noise_profile,
    steps: int | None = None,
    accountant: str = "prv",
    ledger: Ledger | None = None,
) -> tuple[float, ...]:
    """Scales a noise *schedule shape* to meet an epsilon target: returns ``sigma_t = s * profile_t``.

    ``s`` is (to ``NOISE_RTOL``) the smallest scale for which the ledger of the steps
    ``(s * profile_t, sample_rate)``, composed on top of ``ledger`` if given, spends at most
    ``target_epsilon`` at ``delta`` (checked: the returned schedule meets the target).  Epsilon
    decreases as ``s`` grows, so the crossing is found by Brent's method on ``log s`` and then
    verified, as in :func:`calibrate_noise`.  Steps with equal relative noise form one ledger
    segment; a schedule of many distinct values is what the vectorised accountants are for.

    Args:
      target_epsilon: > 0.
      delta: in (0, 1).
      sample_rate: the Poisson sampling rate ``q`` of every step, in (0, 1].
      noise_profile: the relative noise of each step, a sequence (e.g. ``[1.0] * 50 + [0.8] * 50``)
        or a callable ``t -> relative noise`` for ``t = 0 .. steps - 1``; every value > 0.
      steps: the number of steps, only (and then required) for a callable profile.
      accountant: ``"prv"`` (default) or ``"rdp"`` (``"gdp_approx"`` works, but is not a bound).
      ledger: privacy already spent, or None.

    Returns:
      A tuple with one noise multiplier per step.

    Raises:
      UnreachableTargetError: if even the largest scale (``1e4 / min(profile)``) overspends.

    Example:
      >>> from fundp.accounting import Ledger, calibrate_noise_schedule, epsilon
      >>> sigmas = calibrate_noise_schedule(2.0, 1e-5, sample_rate=0.01,
      ...                                   noise_profile=[1.0] * 500 + [0.8] * 500)
      >>> round(sigmas[0] / sigmas[-1], 12), round(sigmas[0], 3)
      (1.25, 1.118)
      >>> epsilon(Ledger([(s, 0.01, 1) for s in sigmas]), 1e-5) <= 2.0
      True
    """
    target = _checks.epsilon(target_epsilon, "target_epsilon")
    delta = _checks.delta(delta)
    q = _checks.sample_rate(sample_rate)
    accountant = _checks.accountant(accountant)
    base = _base(ledger)
    profile = _profile(noise_profile, steps)
    counts: dict[float, int] = {}
    for value in profile:
        counts[value] = counts.get(value, 0) + 1
    runs = list(counts.items())

    def schedule_ledger(scale: float) -> Ledger:
        return Ledger(base.segments + tuple((scale * value, q, count) for value, count in runs), base.events)

    def spent(scale: float) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return epsilon(schedule_ledger(scale), delta, accountant=accountant)

    low_scale = MIN_NOISE_MULTIPLIER / min(counts)
    high_scale = MAX_NOISE_MULTIPLIER / min(counts)
    if spent(high_scale) > target:
        raise UnreachableTargetError(
            f"target_epsilon={target:g} at delta={delta:g} is unreachable: even the noise profile scaled to a "
            f"smallest noise_multiplier of {MAX_NOISE_MULTIPLIER:g} spends {spent(high_scale):.6g}"
        )
    # Start from the homogeneous calibration at the profile's root-mean-inverse-square level (the
    # CLT's effective sigma), then bracket by factors of 1.25.
    total = len(profile)
    level = math.fsum(count / value**2 for value, count in runs) / total
    try:
        guess = calibrate_noise(target, delta, sample_rate=q, steps=total, accountant="gdp_approx") * math.sqrt(level)
    except UnreachableTargetError:
        guess = high_scale
    if spent(low_scale) <= target:
        return tuple(low_scale * value for value in profile)
    scale = _least_meeting(spent, target, guess, low_scale, high_scale)
    return tuple(scale * value for value in profile)
