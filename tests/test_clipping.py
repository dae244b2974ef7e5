"""Clipping invariants (hypothesis) and norms against independent computations.

The gradient pytrees come from ``fundp.testing.strategies.per_example_grad_trees`` (nested
containers, float32 / float64 / bfloat16, one scale 10^k per example); the references are
computed one example at a time in float64 with ``math.fsum``.
"""

import math

import optree
import pytest
import torch
from hypothesis import given, strategies as st

import fundp
from fundp.clipping import clip_sensitivity
from fundp.testing import assert_trees_close
from fundp.testing.strategies import per_example_grad_trees

# Relative accuracy expected of clipping in each dtype (norms accumulate in >= float32).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}
ALL_DTYPES = tuple(TOLERANCE)


def trees(**kwargs):
    return per_example_grad_trees(**{"dtypes": ALL_DTYPES, "min_exponent": -3, "max_exponent": 3, **kwargs})


def dtype_of(tree):
    return optree.tree_leaves(tree)[0].dtype


def tolerances(tree):
    """(rtol, atol) for comparing clipped trees: 4x the dtype's accuracy; atol absorbs subnormal results."""
    dtype = dtype_of(tree)
    return 4 * TOLERANCE[dtype], torch.finfo(dtype).tiny


def reference_norms(tree):
    """Per-example norms computed one example at a time in float64 with math.fsum."""
    leaves = optree.tree_leaves(tree)
    return [
        math.sqrt(math.fsum(float(v) ** 2 for leaf in leaves for v in leaf[i].double().flatten().tolist()))
        for i in range(leaves[0].shape[0])
    ]


def scale_rows(tree, factors):
    """Example i of every leaf times ``factors[i]``, computed in float64 and cast back."""
    leaves, spec = optree.tree_flatten(tree)
    return optree.tree_unflatten(spec, [_scale(leaf, factors) for leaf in leaves])


def scale_leaf_rows(tree, leaf_factors):
    """Example i of leaf l times ``leaf_factors[l][i]`` (leaves in optree's order)."""
    leaves, spec = optree.tree_flatten(tree)
    return optree.tree_unflatten(spec, [_scale(leaf, f) for leaf, f in zip(leaves, leaf_factors)])


def _scale(leaf, factors):
    rows = torch.tensor(factors, dtype=torch.float64).reshape((-1,) + (1,) * (leaf.dim() - 1))
    return (leaf.double() * rows).to(leaf.dtype)


@given(trees(), st.floats(1e-3, 1e3))
def test_flat_clip_invariants(tree, max_norm):
    rtol, atol = tolerances(tree)
    clipped = fundp.clip(tree, max_norm)
    before = reference_norms(tree)
    # under C: unchanged; above C: scaled onto the sphere of radius C, direction kept
    factors = [1.0 if n <= max_norm else max_norm / n for n in before]
    assert_trees_close(clipped, scale_rows(tree, factors), rtol=rtol, atol=atol)
    for n0, n1 in zip(before, reference_norms(clipped)):
        assert n1 <= max_norm * (1 + rtol) + 1e-30  # every clipped norm <= C
        if n0 > max_norm:
            assert n1 == pytest.approx(max_norm, rel=rtol)


@given(trees(dtypes=(torch.float32, torch.float64)), st.floats(1e-2, 1e2), st.floats(0.1, 100))
def test_clipping_commutes_with_scaling(tree, max_norm, scale):
    """clip(s * g, s * C) == s * clip(g, C) for s > 0."""
    rtol, atol = tolerances(tree)
    scaled = fundp.clip(optree.tree_map(lambda x: x * scale, tree), max_norm * scale)
    reference = optree.tree_map(lambda x: x * scale, fundp.clip(tree, max_norm))
    assert_trees_close(scaled, reference, rtol=3 * rtol, atol=atol * scale)


@given(trees(), st.floats(1e-2, 1e2))
def test_per_layer_clip_invariants(tree, max_norm):
    rtol, atol = tolerances(tree)
    leaves, spec = optree.tree_flatten(tree)
    thresholds = optree.tree_unflatten(spec, [max_norm * (k + 1) for k in range(len(leaves))])
    clipped = fundp.clip(tree, thresholds, style="per_layer")
    factors = []
    for leaf, threshold in zip(leaves, optree.tree_leaves(thresholds)):
        norms = [reference_norms([leaf[i : i + 1]])[0] for i in range(leaf.shape[0])]
        factors.append([1.0 if n <= threshold else threshold / n for n in norms])
    assert_trees_close(clipped, scale_leaf_rows(tree, factors), rtol=rtol, atol=atol)
    for leaf, threshold in zip(optree.tree_leaves(clipped), optree.tree_leaves(thresholds)):
        for i in range(leaf.shape[0]):
            assert reference_norms([leaf[i : i + 1]])[0] <= threshold * (1 + rtol) + 1e-30
    # sensitivity of the clipped sum: sqrt(sum_l C_l^2)
    expected = math.sqrt(sum((max_norm * (k + 1)) ** 2 for k in range(len(leaves))))
    assert clip_sensitivity(thresholds, style="per_layer") == pytest.approx(expected)


