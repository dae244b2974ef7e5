"""User-level DP (ULS): per-user clipping equals per-user micro-batching (float64, both engines),
one user's rows move the clipped sum by at most C, the sampler is Poisson over users with at most
k examples each, and user-level epsilon is the Poisson-sampled Gaussian over users."""

import math

import pytest
import torch
from scipy import stats

import fundp
from fundp.user_level import group_epsilon, user_batches, user_loss
from tests import hf_models
from tests.models import MLP, SmallCNN, TinyAttention, classification_loss, data_for, make, params_of

C = 0.5


def per_user_reference(loss_fn, params, data, indices, example_mask, user_mask, *, reduction="sum"):
    """sum_u clip(g_u), g_u from one autograd backward per user over that user's real examples."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for u in range(indices.shape[0]):
        if not user_mask[u] or not example_mask[u].any():
            continue
        rows = indices[u][example_mask[u]]
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = loss_fn(leaves, {k: v[rows] for k, v in data.items()}).sum()
        if reduction == "mean":
            loss = loss / rows.numel()
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves.values())]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        factor = min(1.0, C / norm) if norm > 0 else 1.0
        for name, g in zip(leaves, grads):
            total[name] += factor * g
    return total


def user_ids(n, users, seed=3):
    return torch.randint(0, users, (n,), generator=torch.Generator().manual_seed(seed))


def small_cases():
    for cls in (MLP, SmallCNN, TinyAttention):
        model = make(cls)
        yield cls.__name__, params_of(model), classification_loss(model), data_for(model, 30)


@pytest.mark.parametrize("grad_method", ["vmap", "auto"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", list(small_cases()), ids=lambda c: c[0])
def test_user_clipped_sum_equals_per_user_micro_batching(case, reduction, grad_method):
    _, params, loss_fn, data = case
    batches = user_batches(user_ids(30, 7), 0.7, fundp.random.key(0), steps=2, max_examples_per_user=3, pad_to_multiple=4)
    for t in range(2):
        indices, example_mask, user_mask = batches[t]
        step = fundp.dp_step(user_loss(loss_fn, reduction=reduction), max_norm=C, noise_multiplier=0.0,
                             sampler=batches, grad_method=grad_method)
        out = step(params, batches.gather(data, indices, example_mask), fundp.random.fold_in(fundp.random.key(1), t), mask=user_mask)
        reference = per_user_reference(loss_fn, params, data, indices, example_mask, user_mask, reduction=reduction)
        for name in params:
            torch.testing.assert_close(out.grads[name], reference[name] / batches.expected_batch_size, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["MLP", "SmallCNN", "TinyAttention"])
def test_ghost_engine_clips_users_exactly(name):
    _, params, loss_fn, data = next(c for c in small_cases() if c[0] == name)
    batches = user_batches(user_ids(30, 5), 1.0, fundp.random.key(4), steps=1, max_examples_per_user=4)
    indices, example_mask, user_mask = batches[0]
    step = fundp.dp_step(user_loss(loss_fn), max_norm=C, noise_multiplier=0.0,
                         expected_batch_size=batches.expected_batch_size, grad_method="ghost")
    out = step(params, batches.gather(data, indices, example_mask), fundp.random.key(1), mask=user_mask)
    reference = per_user_reference(loss_fn, params, data, indices, example_mask, user_mask)
    for key in params:
        torch.testing.assert_close(out.grads[key], reference[key] / batches.expected_batch_size, rtol=1e-10, atol=1e-13)


@pytest.mark.slow
@pytest.mark.parametrize("grad_method", ["ghost", "vmap"])
def test_gpt2_lora_user_level(grad_method):
    case = hf_models.build("gpt2_lora", batch_size=10, seq_len=6, layers=1, dim=32, heads=2)
    data = case.batch
    batches = user_batches(user_ids(10, 4, seed=5), 1.0, fundp.random.key(2), steps=1, max_examples_per_user=3, pad_to_multiple=2)
    indices, example_mask, user_mask = batches[0]
    step = fundp.dp_step(user_loss(case.loss_fn), max_norm=C, noise_multiplier=0.0,
                         expected_batch_size=batches.expected_batch_size, grad_method=grad_method)
    out = step(case.params, batches.gather(data, indices, example_mask), fundp.random.key(1), mask=user_mask)
    reference = per_user_reference(case.loss_fn, case.params, data, indices, example_mask, user_mask)
    for key in case.params:
        torch.testing.assert_close(out.grads[key], reference[key] / batches.expected_batch_size, rtol=1e-9, atol=1e-12)


def test_one_users_rows_move_the_clipped_sum_by_at_most_C():
    # Remove-one-user sensitivity, measured by masking each user (all of their rows at once).
    model = make(MLP)
    params, loss_fn = params_of(model), classification_loss(model)
    data = data_for(model, 40)
    data["x"] = data["x"] * 50  # large gradients: every user is clipped
    batches = user_batches(user_ids(40, 6), 1.0, fundp.random.key(7), steps=1, max_examples_per_user=8)
    indices, example_mask, user_mask = batches[0]
    clipped = fundp.clipped_grad_sum(user_loss(loss_fn), max_norm=C)
    sensitivity = fundp.testing.empirical_sensitivity(clipped, params, batches.gather(data, indices, example_mask),
                                                      mask=user_mask)
    assert C * 0.5 < sensitivity <= C * (1 + 1e-12)
    # The example-level clipped sum of the same rows moves by up to k C when one user leaves.
    flat = {k: v[indices[user_mask][example_mask[user_mask]]] for k, v in data.items()}
    owners = torch.arange(int(user_mask.sum()))[:, None].expand_as(example_mask[user_mask])[example_mask[user_mask]]
    example_clipped = fundp.clipped_grad_sum(loss_fn, max_norm=C)
    full = example_clipped(params, flat).grads
    worst = 0.0
    for u in owners.unique():
        without = example_clipped(params, flat, mask=owners != u).grads
        worst = max(worst, torch.sqrt(sum(((full[k] - without[k]) ** 2).sum() for k in full)).item())
    assert worst > 1.5 * C  # why example-level clipping is not user-level DP


def test_sampler_statistics_and_fixed_shapes():
    ids = torch.arange(600) % 200            # 200 users, 3 examples each
    q, k, steps = 0.3, 2, 40
    batches = user_batches(ids, q, fundp.random.key(9), steps=steps, max_examples_per_user=k, pad_to_multiple=100)
    sizes, shapes, chosen = [], set(), torch.zeros(600)
    for indices, example_mask, user_mask in batches:
        shapes.add(tuple(indices.shape))
        sizes.append(int(user_mask.sum()))
        real = indices[user_mask]
        assert bool(example_mask[user_mask].all())        # every sampled user has >= k = 2 examples
        assert bool((ids[real[:, 0]] == ids[real[:, 1]]).all())  # one user per row
        assert bool((real[:, 0] != real[:, 1]).all())          # without replacement
        chosen.index_add_(0, real.flatten(), torch.ones(real.numel()))
    # Users per step ~ Binomial(200, 0.3): a chi-square test of the 40 sizes' mean, false-failure rate 1e-4.
    mean = sum(sizes) / steps
    z = (mean - 200 * q) / math.sqrt(200 * q * (1 - q) / steps)
    assert abs(z) < stats.norm.isf(0.5e-4)
    # Each example of a sampled user is kept with probability k / 3: E[count] = steps q k / 3 = 8 per example;
    # totals per example position within a user are equal in distribution: compare the three positions.
    per_position = chosen.reshape(3, 200).sum(1)  # position j holds examples 200 j .. 200 j + 199
    expected = steps * q * 200 * k / 3
    chi2 = (((per_position - expected) ** 2) / expected).sum().item()
    assert chi2 < stats.chi2.isf(1e-4, df=2)      # conservative: positions are negatively correlated
    assert shapes == {(100, 2)}                   # one shape for the whole run


def test_dp_step_reads_the_user_sampler_and_refuses_another_rate():
    batches = user_batches(user_ids(30, 7), 0.5, fundp.random.key(0), steps=1, max_examples_per_user=2, pad_to_multiple=4)
    model = make(MLP)
    params, loss_fn, data = params_of(model), classification_loss(model), data_for(model, 30)
    step = fundp.dp_step(user_loss(loss_fn), max_norm=C, noise_multiplier=1.0, sampler=batches)
    indices, example_mask, user_mask = batches[0]
    out = step(params, batches.gather(data, indices, example_mask), fundp.random.key(1), mask=user_mask,
               ledger=fundp.Ledger())
    assert out.ledger.segments[0].sample_rate == 0.5  # the users' rate: user-level epsilon
    with pytest.raises(ValueError, match="sample_rate"):
        fundp.dp_step(user_loss(loss_fn), max_norm=C, noise_multiplier=1.0, sampler=batches, sample_rate=0.25)
    with pytest.raises(ValueError, match="mask"):
        step(params, batches.gather(data, indices, example_mask), fundp.random.key(2))


def test_users_with_fewer_examples_are_padded_and_masked():
    ids = torch.tensor([5, 5, 5, 9, 2, 2])
    batches = user_batches(ids, 1.0, fundp.random.key(0), steps=1, max_examples_per_user=4, pad_to_multiple=4)
    indices, example_mask, user_mask = batches[0]
    assert user_mask.tolist() == [True, True, True, False]
    counts = {int(ids[indices[u][example_mask[u]]][0]): int(example_mask[u].sum()) for u in range(3)}
    assert counts == {5: 3, 9: 1, 2: 2}
    assert (indices >= 0).all() and (indices < 6).all()


def test_user_level_epsilon_is_the_poisson_gaussian_over_users():
    dp_accounting = pytest.importorskip("dp_accounting")
    users, q, sigma, steps = 10_000, 0.01, 1.1, 500
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=sigma, sample_rate=q, steps=steps)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(event)
    assert fundp.epsilon(ledger, 1e-6) == pytest.approx(pld.get_epsilon(1e-6), rel=2e-3)
    assert user_batches(torch.arange(users), q, fundp.random.key(0), steps=1, max_examples_per_user=2).expected_batch_size == users * q


def test_group_epsilon_is_the_group_privacy_lemma():
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, steps=300)
    k, delta = 3, 1e-5
    eps_k = group_epsilon(ledger, delta, k)
    # Recompute the lemma's fixed point independently: eps_k / k is example-level epsilon at the
    # delta that the lemma turns into the target delta.
    d = delta / (k * math.exp((k - 1) * eps_k / k))
    assert fundp.epsilon(ledger, d) == pytest.approx(eps_k / k, rel=1e-6)
    assert eps_k > k * fundp.epsilon(ledger, delta)  # group privacy costs more than k times


def test_group_epsilon_reaches_far_below_delta_when_the_lemma_needs_it():
    # Here the lemma's example-level delta lies below delta * e^-40 (the answer is large, not divergent).
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.5, sample_rate=0.25, steps=60)
    k, delta = 4, 1e-5
    eps_k = group_epsilon(ledger, delta, k)
    d = delta / (k * math.exp((k - 1) * eps_k / k))
    assert d < delta * math.exp(-40)
    assert k * math.exp((k - 1) * fundp.epsilon(ledger, d)) * d <= delta * (1 + 1e-9)
    assert fundp.epsilon(ledger, d) == pytest.approx(eps_k / k, rel=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        user_loss(lambda p, b: b, reduction="max")
    with pytest.raises(TypeError, match="user_ids"):
        user_batches(torch.tensor([0.5, 1.0]), 0.5, fundp.random.key(0), steps=1, max_examples_per_user=1)
    with pytest.raises(ValueError, match="user_ids"):
        user_batches(torch.zeros(2, 2, dtype=torch.long), 0.5, fundp.random.key(0), steps=1, max_examples_per_user=1)
    with pytest.raises(ValueError, match="max_examples_per_user"):
        user_batches(torch.tensor([0, 1]), 0.5, fundp.random.key(0), steps=1, max_examples_per_user=0)
    with pytest.raises(ValueError, match="sample_rate"):
        user_batches(torch.tensor([0, 1]), 1.5, fundp.random.key(0), steps=1, max_examples_per_user=1)
    with pytest.raises(ValueError, match="group_size"):
        group_epsilon(fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.1), 1e-5, 0)
