"""Every refusal says what to do, in the user's terms (issue 26 item 7).

Each test either checks exact results against micro-batching (per-example gradients computed one
example at a time, :func:`fundp.testing.reference_step`, noiseless) or that the error names the
layer or op and the fix.
"""

from __future__ import annotations

import pytest
import torch

import fundp
from fundp.testing import reference_step

B = 4


def noiseless_step(loss_fn, grad_method, **kwargs):
    return fundp.dp_step(loss_fn, max_norm=0.5, noise_multiplier=0.0, expected_batch_size=B, grad_method=grad_method,
                         **kwargs)


def assert_exact(loss_fn, params, batch, grad_method, rtol=1e-10, **kwargs):
    out = noiseless_step(loss_fn, grad_method, **kwargs)(params, batch, fundp.random.key(0))
    ref = reference_step(loss_fn, params, batch, max_norm=0.5, expected_batch_size=B, dtype=None)
    for name in params:
        torch.testing.assert_close(out.grads[name].double(), ref.grads[name].double(), rtol=rtol, atol=rtol * 1e-2)


# ------------------------------------------------------------------ 1. nn.GRU / nn.RNN


def recurrent(cls, with_h0):
    torch.manual_seed(0)
    rnn = cls(3, 4, batch_first=True)
    params = {k: v.detach().clone() for k, v in rnn.named_parameters()}

    def loss_fn(p, b):
        args = (b, b.new_zeros(1, b.shape[0], 4)) if with_h0 else (b,)
        return torch.func.functional_call(rnn, p, args)[0].sum(dim=(1, 2))

    return loss_fn, params, torch.randn(B, 2, 3)


@pytest.mark.parametrize("cls", [torch.nn.GRU, torch.nn.RNN])
@pytest.mark.parametrize("grad_method", ["ghost", "auto", "vmap"])
def test_gru_and_rnn_without_initial_state_say_to_pass_one(cls, grad_method):
    # Before: "output with shape [1, 4] doesn't match the broadcast shape [4, 1, 4]" (auto, vmap),
    # and ghost recommended grad_method='auto', which failed so.
    loss_fn, params, x = recurrent(cls, with_h0=False)
    with pytest.raises((ValueError, RuntimeError), match=r"(nn.GRU|nn.RNN).*h0 = x.new_zeros\(num_layers"):
        noiseless_step(loss_fn, grad_method)(params, x, fundp.random.key(0))


@pytest.mark.parametrize("cls", [torch.nn.GRU, torch.nn.RNN])
def test_gru_and_rnn_with_initial_state_from_the_input_are_exact(cls):
    loss_fn, params, x = recurrent(cls, with_h0=True)
    for grad_method in ("auto", "vmap"):
        assert_exact(loss_fn, params, x, grad_method, rtol=1e-5)
    with pytest.raises(fundp.engines.ghost.GhostUnsupportedError, match=r"(gru|rnn_tanh).*grad_method='auto'"):
        noiseless_step(loss_fn, "ghost")(params, x, fundp.random.key(0))
