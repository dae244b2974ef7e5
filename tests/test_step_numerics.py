"""Huge but finite gradients are clipped (not dropped as Inf); dropped rows stay out of the loss.

References are float64 computations on the same numbers, written out by hand."""

import math

import pytest
import torch

import fundp

LOSS = lambda p, b: b @ p["w"]  # noqa: E731  per-example gradient = the row itself


@pytest.mark.parametrize("style", ["flat", "automatic", "per_layer"])
def test_huge_finite_float32_gradient_is_clipped_not_dropped(style):
    """Entries of 1e25 in float32: their squares (1e50) overflow float32, the norm does not."""
    rows = torch.tensor([[3e25, 4e25], [0.3, 0.4], [1e-30, 0.0]], dtype=torch.float32)
    step = fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=1.0, clip_style=style, grad_method="vmap")
    out = step({"w": torch.zeros(2)}, rows, fundp.random.key(0))
    assert int(out.num_nonfinite) == 0
    exact = rows.double()
    norms = exact.norm(dim=1)
    torch.testing.assert_close(out.norms.double(), norms, rtol=1e-6, atol=0)
    if style == "automatic":
        factors = 1.0 / (norms + 0.01)
    else:  # one leaf: per-layer is flat
        factors = torch.clamp(1.0 / norms, max=1.0)
    expected = (exact * factors[:, None]).sum(0)
    torch.testing.assert_close(out.grads["w"].double(), expected, rtol=1e-5, atol=1e-12)
    assert out.grads["w"].abs().max() < 2.0  # clipped: the huge row is about (0.6, 0.8)


def test_clip_and_norms_of_huge_gradients():
    g = {"a": torch.tensor([[1e30], [1.0]]), "b": torch.tensor([[1e30, 0.0], [0.0, 0.0]])}
    norms = fundp.per_sample_norms(g)
    assert torch.isfinite(norms).all()
    assert float(norms[0]) == pytest.approx(math.sqrt(2) * 1e30, rel=1e-6)
    clipped = fundp.clip(g, 1.0)
    torch.testing.assert_close(clipped["a"][0], torch.tensor([2**-0.5]), rtol=1e-6, atol=0)
    torch.testing.assert_close(clipped["b"][0], torch.tensor([2**-0.5, 0.0]), rtol=1e-6, atol=0)
    per_layer = fundp.clip(g, {"a": 1.0, "b": 2.0}, style="per_layer")
    torch.testing.assert_close(per_layer["b"][0], torch.tensor([2.0, 0.0]))
    # Non-finite rows are still dropped.
    bad = fundp.clip({"w": torch.tensor([[float("inf"), 1.0], [1.0, 0.0]])}, 1.0)
    torch.testing.assert_close(bad["w"], torch.tensor([[0.0, 0.0], [1.0, 0.0]]))


def test_the_loss_mean_leaves_dropped_rows_out():
    """A real row whose gradient is NaN is dropped from the sum and from out.loss's mean."""
    params = {"w": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    rows = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 0.5], [4.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([True, True, True, False])
    out = fundp.dp_step(LOSS, max_norm=10.0, noise_multiplier=0.0, expected_batch_size=1.0, grad_method="vmap")(
        params, rows, fundp.random.key(0), mask=mask
    )
    assert int(out.num_nonfinite) == 1
    assert float(out.loss) == pytest.approx(((1.0 - 2.0) + (3.0 - 0.5)) / 2, rel=1e-15)
    torch.testing.assert_close(out.grads["w"], torch.tensor([4.0, 2.5], dtype=torch.float64))
