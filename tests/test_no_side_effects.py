"""Building or running a step leaves torch's global configuration as it was (issue: no global side effects)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fundp


def _unrelated(x):
    # Compiled code elsewhere in the process that takes a gradient: with dynamo's default
    # trace_autograd_ops=False it breaks the graph at torch.autograd.grad.
    x = x.detach().requires_grad_()
    y = (x.sin() ** 2).sum()
    (g,) = torch.autograd.grad(y, x)
    return g * 2


def _breaks(fn, *args) -> int:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    torch._dynamo.reset()
    return explanation.graph_break_count


def test_building_and_running_steps_leaves_dynamo_config_and_other_compiled_code_unchanged():
    config_before = torch._dynamo.config.get_config_copy()
    breaks_before = _breaks(_unrelated, torch.randn(3))
    assert breaks_before >= 1
    model = torch.nn.Linear(4, 3).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p, b):
        return F.cross_entropy(fundp.functional_call(model, p, (b["x"],)), b["y"], reduction="none")

    batch = {"x": torch.randn(5, 4, dtype=torch.float64), "y": torch.arange(5) % 3}
    for i, grad_method in enumerate(("auto", "ghost", "vmap")):
        step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=5, grad_method=grad_method)
        step(params, batch, fundp.random.key(3 * i))  # a fresh key per step
        torch._dynamo.reset()
        fundp.compile(step, backend="eager")(params, batch, fundp.random.key(3 * i + 1))
        torch.compile(step, backend="eager")(params, batch, fundp.random.key(3 * i + 2))
        torch._dynamo.reset()
    assert torch._dynamo.config.get_config_copy() == config_before
    assert _breaks(_unrelated, torch.randn(3)) == breaks_before
