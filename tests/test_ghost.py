"""The ghost / book-keeping engine against independent references.

References: per-example gradients from one ordinary backward per example (``micro_batch_grads``),
clipped and summed here by hand, and the ``vmap`` engine.  Tolerances (ENGINES.md): float64
relative 1e-10 of the global gradient norm (some leaves, e.g. an attention key bias, have exactly
zero gradient, so a per-leaf relative error would be meaningless); float32 1e-5 (norms), 1e-4 (sums).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fundp
from fundp.engines.ghost import GhostUnsupportedError, ghost_plan, make_ghost_engine
from fundp.clipping import ScaledSqNorm
from fundp.engines.ghost._norms import _factor_sq_norm
from models import MLP, SmallCNN, TinyAttention, classification_loss, data_for, make, micro_batch_grads, params_of


class SequenceModel(nn.Module):
    """Embedding (padding_idx, repeated tokens) + LayerNorm + Linear on [B, T, d] + RMSNorm + head."""

    def __init__(self, vocab=7, dim=6, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.wide = nn.Linear(dim, 40)  # 2 T^2 = 72 <= 6 * 40: ghost branch
        self.narrow = nn.Linear(40, 2)  # 2 T^2 = 72 > 40 * 2: materialised branch
        self.rms = nn.RMSNorm(2)
        self.head = nn.Linear(2, classes)

    def forward(self, tokens):
        h = self.norm(self.embed(tokens))
        h = self.rms(self.narrow(torch.tanh(self.wide(h))))
        return self.head(h.mean(dim=1))


class Conv1dModel(nn.Module):
    """Grouped, dilated Conv1d with "same" padding, GroupNorm, and a strided Conv2d without bias."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding="same", dilation=2, groups=2)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(1, 2, (3, 2), stride=(1, 2), padding=(1, 0), bias=False)
        self.head = nn.Linear(4 * 5 + 2 * 4 * 2, classes)

    def forward(self, x):
        h = F.relu(self.norm(self.conv(x)))  # [B, 4, 5]
        image = x[:, :1, :].unsqueeze(1).expand(-1, 1, 4, 5).contiguous()  # [B, 1, 4, 5]
        k = F.relu(self.conv2(image))  # [B, 2, 4, 2]
        return self.head(torch.cat([h.flatten(1), k.flatten(1)], dim=1))


