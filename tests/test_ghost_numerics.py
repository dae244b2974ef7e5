"""The ghost engine under adversarial numerics, compilation and unusual parameters (issue 26).

References are independent of the engine: per-example gradients by micro-batching
(``fundp.testing.micro_batch_grads``, one autograd call per example, in float64 unless stated) and
explicit float64 loops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import _norms
from fundp.engines.ghost._norms import LeafGrads, leaf_sq_norms
from fundp.engines.ghost._uses import Factor, Ids
from fundp.testing import micro_batch_grads
from models import graph_break_loss

B, T, D, P = 5, 4, 8, 4  # 2 T^2 <= P D: the linear weight's norm takes the ghost (Gram) form
BAD = 2  # the adversarial example's row (not 0 or B - 1, which first-call verification checks)


def linear_problem(dtype, magnitude, seed=0):
    """A linear layer on ``T`` tokens whose loss reads the tokens' mean.  Example ``BAD`` has tokens
    ``+M e_0 + w_0`` and ``-M e_0 + w_1``: its weight gradient ``y (sum_t x_t)^T / T`` is of order 1
    while its Gram terms are of order ``M^2`` (the Gram form cancels catastrophically)."""
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(P, D, generator=g, dtype=dtype), "b": 0.1 * torch.randn(P, generator=g, dtype=dtype)}
    x = torch.randn(B, T, D, generator=g, dtype=dtype)
    x[BAD, 0, 0], x[BAD, 1, 0] = magnitude, -magnitude
    x[BAD, :2, 1:] *= 3
    batch = {"x": x, "y": torch.randn(B, P, generator=g, dtype=dtype)}

    def loss_fn(p, b):
        h = F.linear(b["x"], p["w"], p["b"])
        return (h.mean(dim=1) * b["y"]).sum(dim=-1)

    return params, batch, loss_fn


def benign_row(batch, seed=7):
    g = torch.Generator().manual_seed(seed)
    swapped = {k: v.clone() for k, v in batch.items()}
    swapped["x"][BAD] = torch.randn(T, D, generator=g, dtype=batch["x"].dtype)
    return swapped


def flat(tree):
    return torch.cat([v.double().reshape(v.shape[0], -1) if v.dim() else v.double().reshape(1, 1) for v in tree.values()], dim=1)


def true_grads(loss_fn, params, batch, autocast):
    """``[B, n]`` per-example gradients by micro-batching (under autocast as the engine ran)."""
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grads, _, _ = micro_batch_grads(loss_fn, params, batch, dtype=None)
    else:
        grads, _, _ = micro_batch_grads(loss_fn, params, batch)
    return flat(grads)


def run(loss_fn, params, batch, autocast, grad_method, max_norm):
    f = fundp.clipped_grad_sum(loss_fn, max_norm=max_norm, grad_method=grad_method)
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return f(params, batch)
    return f(params, batch)


CASES = [(torch.float64, 1e11, False, 1e-6), (torch.float32, 1e5, False, 1e-3), (torch.float32, 1e5, True, 3e-2)]
IDS = ["float64", "float32", "bfloat16-autocast"]


@pytest.mark.parametrize("dtype, magnitude, autocast, tol", CASES, ids=IDS)
@pytest.mark.parametrize("grad_method", ["ghost", "auto"])
def test_an_adversarial_example_is_clipped_to_max_norm(dtype, magnitude, autocast, tol, grad_method):
    params, batch, loss_fn = linear_problem(dtype, magnitude)
    max_norm = 1.0
    out = run(loss_fn, params, batch, autocast, grad_method, max_norm)
    grads = true_grads(loss_fn, params, batch, autocast)
    norms = grads.norm(dim=1)
    assert norms[BAD] > 2 * max_norm  # the example must be clipped
    # Each example's clipped contribution, with the engine's clip factor, is at most C (1 + tol).
    factors = torch.clamp(max_norm / out.norms.double(), max=1.0)
    contributions = factors * norms
    assert bool((contributions <= max_norm * (1 + tol)).all()), contributions.tolist()
    torch.testing.assert_close(out.norms.double(), norms, rtol=tol, atol=0)
    # The clipped sum equals micro-batching's, clipped by hand.
    expected = (torch.clamp(max_norm / norms, max=1.0).unsqueeze(1) * grads).sum(dim=0)
    got = flat({k: v.unsqueeze(0) for k, v in out.grads.items()})[0]
    assert (got - expected).norm() <= tol * B * max_norm


@pytest.mark.parametrize("dtype, magnitude, autocast, tol", CASES, ids=IDS)
def test_replacing_one_example_by_an_adversary_moves_the_clipped_sum_by_at_most_2C(dtype, magnitude, autocast, tol):
    params, batch, loss_fn = linear_problem(dtype, magnitude)
    max_norm = 1.0
    bad = run(loss_fn, params, batch, autocast, "auto", max_norm)
    good = run(loss_fn, params, benign_row(batch), autocast, "auto", max_norm)
    moved = flat({k: (bad.grads[k] - good.grads[k]).unsqueeze(0) for k in bad.grads})[0].norm()
    assert moved <= 2 * max_norm * (1 + tol), float(moved)


def test_benign_examples_are_not_recomputed(monkeypatch):
    """The materialised fallback runs only for flagged examples: none in an ordinary float32 batch."""
    def refuse(*args, **kwargs):
        raise AssertionError("materialised recomputation ran for a benign batch")

    monkeypatch.setattr(_norms, "_materialised_sq_norm", refuse)
    g = torch.Generator().manual_seed(1)
    steps, height, width = 16, 64, 64  # 2 T^2 <= p d: ghost form
    left, right = torch.randn(8, steps, height, generator=g), torch.relu(torch.randn(8, steps, width, generator=g))
    (norm,) = leaf_sq_norms([LeafGrads(torch.zeros(height, width), [Factor(left, right)])])
    exact = torch.stack([(left[i].double().T @ right[i].double()).square().sum() for i in range(8)])
    torch.testing.assert_close((norm.scale.double() ** 2) * norm.scaled.double(), exact, rtol=1e-5, atol=0)


def cancelling_factor(magnitude, dtype):
    """One example whose ``L^T R`` is ``O(1)`` while its Gram terms are ``O(magnitude^2)``."""
    g = torch.Generator().manual_seed(2)
    left = torch.ones(3, 4, 5, dtype=dtype)
    right = torch.randn(3, 4, 6, generator=g, dtype=dtype)
    right[1, 0, 0], right[1, 1, 0], right[1, 2, 0] = magnitude, -magnitude, 0.5
    return left, right


@pytest.mark.parametrize("dtype, magnitude", [(torch.float64, 1e11), (torch.float32, 1e5)])
def test_gram_norm_near_zero_or_negative_is_recomputed_not_clamped(dtype, magnitude):
    left, right = cancelling_factor(magnitude, dtype)
    total, bound = _norms._ghost_sq_norm(left, right, _norms.Shared())
    exact = torch.stack([(left[i].double().T @ right[i].double()).square().sum() for i in range(3)])
    assert abs(float(total[1]) - float(exact[1])) <= float(bound[1])  # the bound holds ...
    assert float(total[1]) <= _norms.MARGIN * float(bound[1])  # ... and flags the example
    (norm,) = leaf_sq_norms([LeafGrads(torch.zeros(5, 6, dtype=dtype), [Factor(left, right)])])
    torch.testing.assert_close((norm.scale.double() ** 2) * norm.scaled.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype, magnitude", [(torch.float64, 1e11), (torch.float32, 1e5)])
def test_tied_table_whose_lookups_cancel_its_output_use_is_exact(dtype, magnitude):
    """A table used by lookups (``S``) and as an output layer (``H``) with ``S ~ -H``: the
    ``||S||^2 + ||H||^2 + 2 <S, H>`` form cancels; the engine must recompute the example."""
    g = torch.Generator().manual_seed(4)
    vocab, width, steps = 6, 3, 2
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    id_rows = torch.randn(3, steps, width, generator=g, dtype=dtype)
    left = torch.randn(3, steps, vocab, generator=g, dtype=dtype)
    right = torch.randn(3, steps, width, generator=g, dtype=dtype)
    # Example 1: lookups M (e_0) at rows 2 and 3, the output use -M (e_0) there, plus O(1) parts.
    left[1] = 0.0
    left[1, 0, 2], left[1, 1, 3] = 1.0, 1.0
    right[1] = 0.0
    right[1, :, 0] = -magnitude
    id_rows[1, :, 0] = magnitude
    id_rows[1, :, 1:] = torch.tensor([[0.5, -0.25], [0.75, 1.0]], dtype=dtype)
    table = torch.zeros(vocab, width, dtype=dtype)
    (norm,) = leaf_sq_norms([LeafGrads(table, [Factor(left, right), Ids(ids, id_rows, vocab)])])
    exact = []
    for i in range(3):
        grad = left[i].double().T @ right[i].double()
        for s in range(steps):
            grad[ids[i, s]] += id_rows[i, s].double()
        exact.append(grad.square().sum())
    torch.testing.assert_close((norm.scale.double() ** 2) * norm.scaled.double(), torch.stack(exact), rtol=1e-5, atol=0)


# ------------------------------------------------------------------ compilation cannot change the answer


@pytest.mark.slow
@pytest.mark.parametrize("graph_break", ["print", "item", "branch"])
def test_graph_break_in_loss_fn_under_fundp_compile_is_exact_on_every_call(graph_break, capsys):
    """A ``print``, an ``.item()`` for logging or a data-dependent branch in ``loss_fn`` breaks the
    graph; the probes' gradients then come back ``None`` inside the compiled step.  They must never
    become zeros: every call equals micro-batching (the engine runs outside the graph)."""
    import torch._dynamo

    from fundp.testing import reference_step

    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, generator=g, dtype=torch.float64),
              "v": torch.randn(2, 3, generator=g, dtype=torch.float64)}

    loss_fn = graph_break_loss(graph_break)

    torch._dynamo.reset()
    step = fundp.dp_step(loss_fn, max_norm=0.5, noise_multiplier=0.0, expected_batch_size=6)
    fast = fundp.compile(step, backend="aot_eager")  # AOT graphs hide the probes from eager autograd
    for seed in range(3):
        gg = torch.Generator().manual_seed(seed + 10)
        batch = {"x": torch.randn(6, 4, generator=gg, dtype=torch.float64), "y": torch.randint(0, 2, (6,), generator=gg),
                 "m": torch.randint(0, 2, (6,), generator=gg)}
        out = fast(params, batch, fundp.random.key(seed))
        ref = reference_step(loss_fn, params, batch, max_norm=0.5, expected_batch_size=6)
        torch.testing.assert_close(out.norms, ref.norms, rtol=1e-10, atol=0)
        for name in params:
            torch.testing.assert_close(out.grads[name], ref.grads[name], rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype, magnitude, tol", [(torch.float64, 1e11, 1e-6), (torch.float32, 1e5, 1e-3)],
                         ids=["float64", "float32"])
def test_every_example_adversarial_under_plain_torch_compile_is_clipped_to_max_norm(dtype, magnitude, tol):
    """Every row's Gram form cancels: under ``torch.compile`` all of them are recomputed
    materialised (the op ``fundp::recompute_flagged``, no cap on how many), on every call."""
    import torch._dynamo

    params, batch, loss_fn = linear_problem(dtype, magnitude)
    torch._dynamo.reset()
    max_norm = 0.25
    compiled = torch.compile(fundp.clipped_grad_sum(loss_fn, max_norm=max_norm, grad_method="ghost"), backend="aot_eager")
    for seed in range(2):
        _, batch, _ = linear_problem(dtype, magnitude, seed=seed)
        x = batch["x"]
        x[:, 0, 0], x[:, 1, 0] = magnitude, -magnitude
        out = compiled(params, batch)
        norms = true_grads(loss_fn, params, batch, autocast=False).norm(dim=1)
        assert bool((norms > 2 * max_norm).all())  # every example must be clipped
        torch.testing.assert_close(out.norms.double(), norms, rtol=tol, atol=0)
        factors = torch.clamp(max_norm / out.norms.double(), max=1.0)
        assert bool((factors * norms <= max_norm * (1 + tol)).all())
    torch._dynamo.reset()


# ------------------------------------------------------------------ parameters the engine must refuse or handle


@pytest.mark.parametrize("alias", ["same", "view", "transposed_view"])
@pytest.mark.parametrize("grad_method", ["ghost", "auto"])
def test_aliased_parameters_are_refused(alias, grad_method):
    w = torch.randn(3, 4)
    other = {"same": w, "view": w[1:], "transposed_view": w.T}[alias]

    def loss_fn(p, b):
        return F.linear(b, p["a"]).sum(dim=1) + (F.linear(b, p["b"].T) if alias == "transposed_view"
                                                 else F.linear(b, p["b"])).sum(dim=1)

    f = fundp.clipped_grad_sum(loss_fn, max_norm=1.0, grad_method=grad_method)
    with pytest.raises(ValueError, match=r"params\['a'\] and params\['b'\] share memory"):
        f({"a": w, "b": other}, torch.randn(5, 4))
    f({"a": w, "b": other.clone()}, torch.randn(5, 4))  # independent copies are fine


def test_disjoint_views_of_one_storage_are_not_aliases():
    from fundp._validate import check_params

    storage = torch.randn(10)
    check_params({"a": storage[:4], "b": storage[4:]})
    with pytest.raises(ValueError, match="share memory"):
        check_params({"a": storage[:5], "b": storage[4:]})


@pytest.mark.parametrize("grad_method", ["ghost", "auto"])
def test_complex_parameters_are_refused(grad_method):
    f = fundp.clipped_grad_sum(lambda p, b: (b.to(torch.cfloat) @ p["c"]).abs(), max_norm=1.0, grad_method=grad_method)
    with pytest.raises(TypeError, match=r"params\['c'\] is complex"):
        f({"c": torch.randn(4, dtype=torch.cfloat)}, torch.randn(5, 4))


def exact_clipped_sum(loss_fn, params, batch, max_norm=1.0):
    grads, _, _ = micro_batch_grads(loss_fn, params, batch)
    rows = flat(grads)
    factors = torch.clamp(max_norm / rows.norm(dim=1), max=1.0)
    return rows.norm(dim=1), (factors.unsqueeze(1) * rows).sum(dim=0)


def test_one_dimensional_linear_weight_is_refused_clearly_by_ghost_and_exact_in_auto():
    params, x = {"w": torch.randn(4, dtype=torch.float64)}, torch.randn(5, 4, dtype=torch.float64)

    def loss_fn(p, b):
        return torch.tanh(F.linear(b, p["w"]))

    with pytest.raises(fundp.engines.ghost.GhostUnsupportedError, match=r"params\['w'\].*grad_method='auto'"):
        fundp.clipped_grad_sum(loss_fn, max_norm=1.0, grad_method="ghost")(params, x)
    out = fundp.clipped_grad_sum(loss_fn, max_norm=1.0, grad_method="auto")(params, x)
    norms, expected = exact_clipped_sum(loss_fn, params, x)
    torch.testing.assert_close(out.norms, norms, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.grads["w"], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grad_method", ["ghost", "auto"])
def test_embedding_with_max_norm_is_refused_with_what_to_do(grad_method):
    emb = torch.nn.Embedding(6, 3, max_norm=1.0)
    params = {k: v.detach().clone() for k, v in emb.named_parameters()}
    before = params["weight"].clone()

    def loss_fn(p, b):
        return torch.func.functional_call(emb, p, (b,)).sum(dim=(1, 2))

    with pytest.raises(fundp.engines.ghost.GhostUnsupportedError, match=r"max_norm.*renormalise the table after"):
        fundp.clipped_grad_sum(loss_fn, max_norm=1.0, grad_method=grad_method)(params, torch.randint(0, 6, (5, 2)))
    assert torch.equal(params["weight"], before)  # the user's table was not renormalised in place


def test_lstm_is_refused_by_ghost_naming_it_and_exact_in_auto():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(4, 3, batch_first=True)  # (float64 LSTMs fail under torch vmap itself)
    params = {k: v.detach().clone() for k, v in lstm.named_parameters()}
    x = torch.randn(5, 2, 4)

    def loss_fn(p, b):
        return torch.func.functional_call(lstm, p, (b,))[0].sum(dim=(1, 2))

    with pytest.raises(fundp.engines.ghost.GhostUnsupportedError, match=r"lstm.*grad_method='auto'"):
        fundp.clipped_grad_sum(loss_fn, max_norm=1.0, grad_method="ghost")(params, x)
    out = fundp.clipped_grad_sum(loss_fn, max_norm=1.0, grad_method="auto")(params, x)
    norms, expected = exact_clipped_sum(loss_fn, params, x)
    torch.testing.assert_close(out.norms.double(), norms, rtol=1e-5, atol=0)
    got = flat({k: v.unsqueeze(0) for k, v in out.grads.items()})[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