@given(trees(), st.floats(1e-2, 1e2), st.floats(1e-4, 1.0))
def test_automatic_clip_invariants(tree, max_norm, gamma):
    """Automatic clipping: g * C / (||g|| + gamma); norm strictly below C, direction kept."""
    rtol, atol = tolerances(tree)
    clipped = fundp.clip(tree, max_norm, style="automatic", gamma=gamma)
    before = reference_norms(tree)
    factors = [max_norm / (n + gamma) for n in before]
    assert_trees_close(clipped, scale_rows(tree, factors), rtol=rtol, atol=atol)
    for n0, n1, c in zip(before, reference_norms(clipped), factors):
        assert n1 == pytest.approx(n0 * c, rel=rtol, abs=1e-30)
        assert n1 < max_norm * (1 + rtol)


@given(per_example_grad_trees(nonfinite=True), st.sampled_from(["flat", "automatic", "per_layer"]))
def test_nonfinite_examples_are_dropped_whatever_the_tree(tree, style):
    """An example with a NaN/Inf anywhere comes back as exact zeros; the others as if alone."""
    leaves = optree.tree_leaves(tree)
    finite_rows = [i for i in range(leaves[0].shape[0]) if all(bool(torch.isfinite(leaf[i]).all()) for leaf in leaves)]
    dropped = [i for i in range(leaves[0].shape[0]) if i not in finite_rows]
    clipped = fundp.clip(tree, 1.0, style=style)
    zeros = optree.tree_map(lambda leaf: torch.zeros_like(leaf[dropped]), tree)
    assert_trees_close(optree.tree_map(lambda leaf: leaf[dropped], clipped), zeros, rtol=0, atol=0, equal_nan=False)
    if finite_rows:
        alone = fundp.clip(optree.tree_map(lambda leaf: leaf[finite_rows], tree), 1.0, style=style)
        assert_trees_close(optree.tree_map(lambda leaf: leaf[finite_rows], clipped), alone, equal_nan=False)


def test_norms_accumulate_in_float32_for_half_precision():
    # 4096 entries of 1.0 in bfloat16: a bfloat16 accumulator would stall at 256 (8 bits of mantissa).
    g = {"w": torch.ones(2, 4096, dtype=torch.bfloat16)}
    assert_trees_close(fundp.per_sample_norms(g), torch.full((2,), 64.0), rtol=0, atol=0)
    assert fundp.per_sample_norms({"w": torch.ones(1, 3, dtype=torch.float64)}).dtype == torch.float64


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("style", ["flat", "automatic", "per_layer"])
def test_nonfinite_example_is_dropped_and_others_untouched(bad, style):
    """Chosen behaviour: an example with a NaN/Inf anywhere is dropped (exact zeros), others unchanged."""
    g = {"a": torch.tensor([[3.0, 4.0], [1.0, bad], [0.1, 0.2]]), "b": torch.tensor([[0.0], [0.5], [bad if style == "per_layer" else 0.3]])}
    clipped = fundp.clip(g, 1.0, style=style)
    reference = fundp.clip({k: v[[0]] for k, v in g.items()}, 1.0, style=style)
    dropped = [1, 2] if style == "per_layer" else [1]
    assert_trees_close({k: v[dropped] for k, v in clipped.items()}, {k: torch.zeros_like(v[dropped]) for k, v in g.items()}, rtol=0, atol=0)
    assert_trees_close({k: v[[0]] for k, v in clipped.items()}, reference, rtol=0, atol=0)
    assert torch.isfinite(torch.cat([v.flatten() for v in clipped.values()])).all()


def test_mask_rows_are_exact_zeros_even_with_nan():
    g = {"w": torch.tensor([[3.0, 4.0], [float("nan"), 1.0]])}
    clipped = fundp.clip(g, 1.0, mask=torch.tensor([True, False]))
    assert_trees_close(clipped, {"w": torch.tensor([[0.6, 0.8], [0.0, 0.0]])}, rtol=1e-6, atol=0, equal_nan=False)


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
