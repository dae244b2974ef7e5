"""Dropout masks keyed per example in the ghost engine (issue 26 item 4, class 5):
fundp/engines/ghost/_keyed_dropout.py.

Example ``i``'s masks depend on (key, dropout call, ``i``'s row in the step's batch, element) only,
so the per-call consistency check and the verification's single-example check 2 run with
``randomness="different"``.  References are independent: each example run alone (its own
``rows=[i]`` masks) with one autograd backward, torch's own dropout formulas, binomial bounds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import BatchConsistencyError, GhostVerificationError
from fundp.engines.ghost import _engine
from fundp.engines.ghost._keyed_dropout import keep_mask, keyed_randomness
from tests.test_plain_compile import graph_runs_backend

B, T, D, C = 8, 3, 4, 0.5


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (D, D), "conv": (2, 1, 3), "v": (2, 2 * D + 2 * T)}
    return {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in shapes.items()}


def make_batch(seed=1, size=B):
    return torch.randn(size, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def loss_fn(p, x):
    """Every keyed kind: element-wise dropout on [B, T, D], attention dropout (scaled dot product),
    alpha dropout, a channel dropout1d on [B, C, L] and dropout on GPT-2's flat [B * T, D]."""
    h = F.dropout(torch.tanh(F.linear(x, p["w"])), 0.3, training=True)  # [B, T, D]
    q = h.unsqueeze(1)  # [B, 1, T, D]: one head
    a = F.scaled_dot_product_attention(q, q, q, dropout_p=0.25).squeeze(1)
    a = F.alpha_dropout(a, 0.2, training=True)
    c = F.dropout1d(F.conv1d(x.transpose(1, 2)[:, :1], p["conv"], padding=1), 0.5, training=True)  # [B, 2, T]
    flat = F.dropout(h.reshape(-1, D), 0.4, training=True).reshape(x.shape[0], T, D)
    features = torch.cat([a.mean(1), flat.mean(1), c.flatten(1)], dim=1)
    return F.linear(features, p["v"]).pow(2).sum(1)


def losses_on(p, x, rows, key):
    with keyed_randomness(key, x, "different", rows) as mode:
        out = loss_fn(p, x)
    assert mode.unkeyed is None
    return out


def test_each_example_sees_its_masks_in_the_batch_in_a_part_and_alone():
    p, x, key = make_params(), make_batch(), fundp.random.key(3)
    whole = losses_on(p, x, torch.arange(B), key)
    part = torch.tensor([6, 1, 3])
    torch.testing.assert_close(losses_on(p, x[part], part, key), whole[part], rtol=1e-12, atol=0)
    alone = torch.stack([losses_on(p, x[i:i + 1], torch.tensor([i]), key)[0] for i in range(B)])
    torch.testing.assert_close(alone, whole, rtol=1e-12, atol=0)
    # the masks matter: another key, or an example run as another row, gives other losses
    assert not torch.allclose(losses_on(p, x, torch.arange(B), fundp.random.key(4)), whole, rtol=1e-3)
    assert not torch.allclose(losses_on(p, x[part], torch.tensor([0, 2, 4]), key), whole[part], rtol=1e-3)


def test_masks_differ_between_keys_calls_and_rows_and_keep_one_minus_p():
    n, width, p = 64, 4096, 0.3
    rows = torch.arange(n)
    mask = keep_mask(fundp.random.key(0), 0, rows, width, p)
    # keep rate: Binomial(n * width, 1 - p); 6 standard deviations, a false failure has probability < 1e-8
    sd = math.sqrt(p * (1 - p) / mask.numel())
    assert abs(float(mask.double().mean()) - (1 - p)) < 6 * sd
    # each row's rate too (n rows, 6 sd each: a union bound < 64 * 2e-9)
    assert float((mask.double().mean(1) - (1 - p)).abs().max()) < 6 * math.sqrt(p * (1 - p) / width)
    # independence: the agreement of two masks is (1-p)^2 + p^2 when independent
    agree = (1 - p) ** 2 + p**2
    bound = 6 * math.sqrt(agree * (1 - agree) / (n * width))
    for other in (keep_mask(fundp.random.key(1), 0, rows, width, p),  # another key
                  keep_mask(fundp.random.key(0), 1, rows, width, p),  # the next dropout call
                  keep_mask(fundp.random.key(0), 0, rows + 1, width, p),  # the next row
                  torch.roll(mask, 1, dims=1)):  # the next element
        assert abs(float((mask == other).double().mean()) - agree) < bound
    assert keep_mask(fundp.random.key(0), 0, rows, width, 1.0).sum() == 0


