"""Empirical privacy auditing: a statistical lower bound on epsilon from membership tests.

An ``(epsilon, delta)``-DP mechanism bounds every membership test: for any decision rule with
false-positive rate FPR and false-negative rate FNR between neighbouring inputs,

    1 - FNR <= e^epsilon * FPR + delta   and   1 - FPR <= e^epsilon * FNR + delta

(Kairouz et al. 2015).  Running the mechanism many times with and without a *canary* and
scoring each output gives empirical rates; with Clopper-Pearson upper bounds ``FPR_u, FNR_u``
at confidence ``1 - alpha`` (``alpha / 2`` each),

    epsilon_lb = max(log((1 - delta - FNR_u) / FPR_u), log((1 - delta - FPR_u) / FNR_u))

holds with probability >= ``1 - alpha`` (Jagielski et al. 2020; Nasr et al. 2021).  The threshold
is chosen on one half of the trials and the rates measured on the other half, so choosing it
does not bias the bound.

A finite number of trials caps what an audit can show.  Even a perfect attack (no false
positive among ``n_out`` measured "without" runs, no false negative among ``n_in`` "with" runs)
only bounds the rates by ``p_out = 1 - (alpha/2)^(1/n_out)`` and ``p_in = 1 - (alpha/2)^(1/n_in)``
(Clopper-Pearson with zero failures), so no audit of that size can report more than

    epsilon_max = max(log((1 - delta - p_in) / p_out), log((1 - delta - p_out) / p_in)).

:class:`AuditResult` reports it as ``max_detectable_epsilon``: an audit "passing" below an
accountant's epsilon says nothing when ``max_detectable_epsilon`` is below that epsilon too.
:func:`trials_needed` inverts it.

:func:`audit_dp_step` audits a ``dp_step`` directly with a gradient canary: one trial runs the
step on ``batch`` plus the canary row (real, or masked out for the "without" runs: the same
shapes either way) and scores the output by its projection on the canary's clipped gradient.
A correct step yields ``epsilon_lb`` below the accountant's epsilon; a step whose clipping or
noise is broken yields a larger one — which is the point of an audit.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple

import optree
import torch
from scipy import stats  # type: ignore[import-untyped]

from fundp import random as fundp_random
from fundp._validate import check_int, check_real
from fundp.grads import per_sample_grads

__all__ = ["AuditResult", "CanaryTooWeakWarning", "clopper_pearson_upper", "epsilon_lower_bound", "max_detectable_epsilon", "trials_needed", "audit_dp_step"]


class CanaryTooWeakWarning(UserWarning):
    """The audit's canary cannot move the output by the clipping norm, so it cannot detect a
    violation of the claimed sensitivity."""


class AuditResult(NamedTuple):
    """The outcome of an audit (:func:`epsilon_lower_bound`, :func:`audit_dp_step`).

    Attributes:
      epsilon_lower_bound: with probability >= ``confidence`` the mechanism is not
        ``(epsilon, delta)``-DP for any smaller epsilon.  0 when the trials show nothing.
      confidence: ``1 - alpha``, the probability that the bound holds.
      threshold: the score threshold (chosen on the first half of the trials).
      false_positive_rate: measured on the second half of the "without" runs.
      false_negative_rate: measured on the second half of the "with" runs.
      trials: total number of runs, with and without the canary.
      max_detectable_epsilon: the largest ``epsilon_lower_bound`` this many trials can give at
        this confidence and delta: the bound of a perfectly separating attack (no false positive
        or negative in the measured halves).  When it is below the epsilon you claim, the audit
        cannot detect a violation of the claim however broken the mechanism is: run more trials
        (:func:`trials_needed`).

    Example:
      >>> from fundp.audit import epsilon_lower_bound
      >>> result = epsilon_lower_bound([1.0] * 100, [0.0] * 100, delta=1e-5)
      >>> result.trials, result.false_positive_rate, result.false_negative_rate, result.confidence
      (200, 0.0, 0.0, 0.95)
    """

    epsilon_lower_bound: float
    confidence: float
    threshold: float
    false_positive_rate: float
    false_negative_rate: float
    trials: int
    max_detectable_epsilon: float


def clopper_pearson_upper(failures: int, trials: int, alpha: float) -> float:
    """Exact one-sided upper bound on a binomial rate at confidence ``1 - alpha``.

    With 0 failures it is ``1 - alpha^(1/trials)``.

    Example:
      >>> from fundp.audit import clopper_pearson_upper
      >>> round(clopper_pearson_upper(0, 100, 0.05), 6), round(1 - 0.05 ** (1 / 100), 6)
      (0.029513, 0.029513)
    """
    trials = check_int("trials", trials, minimum=1)
    failures = check_int("failures", failures, minimum=0, maximum=trials)
    alpha = _check_open_unit("alpha", alpha)
    if failures == trials:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, failures + 1, trials - failures))


def _check_open_unit(name: str, value: Any) -> float:
    number = check_real(name, value)
    if not 0 < number < 1:
        raise ValueError(f"{name} must be in (0, 1), got {number}")
    return number


def _check_audit_delta(value: Any) -> float:
    delta = check_real("delta", value)
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    return delta


def _epsilon_from_rates(fpr: float, fnr: float, delta: float) -> float:
    best = 0.0
    for rate_a, rate_b in ((fnr, fpr), (fpr, fnr)):
        numerator = 1 - delta - rate_a
        if numerator > 0 and rate_b > 0:
            best = max(best, math.log(numerator / rate_b))
    return best


def _rates(scores_in: torch.Tensor, scores_out: torch.Tensor, threshold: float) -> tuple[int, int]:
    false_negatives = int((scores_in < threshold).sum())
    false_positives = int((scores_out >= threshold).sum())
    return false_positives, false_negatives


def max_detectable_epsilon(trials_in: int, trials_out: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon lower bound ``trials_in`` "with" and ``trials_out`` "without" measured runs can give.

    That of a perfect attack: 0 false negatives and 0 false positives, whose Clopper-Pearson upper
    bounds at ``alpha / 2`` each are ``p_in = 1 - (alpha/2)^(1/trials_in)`` and
    ``p_out = 1 - (alpha/2)^(1/trials_out)``; the result is
    ``max(log((1 - delta - p_in) / p_out), log((1 - delta - p_out) / p_in))`` (0 if negative).
    The counts are those of the *measured* halves (:func:`epsilon_lower_bound` measures on the
    second half of each list of scores).

    Example:
      >>> from fundp.audit import max_detectable_epsilon
      >>> round(max_detectable_epsilon(300, 300, delta=1e-5), 3)
      4.392
    """
    trials_in = check_int("trials_in", trials_in, minimum=1)
    trials_out = check_int("trials_out", trials_out, minimum=1)
    delta = _check_audit_delta(delta)
    alpha = 1 - _check_open_unit("confidence", confidence)
    return _epsilon_from_rates(
        clopper_pearson_upper(0, trials_out, alpha / 2), clopper_pearson_upper(0, trials_in, alpha / 2), delta
    )


