"""Helpers shared by the ghost engine's tests (tests/test_ghost_*.py), float64 throughout.

The reference is always independent of the engine: ``fundp.testing.reference_step`` runs
``loss_fn`` on one example at a time through plain autograd and clips by hand.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import ExamplesInteractError, GhostUnsupportedError
from fundp.testing import reference_step

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
