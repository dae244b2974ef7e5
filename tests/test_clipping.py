"""Clipping invariants (hypothesis) and norms against independent computations."""

import math

import numpy as np
import optree
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

import fundp
from fundp.clipping import clip_sensitivity

DTYPES = {"float32": (torch.float32, 1e-5), "float64": (torch.float64, 1e-12), "bfloat16": (torch.bfloat16, 1e-2)}


@st.composite
def per_example_trees(draw, allow_nonfinite=False):
    """A dict pytree of 1-4 leaves with a shared batch dimension, plus its dtype name."""
    batch = draw(st.integers(1, 6))
    dtype_name = draw(st.sampled_from(sorted(DTYPES)))
    num_leaves = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    elements = st.floats(-10, 10, allow_nan=False, width=32)
    tree = {}
    for i in range(num_leaves):
        shape = (batch,) + tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
        values = draw(arrays(np.float64, shape, elements=elements)) * scale
        tree[f"leaf{i}"] = torch.tensor(values).to(DTYPES[dtype_name][0])
    return tree, dtype_name


def reference_norms(tree):
    """Per-example norms computed one example at a time in float64 with math.fsum."""
    batch = next(iter(tree.values())).shape[0]
    return [
        math.sqrt(math.fsum(float(v) ** 2 for leaf in tree.values() for v in leaf[i].double().flatten().tolist()))
        for i in range(batch)
    ]


@given(per_example_trees(), st.floats(1e-3, 1e3))
def test_flat_clip_invariants(case, max_norm):
    tree, dtype_name = case
    tol = DTYPES[dtype_name][1]
    clipped = fundp.clip(tree, max_norm)
    before = reference_norms(tree)
    after = reference_norms(clipped)
    for i, (n0, n1) in enumerate(zip(before, after)):
        # every clipped norm <= C
        assert n1 <= max_norm * (1 + 2 * tol) + 1e-30
        if n0 <= max_norm:  # already under C: unchanged (to rounding)
            for name in tree:
                torch.testing.assert_close(clipped[name][i], tree[name][i], rtol=4 * tol, atol=0)
        else:  # above C: norm exactly C, direction preserved (a positive multiple)
            assert n1 == pytest.approx(max_norm, rel=4 * tol)
            factor = max_norm / n0
            for name in tree:
                expected = (tree[name][i].double() * factor).to(tree[name].dtype)
                torch.testing.assert_close(clipped[name][i], expected, rtol=4 * tol, atol=4 * tol * max_norm)


@given(per_example_trees(), st.floats(1e-2, 1e2), st.floats(0.1, 100))
def test_clipping_commutes_with_scaling(case, max_norm, scale):
    """clip(s * g, s * C) == s * clip(g, C) for s > 0."""
    tree, dtype_name = case
    if dtype_name == "bfloat16":
        tree = optree.tree_map(lambda x: x.float(), tree)
        dtype_name = "float32"
    tol = DTYPES[dtype_name][1]
    scaled = fundp.clip(optree.tree_map(lambda x: x * scale, tree), max_norm * scale)
    reference = fundp.clip(tree, max_norm)
    for name in tree:
        torch.testing.assert_close(scaled[name], reference[name] * scale, rtol=10 * tol, atol=10 * tol * max_norm * scale)


@given(per_example_trees(), st.floats(1e-2, 1e2))
def test_per_layer_clip_invariants(case, max_norm):
    tree, dtype_name = case
    tol = DTYPES[dtype_name][1]
    thresholds = {name: max_norm * (k + 1) for k, name in enumerate(tree)}
    clipped = fundp.clip(tree, thresholds, style="per_layer")
    for name, leaf in tree.items():
        for i in range(leaf.shape[0]):
            n0 = reference_norms({name: leaf[i : i + 1]})[0]
            n1 = reference_norms({name: clipped[name][i : i + 1]})[0]
            assert n1 <= thresholds[name] * (1 + 2 * tol) + 1e-30
            expected_factor = min(1.0, thresholds[name] / n0) if n0 > 0 else 1.0
            torch.testing.assert_close(
                clipped[name][i], (leaf[i].double() * expected_factor).to(leaf.dtype), rtol=4 * tol, atol=4 * tol * thresholds[name]
            )
    # sensitivity of the clipped sum: sqrt(sum_l C_l^2)
    assert clip_sensitivity(thresholds, style="per_layer") == pytest.approx(math.sqrt(sum(c * c for c in thresholds.values())))