class TiedLoop(nn.Module):
    """Weight tying (embedding = output layer) and one block applied twice."""

    def __init__(self, vocab=9, dim=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.Linear(dim, dim)

    def forward(self, tokens):
        h = self.embed(tokens)
        for _ in range(2):
            h = torch.tanh(self.block(h))
        return F.linear(h.mean(dim=1), self.embed.weight)  # logits over the vocabulary


class ConvTwice(nn.Module):
    """One Conv2d applied twice: its per-example gradients are summed over both uses before the norm."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 5 * 5, classes)

    def forward(self, x):
        h = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        return self.head(h.flatten(1))


class PositionalModel(nn.Module):
    """A positional embedding fed ``arange(T)``: broadcast over the batch (the broadcast rule)."""

    def __init__(self, vocab=6, length=5, dim=4, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(length, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head((self.embed(tokens) + self.position(positions)).mean(dim=1))


class WithAttention(nn.Module):
    """nn.MultiheadAttention (packed projection, seen through by the attention rule) and a scale."""

    def __init__(self, vocab=6, dim=4, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.scale = nn.Parameter(torch.ones(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head(h.mean(dim=1) * self.scale)


def batch_for(model, size, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, (SequenceModel, TiedLoop, PositionalModel, WithAttention, WithBilinear)):
        vocab = model.embed.num_embeddings
        x = torch.randint(0, vocab, (size, 5 if isinstance(model, PositionalModel) else 6), generator=g)
        x[:, 1] = x[:, 0]  # repeated tokens within an example
        classes = vocab if isinstance(model, TiedLoop) else 3
    elif isinstance(model, Conv1dModel):
        x, classes = torch.randn(size, 2, 5, generator=g, dtype=dtype), 3
    elif isinstance(model, ConvTwice):
        x, classes = torch.randn(size, 2, 5, 5, generator=g, dtype=dtype), 3
    else:
        return data_for(model, size, seed=seed, dtype=dtype)
    return {"x": x, "y": torch.randint(0, classes, (size,), generator=g)}


MODELS = [MLP, SmallCNN, TinyAttention, SequenceModel, Conv1dModel, TiedLoop, ConvTwice]


def reference_step(model, params, batch, max_norm, style, gamma=0.01):
    """``sum_i clip(g_i) / B`` from micro-batched gradients, clipped here by hand."""
    grads = micro_batch_grads(model, classification_loss(model), params, batch)
    sq = {k: g.flatten(1).square().sum(1) for k, g in grads.items()}
    total = torch.sqrt(sum(sq.values()))
    size = batch["y"].shape[0]
    out = {}
    for k, g in grads.items():
        if style == "flat":
            c = torch.clamp(max_norm / total, max=1.0)
        elif style == "automatic":
            c = max_norm / (total + gamma)
        else:
            c = torch.clamp(max_norm / torch.sqrt(sq[k]).clamp_min(1e-300), max=1.0)
        out[k] = (g * c.reshape((-1,) + (1,) * (g.dim() - 1))).sum(0) / size
    return out, total


def assert_close_global(actual, expected, rel):
    scale = torch.sqrt(sum(v.square().sum() for v in expected.values()))
    error = torch.sqrt(sum((actual[k] - expected[k]).square().sum() for k in expected))
    assert error <= rel * scale, f"relative error {float(error / scale):.2e} > {rel}"


@pytest.mark.parametrize("style", ["flat", "per_layer", "automatic"])
@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_ghost_step_equals_micro_batched_clipping(model_cls, style):
    model = make(model_cls)
    params = params_of(model)
    batch = batch_for(model, 6)
    max_norm = 0.05 if style != "per_layer" else 0.02  # small enough that most examples are clipped
    step = fundp.dp_step(classification_loss(model), max_norm=max_norm, noise_multiplier=0.0,
                         expected_batch_size=6, clip_style=style, grad_method="ghost")
    out = step(params, batch, fundp.random.key(0))
    expected, norms = reference_step(model, params, batch, max_norm, style)
    torch.testing.assert_close(out.norms, norms, rtol=1e-10, atol=0)
    assert_close_global(out.grads, expected, 1e-10)
    assert bool((norms > max_norm).any()), "the test must exercise clipping"


def test_ghost_per_leaf_norms_and_sums_equal_vmap_engine():
    model = make(SequenceModel)
    params, batch = params_of(model), batch_for(model, 5)
    loss = classification_loss(model)
    ghost = make_ghost_engine(loss)(params, batch)
    reference = micro_batch_grads(model, loss, params, batch)
    factors = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    sums = ghost.weighted_sum({k: factors for k in params})
    for k, rows in reference.items():
        sq = ghost.sq_norms[k]  # a ScaledSqNorm: ||g||^2 = scale^2 * scaled (no overflow)
        torch.testing.assert_close(sq.scale.square() * sq.scaled, rows.flatten(1).square().sum(1), rtol=1e-10, atol=1e-300)
        torch.testing.assert_close(sums[k], (rows * factors.reshape(-1, *[1] * (rows.dim() - 1))).sum(0), rtol=1e-10, atol=1e-14)


def test_frozen_layers_are_not_tracked_and_cost_nothing():
    model = make(MLP)
    params = {k: v for k, v in params_of(model).items() if k.startswith("net.4")}  # only the head trains
    batch = batch_for(model, 5)
    loss = classification_loss(model)
    plan = ghost_plan(loss, params, batch)
    assert set(plan.values()) == {"ghost"} and len(plan) == 2
    out = fundp.dp_step(loss, max_norm=0.1, noise_multiplier=0.0, expected_batch_size=5, grad_method="ghost")(
        params, batch, fundp.random.key(0))
    grads = micro_batch_grads(model, loss, params, batch)
    total = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))
    torch.testing.assert_close(out.norms, total, rtol=1e-10, atol=0)
    assert set(out.grads) == set(params)


class WithBilinear(nn.Module):
    """nn.Bilinear (no ghost rule) between supported layers."""

    def __init__(self, vocab=6, dim=4, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.bilinear = nn.Bilinear(dim, dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens).mean(dim=1)
        return self.head(self.bilinear(h, h))


@pytest.mark.parametrize("model_cls", [PositionalModel, WithAttention])
@pytest.mark.parametrize("clip_style", ["flat", "per_layer", "automatic"])
def test_position_tables_scales_and_attention_are_on_the_ghost_path_and_exact(model_cls, clip_style):
    model = make(model_cls)
    params, batch = params_of(model), batch_for(model, 6)
    loss = classification_loss(model)
    assert set(ghost_plan(loss, params, batch).values()) == {"ghost"}
    step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=0.0, expected_batch_size=6, grad_method="ghost",
                         clip_style=clip_style)
    out = step(params, batch, fundp.random.key(0))
    expected, norms = reference_step(model, params, batch, 0.05, clip_style)
    torch.testing.assert_close(out.norms, norms, rtol=1e-10, atol=0)
    assert_close_global(out.grads, expected, 1e-10)


@pytest.mark.parametrize("model_cls, fallback", [(WithBilinear, {"bilinear.weight", "bilinear.bias"})])
def test_unsupported_parameters_fall_back_to_vmap_in_auto_and_raise_in_ghost(model_cls, fallback):
    model = make(model_cls)
    params, batch = params_of(model), batch_for(model, 6)
    loss = classification_loss(model)
    plan = ghost_plan(loss, params, batch)
    assert {k[len("params['"):-2] for k, v in plan.items() if v.startswith("vmap")} == fallback
    for name in fallback:
        # The reason names the op, e.g. "used by multi_head_attention_forward".
        assert "vmap: " in plan[f"params['{name}']"]
    step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=0.0, expected_batch_size=6, grad_method="auto")
    out = step(params, batch, fundp.random.key(0))
    expected, norms = reference_step(model, params, batch, 0.05, "flat")
    torch.testing.assert_close(out.norms, norms, rtol=1e-10, atol=0)
    assert_close_global(out.grads, expected, 1e-10)
    strict = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=0.0, expected_batch_size=6, grad_method="ghost")
    with pytest.raises(GhostUnsupportedError, match=sorted(fallback)[0].split(".")[0]):
        strict(params, batch, fundp.random.key(0))


def test_unused_and_duplicated_parameters_are_never_silently_zero():
    model = make(MLP)
    params = params_of(model)
    params["unused"] = torch.ones(3, dtype=torch.float64)
    loss = classification_loss(model)
    batch = batch_for(model, 4)

    def loss_with_extra(p, b):
        return loss({k: v for k, v in p.items() if k != "unused"}, b)

    assert ghost_plan(loss_with_extra, params, batch)["params['unused']"].startswith("vmap")
    with pytest.raises(GhostUnsupportedError, match="unused"):
        make_ghost_engine(loss_with_extra)(params, batch)
    out = make_ghost_engine(loss_with_extra, fallback=True)(params, batch)
    unused = out.sq_norms["unused"]
    assert torch.equal(unused.scale.square() * unused.scaled, torch.zeros(4, dtype=torch.float64))


def test_padded_nan_rows_never_reach_the_sum():
    model = make(SmallCNN)
    params, batch = params_of(model), batch_for(model, 6)
    batch["x"][4:] = float("nan")
    mask = torch.tensor([True] * 4 + [False] * 2)
    step = fundp.dp_step(classification_loss(model), max_norm=0.05, noise_multiplier=0.0, expected_batch_size=4,
                         grad_method="ghost")
    out = step(params, batch, fundp.random.key(0), mask=mask)
    real = {k: v[:4] for k, v in batch.items()}
    expected, _ = reference_step(model, params, real, 0.05, "flat")
    assert all(bool(torch.isfinite(g).all()) for g in out.grads.values())
    assert_close_global(out.grads, expected, 1e-10)


def test_compiled_ghost_step_is_one_graph_equals_eager_and_does_not_recompile():
    model = make(TinyAttention)
    params, loss = params_of(model), classification_loss(model)
    step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=1.0, expected_batch_size=6, grad_method="ghost")
    reference = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=1.0, expected_batch_size=6, grad_method="ghost",
                              check_key_reuse=False)  # the eager step on the compiled step's keys
    key = fundp.random.key(3)
    step(params, batch_for(model, 6), key)  # the first call of a shape verifies (eagerly)
    with fundp.compile_options():  # the key guard is in the graph too
        explanation = torch._dynamo.explain(step)(params, batch_for(model, 6), fundp.random.fold_in(key, 100))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()  # dynamo's real tracing and guards, eager kernels
    compiled = fundp.compile(step, backend=counter)
    for seed in range(3):  # new batch tensors and keys each step: no recompile
        batch = batch_for(model, 6, seed=seed)
        eager, fast = reference(params, batch, fundp.random.fold_in(key, seed)), compiled(params, batch, fundp.random.fold_in(key, seed))
        assert_close_global(fast.grads, eager.grads, 1e-10)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_compiled_verification_runs_once_per_shape_and_then_one_graph():
    model = make(TinyAttention)
    params, loss = params_of(model), classification_loss(model)
    step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=1.0, expected_batch_size=6, grad_method="ghost")
    eager_step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=1.0, expected_batch_size=6, grad_method="ghost",
                               check_key_reuse=False)  # the reference, on the compiled step's keys
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = fundp.compile(step, backend=counter)
    frames = []
    for seed in range(4):
        batch = batch_for(model, 6, seed=seed)
        key = fundp.random.key(seed)
        assert_close_global(compiled(params, batch, key).grads, eager_step(params, batch, key).grads, 1e-10)
        frames.append(counter.frame_count)
    # First call: the verification breaks the graph once; second: one recompile without it; then none.
    assert frames[1] == frames[2] == frames[3], frames
    torch._dynamo.reset()
    assert torch._dynamo.config.trace_autograd_ops is False


def test_float32_tolerances():
    # float32 against the float32 vmap engine (the same forward round-off on both sides).
    model = make(SequenceModel, dtype=torch.float32)
    params, batch = params_of(model), batch_for(model, 8, dtype=torch.float32)
    loss = classification_loss(model)
    ghost = make_ghost_engine(loss)(params, batch)
    reference = fundp.engines.make_vmap_engine(loss)(params, batch)
    def total(out):
        plain = [s.scale.square() * s.scaled if isinstance(s, ScaledSqNorm) else s for s in out.sq_norms.values()]
        return torch.sqrt(sum(plain))

    # The vmap engine accumulates its norms in float64 (issue 25): compare the values in float64.
    torch.testing.assert_close(total(ghost).double(), total(reference), rtol=1e-5, atol=0)
    factors = {k: torch.full((8,), 0.5) for k in params}
    assert_close_global(ghost.weighted_sum(factors), reference.weighted_sum(factors), 1e-4)


def test_dropout_needs_a_key_driven_randomness_and_is_deterministic_in_the_key():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, b):
        return F.cross_entropy(torch.func.functional_call(model, p, (b["x"],)), b["y"], reduction="none")

    batch = {"x": torch.randn(6, 4, dtype=torch.float64), "y": torch.arange(6) % 3}
    with pytest.raises(RuntimeError, match="randomness='different'"):
        make_ghost_engine(loss)(params, batch)
    step = fundp.dp_step(loss, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=6, grad_method="ghost",
                         randomness="different", check_key_reuse=False)  # one key twice: compared
    state = torch.get_rng_state()
    first, again = step(params, batch, fundp.random.key(1)), step(params, batch, fundp.random.key(1))
    other = step(params, batch, fundp.random.key(2))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must be left untouched"
    assert all(torch.equal(first.grads[k], again.grads[k]) for k in params)
    assert not all(torch.equal(first.grads[k], other.grads[k]) for k in params)
    with pytest.raises(ValueError, match="randomness='same'"):
        make_ghost_engine(loss, randomness="same")


@given(batch=st.integers(1, 4), steps=st.integers(1, 6), width=st.integers(1, 7), height=st.integers(1, 7),
       seed=st.integers(0, 2**16))
def test_linear_sq_norm_both_branches_equal_materialised(batch, steps, width, height, seed):
    g = torch.Generator().manual_seed(seed)
    activations = torch.randn(batch, steps, width, generator=g, dtype=torch.float64)
    output_grad = torch.randn(batch, steps, height, generator=g, dtype=torch.float64)
    expected = torch.einsum("btp,btd->bpd", output_grad, activations).square().sum(dim=(1, 2))
    torch.testing.assert_close(_factor_sq_norm(output_grad, activations), expected, rtol=1e-10, atol=1e-12)
    ghost_form = (activations @ activations.transpose(1, 2) * (output_grad @ output_grad.transpose(1, 2))).sum((1, 2))
    torch.testing.assert_close(ghost_form, expected, rtol=1e-10, atol=1e-12)


def test_ghost_step_under_no_grad_and_with_grad_requiring_params():
    model = make(MLP)
    loss = classification_loss(model)
    batch = batch_for(model, 5)
    expected, norms = reference_step(model, params_of(model), batch, 0.05, "flat")
    step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=0.0, expected_batch_size=5, grad_method="ghost")
    with torch.no_grad():
        out = step(params_of(model), batch, fundp.random.key(0))
    assert_close_global(out.grads, expected, 1e-10)
    live = dict(model.named_parameters())  # not detached: the engine must not leave .grad behind
    out = step(live, batch, fundp.random.key(1))
    assert_close_global(out.grads, expected, 1e-10)
    assert all(p.grad is None for p in live.values())


@pytest.mark.parametrize("wrap", ["torch.compile", "fundp.compile"])
def test_aot_compiled_ghost_step_equals_eager_with_or_without_the_scoped_option(wrap):
    # Plain torch.compile leaves dynamo's trace_autograd_ops off: the engine must then run outside
    # the graph (AOT graphs would hide the probes from autograd and give zero norms).
    model = make(MLP)
    params, loss = params_of(model), classification_loss(model)
    kw = dict(max_norm=0.05, noise_multiplier=0.0, expected_batch_size=6, grad_method="ghost", verify=False)
    step, reference = fundp.dp_step(loss, **kw), fundp.dp_step(loss, check_key_reuse=False, **kw)  # reference: same keys
    torch._dynamo.reset()
    compiled = (torch.compile if wrap == "torch.compile" else fundp.compile)(step, backend="aot_eager")
    for seed in range(2):
        batch = batch_for(model, 6, seed=seed)
        assert_close_global(compiled(params, batch, fundp.random.key(seed)).grads,
                            reference(params, batch, fundp.random.key(seed)).grads, 1e-10)
    torch._dynamo.reset()


def test_fundp_compile_fullgraph_with_the_default_engine_and_verification():
    model = make(TinyAttention)
    params, loss = params_of(model), classification_loss(model)
    step = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=1.0, expected_batch_size=6)  # auto, verify="first"
    reference = fundp.dp_step(loss, max_norm=0.05, noise_multiplier=1.0, expected_batch_size=6, check_key_reuse=False)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = fundp.compile(step, backend=counter, fullgraph=True)  # with the key guard in the graph
    for seed in range(3):
        batch, key = batch_for(model, 6, seed=seed), fundp.random.key(seed)
        assert_close_global(compiled(params, batch, key).grads, reference(params, batch, key).grads, 1e-10)
    assert counter.frame_count == 1  # the first call ran eagerly (and verified), then one graph
    torch._dynamo.reset()


def test_norms_share_work_between_leaves_reading_the_same_activations_and_free_it_after_the_last():
    # q, k and v read one activation tensor: its normalised copy and Gram are made once, and dropped
    # (eagerly) after the last leaf that needs it, not kept until every norm is done.
    import weakref

    from fundp.engines.ghost._norms import LeafGrads, Shared
    from fundp.engines.ghost._uses import Factor

    g = torch.Generator().manual_seed(0)
    activations = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    leaves = [LeafGrads(torch.zeros(2, 5, dtype=torch.float64),
                        [Factor(torch.randn(3, 4, 2, generator=g, dtype=torch.float64), activations)]) for _ in range(3)]
    shared = Shared(leaves)
    first = leaves[0].sq_norms(shared)
    copy = weakref.ref(shared.normalised(activations)[1])  # a lookup, not a use
    leaves[1].sq_norms(shared)
    assert shared.normalised(activations)[1] is copy()  # kept: the third leaf still needs it
    leaves[2].sq_norms(shared)
    assert copy() is None  # freed after the last leaf
    expected = torch.einsum("btp,btd->bpd", leaves[0].left, activations).square().sum(dim=(1, 2))
    torch.testing.assert_close(first.scale.square() * first.scaled, expected, rtol=1e-12, atol=0)
