"""Modules that break per-example semantics, and the strict functional_call."""

import pytest
import torch
from torch import nn

import fundp


@pytest.mark.parametrize(
    "module, fix",
    [
        (nn.BatchNorm1d(4), "GroupNorm"),
        (nn.BatchNorm2d(4), "GroupNorm"),
        (nn.SyncBatchNorm(4), "GroupNorm"),
        (nn.InstanceNorm1d(4, track_running_stats=True), "track_running_stats=False"),
        (nn.LSTM(4, 4), "nn.Linear"),
    ],
)
def test_unsafe_modules_are_named_with_their_fix(module, fix):
    model = nn.Sequential(nn.Linear(4, 4), module)
    with pytest.raises(fundp.UnsupportedModuleError, match=rf"^1 \({type(module).__name__}\).*{fix}"):
        fundp.check_model(model)


def test_safe_models_pass_and_eval_batchnorm_is_allowed():
    fundp.check_model(nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.InstanceNorm1d(4)))
    fundp.check_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4).eval()))


def test_batchnorm_breaks_per_example_semantics_in_dp_step():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    loss_fn = lambda p, x: fundp.functional_call(model, p, (x,)).sum(-1)
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, grad_method="vmap")
    with pytest.raises(fundp.UnsupportedModuleError, match="BatchNorm1d"):
        step(dict(model.named_parameters()), torch.randn(4, 4), fundp.random.key(0))


def test_misspelled_parameter_never_falls_back_silently():
    model = nn.Sequential(nn.Linear(2, 2))
    params = {"0.wieght": torch.zeros(2, 2), "0.bias": torch.zeros(2)}
    with pytest.raises(KeyError, match=r"'0.wieght' \(did you mean '0.weight'\?\)"):
        fundp.functional_call(model, params, (torch.ones(1, 2),))
    with pytest.raises(KeyError, match="0.wieght"):
        fundp.check_model(model, params)


def test_missing_trainable_parameter_is_an_error_unless_frozen():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    partial = {k: v for k, v in model.named_parameters() if k.startswith("1.")}
    with pytest.raises(ValueError, match=r"\['0.bias', '0.weight'\].*requires_grad_\(False\)"):
        fundp.check_model(model, partial)
    model[0].requires_grad_(False)
    fundp.check_model(model, partial)
