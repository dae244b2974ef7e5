"""Budget enforcement: refuse a step that would push epsilon past a budget.

``spend`` is ``accountant_step`` with a guard: it returns the new ledger only if its epsilon stays
within the budget, and otherwise raises :class:`BudgetExceededError` *before* anything is
computed on the data, so an over-budget step never touches it.  ``dp_step(..., budget=...)``
calls it at the start of every step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from fundp._validate import check_delta, check_positive

__all__ = ["Budget", "BudgetExceededError", "spend"]


class Budget(NamedTuple):
    """A privacy budget: ``epsilon`` at ``delta``, measured with ``accountant``.

    ``accountant`` must be an upper bound, ``"prv"`` (default) or ``"rdp"``; ``"gdp_approx"`` is
    refused with a ``ValueError`` naming ``budget.accountant`` when the budget is used.

    Example:
      >>> import fundp
      >>> fundp.Budget(3.0, 1e-5)
      Budget(epsilon=3.0, delta=1e-05, accountant='prv')
    """

    epsilon: float
    delta: float
    accountant: str = "prv"


class BudgetExceededError(RuntimeError):
    """The next step would spend more than the budget; nothing was computed or spent.

    Example:
      >>> import fundp
      >>> error = fundp.BudgetExceededError(0.9, 1.2, fundp.Budget(1.0, 1e-5))
      >>> error.spent, error.would_spend, isinstance(error, RuntimeError)
      (0.9, 1.2, True)
    """

    def __init__(self, spent: float, would_spend: float, budget: Budget):
        self.spent, self.would_spend, self.budget = spent, would_spend, budget
        super().__init__(
            f"privacy budget exhausted: epsilon spent so far is {spent:.6g}; the next step would "
            f"bring it to {would_spend:.6g} > budget {budget.epsilon:.6g} at delta={budget.delta:g} "
            f"({budget.accountant} accountant). The step was not taken."
        )


def _as_budget(budget: Any) -> Budget:
    """Validates ``budget`` (a :class:`Budget` or an ``(epsilon, delta[, accountant])`` tuple).

    The accountant must be an upper bound (``"prv"`` or ``"rdp"``): a budget enforced with an
    estimate (``"gdp_approx"``, the CLT approximation, which can sit below the true epsilon) would
    let the true spend pass the budget.
    """
    from fundp.accounting._checks import ACCOUNTANTS, BOUND_ACCOUNTANTS

    if not isinstance(budget, Budget):
        if not isinstance(budget, (tuple, list)) or len(budget) not in (2, 3):
            raise TypeError("budget must be fundp.Budget(epsilon, delta[, accountant]) or a tuple (epsilon, delta)")
        budget = Budget(*budget)
    epsilon = check_positive("budget.epsilon", budget.epsilon)
    delta = check_delta(budget.delta, "budget.delta")
    accountant = budget.accountant
    if not isinstance(accountant, str) or accountant not in ACCOUNTANTS:
        raise ValueError(f"budget.accountant must be one of {', '.join(map(repr, BOUND_ACCOUNTANTS))}, got {accountant!r}")
    if accountant not in BOUND_ACCOUNTANTS:
        raise ValueError(
            f"budget.accountant={accountant!r} is an approximation, not an upper bound on epsilon, so it cannot "
            f"enforce a budget (the true epsilon can exceed it); use one of {', '.join(map(repr, BOUND_ACCOUNTANTS))}"
        )
    return Budget(epsilon, delta, accountant)


def spend(ledger: Any, *, noise_multiplier: float, sample_rate: float, budget: Any, steps: int = 1,
          truncation: Any = None) -> Any:
    """Returns ``accountant_step(ledger, ...)`` if its epsilon is within ``budget``, else raises.

    ``truncation`` as in :func:`fundp.accountant_step` (the steps' truncated Poisson sampler).

    Example:
      >>> import fundp
      >>> ledger = fundp.budget.spend(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01,
      ...                             budget=(1.0, 1e-5))
      >>> fundp.budget.spend(ledger, noise_multiplier=1.0, sample_rate=0.01, budget=(1.0, 1e-5), steps=10**6)
      Traceback (most recent call last):
      ...
      fundp.budget.BudgetExceededError: privacy budget exhausted: epsilon spent so far is ...
    """
    from fundp.accounting import accountant_step, epsilon

    budget = _as_budget(budget)
    proposed = accountant_step(ledger, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                               truncation=truncation)
    would_spend = epsilon(proposed, budget.delta, accountant=budget.accountant)
    if would_spend > budget.epsilon:
        spent = epsilon(ledger, budget.delta, accountant=budget.accountant)
        raise BudgetExceededError(spent, would_spend, budget)
    return proposed
