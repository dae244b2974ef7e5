"""Real architectures from HuggingFace ``transformers`` / ``peft`` (tiny random configs, nothing downloaded).

For GPT-2, GPT-2 + LoRA, BERT, ViT and a Llama-style decoder (untied and tied embeddings), in float64:

* ``dp_step(grad_method="auto")`` with ``noise_multiplier=0`` equals an independent reference —
  per-example gradients from one ordinary ``torch.autograd.grad`` per example (a batch of one, same
  model), clipped here by hand (flat, per-layer, automatic) and summed / B.  Tolerance (ENGINES.md):
  relative 1e-10 of the *global* gradient norm (an attention key bias has exactly zero gradient,
  so per-leaf relative errors are meaningless); the per-example norms to relative 1e-10.  ``C`` is
  chosen between the reference norms so that some examples (leaves, for per-layer) are clipped and
  some are not, and the test asserts that it is so.
* ``ghost_plan`` puts >= 99% of the trainable parameter elements on the ghost path;
* ``fundp.compile(step)`` (torch.compile with the engine's backward traced) is one graph without breaks, does not recompile across batches, and
  gives the eager step's gradients.
* Mixed precision (bfloat16 autocast on CPU, and bfloat16 parameters) against the float64
  reference with stated tolerances; ``out.norms`` is float32 or better.

The models run in ``eval()`` mode with dropout probabilities 0 (eval mode is fine for DP: it only
switches dropout off in these architectures, none of which has BatchNorm).
"""

from __future__ import annotations

import optree
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

import fundp
from fundp.engines.ghost import ghost_plan
from hf_models import MODEL_NAMES, build, ghost_fraction

B, T = 4, 8
STYLES = ("flat", "per_layer", "automatic")
GAMMA = 0.01  # dp_step's default stability constant of automatic clipping


# ----------------------------------------------------------------------------------- the reference


def micro_batch_grads(loss_fn, params: dict, batch: dict) -> dict:
    """``{name: [B, *shape]}`` per-example gradients: one ``torch.autograd.grad`` per example (a batch of one)."""
    size = optree.tree_leaves(batch)[0].shape[0]
    rows = []
    for i in range(size):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        example = optree.tree_map(lambda t: t[i : i + 1], batch)
        (loss,) = loss_fn(leaves, example)  # exactly one loss for a batch of one
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        rows.append([torch.zeros_like(v) if g is None else g for v, g in zip(leaves.values(), grads)])
    return {k: torch.stack([row[j] for row in rows]) for j, k in enumerate(params)}


def leaf_norms(grads: dict) -> dict:
    return {k: g.flatten(1).norm(dim=1) for k, g in grads.items()}


def global_norms(grads: dict) -> torch.Tensor:
    return torch.sqrt(sum(n.square() for n in leaf_norms(grads).values()))


def between(values: torch.Tensor) -> float:
    """A threshold strictly inside the sorted positive ``values``: half of them above it, half below."""
    ordered = torch.sort(values[values > 0]).values
    middle = len(ordered) // 2
    return float(torch.sqrt(ordered[middle - 1] * ordered[middle]))


def threshold_for(grads: dict, style: str) -> float:
    if style == "per_layer":  # one C for every leaf: some leaves are clipped, some are not
        return between(torch.cat(list(leaf_norms(grads).values())))
    return between(global_norms(grads))


def clipped_mean(grads: dict, max_norm: float, style: str, batch_size: int) -> dict:
    """``sum_i clip(g_i) / batch_size``, clipped by hand."""
    norms = global_norms(grads)
    if style == "per_layer":
        factors = {k: torch.clamp(max_norm / torch.clamp_min(n, 1e-300), max=1.0) for k, n in leaf_norms(grads).items()}
    elif style == "flat":
        factors = dict.fromkeys(grads, torch.clamp(max_norm / norms, max=1.0))
    else:
        factors = dict.fromkeys(grads, max_norm / (norms + GAMMA))
    return {k: (g * factors[k].reshape((-1,) + (1,) * (g.dim() - 1))).sum(0) / batch_size for k, g in grads.items()}


def assert_close_global(got: dict, expected: dict, rtol: float) -> None:
    """Every leaf's error, relative to the global norm of ``expected``, is at most ``rtol``."""
    scale = torch.sqrt(sum(v.double().square().sum() for v in expected.values()))
    assert scale > 0
    errors = {k: float((got[k].double() - expected[k].double()).norm() / scale) for k in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.3g} > {rtol:g}"


