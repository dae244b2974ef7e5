"""The testing toolkit itself: each checker passes on right answers and FAILS on wrong ones.

Reference values come from closed forms (per-example gradients of linear models written out by
hand), never from the code under test.
"""

import math
import subprocess
import sys

import optree
import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings, strategies as st

import fundp
from fundp.testing import (
    Variant,
    assert_matches_vmap,
    assert_trees_close,
    compiled_variants,
    empirical_sensitivity,
    micro_batch_grads,
    reference_step,
    reset_compiler,
    tree_distance,
)
from fundp.testing.strategies import grad_trees_with_masks, masks, model_cases, per_example_grad_trees

F64 = torch.float64


# --------------------------------------------------------------------------- assert_trees_close


def test_trees_close_passes_within_tolerance_and_fails_outside_naming_the_leaf():
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64), "b": (torch.tensor([0.5], dtype=F64), torch.zeros(3, dtype=F64))}
    close = optree.tree_map(lambda t: t * (1 + 1e-9), a)
    assert_trees_close(close, a)  # float64 default rtol 1e-7
    far = {"w": a["w"].clone(), "b": (a["b"][0].clone(), torch.tensor([0.0, 0.0, 1e-3], dtype=F64))}
    with pytest.raises(AssertionError) as info:
        assert_trees_close(far, a, rtol=1e-6, atol=1e-6, msg="step vs reference")
    text = str(info.value)
    assert text.startswith("step vs reference: actual['b'][1]: 1 of 3 elements differ")
    assert "worst at index (2,)" in text and "actual 0.001" in text and "max abs difference 0.001" in text


def test_trees_close_exact_mode_and_default_float32_tolerances():
    a = {"w": torch.tensor([1.0, 2.0])}
    assert_trees_close(a, {"w": torch.tensor([1.0, 2.0])}, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="1 of 2 elements differ"):
        assert_trees_close({"w": torch.tensor([1.0, 2.0 + 2.4e-7])}, a, rtol=0, atol=0)
    # float32 defaults (rtol 1.3e-6, atol 1e-5): 1e-6 relative passes, 1e-4 relative fails
    assert_trees_close({"w": torch.tensor([1.0, 2.0 * (1 + 1e-6)])}, a)
    with pytest.raises(AssertionError):
        assert_trees_close({"w": torch.tensor([1.0, 2.0 * (1 + 1e-4)])}, a)


def test_trees_close_checks_structure_shape_and_dtype():
    a = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(AssertionError, match="tree structures differ"):
        assert_trees_close({"w": torch.zeros(2)}, a)
    with pytest.raises(AssertionError, match=r"actual\['w'\]: shape \(3,\) != expected \(2,\)"):
        assert_trees_close({"w": torch.zeros(3), "b": torch.zeros(1)}, a)
    with pytest.raises(AssertionError, match=r"actual\['b'\]: dtype torch.float64 != expected torch.float32"):
        assert_trees_close({"w": torch.zeros(2), "b": torch.zeros(1, dtype=F64)}, a)
    assert_trees_close({"w": torch.zeros(2), "b": torch.zeros(1, dtype=F64)}, a, check_dtype=False)


def test_trees_close_nonfinite_values_and_integers():
    nan_inf = torch.tensor([math.nan, math.inf, 1.0])
    assert_trees_close(nan_inf, nan_inf.clone())
    with pytest.raises(AssertionError, match="worst at index"):
        assert_trees_close(nan_inf, nan_inf.clone(), equal_nan=False)
    with pytest.raises(AssertionError, match="actual -inf"):
        assert_trees_close(torch.tensor([math.nan, -math.inf, 1.0]), nan_inf)
    with pytest.raises(AssertionError, match="actual 1.0, expected nan"):
        assert_trees_close(torch.tensor([1.0, math.inf, 1.0]), nan_inf)
    with pytest.raises(AssertionError, match="1 of 2 elements differ"):
        assert_trees_close(torch.tensor([1, 3]), torch.tensor([1, 2]), rtol=1.0, atol=1.0)  # ints: exact


def test_trees_close_names_namedtuple_fields():
    state = fundp.optim.adam(0.1).init({"w": torch.zeros(2)})
    other = state._replace(mu={"w": torch.ones(2)})
    with pytest.raises(AssertionError, match=r"actual\.mu\['w'\]"):
        assert_trees_close(other, state)


# --------------------------------------------------------------------------- the reference


