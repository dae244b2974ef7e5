"""The fast path under attack (issue 26): models an adversarial user would write, each called three
times on different batches of one shape.

Every call of ``grad_method="auto"`` must give the per-example norms and the clipped sum of
micro-batching (one example at a time through plain autograd, :func:`fundp.testing.reference_step`)
in float64, or raise a clear fundp error naming the problem.  The batches are arranged so that the
checks of the previous engine (one verification per signature, rows 0 and B-1 alone) pass on the
first call: each test failed on the code before default deny.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.engines.ghost import ExamplesInteractError, GhostUnsupportedError, GhostVerificationError, ghost_plan
from fundp.testing import reference_step

B, T, D, H, K = 6, 5, 4, 5, 3
C = 0.05
CLEAR = (ExamplesInteractError, GhostUnsupportedError, GhostVerificationError)


pytestmark = pytest.mark.usefixtures("float64_by_default")  # tests/conftest.py


def mlp_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(H, D, generator=g), "w2": torch.randn(K, H, generator=g)}


def mlp_losses(p, x, y):
    return F.cross_entropy(F.linear(torch.tanh(F.linear(x, p["w1"])), p["w2"]), y, reduction="none")


def features(seed):
    g = torch.Generator().manual_seed(100 + seed)
    return {"x": torch.randn(B, D, generator=g), "y": torch.randint(0, K, (B,), generator=g)}


def take(batch, rows):
    rows = torch.as_tensor(rows)
    return {k: v[rows] for k, v in batch.items()}


def outcome_of_every_call(loss_fn, params, batches, **kwargs):
    """Runs ``"auto"`` on each batch in turn; asserts each result equals micro-batching.

    Returns ``"exact"`` or the clear error that stopped the run (a refusal is allowed, a wrong
    number is not).
    """
    f = fundp.clipped_grad_sum(loss_fn, max_norm=C, grad_method="auto", **kwargs)
    for call, batch in enumerate(batches):
        ref = reference_step(loss_fn, params, batch, max_norm=C, expected_batch_size=1)
        try:
            out = f(params, batch, key=fundp.random.key(call))
        except CLEAR as error:
            return type(error).__name__
        assert bool((ref.norms > C).any()), "the reference must clip something"
        torch.testing.assert_close(out.norms, ref.norms, rtol=1e-9, atol=1e-12, msg=f"norms differ on call {call}")
        for name in params:
            torch.testing.assert_close(out.grads[name], ref.grads[name], rtol=1e-9, atol=1e-12,
                                       msg=f"clipped sum of {name} differs on call {call}")
    return "exact"


def arranged_by_loss(params, batch, first_rows):
    """``batch`` reordered by loss (descending); then the given ranks are put first and last."""
    losses = mlp_losses(params, batch["x"], batch["y"])
    ranked = losses.argsort(descending=True).tolist()
    top, second = ranked[first_rows[0]], ranked[first_rows[1]]
    middle = [r for r in ranked if r not in (top, second)]
    return take(batch, [top] + middle + [second])


# ------------------------------------------------------------------ couplings after a loss function


@pytest.mark.parametrize("threshold", ["quantile", "sorted", "kthvalue", "topk_detached", "max_scaled"])
def test_loss_truncation_at_a_batch_quantile(threshold):
    # The largest losses of the batch are dropped: alone, an example is never above its own quantile.
    params = mlp_params()

    def loss_fn(p, b):
        losses = mlp_losses(p, b["x"], b["y"])
        n = losses.shape[0]
        if threshold == "quantile":
            cut = torch.quantile(losses, 0.6)
        elif threshold == "sorted":
            cut = losses.sort().values[(n - 1) * 3 // 5]
        elif threshold == "kthvalue":
            cut = losses.kthvalue((n - 1) * 3 // 5 + 1).values
        elif threshold == "topk_detached":
            cut = losses.detach().topk(n - (n - 1) * 3 // 5).values.min()
        else:  # a weight by the batch's largest loss: 1 only for the largest
            return losses * (losses <= losses.max() * 0.999) + losses * (losses > losses.max() * 0.999)
        return losses * (losses <= cut)

    # First batch: the two smallest losses at rows 0 and B-1, so single-example checks there pass.
    batches = [arranged_by_loss(params, features(s), (B - 1, B - 2)) for s in range(3)]
    assert outcome_of_every_call(loss_fn, params, batches) in ("exact", "ExamplesInteractError")


def test_reweighting_by_a_softmax_of_the_batch_losses():
    params = mlp_params(1)

    def loss_fn(p, b):
        losses = mlp_losses(p, b["x"], b["y"])
        weights = (losses.shape[0] * torch.softmax(losses.detach(), dim=0)).clamp(max=1.0)
        return losses * weights

    first = features(0)
    first = arranged_by_loss(params, first, (0, 1))
    first = take(first, list(range(B - 1)) + [0])  # the largest loss twice: weight 1 at rows 0 and B-1
    batches = [first, features(1), features(2)]
    assert outcome_of_every_call(loss_fn, params, batches) in ("exact", "ExamplesInteractError")


# ------------------------------------------------------------------ the unsort idiom


@pytest.mark.parametrize("unsort", ["setitem", "index_add", "index_add_", "index_copy", "setitem_new_zeros"])
def test_the_unsort_idiom_maps_rows_back_or_refuses(unsort):
    # Rows sorted by a key (as before pack_padded_sequence), processed, then put back.
    params = mlp_params(2)

    def loss_fn(p, b):
        x = b["x"]
        order = x[:, 0].argsort()
        h = torch.tanh(F.linear(x[order], p["w1"]))
        if unsort == "setitem":
            out = torch.zeros_like(h)
            out[order] = h
        elif unsort == "setitem_new_zeros":
            out = x.new_zeros(x.shape[0], H)
            out[order] = h
        elif unsort == "index_add":
            out = torch.zeros(x.shape[0], H).index_add(0, order, h)
        elif unsort == "index_add_":
            out = torch.zeros(x.shape[0], H)
            out.index_add_(0, order, h)
        else:
            out = torch.zeros(x.shape[0], H).index_copy(0, order, h)
        return F.cross_entropy(F.linear(out, p["w2"]), b["y"], reduction="none")

    first = features(0)
    first = take(first, first["x"][:, 0].argsort())  # sorted: the order is the identity
    batches = [first, features(1), features(2)]
    # The rows are followed through a known permutation: exact on the ghost path.
    assert set(ghost_plan(loss_fn, params, batches[1]).values()) == {"ghost"}
    assert outcome_of_every_call(loss_fn, params, batches) == "exact"


@pytest.mark.parametrize("write", ["unknown_index", "scatter", "index_put", "partial_rows"])
def test_writes_along_the_batch_by_an_index_the_tracer_cannot_follow_leave_the_ghost_path(write):
    params = mlp_params(7)
    shift = torch.tensor([1, 2, 3, 4, 5, 0])  # a permutation the tracer cannot know is one

    def loss_fn(p, b):
        x = b["x"]
        n = x.shape[0]
        h = torch.tanh(F.linear(x, p["w1"]))
        out = torch.zeros_like(h)  # (batched under vmap, so in-place writes run there too)
        index = shift[:n] % n
        if write == "unknown_index":
            out[index] = h
        elif write == "scatter":
            out = out.scatter(0, index[:, None].expand(n, H), h)
        elif write == "index_put":
            out = out.index_put((index,), h)
        else:
            out[: n // 2 + 1] = h[: n // 2 + 1]
            out[n // 2:] = out[n // 2:] + h[: n - n // 2]
        return F.cross_entropy(F.linear(out, p["w2"]), b["y"], reduction="none")

    assert all(v.startswith("vmap") for v in ghost_plan(loss_fn, params, features(0)).values())
    assert outcome_of_every_call(loss_fn, params, [features(s) for s in range(3)]) == "exact"


# ------------------------------------------------------------------ Python numbers read from the batch


def padded(seed, lengths):
    g = torch.Generator().manual_seed(200 + seed)
    x = torch.randn(B, T, D, generator=g)
    mask = torch.arange(T) < torch.as_tensor(lengths)[:, None]
    return {"x": x * mask[..., None], "mask": mask, "len": torch.as_tensor(lengths),
            "y": torch.randint(0, K, (B,), generator=g)}


def test_trimming_padding_to_the_longest_example_of_the_batch():
    # Padding is trimmed to the batch's longest example and the mean over positions is not masked:
    # each loss depends on the longest example of the batch (alone: on its own length).
    params = mlp_params(3)

    def loss_fn(p, b):
        longest = int(b["len"].max())
        h = torch.tanh(F.linear(b["x"][:, :longest], p["w1"]))  # zero at padded positions (no bias)
        return F.cross_entropy(F.linear(h.mean(1), p["w2"]), b["y"], reduction="none")

    batches = [padded(0, [T, 2, 3, 1, 4, T]), padded(1, [2, 4, 1, 3, 2, 1]), padded(2, [1, 3, T, 2, 2, 4])]
    assert outcome_of_every_call(loss_fn, params, batches) in ("exact", "ExamplesInteractError", "GhostVerificationError")


def test_normalising_by_the_number_of_real_tokens_in_the_batch():
    params = {"w1": mlp_params(4)["w1"]}
    g = torch.Generator().manual_seed(5)
    v = torch.randn(H, generator=g)

    def loss_fn(p, b):
        count = int(b["mask"].sum())  # tokens in the whole batch
        tokens = torch.tanh(F.linear(b["x"], p["w1"])) @ v
        return (tokens * b["mask"]).sum(1) * b["x"].shape[0] / count

    # First batch: every example has the batch's mean number of tokens, so each loss is as alone.
    batches = [padded(0, [3] * B), padded(1, [1, T, 2, 4, 3, 1]), padded(2, [2, 2, T, 1, 4, 3])]
    assert outcome_of_every_call(loss_fn, params, batches) in ("exact", "ExamplesInteractError", "GhostVerificationError")
    # With a parameter the ghost path cannot see (w2 unused) the vmap fallback cannot read the
    # number either: a clear refusal, not vmap's error.
    params = mlp_params(4)
    assert outcome_of_every_call(loss_fn, params, batches) == "GhostUnsupportedError"


def test_trimming_padding_with_a_masked_mean_is_exact_and_verified_on_every_call(monkeypatch):
    # The legitimate use of a number read from the batch: trimming padding that the loss masks out.
    # Exact on every call, and verified on every call (the number may differ from call to call).
    from fundp.engines.ghost import _engine

    params = mlp_params(6)
    checks = []
    original = _engine.verify_engine
    monkeypatch.setattr(_engine, "verify_engine", lambda *a, **k: checks.append(k.get("thorough")) or original(*a, **k))

    def loss_fn(p, b):
        longest = int(b["len"].max())
        mask = b["mask"][:, :longest, None]
        h = torch.tanh(F.linear(b["x"][:, :longest], p["w1"]))
        return F.cross_entropy(F.linear((h * mask).sum(1) / mask.sum(1), p["w2"]), b["y"], reduction="none")

    batches = [padded(0, [T, 2, 3, 1, 4, T]), padded(1, [2, 4, 1, 3, 2, 1]), padded(2, [1, 3, T, 2, 2, 4])]
    assert outcome_of_every_call(loss_fn, params, batches) == "exact"
    assert checks == [True, True, True]


# ------------------------------------------------------------------ verification with dropout


def _wrong_linear_rule(monkeypatch):
    """F.linear's rule made wrong (every per-example weight gradient doubled): only verification sees it."""
    from fundp.engines.ghost import RULES, Factor, Rows

    original = RULES[F.linear]

    def double(form):
        return Factor(2 * form.left, form.right) if isinstance(form, Factor) else Rows(2 * form.rows)

    def wrong(tracer, func, args, kwargs):
        out = original(tracer, func, args, kwargs)
        if out is not None and tracer.uses:
            use = tracer.uses[-1]
            tracer.uses[-1] = use._replace(resolve=lambda grads, resolve=use.resolve: double(resolve(grads)))
        return out

    monkeypatch.setitem(RULES, F.linear, wrong)


