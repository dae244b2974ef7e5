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

:func:`audit_dp_step` audits a ``dp_step`` directly with a gradient canary: one trial runs the
step on ``batch`` plus the canary row (real, or masked out for the "without" runs: the same
shapes either way) and scores the output by its projection on the canary's clipped gradient.
A correct step yields ``epsilon_lb`` below the accountant's epsilon; a step whose clipping or
noise is broken yields a larger one — which is the point of an audit.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import optree
import torch
from scipy import stats

from fundp import random as fundp_random
from fundp._validate import check_number
from fundp.grads import per_sample_grads

__all__ = ["AuditResult", "clopper_pearson_upper", "epsilon_lower_bound", "audit_dp_step"]


class AuditResult(NamedTuple):
    epsilon_lower_bound: float
    """With probability >= ``confidence`` the mechanism is not DP for any smaller epsilon."""
    confidence: float
    threshold: float
    false_positive_rate: float
    false_negative_rate: float
    trials: int


def clopper_pearson_upper(failures: int, trials: int, alpha: float) -> float:
    """Exact one-sided upper bound on a binomial rate at confidence ``1 - alpha``."""
    if trials <= 0:
        raise ValueError(f"trials must be > 0, got {trials}")
    if failures >= trials:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, failures + 1, trials - failures))


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


def epsilon_lower_bound(scores_in: Any, scores_out: Any, *, delta: float, confidence: float = 0.95) -> AuditResult:
    """Lower bound on epsilon from membership scores (higher score = "canary was in").

    ``scores_in[j]`` / ``scores_out[j]`` are the scores of independent runs with / without the
    canary.  The first half of each picks the threshold, the second half yields the bound.
    """
    delta = check_number("delta", delta)
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0 < check_number("confidence", confidence) < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
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

    def bound(candidate_in, candidate_out, threshold):
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
) -> AuditResult:
    """Audits one ``dp_step`` with a gradient canary over ``trials`` runs with and ``trials`` without.

    ``canary`` is a batch of one example (same pytree structure as ``batch``).  Every run uses
    the batch plus the canary row, real in "with" runs and masked out in "without" runs, and a
    fresh key.  The score of a run is ``<grads, u>`` with ``u`` the unit direction of the
    canary's gradient at ``params``.  Compare the result with ``fundp.epsilon`` of one step at
    the step's noise multiplier and ``sample_rate=1``.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 8:
        raise ValueError(f"trials must be an int >= 8, got {trials!r}")
    direction = _flat(optree.tree_map(lambda g: g[0], per_sample_grads(loss_fn)(params, canary)))
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the canary's gradient must be finite and non-zero at params")
    direction = direction / norm
    combined = _concat(batch, canary)
    rows = optree.tree_leaves(combined)[0].shape[0]
    with_canary = torch.ones(rows, dtype=torch.bool)
    without_canary = with_canary.clone()
    without_canary[-1] = False
    scores = {True: [], False: []}
    for trial in range(trials):
        for included, mask in ((True, with_canary), (False, without_canary)):
            run_key = fundp_random.fold_in(fundp_random.fold_in(key, trial), int(included))
            out = step(params, combined, run_key, mask=mask)
            scores[included].append(float(_flat(out.grads) @ direction))
    return epsilon_lower_bound(scores[True], scores[False], delta=delta, confidence=confidence)