def _linear_case(dtype=F64):
    """Squared error of a linear model: g_i = 2 (x_i . w - y_i) x_i, in closed form."""
    params = {"w": torch.tensor([0.5, -1.0, 2.0], dtype=dtype), "unused": torch.ones(2, dtype=dtype)}
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 1.0], [0.1, 0.0, 0.0], [-2.0, 0.5, 4.0]], dtype=dtype)
    y = torch.tensor([1.0, 0.0, 2.0, -3.0], dtype=dtype)

    def loss_fn(p, b):
        return (b["x"] @ p["w"] - b["y"]) ** 2

    residual = x.double() @ params["w"].double() - y.double()
    grads = 2 * residual[:, None] * x.double()
    return loss_fn, params, {"x": x, "y": y}, grads, residual**2


def test_micro_batch_grads_closed_form_float64_from_float32_params():
    loss_fn, params, batch, closed_form, losses = _linear_case(torch.float32)
    grads, got_losses, aux = micro_batch_grads(loss_fn, params, batch)
    assert aux is None
    assert grads["w"].dtype == F64 and grads["unused"].shape == (4, 2)
    assert_trees_close(grads, {"w": closed_form, "unused": torch.zeros(4, 2, dtype=F64)}, rtol=1e-12, atol=1e-12)
    assert_trees_close(got_losses, losses, rtol=1e-12, atol=0)
    native, _, _ = micro_batch_grads(loss_fn, params, batch, dtype=None)
    assert native["w"].dtype == torch.float32


def test_micro_batch_grads_aux_is_per_example_and_scalar_losses_are_refused():
    def loss_fn(p, x):
        pred = x @ p["w"]
        return pred**2, {"pred": pred}

    _, _, aux = micro_batch_grads(loss_fn, {"w": torch.tensor([1.0, 2.0])}, torch.eye(2), has_aux=True)
    assert_trees_close(aux, {"pred": torch.tensor([1.0, 2.0], dtype=F64)}, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        micro_batch_grads(lambda p, x: (x @ p["w"]).sum(), {"w": torch.ones(2)}, torch.eye(2))


@pytest.mark.parametrize("style", ["flat", "automatic", "per_layer"])
def test_reference_step_closed_form(style):
    loss_fn, params, batch, g, _ = _linear_case()
    mask = torch.tensor([True, True, False, True])
    C, gamma, expected_batch_size = 3.0, 0.1, 5.0
    norms = g.norm(dim=1)
    if style == "automatic":
        factors = C / (norms + gamma)
    else:  # one used leaf: per-layer is flat on "w"
        factors = torch.clamp(C / norms, max=1.0)
    expected = (factors[:, None] * g)[mask].sum(0) / expected_batch_size
    ref = reference_step(
        loss_fn, params, batch, max_norm=C, expected_batch_size=expected_batch_size, mask=mask, clip_style=style, gamma=gamma
    )
    assert_trees_close(ref.grads, {"w": expected, "unused": torch.zeros(2, dtype=F64)}, rtol=1e-12, atol=1e-15)
    assert_trees_close(ref.norms, norms, rtol=1e-12, atol=0)
    assert ref.counted.tolist() == [True, True, False, True]


def test_reference_step_per_layer_thresholds_and_nonfinite_rows():
    params = {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(1, dtype=F64)}
    x = torch.tensor([[3.0, 4.0, 10.0], [math.nan, 0.0, 1.0], [0.3, 0.4, 0.5]], dtype=F64)

    def loss_fn(p, x):  # gradient of example i: (x_i[:2], x_i[2:])
        return x[:, :2] @ p["a"] + x[:, 2:] @ p["b"]

    ref = reference_step(loss_fn, params, x, max_norm={"a": 1.0, "b": 2.0}, expected_batch_size=1.0, clip_style="per_layer")
    # row 0: a clipped to (0.6, 0.8), b clipped to 2; row 1 dropped (NaN); row 2 under both thresholds
    assert_trees_close(ref.grads, {"a": torch.tensor([0.9, 1.2], dtype=F64), "b": torch.tensor([2.5], dtype=F64)}, rtol=1e-12, atol=0)
    assert ref.counted.tolist() == [True, False, True] and math.isnan(float(ref.norms[1]))


# --------------------------------------------------------------------------- assert_matches_vmap


@settings(max_examples=12)
@given(model_cases(), st.sampled_from(["vmap", "ghost", "auto"]), st.sampled_from(["flat", "automatic", "per_layer"]), st.data())
def test_dp_step_matches_reference_on_small_models(case, grad_method, style, data):
    size = case.batch["y"].shape[0]
    mask = data.draw(masks(size))
    max_norm = data.draw(st.sampled_from([1e-2, 1.0, 1e2]))
    assert_matches_vmap(case.loss_fn, case.params, case.batch, mask=mask, max_norm=max_norm, clip_style=style, grad_method=grad_method)


@pytest.mark.parametrize("grad_method", ["vmap", "ghost"])
def test_dp_step_matches_reference_eager_and_compiled(variant, grad_method):
    case = _mlp_case()
    mask = torch.tensor([True, False, True, True])
    out = assert_matches_vmap(*case, mask=mask, max_norm=0.1, grad_method=grad_method, transform=variant, expected_batch_size=3.5)
    assert float(out.norms[1]) == 0.0  # a padded row has norm 0 (fundp's convention)


def _mlp_case(dtype=F64):
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):  # the parameters come from the generator below, not the global RNG
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.to_empty(device="cpu").to(dtype)
    params = {name: torch.randn(p.shape, generator=g, dtype=dtype) for name, p in model.named_parameters()}
    batch = {"x": torch.randn(4, 3, generator=g, dtype=dtype) * 3, "y": torch.tensor([0, 1, 1, 0])}

    def loss_fn(p, b):
        return torch.nn.functional.cross_entropy(fundp.functional_call(model, p, (b["x"],)), b["y"], reduction="none")

    return loss_fn, params, batch


