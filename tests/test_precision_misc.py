"""Issue 25 items 5 and 6: complex / integer gradients refused, ``calibrate_noise`` at
``sample_rate=1`` (against the Gaussian mechanism's closed form), checkpoints of another run
refused, and the audit's warning when its canary cannot reach the clipping norm."""

import math

import pytest
import torch
from scipy import optimize, stats

import fundp
from fundp.testing import empirical_sensitivity, tree_distance


# ------------------------------------------------------------------ complex and integer gradients


def test_clip_refuses_complex_and_integer_gradients():
    with pytest.raises(TypeError, match="complex"):
        fundp.clip({"w": torch.tensor([[3 + 4j, 0j]])}, 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        fundp.clip({"w": torch.tensor([[3, 4]])}, 1.0)
    with pytest.raises(TypeError, match="complex"):
        fundp.per_sample_norms({"w": torch.tensor([[1j]])})


def test_clipped_grad_sum_refuses_complex_params():
    loss_fn = lambda p, x: (x.to(p["w"].dtype) @ p["w"]).abs()  # noqa: E731
    for method in ("vmap", "auto"):
        f = fundp.clipped_grad_sum(loss_fn, max_norm=1.0, grad_method=method)
        with pytest.raises(TypeError, match="complex"):
            f({"w": torch.tensor([1 + 1j, 2 - 1j])}, torch.ones(3, 2))


def test_tree_distance_keeps_imaginary_parts():
    a = {"w": torch.tensor([3j, 0j])}
    b = {"w": torch.tensor([0j, 4.0 + 0j])}
    assert tree_distance(a, b) == 5.0
    unclipped = lambda p, x, m: {"w": (x * m[:, None]).sum(0)}  # noqa: E731
    x = torch.tensor([[1 + 1j], [0.6j]])
    assert empirical_sensitivity(unclipped, {}, x) == pytest.approx(math.sqrt(2), rel=1e-12)


# ---------------------------------------------------------------- calibrate_noise at sample_rate=1


def gaussian_delta(eps, mu):
    """Exact delta(eps) of mu-GDP (Dong, Roth & Su; Balle & Wang 2018 for the Gaussian)."""
    return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize("eps,delta,steps", [(1.0, 1e-5, 10), (3.0, 1e-6, 1), (0.5, 1e-5, 100)])
def test_calibrate_noise_without_subsampling_matches_the_gaussian_closed_form(eps, delta, steps):
    # T Gaussian steps at sigma compose to mu = sqrt(T) / sigma GDP: the least sigma solves
    # gaussian_delta(eps, sqrt(T) / sigma) = delta.
    mu = optimize.brentq(lambda m: gaussian_delta(eps, m) - delta, 1e-6, 50.0, xtol=1e-14)
    exact = math.sqrt(steps) / mu
    sigma = fundp.calibrate_noise(eps, delta, sample_rate=1.0, steps=steps)
    assert exact * (1 - 1e-6) <= sigma <= exact * 1.01
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=sigma, sample_rate=1.0, steps=steps)
    assert fundp.epsilon(ledger, delta) <= eps
    rdp = fundp.calibrate_noise(eps, delta, sample_rate=1.0, steps=steps, accountant="rdp")
    assert rdp >= exact  # RDP is looser, never below the exact answer


# ------------------------------------------------------------------------------ checkpoint run ids


def _save(path, run_id=None, step=0):
    fundp.checkpoint.save(path, params={"w": torch.ones(2)}, opt_state=(), ledger=None,
                          key=fundp.random.key(step), step=step, run_id=run_id)


def _load(path, **kwargs):
    return fundp.checkpoint.load(path, params_like={"w": torch.zeros(2)}, opt_state_like=(), **kwargs)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    mine, theirs = str(tmp_path / "mine.pt"), str(tmp_path / "theirs.pt")
    _save(mine, run_id="run-a")
    _save(theirs, run_id="run-b")
    assert _load(mine, run_id="run-a").run_id == "run-a"
    with pytest.raises(fundp.checkpoint.CheckpointError, match="belongs to run 'run-b'"):
        _load(theirs, run_id="run-a")
    assert _load(theirs, run_id="run-a", allow_other_run=True).run_id == "run-b"
    # Without a run_id a fresh random one is written; a resumed run keeps the one it loaded.
    fresh = str(tmp_path / "fresh.pt")
    _save(fresh)
    first = _load(fresh).run_id
    assert isinstance(first, str) and len(first) == 32
    _save(fresh, run_id=first, step=1)
    assert _load(fresh, run_id=first).step == 1
    with pytest.raises(ValueError, match="run_id"):
        _save(fresh, run_id="has space")


def test_run_id_is_covered_by_the_digest(tmp_path):
    path = str(tmp_path / "run.pt")
    _save(path, run_id="run-a")
    payload = torch.load(path, weights_only=True)
    payload["run_id"] = "run-b"
    torch.save(payload, path)
    with pytest.raises(fundp.checkpoint.CheckpointError, match="integrity"):
        _load(path, run_id="run-b")


# ------------------------------------------------------------------------- audit canary strength


def test_audit_warns_when_the_canary_cannot_reach_the_clipping_norm():
    from fundp.audit import CanaryTooWeakWarning, audit_dp_step

    loss_fn = lambda p, b: (b["x"] @ p["w"] - b["y"]) ** 2  # noqa: E731  gradient 2 (x.w - y) x
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=2.0, expected_batch_size=3)
    params, batch = {"w": torch.zeros(2)}, {"x": torch.eye(2), "y": torch.zeros(2)}
    weak = {"x": torch.tensor([[1.0, 0.0]]), "y": torch.tensor([0.0025])}  # gradient norm 0.005
    with pytest.warns(CanaryTooWeakWarning, match="0.005"):
        audit_dp_step(step, loss_fn, params, batch, weak, trials=8, key=fundp.random.key(0), delta=1e-5)
    strong = {"x": torch.tensor([[1.0, 0.0]]), "y": torch.tensor([5.0])}  # gradient norm 10 >= C
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", CanaryTooWeakWarning)
        audit_dp_step(step, loss_fn, params, batch, strong, trials=8, key=fundp.random.key(1), delta=1e-5)  # a new audit, new keys


def test_gradient_canaries_warn_when_scale_is_below_the_clipping_norm():
    from fundp.audit import CanaryTooWeakWarning
    from fundp.one_run_audit import GradientCanaries

    with pytest.warns(CanaryTooWeakWarning, match="scale"):
        GradientCanaries(4, key=fundp.random.key(0), scale=0.005, max_norm=1.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", CanaryTooWeakWarning)
        GradientCanaries(4, key=fundp.random.key(0), scale=1e3, max_norm=1.0)