def trials_needed(epsilon: float, *, delta: float, confidence: float = 0.95) -> int:
    """The smallest number of runs *per side* for which :func:`audit_dp_step` can detect ``epsilon``.

    Returns ``trials`` such that an audit with ``trials`` runs with and ``trials`` without the
    canary (half of each measured) has ``max_detectable_epsilon > epsilon``: the measured half
    ``n`` needs ``p = 1 - (alpha/2)^(1/n) < (1 - delta) / (1 + e^epsilon)``, i.e.
    ``n > log(alpha/2) / log(1 - (1 - delta) / (1 + e^epsilon))``.  Only then can an audit that
    reports no violation of a claimed ``epsilon`` mean anything.

    Example:
      >>> from fundp.audit import trials_needed, max_detectable_epsilon
      >>> n = trials_needed(2.0, delta=1e-5)
      >>> n, max_detectable_epsilon(n - n // 2, n - n // 2, delta=1e-5) > 2.0
      (59, True)
    """
    epsilon = check_real("epsilon", epsilon)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    delta = _check_audit_delta(delta)
    alpha = 1 - _check_open_unit("confidence", confidence)
    rate = (1 - delta) / (1 + math.exp(epsilon))
    measured = math.floor(math.log(alpha / 2) / math.log1p(-rate)) + 1
    while max_detectable_epsilon(measured, measured, delta=delta, confidence=1 - alpha) <= epsilon:
        measured += 1  # guards the floating-point edge of the closed form
    return max(2 * measured - 1, 8)


def epsilon_lower_bound(scores_in: Any, scores_out: Any, *, delta: float, confidence: float = 0.95) -> AuditResult:
    """Lower bound on epsilon from membership scores (higher score = "canary was in").

    ``scores_in[j]`` / ``scores_out[j]`` are the scores of independent runs with / without the
    canary.  The first half of each picks the threshold, the second half yields the bound.

    Example:
      >>> from fundp.audit import epsilon_lower_bound
      >>> result = epsilon_lower_bound([1.0] * 100, [0.0] * 100, delta=1e-5)  # perfectly separated
      >>> result.epsilon_lower_bound == result.max_detectable_epsilon, round(result.max_detectable_epsilon, 2)
      (True, 2.57)
    """
    delta = _check_audit_delta(delta)
    confidence = _check_open_unit("confidence", confidence)
    scores_in = torch.as_tensor(scores_in, dtype=torch.float64).flatten()
    scores_out = torch.as_tensor(scores_out, dtype=torch.float64).flatten()
    if min(scores_in.numel(), scores_out.numel()) < 4:
        raise ValueError("need at least 4 runs with and 4 without the canary")
    if not (torch.isfinite(scores_in).all() and torch.isfinite(scores_out).all()):
        raise ValueError("scores must be finite")
    alpha = 1 - confidence
    half_in, half_out = scores_in.numel() // 2, scores_out.numel() // 2
    pick_in, test_in = scores_in[:half_in], scores_in[half_in:]
    pick_out, test_out = scores_out[:half_out], scores_out[half_out:]

    def bound(candidate_in: torch.Tensor, candidate_out: torch.Tensor, threshold: float) -> float:
        fp, fn = _rates(candidate_in, candidate_out, threshold)
        fpr_u = clopper_pearson_upper(fp, candidate_out.numel(), alpha / 2)
        fnr_u = clopper_pearson_upper(fn, candidate_in.numel(), alpha / 2)
        return _epsilon_from_rates(fpr_u, fnr_u, delta)

    candidates = torch.cat([pick_in, pick_out]).unique().tolist()
    threshold = max(candidates, key=lambda t: bound(pick_in, pick_out, t))
    fp, fn = _rates(test_in, test_out, threshold)
    return AuditResult(
        epsilon_lower_bound=bound(test_in, test_out, threshold),
        confidence=confidence,
        threshold=float(threshold),
        false_positive_rate=fp / test_out.numel(),
        false_negative_rate=fn / test_in.numel(),
        trials=scores_in.numel() + scores_out.numel(),
        max_detectable_epsilon=max_detectable_epsilon(test_in.numel(), test_out.numel(), delta=delta, confidence=confidence),
    )