def test_float32_step_against_float64_reference():
    assert_matches_vmap(*_mlp_case(torch.float32), max_norm=0.5)


def test_a_nan_example_is_dropped_by_step_and_reference():
    loss_fn, params, batch = _mlp_case()
    batch["x"][2, 0] = math.nan
    out = assert_matches_vmap(loss_fn, params, batch, max_norm=0.5)
    assert int(out.num_nonfinite) == 1


def _wrong(transform_out=None, **overrides):
    """A step that is fundp's with one thing changed, to check the checker notices."""
    loss_fn, _, _ = _mlp_case()
    settings = dict(max_norm=0.5, noise_multiplier=0.0, expected_batch_size=4)
    settings.update(overrides)
    inner = fundp.dp_step(loss_fn, **settings)

    def step(params, batch, key, mask=None):
        out = inner(params, batch, key, mask=mask)
        return out if transform_out is None else transform_out(out, mask)

    return step


WRONG_STEPS = {
    "clips at 2C": (dict(max_norm=1.0), "grads"),
    "divides by the realised batch size": (
        dict(transform_out=lambda out, mask: out._replace(grads=optree.tree_map(lambda g: g * 4 / mask.sum(), out.grads))),
        "grads",
    ),
    "lets a padded row in": (dict(transform_out=None, ignore_mask=True), "grads"),
    "is off by one part in a million": (
        dict(transform_out=lambda out, mask: out._replace(grads=optree.tree_map(lambda g: g * (1 + 1e-6), out.grads))),
        "grads",
    ),
    "reports norms after clipping": (
        dict(transform_out=lambda out, mask: out._replace(norms=torch.clamp(out.norms, max=0.5))),
        "norms",
    ),
    "returns float32 grads": (
        dict(transform_out=lambda out, mask: out._replace(grads=optree.tree_map(lambda g: g.float(), out.grads))),
        "dtype",
    ),
    "averages the loss over all rows": (
        dict(transform_out=lambda out, mask: out._replace(loss=out.loss * mask.sum() / mask.numel())),
        "loss",
    ),
}


@pytest.mark.parametrize("name", sorted(WRONG_STEPS))
def test_a_wrong_step_fails_with_a_message_naming_what_is_wrong(name):
    loss_fn, params, batch = _mlp_case()
    mask = torch.tensor([True, True, False, True])
    overrides, expected_word = WRONG_STEPS[name]
    overrides = dict(overrides)
    if overrides.pop("ignore_mask", False):
        inner = _wrong()
        step = lambda p, b, k, mask=None: inner(p, b, k)  # noqa: E731
    else:
        transform_out = overrides.pop("transform_out", None)
        step = _wrong(transform_out, **{k: v for k, v in overrides.items()})
    with pytest.raises(AssertionError) as info:
        assert_matches_vmap(loss_fn, params, batch, mask=mask, step=step, max_norm=0.5, expected_batch_size=4)
    text = str(info.value)
    assert expected_word in text and "custom step" in text
    if expected_word == "grads":
        assert text.startswith("grads['") and "relative error" in text


