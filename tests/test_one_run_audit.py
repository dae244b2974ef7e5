"""One-run auditing (Steinke, Nasr & Jagielski 2023): the bound against the theorem computed here
independently, closed forms, and audits of a correct and a broken DP-SGD run."""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

import fundp
from fundp.one_run_audit import GradientCanaries, audit_scores, epsilon_lower_bound, max_detectable_epsilon, p_value


def theorem_p_value(m, r, v, eps, delta):
    """The theorem's right-hand side written out term by term (no shared code with the library)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    f = stats.binom(r, q).sf(np.arange(v + 1) - 1)  # f[u] = P[Binomial(r, q) >= u], u = 0..v
    i = np.arange(1, v + 1)
    worst = np.max((f[v - i] - f[v]) / i) if v > 0 else 0.0
    return min(1.0, f[v] + 2 * m * delta * worst)


@pytest.mark.parametrize("m, r, v, delta", [(1000, 100, 80, 1e-5), (500, 500, 400, 0.0), (200, 20, 20, 1e-4),
                                            (10000, 2000, 1300, 1e-6), (50, 10, 9, 1e-3)])
def test_bound_is_the_root_of_the_theorems_p_value(m, r, v, delta):
    alpha = 0.05
    for eps in (0.0, 0.3, 1.0, 2.5):
        assert p_value(m, r, v, epsilon=eps, delta=delta) == pytest.approx(theorem_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)
    bound = epsilon_lower_bound(m, r, v, delta=delta, confidence=1 - alpha)
    assert bound > 0
    root = optimize.brentq(lambda e: theorem_p_value(m, r, v, e, delta) - alpha, 0.0, 50.0, xtol=1e-12)
    assert bound == pytest.approx(root, abs=1e-8)
    # the reported epsilon is itself rejected (up to the last bits of two float computations)
    assert theorem_p_value(m, r, v, bound, delta) < alpha * (1 + 1e-9)


def test_perfect_attack_closed_form_and_bonferroni():
    # delta = 0, v = r: p^r = alpha  =>  eps = -log(alpha^(-1/r) - 1)
    for r, alpha in ((10, 0.05), (300, 0.01), (5000, 0.05)):
        closed = -math.log(alpha ** (-1 / r) - 1)
        assert epsilon_lower_bound(r, r, r, delta=0.0, confidence=1 - alpha) == pytest.approx(closed, abs=1e-9)
        assert epsilon_lower_bound(r, r, r, delta=0.0, confidence=1 - alpha, tests=4) == pytest.approx(
            -math.log((alpha / 4) ** (-1 / r) - 1), abs=1e-9)
    assert max_detectable_epsilon(1000, delta=1e-5, guess_counts=[1000]) == pytest.approx(
        epsilon_lower_bound(1000, 1000, 1000, delta=1e-5), abs=1e-12)


def test_chance_level_guessing_rejects_nothing():
    assert epsilon_lower_bound(1000, 100, 50, delta=1e-5) == 0.0
    assert audit_scores(np.zeros(200), np.arange(200) % 2 == 0, delta=1e-5).epsilon_lower_bound == 0.0


def test_audit_scores_counts_the_guesses():
    scores = np.arange(10, dtype=float)               # canary j scores j
    included = np.array([0, 0, 1, 0, 1, 0, 1, 1, 1, 1], dtype=bool)
    result = audit_scores(scores, included, delta=0.0, guess_counts=[4])
    # "in" for scores 9, 8 (both in: right); "out" for 0, 1 (both out: right)
    assert (result.guesses, result.correct) == (4, 4)
    result = audit_scores(scores, included, delta=0.0, guess_counts=[10])
    assert result.correct == 4 + 3  # "in" for scores 5..9 (4 are in), "out" for 0..4 (3 are out)


@pytest.mark.parametrize("bad, match", [
    (dict(canaries=10, guesses=11, correct=0), "guesses"),
    (dict(canaries=10, guesses=5, correct=6), "correct"),
])
def test_bad_counts(bad, match):
    with pytest.raises(ValueError, match=match):
        epsilon_lower_bound(**bad, delta=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="delta"):
        p_value(10, 5, 5, epsilon=1.0, delta=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        p_value(10, 5, 5, epsilon=-1.0, delta=0.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(10, 5, 5, delta=0.0, confidence=1.0)
    with pytest.raises(TypeError, match="included"):
        audit_scores([1.0, 2.0], [1, 0], delta=0.0)
    with pytest.raises(ValueError, match="one length"):
        audit_scores([1.0, 2.0], [True], delta=0.0)
    with pytest.raises(ValueError, match="finite"):
        audit_scores([1.0, float("nan")], [True, False], delta=0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        GradientCanaries(3, key=fundp.random.key(0)).batch({"x": torch.ones(2, 1)}, torch.ones(2, dtype=torch.bool),
                                                          key=fundp.random.key(1), sample_rate=0.0)


N, D = 48, 4
_X = torch.randn(N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
_Y = _X @ torch.linspace(-1, 1, D, dtype=torch.float64)


def loss_fn(params, batch):
    return (batch["x"] @ params["w"] - batch["y"]) ** 2


def run(canaries, *, noise_multiplier, steps, sample_rate, seed, grad_method="auto"):
    """Trains once with the canaries; returns the per-step noisy gradients."""
    step = fundp.dp_step(canaries.loss_fn(loss_fn), max_norm=1.0, noise_multiplier=noise_multiplier,
                         expected_batch_size=N, grad_method=grad_method)
    params = canaries.params({"w": torch.zeros(D, dtype=torch.float64)})
    key, grads = fundp.random.key(seed), []
    for t in range(steps):
        batch, mask = canaries.batch({"x": _X, "y": _Y}, torch.ones(N, dtype=torch.bool),
                                     key=fundp.random.fold_in(key, 2 * t), sample_rate=sample_rate)
        out = step(params, batch, fundp.random.fold_in(key, 2 * t + 1), mask=mask)
        grads.append(out.grads)
        params = {"model": {"w": params["model"]["w"] - 0.05 * out.grads["model"]["w"]}, "canary": params["canary"]}
    return grads


@pytest.mark.parametrize("grad_method", ["auto", "vmap"])
def test_canary_rows_contribute_exactly_their_clipped_gradient(grad_method):
    canaries = GradientCanaries(6, key=fundp.random.key(3))
    batch, mask = canaries.batch({"x": _X, "y": _Y}, torch.ones(N, dtype=torch.bool), key=fundp.random.key(4), sample_rate=1.0)
    step = fundp.dp_step(canaries.loss_fn(loss_fn), max_norm=1.0, noise_multiplier=0.0, expected_batch_size=N,
                         grad_method=grad_method)
    params = canaries.params({"w": torch.full((D,), 0.3, dtype=torch.float64)})
    out = step(params, batch, fundp.random.key(5), mask=mask)
    # canary j: gradient scale * e_j clipped to C = 1, divided by the expected batch size
    expected = canaries.included.to(torch.float64) / N
    torch.testing.assert_close(out.grads["canary"].reshape(-1), expected, rtol=0, atol=1e-15)
    # the model's gradient is that of the real rows alone, clipped one example at a time
    per_example = torch.func.vmap(torch.func.grad(lambda w, x, y: ((x @ w - y) ** 2)), in_dims=(None, 0, 0))(
        params["model"]["w"], _X, _Y)
    norms = per_example.norm(dim=1, keepdim=True)
    reference = (per_example * torch.clamp(1.0 / norms, max=1.0)).sum(0) / N
    torch.testing.assert_close(out.grads["model"]["w"], reference, rtol=1e-12, atol=1e-15)


def test_canary_inclusion_and_sampling_statistics():
    # included ~ Bernoulli(1/2) over 4000 canaries: |mean - 1/2| < 5 sd (sd = 0.0079): false-failure rate < 1e-6
    canaries = GradientCanaries(4000, key=fundp.random.key(11))
    assert abs(canaries.included.double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / 4000)
    _, mask = canaries.batch({"x": torch.ones(2, 1)}, torch.ones(2, dtype=torch.bool), key=fundp.random.key(12), sample_rate=0.25)
    rows = mask[2:]
    assert not rows[~canaries.included].any()  # an excluded canary never joins a step
    n_in = int(canaries.included.sum())
    rate = rows[canaries.included].double().mean().item()
    assert abs(rate - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n_in)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_broken_step_noise_off_is_caught(seed):
    # The run claims sigma = 6 over 4 full-batch steps but adds no noise: every guess is right.
    canaries = GradientCanaries(1000, key=fundp.random.key(100 + seed))
    claimed = fundp.epsilon(fundp.accountant_step(fundp.Ledger(), noise_multiplier=6.0, sample_rate=1.0, steps=4), 1e-5)
    result = canaries.audit(run(canaries, noise_multiplier=0.0, steps=4, sample_rate=1.0, seed=seed), delta=1e-5)
    assert result.correct == result.guesses  # every guess right
    assert result.epsilon_lower_bound > 3 * claimed


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("noise_multiplier, sample_rate, steps", [(1.0, 1.0, 4), (0.8, 0.5, 6)])
def test_correct_step_stays_below_the_accountant(seed, noise_multiplier, sample_rate, steps):
    canaries = GradientCanaries(1000, key=fundp.random.key(200 + seed))
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    claimed = fundp.epsilon(ledger, 1e-5)
    result = canaries.audit(run(canaries, noise_multiplier=noise_multiplier, steps=steps, sample_rate=sample_rate,
                                seed=seed), delta=1e-5)
    assert result.epsilon_lower_bound <= claimed
    assert result.max_detectable_epsilon > 0