@pytest.mark.parametrize("alpha", [False, True], ids=["dropout", "alpha_dropout"])
def test_the_output_is_torchs_formula(alpha):
    x = torch.full((B, 50), 2.0, dtype=torch.float64)
    op = F.alpha_dropout if alpha else F.dropout
    torch_values = set(op(x, 0.3, training=True).unique().tolist())  # (torch's own draw: two values)
    with keyed_randomness(fundp.random.key(0), x, "different"):
        ours = op(x, 0.3, training=True)
    assert len(torch_values) == 2 and ours.unique().numel() == 2
    for value, expected in zip(sorted(ours.unique().tolist()), sorted(torch_values)):
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # channel dropout: one draw per (row, channel)
    with keyed_randomness(fundp.random.key(0), x, "different"):
        maps = F.dropout2d(torch.ones(B, 6, 3, 3, dtype=torch.float64), 0.5, training=True)
    assert torch.equal(maps.amax((2, 3)), maps.amin((2, 3))) and set(maps.unique().tolist()) <= {0.0, 2.0}


@torch.jit.script
def _hidden_shift(h: torch.Tensor) -> torch.Tensor:
    # A batch mean out of the tracer's sight (to it a constant), only once some activation exceeds 10.
    active = (h.abs().amax() > 10.0).to(h.dtype)
    return active * h.mean(0, keepdim=True)


def hidden_coupled_dropout_loss(p, x):
    h = F.dropout(F.linear(x, p["w"]), 0.2, training=True)
    return F.linear(h - _hidden_shift(h.detach()), p["u"]).pow(2).sum((1, 2))


def quiet_and_loud():
    quiet = 0.1 * make_batch(5)
    loud = make_batch(6)
    loud[2] *= 100.0
    return quiet, loud


def test_a_hidden_coupling_in_a_dropout_model_is_caught_on_the_call_where_it_acts():
    # Before: with randomness="different" the check was skipped: the later call was silently wrong.
    params, (quiet, loud) = {"w": make_params()["w"], "u": make_params()["v"][:, :D]}, quiet_and_loud()
    step = fundp.dp_step(hidden_coupled_dropout_loss, max_norm=1e9, noise_multiplier=0.0, expected_batch_size=B,
                         randomness="different")
    step(params, quiet, fundp.random.key(0))  # verified (checks 1 and 2): the coupling is off
    with pytest.raises(BatchConsistencyError, match="in the batch of 8 but"):
        step(params, loud, fundp.random.key(1))


def test_verification_check_2_runs_with_dropout_and_catches_wrong_norms(monkeypatch):
    # Norms made twice too large leave the weighted sum (check 1) right: only single examples see them.
    real = _engine.leaf_sq_norms
    monkeypatch.setattr(_engine, "leaf_sq_norms",
                        lambda handlers: [s if s is None else s._replace(scaled=4 * s.scaled) for s in real(handlers)])
    f = fundp.clipped_grad_sum(loss_fn, max_norm=C, grad_method="ghost", randomness="different")
    with pytest.raises(GhostVerificationError, match="per-example norm of .* alone gives"):
        f(make_params(), make_batch(), None, fundp.random.key(0))


def micro_batched(params, x, key):
    """Each example alone with its own rows=[i] masks, one autograd backward each: (clipped sum, norms)."""
    sums = {name: torch.zeros_like(value) for name, value in params.items()}
    norms = []
    for i in range(x.shape[0]):
        leaves = {name: value.clone().requires_grad_() for name, value in params.items()}
        with keyed_randomness(key, x[i:i + 1], "different", torch.tensor([i])):
            loss = loss_fn(leaves, x[i:i + 1])[0]
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
        norms.append(norm)
        for name, g in grads.items():
            sums[name] += g * min(1.0, C / float(norm))
    return sums, torch.stack(norms)


@pytest.mark.parametrize("compiled", [None, torch.compile, fundp.compile], ids=["eager", "torch.compile", "fundp.compile"])
def test_ghost_with_dropout_is_micro_batching_with_the_same_masks(compiled):
    params = make_params()
    f = fundp.clipped_grad_sum(loss_fn, max_norm=C, grad_method="ghost", randomness="different")
    if compiled:
        backend, runs, graphs = graph_runs_backend()
        f = compiled(f, backend=backend)
    for call in range(3):
        # Compiled, the first call runs the engine eagerly outside the graph (where every random op
        # is seen); once it drew only keyed dropout masks, the second recompiles with the engine in
        # the graph (verified there, its first call in the graph), the third reuses that graph.
        batch, call_key = make_batch(10 + call), fundp.random.key(7 + call)
        if compiled:
            runs[0], before = 0, graphs[0]
        out = f(params, batch, None, call_key)
        sums, norms = micro_batched(params, batch, call_key)
        torch.testing.assert_close(out.norms, norms, rtol=1e-10, atol=0)
        for name in params:
            torch.testing.assert_close(out.grads[name], sums[name], rtol=1e-10, atol=1e-12)
    if compiled:  # the last call: not recompiled for a new key; the engine's graph and the step's
        # prefix (split where the first call left the graph) -- two graphs, none more
        assert runs[0] <= 2 and graphs[0] == before, f"{runs[0]} graphs run, {graphs[0] - before} compiled"