# --------------------------------------------------------------------------------------- fixtures


_CASES: dict = {}


def case_for(name: str):
    """Builds each model once per test session (building is the slow part, not the steps)."""
    if name not in _CASES:
        case = build(name, batch_size=B, seq_len=T)
        grads = micro_batch_grads(case.loss_fn, case.params, case.batch)
        _CASES[name] = (case, grads)
    return _CASES[name]


# ------------------------------------------------------------------------------------------ tests


def test_reference_is_not_trivial():
    # The reference itself: every example's gradient is non-zero and the examples differ, so a
    # wrong row (example i's gradient attributed to example j) would be caught.
    for name in MODEL_NAMES:
        case, grads = case_for(name)
        norms = global_norms(grads)
        assert bool((norms > 0).all()), name
        assert float(norms.max() / norms.min()) > 1.01, name
        assert case.model.training is False


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dp_step_matches_micro_batching(name, style):
    case, grads = case_for(name)
    max_norm = threshold_for(grads, style)
    norms = global_norms(grads)
    if style == "flat":
        assert bool((norms > max_norm).any() and (norms < max_norm).any())
    if style == "per_layer":
        stacked = torch.cat(list(leaf_norms(grads).values()))
        assert bool((stacked > max_norm).any() and ((stacked < max_norm) & (stacked > 0)).any())
    step = fundp.dp_step(case.loss_fn, max_norm=max_norm, noise_multiplier=0.0, expected_batch_size=B,
                         clip_style=style, grad_method="auto")
    out = step(case.params, case.batch, fundp.random.key(0))
    torch.testing.assert_close(out.norms, norms, rtol=1e-10, atol=0)
    assert_close_global(out.grads, clipped_mean(grads, max_norm, style, B), 1e-10)
    losses = torch.stack([case.loss_fn(case.params, optree.tree_map(lambda t: t[i : i + 1], case.batch))[0]
                          for i in range(B)])
    torch.testing.assert_close(out.loss, losses.mean(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_ghost_plan_covers_99_percent_of_parameter_elements(name):
    case, _ = case_for(name)
    plan = ghost_plan(case.loss_fn, case.params, case.batch)
    assert len(plan) == len(case.params)
    fraction, others = ghost_fraction(plan, case.params)
    assert fraction >= 0.99, f"{fraction:.1%} of the elements on ghost; not on ghost: {others}"


# Compiling a transformer's step is the suite's costliest check (minutes per model on 2 cores):
# plain Llama is covered by llama_tied (the same layers, with the tied head on top).
COMPILED_CASES = [n for n in MODEL_NAMES if n != "llama"]


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED_CASES)
def test_compiled_step_is_one_graph_and_equals_eager(name):
    # Plain torch.compile, the fast path: the ghost engine is traced through torch.func.vjp and the
    # first call's verification is one opaque op of the graph, so every call runs one graph.
    case, grads = case_for(name)
    max_norm = threshold_for(grads, "flat")
    step = fundp.dp_step(case.loss_fn, max_norm=max_norm, noise_multiplier=1.0, expected_batch_size=B,
                         grad_method="auto")
    reference = fundp.dp_step(case.loss_fn, max_norm=max_norm, noise_multiplier=1.0, expected_batch_size=B,
                              grad_method="auto", check_key_reuse=False)  # the eager step on the compiled step's keys
    key = fundp.random.key(3)
    torch._dynamo.reset()
    try:
        step(case.params, case.batch, key)  # the first call of this shape verifies (eagerly)
        # One compilation, checked by the counter: a graph break would show as a second frame.
        counter = torch._dynamo.testing.CompileCounter()  # dynamo's real tracing and guards, eager kernels
        compiled = torch.compile(step, backend=counter)
        for seed in range(2):  # a new batch and key: no recompile
            batch = build_batch(name, seed)
            k = fundp.random.fold_in(key, seed)
            eager, fast = reference(case.params, batch, k), compiled(case.params, batch, k)
            assert_close_global(fast.grads, eager.grads, 1e-10)
            torch.testing.assert_close(fast.norms, eager.norms, rtol=1e-10, atol=0)
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


def build_batch(name: str, seed: int) -> dict:
    from hf_models import make_batch

    return make_batch(name, B, T, seed=10 + seed)


# ------------------------------------------------------------------------------- mixed precision

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per operation).  Measured on
# these models (autocast and bf16 parameters, vmap and ghost): per-example norms within 5e-3 of
# float64, the clipped mean within 6.1e-3 of its global norm.  Stated tolerances, ~4x margin:
# norms 2e-2 relative, clipped mean 3e-2 relative to its global norm.
BF16_NORM_RTOL, BF16_GRAD_RTOL = 2e-2, 3e-2


