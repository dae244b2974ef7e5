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


# ------------------------------------------------------------------ 2. unusual einsum equations


def einsum_problem(equation, w_shape, x_shape, extra=None):
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(*w_shape, generator=g, dtype=torch.float64)}
    if extra is not None:
        params["v"] = torch.randn(*extra, generator=g, dtype=torch.float64)
    x = torch.randn(B, *x_shape, generator=g, dtype=torch.float64)
    param_first = equation.startswith("oi,")

    def loss_fn(p, b):
        operands = [p["w"], b] if param_first else [b, p["w"]] + ([p["v"]] if extra is not None else [])
        out = torch.einsum(equation, *operands)
        return out.pow(2).reshape(out.shape[0], -1).sum(dim=1)

    return loss_fn, params, x


@pytest.mark.parametrize("equation,w_shape,x_shape", [
    ("bi,ii->bi", (3, 3), (3,)),  # the parameter's diagonal: before, "output subscript i appears more than once"
    ("bi,ij->bi", (3, 5), (3,)),  # j summed in the parameter alone: before, "output subscript j does not appear"
])
def test_einsum_the_rule_cannot_take_is_exact_in_auto_and_named_by_ghost(equation, w_shape, x_shape):
    loss_fn, params, x = einsum_problem(equation, w_shape, x_shape)
    assert_exact(loss_fn, params, x, "auto")
    with pytest.raises(fundp.engines.ghost.GhostUnsupportedError,
                       match=rf"einsum\('{equation}'\), which the ghost engine has no rule for.*grad_method='auto'"):
        noiseless_step(loss_fn, "ghost")(params, x, fundp.random.key(0))


@pytest.mark.parametrize("equation,w_shape,x_shape,extra", [
    ("bti,oi->bto", (5, 3), (2, 3), None),
    ("oi,bti->bto", (5, 3), (2, 3), None),  # parameter first
    ("bij,jk->bik", (3, 5), (2, 3), None),
    ("bti,io->bo", (3, 5), (2, 3), None),
    ("bti,oi,o->bt", (5, 3), (2, 3), (5,)),  # three operands: auto
])
def test_einsum_equations_are_exact(equation, w_shape, x_shape, extra):
    loss_fn, params, x = einsum_problem(equation, w_shape, x_shape, extra)
    assert_exact(loss_fn, params, x, "auto")
    if extra is None:
        assert_exact(loss_fn, params, x, "ghost")


def test_einsum_with_ellipsis_says_to_spell_the_dims_out():
    loss_fn, params, x = einsum_problem("...i,ij->...j", (3, 5), (2, 3))
    assert_exact(loss_fn, params, x, "auto")
    with pytest.raises(fundp.engines.ghost.GhostUnsupportedError, match=r"'\.\.\.i,ij->\.\.\.j'.*spell every dim out"):
        noiseless_step(loss_fn, "ghost")(params, x, fundp.random.key(0))


# ------------------------------------------------------------------ 3. autograd.Function, checkpoint