def test_the_right_step_passes_the_same_comparison():
    loss_fn, params, batch = _mlp_case()
    mask = torch.tensor([True, True, False, True])
    assert_matches_vmap(loss_fn, params, batch, mask=mask, step=_wrong(), max_norm=0.5, expected_batch_size=4)


def test_noisy_or_random_steps_are_refused():
    loss_fn, params, batch = _mlp_case()
    with pytest.raises(ValueError, match="noise_multiplier must be 0"):
        assert_matches_vmap(loss_fn, params, batch, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="randomness"):
        assert_matches_vmap(loss_fn, params, batch, randomness="different")


# --------------------------------------------------------------------------- empirical_sensitivity


@settings(max_examples=15)
@given(model_cases(), st.sampled_from([1e-2, 1.0, 1e2]), st.data())
def test_flat_clipped_sum_moves_by_at_most_c(case, max_norm, data):
    """Removing example i changes the flat clipped sum by exactly min(||g_i||, C) <= C."""
    mask = data.draw(masks(case.batch["y"].shape[0]))
    clipped = fundp.clipped_grad_sum(case.loss_fn, max_norm=max_norm)
    removed = empirical_sensitivity(clipped, case.params, case.batch, mask=mask)
    norms = reference_step(case.loss_fn, case.params, case.batch, max_norm=max_norm, expected_batch_size=1.0).norms
    expected = max([min(float(n), max_norm) for n, m in zip(norms, mask) if m], default=0.0)
    assert removed == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert removed <= max_norm * (1 + 1e-9)
    assert empirical_sensitivity(clipped, case.params, case.batch, mask=mask, mode="replace") <= 2 * max_norm * (1 + 1e-9)


@pytest.mark.parametrize("style", ["per_layer", "automatic"])
def test_other_clip_styles_stay_within_their_sensitivity(style):
    loss_fn, params, batch = _mlp_case()
    clipped = fundp.clipped_grad_sum(loss_fn, max_norm=0.05, clip_style=style)
    bound = fundp.clip_sensitivity(0.05, style=style, params=params)
    assert empirical_sensitivity(clipped, params, batch) <= bound * (1 + 1e-9)
    assert empirical_sensitivity(clipped, params, batch, mode="replace") <= 2 * bound * (1 + 1e-9)


@pytest.mark.parametrize("style", ["flat", "per_layer", "automatic"])
def test_the_sensitivity_a_clipped_sum_carries_is_respected(style):
    """ClippedSum.sensitivity (what privatize scales the noise by) bounds every measured change."""
    if "sensitivity" not in fundp.ClippedSum._fields:
        pytest.skip("this fundp's ClippedSum does not carry its sensitivity")
    loss_fn, params, batch = _mlp_case()
    clipped = fundp.clipped_grad_sum(loss_fn, max_norm=0.05, clip_style=style)
    claimed = float(clipped(params, batch).sensitivity)
    assert claimed == pytest.approx(fundp.clip_sensitivity(0.05, style=style, params=params), rel=1e-12)
    removed = empirical_sensitivity(clipped, params, batch)
    assert claimed * 0.5 < removed <= claimed * (1 + 1e-9)  # every example here is clipped: the bound is nearly met
    assert empirical_sensitivity(clipped, params, batch, mode="replace") <= 2 * claimed * (1 + 1e-9)


def test_an_unclipped_sum_exceeds_the_bound():
    loss_fn, params, batch = _mlp_case()
    per_example = fundp.per_sample_grads(loss_fn)

    def unclipped_sum(p, b, mask):
        grads = per_example(p, b)
        return optree.tree_map(lambda g: (g * mask.reshape((-1,) + (1,) * (g.dim() - 1))).sum(0), grads)

    largest = float(fundp.per_sample_norms(per_example(params, batch)).max())
    assert largest > 0.5
    assert empirical_sensitivity(unclipped_sum, params, batch) == pytest.approx(largest, rel=1e-9)
    assert empirical_sensitivity(fundp.clipped_grad_sum(loss_fn, max_norm=0.5), params, batch) == pytest.approx(0.5, rel=1e-9)


