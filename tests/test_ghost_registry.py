"""The public rule registry: a rule for a custom op, tested the way every rule must be.

Recipe (also in the README): register the rule, then check the step against single examples in
float64 for every clip style — here by hand, and with ``fundp.testing.assert_matches_vmap``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import RULES, Factor, ghost_plan, register_rule, to_examples
from fundp.testing import assert_matches_vmap


@torch.library.custom_op("fundp_test::scaled_linear", mutates_args=())
def scaled_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return 2 * x @ w.T


@scaled_linear.register_fake
def _(x, w):
    return x.new_empty(x.shape[:-1] + (w.shape[0],))


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    return 2 * grad @ w, 2 * grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])


scaled_linear.register_autograd(_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))

OP = torch.ops.fundp_test.scaled_linear.default


def scaled_linear_rule(tracer, func, args, kwargs):
    x, w = args
    layout = tracer.trusted(x)
    if layout is None or tracer.origin(w) is None:
        return None
    out = func(x, w.detach())
    tracer.set_layout(out, layout)
    out, index = tracer.probe(out)
    inputs = x.detach()
    # per example: g_i(w) = 2 G_i^T A_i
    tracer.record(w, lambda grads: Factor(2 * to_examples(grads[index], layout, 1), to_examples(inputs, layout, 1)),
                  "scaled_linear")
    return out


@pytest.fixture
def registered():
    register_rule(OP)(scaled_linear_rule)
    yield
    del RULES[OP]


def problem():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, generator=g, dtype=torch.float64),
              "v": torch.randn(2, 3, generator=g, dtype=torch.float64)}
    batch = {"x": torch.randn(6, 5, 4, generator=g, dtype=torch.float64), "y": torch.randint(0, 2, (6,), generator=g)}

    def loss_fn(p, b):
        h = torch.tanh(scaled_linear(b["x"], p["w"])).mean(1)
        return F.cross_entropy(F.linear(h, p["v"]), b["y"], reduction="none")

    return loss_fn, params, batch


def test_without_a_rule_the_custom_op_goes_to_vmap():
    loss_fn, params, batch = problem()
    assert ghost_plan(loss_fn, params, batch)["params['w']"].startswith("vmap")


@pytest.mark.parametrize("clip_style", ["flat", "per_layer", "automatic"])
def test_a_registered_rule_puts_the_op_on_the_ghost_path_exactly(registered, clip_style):
    loss_fn, params, batch = problem()
    assert set(ghost_plan(loss_fn, params, batch).values()) == {"ghost"}
    assert_matches_vmap(loss_fn, params, batch, max_norm=0.5, clip_style=clip_style, grad_method="ghost",
                        expected_batch_size=6)


def test_a_wrong_rule_is_refused_by_verification(registered):
    loss_fn, params, batch = problem()

    def wrong_rule(tracer, func, args, kwargs):  # forgets the factor 2
        x, w = args
        layout = tracer.trusted(x)
        out = func(x, w.detach())
        tracer.set_layout(out, layout)
        out, index = tracer.probe(out)
        inputs = x.detach()
        tracer.record(w, lambda grads: Factor(to_examples(grads[index], layout, 1), to_examples(inputs, layout, 1)), "op")
        return out

    RULES[OP] = wrong_rule
    step = fundp.dp_step(loss_fn, max_norm=0.5, noise_multiplier=0.0, expected_batch_size=6, grad_method="ghost")
    with pytest.raises(fundp.engines.ghost.GhostVerificationError, match=r"params\['w'\]"):
        step(params, batch, fundp.random.key(0))
