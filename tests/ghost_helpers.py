"""Helpers shared by the ghost engine's tests (tests/test_ghost_*.py), float64 throughout.

The reference is always independent of the engine: ``fundp.testing.reference_step`` runs
``loss_fn`` on one example at a time through plain autograd and clips by hand.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fundp
from fundp.engines.ghost import ExamplesInteractError, GhostUnsupportedError
from fundp.testing import reference_step
from models import classification_loss, data_for, micro_batch_grads

B, T, D, V = 6, 5, 4, 7


def assert_exact(loss_fn, params, batch, style="flat", max_norm=0.3, grad_method="ghost", rel=1e-10, **kwargs):
    """Norms and clipped sum of ``fundp.dp_step`` (noiseless) equal micro-batching to ``rel`` of the
    global norm; some example must be clipped (not for ``"automatic"``)."""
    step = fundp.dp_step(loss_fn, max_norm=max_norm, noise_multiplier=0.0, expected_batch_size=B,
                         grad_method=grad_method, clip_style=style, **kwargs)
    out = step(params, batch, fundp.random.key(0))
    # The independent reference: one example at a time through autograd, clipped by hand.
    ref = reference_step(loss_fn, params, batch, max_norm=max_norm, expected_batch_size=B, clip_style=style)
    expected, norms = ref.grads, ref.norms
    torch.testing.assert_close(out.norms, norms, rtol=rel, atol=0)
    scale = torch.sqrt(sum(v.square().sum() for v in expected.values()))
    error = torch.sqrt(sum((out.grads[k] - expected[k]).square().sum() for k in expected))
    assert error <= rel * scale, f"relative error {float(error / scale):.2e}"
    assert bool(((norms > max_norm) & (norms < 10 * max_norm)).any()) or style == "automatic"


def tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[:, 1] = ids[:, 0]  # repeated tokens within an example
    return {"ids": ids, "y": torch.randint(0, V, (B, T), generator=g)}


def features(seed=0, width=D):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, width, generator=g), "y": torch.randint(0, 3, (B,), generator=g)}


def tied_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(V, D, generator=g) * 0.5, "w": torch.randn(D, D, generator=g) * 0.5}


# ------------------------------------------------------------------------------------- layout rules
# A layout-rule case: ``loss_fn(params, batch) -> [B]`` that sends batch data through the op and
# then through a parameterised ``F.linear`` head, whose ghost rule needs the rows the layout rule
# gives.  Exact: the step is on the ghost path (``grad_method="ghost"`` would raise otherwise) and
# equals micro-batching.  Refused: ``grad_method="ghost"`` raises, naming the reason.


def layout_batch(seed=0) -> dict:
    """``x`` [B, T, D] floats, ``ids`` [B, T] in ``range(V)``, ``y`` [B] classes, ``t`` [B, T, 2] targets."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, T, D, generator=g), "ids": torch.randint(0, V, (B, T), generator=g),
            "y": torch.randint(0, 2, (B,), generator=g), "t": torch.randn(B, T, 2, generator=g)}


def layout_params(width: int = D, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(2, width, generator=g) * 0.7}


def head(h: torch.Tensor, params: dict) -> torch.Tensor:
    """Per-example loss ``[B]`` from rows ``h`` [B, ..., width]: a parameterised linear layer, tanh, sum."""
    return torch.tanh(F.linear(h, params["w"])).flatten(1).sum(1)


def assert_layout_exact(loss_fn: Callable, width: int = D, style: str = "flat") -> None:
    """``loss_fn`` on :func:`layout_batch` is on the ghost path and exact against micro-batching;
    ``max_norm`` is the median per-example norm, so about half of the examples are clipped."""
    params, batch = layout_params(width), layout_batch()
    norms = reference_step(loss_fn, params, batch, max_norm=1.0, expected_batch_size=B).norms
    assert bool((norms > 0).all()) and float(norms.max() - norms.min()) > 1e-6 * float(norms.max()), \
        "the case must give the examples different, nonzero gradients"
    assert_exact(loss_fn, params, batch, style=style, max_norm=float(norms.median()))


def assert_layout_refused(loss_fn: Callable, match: str, width: int = D, interact: bool = False) -> None:
    """``grad_method="ghost"`` refuses ``loss_fn`` (``ExamplesInteractError`` where ``interact``, else
    ``GhostUnsupportedError``) with a message matching ``match``."""
    error: Any = ExamplesInteractError if interact else GhostUnsupportedError
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=B, grad_method="ghost")
    with pytest.raises(error, match=match):
        step(layout_params(width), layout_batch(), fundp.random.key(0))


def rule_cases(cases: list) -> list:
    """``pytest.param(op, case...)`` with id ``rule:op:label`` for each ``(op, label, *case)``."""
    from fundp.engines.ghost._layout_rules import LAYOUT_RULES
    import fundp.engines.ghost._tracer  # noqa: F401  (registers the rules)

    return [pytest.param(op, *rest, id=f"{LAYOUT_RULES[op].__name__}:{op}:{label}") for op, label, *rest in cases]


def covered(*case_lists: list) -> set:
    """The layout rules (functions) that the cases exercise."""
    from fundp.engines.ghost._layout_rules import LAYOUT_RULES
    import fundp.engines.ghost._tracer  # noqa: F401

    return {LAYOUT_RULES[case[0]] for cases in case_lists for case in cases}


def assert_rule_used(monkeypatch, op: str, run: Callable[[], Any]) -> None:
    """Runs ``run()`` with the layout rule of ``op`` counted: it must be asked at least once."""
    from fundp.engines.ghost import _layout_rules
    from fundp.engines.ghost._layout import Layout

    rule = _layout_rules.LAYOUT_RULES[op]
    seen = []

    def counted(tracer, call):
        if call.name == op:
            seen.append(call.name)
        if rule.needs_first and not isinstance(call.layout, Layout):  # as apply_layout_rule does
            return _layout_rules.deny(tracer, call)
        return rule(tracer, call)

    counted.needs_first = False  # type: ignore[attr-defined]
    monkeypatch.setitem(_layout_rules.LAYOUT_RULES, op, counted)
    run()
    assert seen, f"the layout rule of {op!r} ({rule.__name__}) was never asked"



def assert_rule_refuses(monkeypatch, op: str, loss_fn: Callable, match: str, width: int = D,
                        interact: bool = False) -> None:
    """:func:`assert_layout_refused`; the rule of ``op`` must be asked, except for an interaction
    (raised before the call by the tracer's check, for float reductions and normalisations)."""
    if interact:
        assert_layout_refused(loss_fn, match, width, interact=True)
    else:
        assert_rule_used(monkeypatch, op, lambda: assert_layout_refused(loss_fn, match, width))

# ------------------------------------------------------------------------------------- models
# (moved from tests/test_ghost.py; its ``reference_step`` is ``model_reference_step`` here)


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


def model_reference_step(model, params, batch, max_norm, style, gamma=0.01):
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