def test_sensitivity_ignores_padded_rows_and_uses_given_replacements():
    params = {"w": torch.zeros(2, dtype=F64)}
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=F64)
    loss_fn = lambda p, x: x @ p["w"]  # noqa: E731  (gradient of example i: x_i)
    clipped = fundp.clipped_grad_sum(loss_fn, max_norm=10.0)
    assert empirical_sensitivity(clipped, params, x) == pytest.approx(5.0)
    assert empirical_sensitivity(clipped, params, x, mask=torch.tensor([False, True])) == pytest.approx(0.5)
    far = torch.tensor([[0.0, -100.0]], dtype=F64)  # clipped to (0, -10)
    assert empirical_sensitivity(clipped, params, x, mode="replace", replacements=far) == pytest.approx(math.hypot(3, 14))
    with pytest.raises(ValueError, match="mode"):
        empirical_sensitivity(clipped, params, x, mode="swap")


def test_a_nan_in_the_sum_is_an_unbounded_change():
    x = torch.tensor([[1.0], [math.nan]])
    leaky = lambda p, x, m: {"w": (x * m[:, None]).sum(0)}  # noqa: E731  (NaN * 0 = NaN: mask by product leaks)
    assert empirical_sensitivity(leaky, {"w": torch.zeros(1)}, x) == math.inf
    assert tree_distance({"a": torch.tensor([0.0])}, {"a": torch.tensor([math.inf])}) == math.inf


# --------------------------------------------------------------------------- strategies


@settings(max_examples=30)
@given(per_example_grad_trees(min_exponent=-3, max_exponent=3))
def test_grad_trees_share_the_batch_dimension_and_respect_scales(grads):
    leaves = optree.tree_leaves(grads)
    size = leaves[0].shape[0]
    assert 1 <= size <= 6 and all(leaf.shape[0] == size for leaf in leaves)
    assert len({leaf.dtype for leaf in leaves}) == 1 and leaves[0].dtype in (torch.float32, F64)
    assert all(bool(torch.isfinite(leaf).all()) and float(leaf.abs().max()) <= 1e3 * (1 + 1e-6) for leaf in leaves)


@settings(max_examples=30)
@given(grad_trees_with_masks(nonfinite=True, min_real=1))
def test_nonfinite_trees_have_a_nonfinite_row_and_masks_their_size(case):
    grads, mask = case
    norms = fundp.per_sample_norms(grads)  # non-finite rows give non-finite norms
    assert not bool(torch.isfinite(norms).all())
    assert mask.shape == norms.shape and mask.dtype == torch.bool and int(mask.sum()) >= 1


def test_scales_span_orders_of_magnitude():
    seen = set()

    @settings(max_examples=60, database=None)
    @given(per_example_grad_trees(dtypes=(F64,)))
    def record(grads):
        norms = fundp.per_sample_norms(grads)
        seen.update(round(math.log10(float(n))) for n in norms if n > 0)

    record()
    assert max(seen) - min(seen) >= 6


def test_model_cases_do_not_touch_the_global_rng_and_replay():
    state = torch.random.get_rng_state()
    cases = []

    @settings(max_examples=5, database=None, derandomize=True)
    @given(model_cases())
    def collect(case):
        losses = case.loss_fn(case.params, case.batch)
        assert losses.shape == case.batch["y"].shape and losses.dtype == F64
        cases.append(case)

    collect()
    first = list(cases)
    cases.clear()
    collect()
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first, cases):
        assert_trees_close((a.params, a.batch), (b.params, b.batch), rtol=0, atol=0)


def test_fundp_testing_imports_without_hypothesis():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import fundp.testing\n"
        "assert callable(fundp.testing.assert_matches_vmap)\n"
        "try:\n"
        "    import fundp.testing.strategies\n"
        "except ImportError as error:\n"
        "    assert 'pip install hypothesis' in str(error), error\n"
        "else:\n"
        "    raise SystemExit('strategies imported without hypothesis')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- variants


def test_compiled_variants_compile_and_reset_between_uses():
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.nn.functional.softsign
    x = torch.tensor([1.0, -3.0])
    for _ in range(2):  # a second use compiles again: the caches were reset in between
        names = []
        for name, f in compiled_variants(fn, backend=counter):
            names.append(name)
            assert_trees_close(f(x), torch.tensor([0.5, -0.75]), rtol=0, atol=0)
        assert names == ["eager", "compiled"]
    assert counter.frame_count == 2
    reset_compiler()


def test_variant_fixture(variant):
    counter = torch._dynamo.testing.CompileCounter()
    reset_compiler()
    f = Variant(variant.name, backend=counter)(torch.nn.functional.softsign)
    f(torch.ones(3))
    assert counter.frame_count == (1 if variant.compiled else 0)
    assert variant.name in ("eager", "compiled") and variant.compiled == (variant.name == "compiled")
    with pytest.raises(ValueError, match="name"):
        Variant("jit")