def test_random_ops_not_keyed_per_example_keep_the_old_behaviour(monkeypatch):
    # torch.rand draws from torch's RNG seeded from the key; a sequence-first dropout's dim 0 is not
    # the batch: such runs are marked, and neither the check nor check 2 runs (no false alarm).
    checks = []
    monkeypatch.setattr(_engine, "_check_consistency", lambda *a, **k: checks.append(1))

    def noisy(p, x):
        h = F.linear(x, p["w"])
        return (h * torch.rand_like(h)).pow(2).sum((1, 2))

    def sequence_first(p, x):
        h = F.dropout(F.linear(x.transpose(0, 1), p["w"]), 0.3, training=True)  # [T, B, D]
        return h.pow(2).sum((0, 2))

    params = {"w": make_params()["w"]}
    for loss in (noisy, sequence_first):
        f = fundp.clipped_grad_sum(loss, max_norm=C, grad_method="ghost", randomness="different", verify="always")
        first = f(params, make_batch(), None, fundp.random.key(0))
        again = f(params, make_batch(), None, fundp.random.key(0))
        assert torch.equal(first.norms, again.norms)  # deterministic in the key
    assert checks == []


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_gpt2_in_train_mode_with_dropout_is_exact_on_the_ghost_path(attn):
    # GPT-2's dropouts (embeddings, residuals, attention weights: F.dropout eagerly, dropout_p of
    # scaled_dot_product_attention with "sdpa") all keyed per example: the default step stays on the
    # ghost path, runs both checks, and equals each example run alone with its rows=[i] masks.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab, size, length = 50, 6, 8
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=16, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, use_cache=False, attn_implementation=attn,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).double().train()
    params = {name: p.detach() for name, p in model.named_parameters()}

    def gpt_loss(p, x):
        logits = torch.func.functional_call(model, p, (x,)).logits[:, :-1]
        per_token = F.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1), reduction="none")
        return per_token.reshape(x.shape[0], -1).mean(1)

    x = torch.randint(0, vocab, (size, length), generator=torch.Generator().manual_seed(1))
    key = fundp.random.key(3)
    out = fundp.clipped_grad_sum(gpt_loss, max_norm=1e9, randomness="different")(params, x, None, key)
    norms = []
    for i in range(size):
        leaves = {name: value.clone().requires_grad_() for name, value in params.items()}
        with keyed_randomness(key, x[i:i + 1], "different", torch.tensor([i])):
            loss = gpt_loss(leaves, x[i:i + 1])[0]
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        norms.append(torch.sqrt(sum(g.square().sum() for g in grads if g is not None)))
    torch.testing.assert_close(out.norms, torch.stack(norms), rtol=1e-10, atol=0)


def test_under_compile_random_ops_the_masks_do_not_take_run_the_engine_outside_the_graph():
    # Dynamo never shows torch.rand & co. to a TorchFunctionMode (and such an op traced inside the
    # engine's torch.func.vjp fails to compile): a compiled step runs the engine eagerly, outside the
    # graph, until an eager run has shown that loss_fn draws only keyed dropout masks.  Those that
    # draw otherwise stay outside, seeded from the key: the same bits as the eager step.
    def sequence_first(p, x):
        return F.dropout(F.linear(x.transpose(0, 1), p["w"]), 0.3, training=True).pow(2).sum((0, 2))

    def noisy(p, x):
        h = F.linear(x, p["w"])
        return (h * (torch.rand(h.shape, dtype=h.dtype) > 0.3)).pow(2).sum((1, 2))

    params = {"w": make_params()["w"]}
    for loss in (sequence_first, noisy):
        f = fundp.clipped_grad_sum(loss, max_norm=C, grad_method="ghost", randomness="different")
        compiled = torch.compile(f, backend="aot_eager")
        for call in range(3):
            batch, call_key = make_batch(20 + call), fundp.random.key(30 + call)
            expected, got = f(params, batch, None, call_key), compiled(params, batch, None, call_key)
            assert torch.equal(got.norms, expected.norms) and torch.equal(got.grads["w"], expected.grads["w"])