class SmallMLP(nn.Module):
    def __init__(self, d_in=16, hidden=32, classes=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def mlp_case(dtype):
    torch.manual_seed(0)
    model = SmallMLP().to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(8, 16, generator=g, dtype=dtype), "y": torch.randint(0, 3, (8,), generator=g)}

    def loss_fn(params, batch):
        return F.cross_entropy(fundp.functional_call(model, params, (batch["x"],)), batch["y"], reduction="none")

    return model, {k: v.detach().clone() for k, v in model.named_parameters()}, batch, loss_fn


def precision_case(name: str, dtype):
    if name == "mlp":
        return mlp_case(dtype)
    case = build("gpt2", dtype=dtype, batch_size=B, seq_len=T)
    return case.model, case.params, case.batch, case.loss_fn


@pytest.mark.parametrize("grad_method", ["auto", "vmap"])
@pytest.mark.parametrize("mode", ["autocast", "bf16_params"])
@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_bfloat16_against_float64(name, mode, grad_method):
    # Under autocast the parameters stay float32 and so must their gradients (what autograd and
    # every torch.optim optimizer expect); with bfloat16 parameters the gradients are bfloat16.
    _, params64, batch64, loss64 = precision_case(name, torch.float64)
    grads = micro_batch_grads(loss64, params64, batch64)
    norms = global_norms(grads)
    size = len(norms)
    max_norm = threshold_for(grads, "flat")
    expected = clipped_mean(grads, max_norm, "flat", size)

    low = torch.float32 if mode == "autocast" else torch.bfloat16
    _, _, _, loss_low = precision_case(name, low)
    to_low = lambda t: t.to(low) if t.is_floating_point() else t  # noqa: E731  (the same values, rounded)
    params, batch = optree.tree_map(to_low, params64), optree.tree_map(to_low, batch64)
    step = fundp.dp_step(loss_low, max_norm=max_norm, noise_multiplier=0.0, expected_batch_size=size,
                         grad_method=grad_method)
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = step(params, batch, fundp.random.key(0))
    else:
        out = step(params, batch, fundp.random.key(0))
    assert out.norms.dtype in (torch.float32, torch.float64), out.norms.dtype
    wrong = {k: out.grads[k].dtype for k in params if out.grads[k].dtype != params[k].dtype}
    assert not wrong, f"gradient dtypes differ from the parameters' ({low}): {wrong}"
    assert bool(torch.isfinite(out.norms).all())
    torch.testing.assert_close(out.norms.double(), norms, rtol=BF16_NORM_RTOL, atol=0)
    assert_close_global(out.grads, expected, BF16_GRAD_RTOL)


# ------------------------------------------------------------------ batch size == sequence length

# With B == T a [B, T, ...] activation cannot be told from [T, B, ...] by its shape alone: the
# engine must follow the layout, not guess it.  (ViT: 16 patches + cls = 17 tokens, so B = 17.)
SQUARE = {"vit": (17, T)}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_batch_size_equal_to_sequence_length(name):
    size, length = SQUARE.get(name, (6, 6))
    case = build(name, batch_size=size, seq_len=length)
    grads = micro_batch_grads(case.loss_fn, case.params, case.batch)
    max_norm = threshold_for(grads, "flat")
    step = fundp.dp_step(case.loss_fn, max_norm=max_norm, noise_multiplier=0.0, expected_batch_size=size,
                         grad_method="auto")
    out = step(case.params, case.batch, fundp.random.key(0))
    torch.testing.assert_close(out.norms, global_norms(grads), rtol=1e-10, atol=0)
    assert_close_global(out.grads, clipped_mean(grads, max_norm, "flat", size), 1e-10)