class _Scale(torch.autograd.Function):
    """``x * w`` as an old-style Function (no setup_context): torch.func cannot run it."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum_to_size(w.shape)


def block_problem():
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64), "b": torch.randn(4, generator=g, dtype=torch.float64),
              "s": torch.randn(4, generator=g, dtype=torch.float64)}
    batches = [torch.randn(B, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    return params, batches


def block(p, h):
    return torch.tanh(torch.nn.functional.linear(h, p["w"], p["b"]))


def checkpointed(reentrant):
    def loss_fn(p, b):
        h = torch.utils.checkpoint.checkpoint(block, p, b, use_reentrant=reentrant)
        return (h * p["s"]).pow(2).sum(dim=1)

    return loss_fn


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("grad_method", ["ghost", "auto"])
def test_reentrant_checkpoint_is_exact_on_every_compiled_call(grad_method):
    # Before: the second fundp.compile call refused, blaming "tag_activation_checkpoint has no layout rule".
    params, batches = block_problem()
    loss_fn = checkpointed(reentrant=True)
    torch._dynamo.reset()
    step = fundp.compile(noiseless_step(loss_fn, grad_method), backend="eager")
    for call, batch in enumerate(batches):
        out = step(params, batch, fundp.random.key(call))
        ref = reference_step(loss_fn, params, batch, max_norm=0.5, expected_batch_size=B, dtype=None)
        for name in params:
            torch.testing.assert_close(out.grads[name], ref.grads[name], rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()


@pytest.mark.parametrize("grad_method", ["ghost", "auto", "vmap"])
def test_non_reentrant_checkpoint_says_use_reentrant(grad_method):
    # Before: CheckpointError "Recomputed values ... have different metadata" (ghost, auto) and
    # "torch.func ... don't yet support saved tensor hooks" (vmap).
    params, batches = block_problem()
    with pytest.raises((ValueError, RuntimeError), match=r"use_reentrant=True with grad_method='ghost' or 'auto'"):
        noiseless_step(checkpointed(reentrant=False), grad_method)(params, batches[0], fundp.random.key(0))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("grad_method", ["ghost", "auto", "vmap"])
def test_custom_autograd_function_says_how_to_write_it(grad_method):
    params, batches = block_problem()

    def loss_fn(p, b):
        return _Scale.apply(block(p, b), p["s"]).pow(2).sum(dim=1)

    words = "custom autograd.Function" if grad_method == "ghost" else "setup_context and generate_vmap_rule = True"
    with pytest.raises((ValueError, RuntimeError), match=words):
        noiseless_step(loss_fn, grad_method)(params, batches[0], fundp.random.key(0))


# ------------------------------------------------------------------ 4. state changed between forwards


class _CountingModel(torch.nn.Module):
    """Counts its calls in a buffer and lets the count scale its output: not a pure function."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * (1 + 0.1 * self.calls)


def stateful_problem(module):
    torch.manual_seed(0)
    model = module.double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_fn(p, b):
        return torch.func.functional_call(model, p, (b,)).pow(2).sum(dim=1)

    return loss_fn, params, torch.randn(B, 3, dtype=torch.float64)


@pytest.mark.parametrize("grad_method", ["ghost", "auto"])
def test_state_changed_between_forwards_is_named_not_blamed_on_a_parameter(grad_method):
    # Before: "the ghost engine's per-example gradients for params['lin.bias'] do not match autograd".
    loss_fn, params, x = stateful_problem(_CountingModel())
    with pytest.raises(fundp.engines.ghost.GhostVerificationError,
                       match=r"changes state between calls.*Make the forward pure.*eval mode") as error:
        noiseless_step(loss_fn, grad_method)(params, x, fundp.random.key(0))
    assert "params[" not in str(error.value)


@pytest.mark.parametrize("module", [_CountingModel, lambda: torch.nn.Sequential(torch.nn.Linear(3, 4),
                                                                                 torch.nn.BatchNorm1d(4))])
def test_vmap_says_a_forward_that_updates_state_must_be_made_pure(module):
    # Before: torch's "attempted to call in-place operation ... that would mutate a captured Tensor".
    loss_fn, params, x = stateful_problem(module())
    with pytest.raises(RuntimeError, match=r"buffer or counter updated in forward.*eval mode"):
        noiseless_step(loss_fn, "vmap")(params, x, fundp.random.key(0))


@pytest.mark.parametrize("grad_method", ["ghost", "auto"])
def test_batchnorm_in_train_mode_says_use_eval_mode(grad_method):
    loss_fn, params, x = stateful_problem(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)))
    with pytest.raises(fundp.engines.ghost.ExamplesInteractError, match=r"batch_norm.*BatchNorm1d.*eval-mode"):
        noiseless_step(loss_fn, grad_method)(params, x, fundp.random.key(0))


# ------------------------------------------------------------------ 5. found on the way


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("grad_method", ["auto", "vmap"])
def test_packed_sequences_say_keep_shapes_fixed(grad_method):
    # Before: "stack expects each tensor to be equal size, but got [3, 3] at entry 0 and [1, 3] at entry 1".
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    params = {k: v.detach().clone() for k, v in lstm.named_parameters()}

    def loss_fn(p, b):
        packed = torch.nn.utils.rnn.pack_padded_sequence(b["x"], b["n"], batch_first=True, enforce_sorted=False)
        return torch.func.functional_call(lstm, p, (packed,))[1][0][-1].pow(2).sum(dim=1)

    batch = {"x": torch.randn(B, 3, 3), "n": torch.tensor([3, 1, 2, 3])}
    with pytest.raises(RuntimeError, match=r"results of different shapes.*pack_padded_sequence.*mask"):
        noiseless_step(loss_fn, grad_method)(params, batch, fundp.random.key(0))
