"""Budget enforcement: refuse a step that would push epsilon past a budget.

``spend`` is ``accountant_step`` with a guard: it returns the new ledger only if its epsilon stays
within the budget, and otherwise raises :class:`BudgetExceededError` *before* anything is
computed on the data, so an over-budget step never touches it.  ``dp_step(..., budget=...)``
calls it at the start of every step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from fundp._validate import check_number

__all__ = ["Budget", "BudgetExceededError", "spend"]


class Budget(NamedTuple):
    """A privacy budget: ``epsilon`` at ``delta``, measured with ``accountant``."""

    epsilon: float
    delta: float
    accountant: str = "prv"


class BudgetExceededError(RuntimeError):
    """The next step would spend more than the budget; nothing was computed or spent."""

    def __init__(self, spent: float, would_spend: float, budget: Budget):
        self.spent, self.would_spend, self.budget = spent, would_spend, budget
        super().__init__(
            f"privacy budget exhausted: epsilon spent so far is {spent:.6g}; the next step would "
            f"bring it to {would_spend:.6g} > budget {budget.epsilon:.6g} at delta={budget.delta:g} "
            f"({budget.accountant} accountant). The step was not taken."
        )


def _as_budget(budget: Any) -> Budget:
    if not isinstance(budget, Budget):
        if not isinstance(budget, (tuple, list)) or len(budget) not in (2, 3):
            raise TypeError("budget must be fundp.Budget(epsilon, delta[, accountant]) or a tuple (epsilon, delta)")
        budget = Budget(*budget)
    if check_number("budget.epsilon", budget.epsilon, positive=True) <= 0:
        raise ValueError(f"budget.epsilon must be > 0, got {budget.epsilon}")
    if not 0 < check_number("budget.delta", budget.delta) < 1:
        raise ValueError(f"budget.delta must be in (0, 1), got {budget.delta}")
    return budget


def spend(ledger: Any, *, noise_multiplier: float, sample_rate: float, budget: Any, steps: int = 1) -> Any:
    """Returns ``accountant_step(ledger, ...)`` if its epsilon is within ``budget``, else raises.

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
    proposed = accountant_step(ledger, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    would_spend = epsilon(proposed, budget.delta, accountant=budget.accountant)
    if would_spend > budget.epsilon:
        spent = epsilon(ledger, budget.delta, accountant=budget.accountant)
        raise BudgetExceededError(spent, would_spend, budget)
    return proposed
