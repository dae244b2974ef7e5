"""Auditing in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

The multi-run audit of :mod:`fundp.audit` trains hundreds of times with and without one canary.
A one-run audit inserts ``m`` canaries into **one** run, each independently with probability 1/2
(``S_j`` uniform on {in, out}, drawn from a key), trains once, scores every canary, and guesses
membership for the ``r`` canaries it is surest of (the top-scored as "in", the bottom-scored as
"out", abstaining on the rest).  Let ``W`` be the number of correct guesses.

**The bound** (their Theorem 3.1 with the delta term of their Proposition 5.5 / appendix code).
If the training run is ``(epsilon, delta)``-DP with respect to adding or removing one canary,
then for every ``v``

    P[W >= v] <= f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i,

    f(u) = P[Binomial(r, p) >= u],   p = e^epsilon / (1 + e^epsilon),

i.e. the guesses are no better than ``r`` independent coin flips of an epsilon-DP randomized
response, up to the delta term.  Observing ``v`` correct guesses therefore rejects "the run is
``(epsilon, delta)``-DP" at confidence ``1 - alpha`` whenever that right-hand side is below
``alpha``; the audit reports the largest such epsilon (:func:`epsilon_lower_bound`).  A run that
is ``(epsilon, delta)``-DP is also ``(epsilon', delta)``-DP for every ``epsilon' > epsilon``, so
rejecting one epsilon rejects every smaller one: the reported value is a lower bound with
probability ``>= 1 - alpha``.  Choosing the number of guesses after seeing the scores is paid for
by a Bonferroni correction over the candidate counts (``alpha / len(guess_counts)``).

**What it can see.**  Even a perfect attack (every guess right) with ``m`` canaries cannot
report more than :func:`max_detectable_epsilon`; one-run audits of Gaussian DP-SGD are known to be
loose (the paper's section 7), so a bound *below* the accountant's epsilon is the expected outcome
for a correct implementation, and a bound *above* it proves a bug.

**DP-SGD with gradient canaries** (:class:`GradientCanaries`): canary ``j`` is a batch row whose
loss is ``scale * a_j`` for a dedicated audit parameter ``a`` (shape ``[m, 1]``, zero and unused by
the model), so its gradient is ``scale * e_j``: clipped to ``C`` by a correct step, and orthogonal
to every real example's gradient and to every other canary's.  Every step appends all ``m`` canary
rows; a row is real (``mask`` True) when the canary is in (``S_j``) and sampled for that step
(probability ``sample_rate``, from the step's key), padding otherwise — one fixed shape.  The score
of canary ``j`` is the sum over steps of the noisy gradient's coordinate ``j`` of ``a``; the
auditor sees every step's noisy gradient (the white-box threat model of DP-SGD's analysis).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import optree
import torch
import torch.nn.functional as F
from scipy import stats  # type: ignore[import-untyped]

from fundp import random as fundp_random
from fundp._validate import check_int, check_real

__all__ = [
    "GradientCanaries",
    "OneRunAuditResult",
    "audit_scores",
    "epsilon_lower_bound",
    "max_detectable_epsilon",
    "p_value",
]


def _check_counts(canaries: Any, guesses: Any, correct: Any) -> tuple[int, int, int]:
    m = check_int("canaries", canaries, minimum=1)
    r = check_int("guesses", guesses, minimum=0, maximum=m)
    v = check_int("correct", correct, minimum=0, maximum=r)
    return m, r, v


def _check_delta(value: Any) -> float:
    delta = check_real("delta", value)
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    return delta


def _check_confidence(value: Any) -> float:
    confidence = check_real("confidence", value)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return confidence


def p_value(canaries: int, guesses: int, correct: int, *, epsilon: float, delta: float) -> float:
    """Upper bound on ``P[W >= correct]`` for an ``(epsilon, delta)``-DP run (the module's bound).

    ``canaries`` = m, ``guesses`` = r (non-abstaining guesses), ``correct`` = v.  Returns
    ``min(1, f(v) + 2 m delta max_{1<=i<=v} (f(v-i) - f(v)) / i)`` with
    ``f(u) = P[Binomial(r, e^eps / (1 + e^eps)) >= u]``.

    Example:
      >>> from fundp.one_run_audit import p_value
      >>> round(p_value(10, 10, 10, epsilon=0.0, delta=0.0), 6) == round(0.5 ** 10, 6)
      True
    """
    m, r, v = _check_counts(canaries, guesses, correct)
    epsilon = check_real("epsilon", epsilon)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    delta = _check_delta(delta)
    p = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, p))  # f(v) = P[Binomial(r, p) >= v]
    if v == 0 or delta == 0:
        return min(tail, 1.0)
    # f(v - i) - f(v) = P[v - i <= Binomial < v] = sum_{u = v-i}^{v-1} pmf(u), i = 1..v
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))
    slope = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * slope, 1.0)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, *, delta: float, confidence: float = 0.95,
                        tests: int = 1) -> float:
    """The largest epsilon that ``correct`` right guesses out of ``guesses`` reject at ``confidence``.

    Returns ``sup {epsilon : p_value(epsilon) < alpha / tests}`` found by bisection that keeps
    ``p_value(lo) < alpha / tests`` (so the returned value is itself rejected), ``alpha = 1 -
    confidence``; 0 when even epsilon = 0 is not rejected.  ``tests`` is the number of guess counts
    tried on the same scores (Bonferroni).

    Example (a perfect attack, delta = 0: ``p^r = alpha`` in closed form):
      >>> import math
      >>> from fundp.one_run_audit import epsilon_lower_bound
      >>> eps = epsilon_lower_bound(100, 100, 100, delta=0.0, confidence=0.95)
      >>> round(eps, 4) == round(-math.log(0.05 ** (-1 / 100) - 1), 4)
      True
    """
    m, r, v = _check_counts(canaries, guesses, correct)
    delta = _check_delta(delta)
    alpha = (1 - _check_confidence(confidence)) / check_int("tests", tests, minimum=1)

    def rejected(epsilon: float) -> bool:
        return p_value(m, r, v, epsilon=epsilon, delta=delta) < alpha

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # v = r with delta = 0 never stops rejecting only as r -> infinity
            return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_detectable_epsilon(canaries: int, *, delta: float, confidence: float = 0.95,
                           guess_counts: Sequence[int] | None = None) -> float:
    """The most a one-run audit with ``canaries`` canaries can report: every guess right.

    The maximum over the candidate guess counts ``r`` of ``epsilon_lower_bound(m, r, r)`` with
    the same Bonferroni correction the audit pays.  When it is below the epsilon you claim, the
    audit cannot detect a violation of the claim, however broken the run is: add canaries.

    Example:
      >>> from fundp.one_run_audit import max_detectable_epsilon
      >>> round(max_detectable_epsilon(1000, delta=1e-5, guess_counts=[1000]), 2)
      5.78
    """
    m = check_int("canaries", canaries, minimum=1)
    counts = _guess_counts(m, guess_counts)
    return max(epsilon_lower_bound(m, r, r, delta=delta, confidence=confidence, tests=len(counts)) for r in counts)


def _guess_counts(m: int, guess_counts: Sequence[int] | None) -> list[int]:
    if guess_counts is None:
        counts = sorted({max(1, round(m * f)) for f in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)})
    else:
        counts = [check_int("guess_counts", r, minimum=1, maximum=m) for r in guess_counts]
        if not counts:
            raise ValueError("guess_counts must not be empty")
    return counts


class OneRunAuditResult(NamedTuple):
    """The outcome of :func:`audit_scores`.

    Attributes:
      epsilon_lower_bound: with probability >= ``confidence`` the run is not ``(eps, delta)``-DP
        for any smaller eps (Bonferroni-corrected over the guess counts tried).
      confidence: ``1 - alpha``.
      canaries: m.
      guesses: r, the guess count that gave the bound (half "in", half "out").
      correct: v, right guesses among them.
      max_detectable_epsilon: the bound a perfect attack would give with these canaries and
        guess counts (:func:`max_detectable_epsilon`).

    Example:
      >>> from fundp.one_run_audit import audit_scores
      >>> result = audit_scores([1.0, 0.0] * 50, [True, False] * 50, delta=0.0)
      >>> result.guesses == result.correct == 100, result.epsilon_lower_bound == result.max_detectable_epsilon
      (True, True)
    """

    epsilon_lower_bound: float
    confidence: float
    canaries: int
    guesses: int
    correct: int
    max_detectable_epsilon: float


def audit_scores(scores: Any, included: Any, *, delta: float, confidence: float = 0.95,
                 guess_counts: Sequence[int] | None = None) -> OneRunAuditResult:
    """Epsilon lower bound from one run's canary scores (higher score = "canary was in").

    ``scores``: ``[m]`` finite scores; ``included``: ``[m]`` bools, the canaries' true membership
    ``S``.  For each guess count ``r`` in ``guess_counts`` (default: 2%, 5%, 10%, 20%, 50% and
    100% of ``m``) the attack guesses "in" for the ``ceil(r/2)`` highest scores and "out" for the
    ``floor(r/2)`` lowest, counts the right guesses ``v`` and computes the bound at
    ``alpha / len(guess_counts)``; the largest bound is reported.

    Example:
      >>> from fundp.one_run_audit import audit_scores
      >>> audit_scores([0.0] * 100, [True, False] * 50, delta=1e-5).epsilon_lower_bound  # ties: no signal
      0.0
    """
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    scores_t = torch.as_tensor(scores, dtype=torch.float64).flatten()
    included_t = torch.as_tensor(included).flatten()
    if included_t.dtype != torch.bool:
        raise TypeError(f"included must be booleans, got {included_t.dtype}")
    m = scores_t.numel()
    if m == 0 or included_t.numel() != m:
        raise ValueError(f"scores and included must be non-empty and of one length, got {m} and {included_t.numel()}")
    if not torch.isfinite(scores_t).all():
        raise ValueError("scores must be finite")
    counts = _guess_counts(m, guess_counts)
    # A stable sort on (score, index) orders ties by index, which is independent of S: tied
    # scores give coin-flip guesses, never a spurious signal.
    order = torch.sort(scores_t, stable=True).indices
    best = (0.0, counts[0], 0)
    for r in counts:
        top, bottom = (r + 1) // 2, r // 2
        right = int(included_t[order[m - top:]].sum()) + int((~included_t[order[:bottom]]).sum())
        bound = epsilon_lower_bound(m, r, right, delta=delta, confidence=confidence, tests=len(counts))
        if bound > best[0] or (bound == best[0] and r == counts[0]):
            best = (bound, r, right)
    return OneRunAuditResult(
        epsilon_lower_bound=best[0],
        confidence=confidence,
        canaries=m,
        guesses=best[1],
        correct=best[2],
        max_detectable_epsilon=max_detectable_epsilon(m, delta=delta, confidence=confidence, guess_counts=counts),
    )


class GradientCanaries:
    """``m`` gradient canaries for a one-run audit of a ``dp_step`` (see the module docstring).

    ``included``: ``BoolTensor[m]``, canary ``j`` is in the run with probability 1/2, drawn from
    ``key``.  Use :meth:`loss_fn` to wrap the model's loss, :meth:`params` to add the audit
    parameter, :meth:`batch` to append the canary rows to each step's batch and mask, and
    :meth:`scores` on the noisy gradients of every step.  Each canary's gradient has norm
    ``scale``; pass the step's ``max_norm`` to be warned (:class:`fundp.audit.CanaryTooWeakWarning`)
    when ``scale < max_norm``, where the canaries cannot reach the sensitivity.

    Example:
      >>> import torch, fundp
      >>> from fundp.one_run_audit import GradientCanaries
      >>> canaries = GradientCanaries(4, key=fundp.random.key(0))
      >>> loss_fn = canaries.loss_fn(lambda p, b: (b["x"] @ p["w"]) ** 2)
      >>> params = canaries.params({"w": torch.zeros(2)})
      >>> batch, mask = canaries.batch({"x": torch.ones(3, 2)}, torch.ones(3, dtype=torch.bool),
      ...                              key=fundp.random.key(1), sample_rate=1.0)
      >>> mask.tolist()[3:] == canaries.included.tolist(), batch["canary"].tolist()
      (True, [-1, -1, -1, 0, 1, 2, 3])
    """

    def __init__(self, canaries: int, *, key: torch.Tensor, scale: float = 1e3, max_norm: float | None = None) -> None:
        self.canaries = check_int("canaries", canaries, minimum=1)
        self.scale = check_real("scale", scale)
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if max_norm is not None and self.scale < check_real("max_norm", max_norm):
            from fundp.audit import CanaryTooWeakWarning

            warnings.warn(
                f"each canary's gradient has norm scale={self.scale:g}, below the clipping norm max_norm="
                f"{max_norm:g}: a canary then moves the output by less than the sensitivity, so the audit cannot "
                "detect the claimed guarantee. Use scale >= max_norm",
                CanaryTooWeakWarning,
                stacklevel=2,
            )
        self.included = fundp_random.uniform(key, (self.canaries,), dtype=torch.float64) < 0.5

    def params(self, params: Any) -> dict[str, Any]:
        """``{"model": params, "canary": zeros[m, 1]}`` (float64 unless params are all of one float dtype)."""
        dtypes = {leaf.dtype for leaf in optree.tree_leaves(params)}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
        return {"model": params, "canary": torch.zeros(self.canaries, 1, dtype=dtype)}

    def loss_fn(self, loss_fn: Callable[[Any, Any], torch.Tensor]) -> Callable[[Any, Any], torch.Tensor]:
        """Wraps ``loss_fn(params, batch) -> [B]`` for the batches of :meth:`batch`.

        Row ``i`` with ``batch["canary"][i] = j >= 0`` has loss ``scale * a_j`` (gradient
        ``scale * e_j`` on the audit parameter, nothing on the model); a row with ``-1`` has the
        model's loss (nothing on ``a``).  ``torch.where`` selects, so the unselected branch gets
        an exactly-zero gradient.
        """

        def audited_loss(params: Any, batch: Any) -> torch.Tensor:
            ids = batch["canary"]
            is_canary = ids >= 0
            model_loss = loss_fn(params["model"], batch["data"])
            canary_loss = self.scale * F.embedding(ids.clamp(min=0), params["canary"]).squeeze(-1)
            return torch.where(is_canary, canary_loss.to(model_loss.dtype), model_loss)

        return audited_loss

    def batch(self, batch: Any, mask: torch.Tensor, *, key: torch.Tensor, sample_rate: float) -> tuple[dict[str, Any], torch.Tensor]:
        """Appends the ``m`` canary rows to ``batch`` (copies of row 0, never read) and to ``mask``.

        A canary row is real when the canary is in and it is sampled for this step: independently
        with probability ``sample_rate``, drawn from ``key`` (use a fresh key per step, e.g.
        ``fold_in(key, step)``).  Returns ``({"data": batch, "canary": LongTensor[B + m]}, mask)``.
        """
        rate = check_real("sample_rate", sample_rate)
        if not 0 < rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {rate}")
        rows = mask.shape[0]
        sampled = fundp_random.uniform(key, (self.canaries,), dtype=torch.float64) < rate
        data = optree.tree_map(lambda leaf: torch.cat([leaf, leaf[:1].expand(self.canaries, *leaf.shape[1:])]), batch)
        ids = torch.cat([torch.full((rows,), -1, dtype=torch.long), torch.arange(self.canaries)])
        return {"data": data, "canary": ids}, torch.cat([mask, self.included & sampled])

    def scores(self, noisy_grads: Sequence[Any]) -> torch.Tensor:
        """``[m]`` scores: the sum over steps of each canary's coordinate of the noisy gradient."""
        if len(noisy_grads) == 0:
            raise ValueError("noisy_grads must hold at least one step's gradients")
        return torch.stack([grads["canary"].reshape(-1).to(torch.float64) for grads in noisy_grads]).sum(0)

    def audit(self, noisy_grads: Sequence[Any], *, delta: float, confidence: float = 0.95,
              guess_counts: Sequence[int] | None = None) -> OneRunAuditResult:
        """:func:`audit_scores` of :meth:`scores` against :attr:`included`."""
        return audit_scores(self.scores(noisy_grads), self.included, delta=delta, confidence=confidence,
                            guess_counts=guess_counts)