def _concat(batch: Any, canary: Any) -> Any:
    return optree.tree_map(lambda b, c: torch.cat([b, c.to(b.dtype)]), batch, canary)


def _flat(tree: Any) -> torch.Tensor:
    return torch.cat([leaf.reshape(-1).to(torch.float64) for leaf in optree.tree_leaves(tree)])


def audit_dp_step(
    step: Callable,
    loss_fn: Callable,
    params: Any,
    batch: Any,
    canary: Any,
    *,
    trials: int,
    key: torch.Tensor,
    delta: float,
    confidence: float = 0.95,
    max_norm: float | None = None,
) -> AuditResult:
    """Audits one ``dp_step`` with a gradient canary over ``trials`` runs with and ``trials`` without.

    ``canary`` is a batch of one example (same pytree structure as ``batch``).  Every run uses
    the batch plus the canary row, real in "with" runs and masked out in "without" runs, and a
    fresh key.  The score of a run is ``<grads, u>`` with ``u`` the unit direction of the
    canary's gradient at ``params``.  Compare the result with ``fundp.epsilon`` of one step at
    the step's noise multiplier and ``sample_rate=1``, and check that ``max_detectable_epsilon``
    exceeds that epsilon (else the audit is too small to detect a violation: see
    :func:`trials_needed`).

    ``max_norm``: the step's clipping norm ``C`` (default: ``step.max_norm`` when the step
    records one).  A canary whose gradient norm is below ``C`` moves the output by less than
    the sensitivity the guarantee is about, so the audit cannot detect a mechanism that
    under-noises for ``C``: a :class:`CanaryTooWeakWarning` says so (use a canary whose loss
    gradient has norm ``>= C``, e.g. a large target).

    Example:
      >>> import torch, fundp
      >>> loss_fn = lambda p, b: (b["x"] @ p["w"] - b["y"]) ** 2
      >>> step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=2.0, expected_batch_size=3)
      >>> batch = {"x": torch.eye(2), "y": torch.zeros(2)}
      >>> canary = {"x": torch.tensor([[1.0, 0.0]]), "y": torch.tensor([5.0])}
      >>> result = fundp.audit.audit_dp_step(step, loss_fn, {"w": torch.zeros(2)}, batch, canary,
      ...                                    trials=8, key=fundp.random.key(0), delta=1e-5)
      >>> result.trials, round(result.max_detectable_epsilon, 3)
      (16, 0.0)
    """
    trials = check_int("trials", trials, minimum=8)
    direction = _flat(optree.tree_map(lambda g: g[0], per_sample_grads(loss_fn)(params, canary)))
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the canary's gradient must be finite and non-zero at params")
    threshold = getattr(step, "max_norm", None) if max_norm is None else max_norm
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and float(norm) < threshold:
        warnings.warn(
            f"the canary's gradient has norm {float(norm):.3g}, below the clipping norm max_norm={threshold:g} "
            f"({float(norm) / threshold:.2%} of it): one example can move the output by max_norm, this canary "
            "moves it less, so the audit cannot detect the claimed sensitivity (its bound is "
            "meaningless for it). Use a canary whose gradient norm is at least max_norm",
            CanaryTooWeakWarning,
            stacklevel=2,
        )
    direction = direction / norm
    combined = _concat(batch, canary)
    rows = optree.tree_leaves(combined)[0].shape[0]
    with_canary = torch.ones(rows, dtype=torch.bool)
    without_canary = with_canary.clone()
    without_canary[-1] = False
    scores: dict[bool, list[float]] = {True: [], False: []}
    for trial in range(trials):
        for included, mask in ((True, with_canary), (False, without_canary)):
            run_key = fundp_random.fold_in(fundp_random.fold_in(key, trial), int(included))
            out = step(params, combined, run_key, mask=mask)
            scores[included].append(float(_flat(out.grads) @ direction))
    return epsilon_lower_bound(scores[True], scores[False], delta=delta, confidence=confidence)
