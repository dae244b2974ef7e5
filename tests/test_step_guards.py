"""Guards against silent misuse of a step, each tested by performing the misuse."""

import pytest
import torch
import torch._dynamo

import fundp
import fundp.data as data

LOSS = lambda p, b: (b @ p["w"]) ** 2  # noqa: E731
PARAMS = {"w": torch.ones(2)}
BATCH = torch.eye(2)


def make_step(**kwargs):
    kw = dict(max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0, sample_rate=0.01, grad_method="vmap") | kwargs
    return fundp.dp_step(LOSS, **kw)


def test_ledger_and_mask_are_keyword_only():
    step = make_step()
    with pytest.raises(TypeError):
        step(PARAMS, BATCH, fundp.random.key(0), torch.ones(2, dtype=torch.bool))  # the mask, positionally
    with pytest.raises(TypeError):
        step(PARAMS, BATCH, fundp.random.key(0), fundp.Ledger())


def test_forgetting_to_keep_the_new_ledger_is_refused():
    """The loop that forgets ``ledger = out.ledger`` (issue 16: epsilon 1.03 reported instead of
    3.50 after 100 steps) stops at its second step."""
    step = make_step()
    ledger = fundp.Ledger()
    step(PARAMS, BATCH, fundp.random.key(0), ledger=ledger)
    with pytest.raises(ValueError, match="stale"):
        step(PARAMS, BATCH, fundp.random.key(1), ledger=ledger)  # forgot ledger = out.ledger
    # The right loop runs, and equals the accountant applied by hand.
    ledger = fundp.Ledger()
    for t in range(3):
        ledger = step(PARAMS, BATCH, fundp.random.key(10 + t), ledger=ledger).ledger  # a fresh key per step
    assert ledger == fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, steps=3)
    # A fresh ledger starts a new run.
    assert step(PARAMS, BATCH, fundp.random.key(9), ledger=fundp.Ledger()).ledger.steps == 1


def test_an_older_ledger_of_the_run_is_refused():
    step = make_step()
    history = [fundp.Ledger()]
    for t in range(3):
        history.append(step(PARAMS, BATCH, fundp.random.key(t), ledger=history[-1]).ledger)
    for old in history[:-1]:
        with pytest.raises(ValueError, match="ledger = out.ledger"):
            step(PARAMS, BATCH, fundp.random.key(7), ledger=old)
    step(PARAMS, BATCH, fundp.random.key(7), ledger=history[-1])  # the newest one is fine


def test_stale_ledger_is_refused_under_torch_compile():
    torch._dynamo.reset()
    compiled = torch.compile(make_step(), backend="eager")
    ledger = fundp.Ledger()
    compiled(PARAMS, BATCH, fundp.random.key(0), ledger=ledger)
    with pytest.raises(ValueError, match="stale"):
        compiled(PARAMS, BATCH, fundp.random.key(1), ledger=ledger)
    torch._dynamo.reset()


def test_a_refused_budget_step_leaves_the_ledger_usable():
    step = make_step(noise_multiplier=0.5, sample_rate=0.5, budget=(2.0, 1e-5))
    ledger = fundp.Ledger()
    with pytest.raises(fundp.BudgetExceededError):
        for t in range(100):
            ledger = step(PARAMS, BATCH, fundp.random.key(t), ledger=ledger).ledger
    with pytest.raises(fundp.BudgetExceededError):  # the same (newest) ledger: refused by the budget, not as stale
        step(PARAMS, BATCH, fundp.random.key(0), ledger=ledger)


def test_key_reuse_is_refused_by_default():
    step = make_step()  # no check_key_reuse argument: the guard is on
    key = fundp.random.key(3)
    step(PARAMS, BATCH, key)
    step(PARAMS, BATCH, fundp.random.fold_in(key, 1))
    with pytest.raises(ValueError, match="already used"):
        step(PARAMS, BATCH, fundp.random.key(3))  # an equal key, not only the same object
    relaxed = make_step(check_key_reuse=False)  # the explicit opt-out
    assert torch.equal(relaxed(PARAMS, BATCH, key).grads["w"], relaxed(PARAMS, BATCH, key).grads["w"])


def test_a_padded_poisson_batch_without_its_mask_is_refused_even_without_a_sampler():
    """Issue 20: without sampler= a padded batch passed without its mask counted its padding rows
    (copies of one example) as real examples, silently; then only a warning.  Now refused."""
    from fundp.guards import MissingMaskError

    batches = data.poisson_batches(400, 0.05, fundp.random.key(0), steps=3, pad_to_multiple=16)
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    indices, mask = batches[0]
    assert int(mask.sum()) <= indices.shape[0] - 2  # at least two padding rows
    step = make_step(expected_batch_size=20.0, sample_rate=0.05)  # no sampler=
    with pytest.raises(MissingMaskError, match="mask"):
        step(PARAMS, x[indices], fundp.random.key(1))
    make_step(expected_batch_size=20.0, sample_rate=0.05)(PARAMS, x[indices], fundp.random.key(2), mask=mask)  # with its mask
    make_step()(PARAMS, x[:32], fundp.random.key(3))  # a fixed batch of distinct rows
    with pytest.raises(MissingMaskError):
        step(PARAMS, x[indices], fundp.random.key(4))  # every eager call of CPU data is looked at


def test_sampler_guard_refuses_batches_that_do_not_come_from_it():
    batches = data.poisson_batches(400, 0.05, fundp.random.key(0), steps=3, pad_to_multiple=16)
    step = fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, sampler=batches, grad_method="vmap")
    assert step.sample_rate == 0.05 and step.expected_batch_size == pytest.approx(20.0)
    x = torch.randn(400, 2)
    indices, mask = batches[0]
    step(PARAMS, x[indices], fundp.random.key(0), mask=mask)
    with pytest.raises(ValueError, match="multiple of 16"):
        step(PARAMS, x[:20], fundp.random.key(0), mask=torch.ones(20, dtype=torch.bool))  # a fixed-size batch of 20
    with pytest.raises(ValueError, match="mask"):
        step(PARAMS, x[indices], fundp.random.key(0))  # the padding would count as real rows
    with pytest.raises(ValueError, match="sample_rate"):
        fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, sampler=batches, sample_rate=0.1)
    with pytest.raises(ValueError, match="expected_batch_size"):
        fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, sampler=batches, expected_batch_size=32.0)
    shuffled = data.shuffled_batches(400, 20, fundp.random.key(0), steps=3)
    with pytest.raises(ValueError, match="not Poisson"):
        fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, sampler=shuffled, sample_rate=0.05, expected_batch_size=20.0)


def test_num_examples_guard():
    step = fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.01, num_examples=300, grad_method="vmap")
    assert step.expected_batch_size == pytest.approx(3.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.01, num_examples=300, expected_batch_size=5.0)
    with pytest.raises(ValueError, match="num_examples"):
        step(PARAMS, torch.ones(301, 2), fundp.random.key(0))
    with pytest.raises(ValueError, match="sample_rate"):
        fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, num_examples=300)


def test_an_untagged_batch_with_duplicate_rows_is_refused_unless_the_step_opts_out():
    """Equal last rows can be genuine duplicates: refused by default, trained with the explicit opt-out."""
    from fundp.guards import MissingMaskError

    batch = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    with pytest.raises(MissingMaskError, match="check_padding=False"):
        make_step()(PARAMS, batch, fundp.random.key(31))
    out = make_step(check_padding=False)(PARAMS, batch, fundp.random.key(31))
    assert torch.isfinite(out.grads["w"]).all()  # it trained