@given(per_example_trees(), st.floats(1e-2, 1e2), st.floats(1e-4, 1.0))
def test_automatic_clip_invariants(case, max_norm, gamma):
    """Automatic clipping: g * C / (||g|| + gamma); norm strictly below C, direction kept."""
    tree, dtype_name = case
    tol = DTYPES[dtype_name][1]
    clipped = fundp.clip(tree, max_norm, style="automatic", gamma=gamma)
    for i, (n0, n1) in enumerate(zip(reference_norms(tree), reference_norms(clipped))):
        factor = max_norm / (n0 + gamma)
        assert n1 == pytest.approx(n0 * factor, rel=4 * tol, abs=1e-30)
        assert n1 < max_norm * (1 + 2 * tol)
        for name in tree:
            expected = (tree[name][i].double() * factor).to(tree[name].dtype)
            torch.testing.assert_close(clipped[name][i], expected, rtol=4 * tol, atol=4 * tol * max_norm)


def test_norms_accumulate_in_float32_for_half_precision():
    # 4096 entries of 1.0 in bfloat16: a bfloat16 accumulator would stall at 256 (8 bits of mantissa).
    g = {"w": torch.ones(2, 4096, dtype=torch.bfloat16)}
    norms = fundp.per_sample_norms(g)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.full((2,), 64.0))
    assert fundp.per_sample_norms({"w": torch.ones(1, 3, dtype=torch.float64)}).dtype == torch.float64


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("style", ["flat", "automatic", "per_layer"])
def test_nonfinite_example_is_dropped_and_others_untouched(bad, style):
    """Chosen behaviour: an example with a NaN/Inf anywhere is dropped (exact zeros), others unchanged."""
    g = {"a": torch.tensor([[3.0, 4.0], [1.0, bad], [0.1, 0.2]]), "b": torch.tensor([[0.0], [0.5], [bad if style == "per_layer" else 0.3]])}
    clipped = fundp.clip(g, 1.0, style=style)
    reference = fundp.clip({k: v[[0]] for k, v in g.items()}, 1.0, style=style)
    dropped = [1, 2] if style == "per_layer" else [1]
    for name in g:
        assert torch.equal(clipped[name][dropped], torch.zeros_like(g[name][dropped]))
        torch.testing.assert_close(clipped[name][0], reference[name][0])
    assert torch.isfinite(torch.cat([v.flatten() for v in clipped.values()])).all()


def test_mask_rows_are_exact_zeros_even_with_nan():
    g = {"w": torch.tensor([[3.0, 4.0], [float("nan"), 1.0]])}
    clipped = fundp.clip(g, 1.0, mask=torch.tensor([True, False]))
    assert torch.equal(clipped["w"][1], torch.zeros(2))
    torch.testing.assert_close(clipped["w"][0], torch.tensor([0.6, 0.8]))


def test_zero_gradient_has_factor_one():
    assert fundp.clip_factors(torch.tensor([0.0, 2.0]), 1.0).tolist() == [1.0, 0.5]


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_max_norm_names_the_argument(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        fundp.clip({"w": torch.ones(2, 2)}, max_norm)


def test_bad_style_and_gamma():
    with pytest.raises(ValueError, match="style"):
        fundp.clip({"w": torch.ones(2, 2)}, 1.0, style="unknown")
    with pytest.raises(ValueError, match="gamma"):
        fundp.clip({"w": torch.ones(2, 2)}, 1.0, style="automatic", gamma=-1.0)


def test_per_layer_thresholds_must_match_structure():
    with pytest.raises(ValueError, match="max_norm"):
        fundp.clip({"a": torch.ones(2, 2), "b": torch.ones(2)}, {"a": 1.0}, style="per_layer")
