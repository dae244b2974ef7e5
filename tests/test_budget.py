"""Budget enforcement refuses the step that would overspend, before touching the data."""

import pytest
import torch

import fundp

DELTA = 1e-5


def test_dp_step_stops_exactly_at_the_budget():
    sigma, q, budget = 1.0, 0.05, 1.0
    touched = []

    def loss_fn(p, b):
        touched.append(1)
        return b @ p["w"]

    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=sigma, expected_batch_size=2, sample_rate=q, budget=(budget, DELTA), grad_method="vmap")
    ledger, taken = fundp.Ledger(), 0
    with pytest.raises(fundp.BudgetExceededError) as caught:
        for t in range(10_000):
            out = step({"w": torch.ones(2)}, torch.eye(2), fundp.random.key(t), ledger=ledger)
            ledger, taken = out.ledger, taken + 1
    # Independent check with the accountant: `taken` steps fit, one more does not.
    within = fundp.accountant_step(fundp.Ledger(), noise_multiplier=sigma, sample_rate=q, steps=taken)
    beyond = fundp.accountant_step(fundp.Ledger(), noise_multiplier=sigma, sample_rate=q, steps=taken + 1)
    assert fundp.epsilon(within, DELTA) <= budget < fundp.epsilon(beyond, DELTA)
    error = caught.value
    assert error.spent == pytest.approx(fundp.epsilon(within, DELTA))
    assert error.would_spend > budget and "epsilon spent so far" in str(error)
    calls_before = len(touched)
    with pytest.raises(fundp.BudgetExceededError):
        step({"w": torch.ones(2)}, torch.eye(2), fundp.random.key(0), ledger=ledger)
    assert len(touched) == calls_before  # the refused step never ran the model
    assert ledger == within  # and spent nothing


def test_spend_and_bad_budgets():
    ledger = fundp.budget.spend(fundp.Ledger(), noise_multiplier=2.0, sample_rate=0.01, budget=fundp.Budget(1.0, DELTA))
    assert ledger == fundp.accountant_step(fundp.Ledger(), noise_multiplier=2.0, sample_rate=0.01)
    with pytest.raises(ValueError, match="budget.epsilon"):
        fundp.budget.spend(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, budget=(0.0, DELTA))
    with pytest.raises(ValueError, match="budget.delta"):
        fundp.budget.spend(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, budget=(1.0, 1.0))
    with pytest.raises(ValueError, match="sample_rate"):
        fundp.dp_step(lambda p, b: b @ p["w"], max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, budget=(1.0, DELTA))
    step = fundp.dp_step(lambda p, b: b @ p["w"], max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, sample_rate=0.1, budget=(1.0, DELTA))
    with pytest.raises(ValueError, match="ledger"):
        step({"w": torch.ones(2)}, torch.eye(2), fundp.random.key(0))


def test_budget_refuses_an_accountant_that_is_not_a_bound():
    # The misuse: the CLT estimate sits below the true epsilon for this run, so a budget enforced
    # with it lets the true (prv/rdp) epsilon pass the budget.
    sigma, q, steps, cap = 0.8, 0.05, 50, 3.0  # gdp_approx says 2.85, prv 4.45
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert fundp.epsilon(ledger, DELTA, accountant="gdp_approx") <= cap < fundp.epsilon(ledger, DELTA)
    with pytest.raises(ValueError, match="budget.accountant='gdp_approx' is an approximation, not an upper bound"):
        fundp.budget.spend(fundp.Ledger(), noise_multiplier=sigma, sample_rate=q, steps=steps,
                           budget=fundp.Budget(cap, DELTA, "gdp_approx"))
    with pytest.raises(ValueError, match="budget.accountant"):
        fundp.dp_step(lambda p, b: b @ p["w"], max_norm=1.0, noise_multiplier=sigma, expected_batch_size=2,
                      sample_rate=q, budget=(cap, DELTA, "gdp_approx"))
    with pytest.raises(ValueError, match="budget.accountant must be one of 'prv', 'rdp', got 'moments'"):
        fundp.budget.spend(fundp.Ledger(), noise_multiplier=sigma, sample_rate=q, budget=(cap, DELTA, "moments"))
    # The bounds are accepted, and refuse the same overspend.
    for accountant in ("prv", "rdp"):
        with pytest.raises(fundp.BudgetExceededError):
            fundp.budget.spend(fundp.Ledger(), noise_multiplier=sigma, sample_rate=q, steps=steps,
                               budget=fundp.Budget(cap, DELTA, accountant))


def test_budget_fields_are_checked_with_their_names():
    with pytest.raises(ValueError, match="budget.epsilon must be finite"):
        fundp.budget.spend(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, budget=(float("inf"), DELTA))
    with pytest.raises(ValueError, match=r"budget.delta must be in \(0, 1\)"):
        fundp.budget.spend(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, budget=(1.0, 0.0))
    with pytest.raises(TypeError, match="budget.epsilon must be a real number"):
        fundp.budget.spend(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, budget=("1", DELTA))