def dropout_loss(p, b):
    h = F.dropout(torch.tanh(F.linear(b["x"], p["w1"])), 0.3, training=True)
    return F.cross_entropy(F.linear(h, p["w2"]), b["y"], reduction="none")


def test_dropout_verification_checks_a_batch_with_a_nan_in_a_masked_row(monkeypatch):
    # Before: with randomness="different" a first batch with a NaN in a masked row skipped every
    # check yet marked the signature verified, so the wrong rule was never seen.
    params = mlp_params(8)
    batch = features(3)
    batch["x"][B - 1] = float("nan")
    mask = torch.arange(B) < B - 1
    correct = fundp.clipped_grad_sum(dropout_loss, max_norm=C, grad_method="ghost", randomness="different",
                                     verify="always")
    out = correct(params, batch, mask, fundp.random.key(0))  # the check itself raises no false alarm
    assert all(bool(torch.isfinite(g).all()) for g in out.grads.values())
    _wrong_linear_rule(monkeypatch)
    f = fundp.clipped_grad_sum(dropout_loss, max_norm=C, grad_method="ghost", randomness="different")
    with pytest.raises(GhostVerificationError, match=r"params\['w"):
        f(params, batch, mask, fundp.random.key(0))


def test_a_signature_where_nothing_was_checked_is_not_recorded_as_verified(monkeypatch):
    _wrong_linear_rule(monkeypatch)
    params = mlp_params(9)
    f = fundp.clipped_grad_sum(dropout_loss, max_norm=C, grad_method="ghost", randomness="different")
    nothing = features(4)
    nothing["x"][:] = float("nan")  # no example can be checked
    f(params, nothing, torch.zeros(B, dtype=torch.bool), fundp.random.key(0))
    with pytest.raises(GhostVerificationError):  # the next call of this signature is checked
        f(params, features(5), None, fundp.random.key(1))
