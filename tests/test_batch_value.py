"""Issue 20 item 3: batches carry their mask.  A padded batch without its mask is refused (not
only warned about), also when its rows were gathered with the indices (``x[indices]``, a new
tensor); a :class:`fundp.data.Batch` holds the gathered rows, the mask and the sampler, and a step
takes it whole and refuses one from another sampler.  References are computed here, one example
at a time with plain autograd, never with the code under test."""

import pytest
import torch
import torch._dynamo

import fundp
from fundp.guards import MissingMaskError, UnsupportedCombination, forget_keys

N, Q, PAD, C = 64, 0.25, 8, 1.0
X = torch.randn(N, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
PARAMS = {"w": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)}


def loss_fn(p, b):
    return (b["x"] @ p["w"] - b["y"]) ** 2


def batches(rate=Q, key=0, steps=4):
    return fundp.data.poisson_batches(N, rate, fundp.random.key(key), steps=steps, pad_to_multiple=PAD)


def micro_batched(rows, max_norm=C, divisor=Q * N):
    """``sum_i min(1, C / ||g_i||) g_i / divisor`` over ``rows`` (indices into X, Y; repeats count)."""
    total = torch.zeros(3, dtype=torch.float64)
    for i in rows:
        w = PARAMS["w"].clone().requires_grad_(True)
        (g,) = torch.autograd.grad((X[i] @ w - Y[i]) ** 2, w)
        total += g * min(1.0, max_norm / float(g.norm()))
    return total / divisor


def padded_step(sampler):
    """A step index with at least two padding rows (so its last two gathered rows are equal)."""
    for t in range(len(sampler)):
        indices, mask = sampler[t]
        if int((~mask).sum()) >= 2 and int(mask.sum()) >= 1:
            return t
    raise AssertionError("no batch with two padding rows")


@pytest.fixture(autouse=True)
def fresh_keys():
    forget_keys()


def test_the_issues_repro_a_gathered_poisson_batch_without_its_mask_is_refused():
    """Without sampler= (as three of four examples were): the padding rows are copies of example 0."""
    sampler = batches()
    indices, mask = sampler[padded_step(sampler)]
    step = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=1.0, sample_rate=Q, num_examples=N, grad_method="vmap")
    gathered = {"x": X[indices], "y": Y[indices]}
    assert torch.equal(gathered["x"][-1], X[0]) and torch.equal(gathered["x"][-2], X[0])  # the issue's copies of example 0
    with pytest.raises(MissingMaskError, match="mask") as caught:
        step(PARAMS, gathered, fundp.random.key(1))
    assert "fundp.data.gather" in str(caught.value) and "check_padding=False" in str(caught.value)
    with pytest.raises(ValueError, match="mask"):  # every call is looked at (CPU tensors: no device sync)
        step(PARAMS, gathered, fundp.random.key(2))
    ledger = fundp.Ledger()
    out = step(PARAMS, gathered, fundp.random.key(3), mask=mask, ledger=ledger)  # with its mask: trains
    assert out.ledger.steps == 1 and not ledger.steps  # the refused calls consumed nothing


def test_a_gathered_batch_value_trains_and_equals_micro_batching_over_its_real_rows():
    sampler = batches()
    step = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=0.0, sampler=sampler, grad_method="vmap")
    for t in range(len(sampler)):
        indices, mask = sampler[t]
        batch = fundp.data.gather({"x": X, "y": Y}, indices, mask)
        assert isinstance(batch, fundp.data.Batch) and batch.sampler is sampler and batch.mask is mask
        out = step(PARAMS, batch, fundp.random.key(t))
        expected = micro_batched(indices[mask].tolist())
        torch.testing.assert_close(out.grads["w"], expected, rtol=1e-12, atol=1e-14)
        raw = step(PARAMS, {"x": X[indices], "y": Y[indices]}, fundp.random.key(t), mask=mask)
        assert torch.equal(out.grads["w"], raw.grads["w"])


def test_a_batch_value_with_noise_and_a_ledger_equals_the_raw_call_with_its_mask():
    sampler = batches()
    step = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=1.3, sampler=sampler, grad_method="vmap", check_key_reuse=False)
    ledger_a, ledger_b = fundp.Ledger(), fundp.Ledger()
    for t, (indices, mask) in enumerate(sampler):
        key = fundp.random.fold_in(fundp.random.key(5), t)
        a = step(PARAMS, fundp.data.gather({"x": X, "y": Y}, indices, mask), key, ledger=ledger_a)
        b = step(PARAMS, {"x": X[indices], "y": Y[indices]}, key, mask=mask, ledger=ledger_b)
        assert torch.equal(a.grads["w"], b.grads["w"])
        ledger_a, ledger_b = a.ledger, b.ledger
    assert ledger_a == ledger_b == fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.3, sample_rate=Q, steps=4)


def test_opting_out_trains_on_data_that_legitimately_repeats_rows():
    rows = [3, 5, 7, 7]  # example 7 twice, both real (e.g. a duplicated record in the data)
    batch = {"x": X[rows], "y": Y[rows]}
    kwargs = dict(max_norm=C, noise_multiplier=0.0, expected_batch_size=4.0, grad_method="vmap")
    with pytest.raises(MissingMaskError):
        fundp.dp_step(loss_fn, **kwargs)(PARAMS, batch, fundp.random.key(0))
    out = fundp.dp_step(loss_fn, check_padding=False, **kwargs)(PARAMS, batch, fundp.random.key(0))
    torch.testing.assert_close(out.grads["w"], micro_batched(rows, divisor=4.0), rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="check_padding"):
        fundp.dp_step(loss_fn, check_padding="no", **kwargs)
    # The opt-out covers the look at the rows only: a padded index tensor without its mask stays refused.
    indices, _ = batches()[0]
    relaxed = fundp.dp_step(lambda p, b: (X[b] @ p["w"]) ** 2, check_padding=False, **kwargs)
    with pytest.raises(MissingMaskError, match="PoissonBatches"):
        relaxed(PARAMS, indices, fundp.random.key(1))


def test_a_batch_from_another_sampler_is_refused():
    sampler = batches()
    step = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=1.0, sampler=sampler, grad_method="vmap")
    dataset = {"x": X, "y": Y}
    for other in (batches(rate=0.5), batches(key=1)):  # another rate; the same rate, other batches
        with pytest.raises(ValueError, match="not from the sampler the step was built for"):
            step(PARAMS, fundp.data.gather(dataset, *other[0]), fundp.random.key(2))
    twin = batches()  # built from the same arguments: it draws the very same batches
    step(PARAMS, fundp.data.gather(dataset, *twin[0]), fundp.random.key(3))
    # Without sampler=: a step accounting Poisson at sample_rate refuses shuffled batches, a
    # correlated-noise step refuses plain Poisson batches.
    shuffled = fundp.data.shuffled_batches(N, 16, fundp.random.key(0), steps=2)
    plain = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=1.0, sample_rate=Q, num_examples=N, grad_method="vmap")
    with pytest.raises(UnsupportedCombination) as caught:
        plain(PARAMS, fundp.data.gather(dataset, *next(iter(shuffled))), fundp.random.key(4))
    assert caught.value.pair == ("noise_mechanism=None", "sampler=shuffled") and isinstance(caught.value, ValueError)
    import fundp.mf as mf

    mech = mf.mechanism(mf.banded_toeplitz([1.0, 0.5], 4), mf.min_separation(2))
    correlated = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=1.0, expected_batch_size=Q * N, noise_mechanism=mech,
                               grad_method="vmap")
    with pytest.raises(UnsupportedCombination) as caught:
        correlated(PARAMS, fundp.data.gather(dataset, *sampler[0]), fundp.random.key(5), noise_state=mech.init(PARAMS))
    assert caught.value.pair == ("noise_mechanism", "sampler=poisson")


def test_a_batch_value_refuses_a_second_mask_and_is_immutable():
    sampler = batches()
    indices, mask = sampler[0]
    batch = fundp.data.gather({"x": X, "y": Y}, indices, mask)
    step = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=1.0, sampler=sampler, grad_method="vmap")
    with pytest.raises(ValueError, match="carries its own mask"):
        step(PARAMS, batch, fundp.random.key(0), mask=mask)
    with pytest.raises(AttributeError, match="immutable"):
        batch.mask = torch.ones_like(mask)
    data, unpacked_mask = batch  # unpacks as (rows, mask)
    assert data is batch.data and unpacked_mask is mask
    with pytest.raises(ValueError, match="mask"):
        fundp.data.Batch(batch.data, mask[:-1], sampler)


def test_gather_takes_the_sampler_from_the_mask_or_needs_it():
    sampler = batches()
    indices, mask = sampler[0]
    copy = mask.clone()  # a copy carries no tag
    with pytest.raises(ValueError, match="sampler="):
        fundp.data.gather(X, indices, copy)
    assert fundp.data.gather(X, indices, copy, sampler=sampler).sampler is sampler
    with pytest.raises(ValueError, match="not by sampler="):
        fundp.data.gather(X, indices, mask, sampler=batches(key=3))


def test_the_batch_value_is_a_pytree_that_keeps_its_sampler():
    import torch.utils._pytree as pytree

    sampler = batches()
    batch = fundp.data.gather({"x": X, "y": Y}, *sampler[0])
    leaves, spec = pytree.tree_flatten(batch)
    assert len(leaves) == 3  # x, y and the mask
    doubled = pytree.tree_map(lambda t: t * 2 if t.dtype != torch.bool else t, batch)
    assert isinstance(doubled, fundp.data.Batch) and doubled.sampler is sampler
    assert torch.equal(doubled.data["x"], 2 * batch.data["x"])
    moved = batch.to(torch.float32)
    assert moved.data["x"].dtype == torch.float32 and moved.sampler is sampler and moved.mask.dtype == torch.bool


def test_the_loader_yields_batch_values_that_a_step_takes_whole():
    dataset = torch.utils.data.TensorDataset(X, Y)
    loader = fundp.data.poisson_loader(dataset, Q, fundp.random.key(0), steps=3, pad_to_multiple=PAD)
    step = fundp.dp_step(lambda p, b: (b[0] @ p["w"] - b[1]) ** 2, max_norm=C, noise_multiplier=0.0, sampler=loader,
                         grad_method="vmap")
    expected_batches = batches(steps=3)
    for t, batch in enumerate(loader):
        assert isinstance(batch, fundp.data.Batch)
        indices, mask = expected_batches[t]
        assert torch.equal(batch.mask, mask)
        out = step(PARAMS, batch, fundp.random.key(t))
        torch.testing.assert_close(out.grads["w"], micro_batched(indices[mask].tolist()), rtol=1e-12, atol=1e-14)
        rows, mask_again = batch  # the old form unpacks; its tensors are tagged, so the mask cannot be dropped
        with pytest.raises(MissingMaskError):
            step(PARAMS, rows, fundp.random.key(t))
        assert torch.equal(step(PARAMS, rows, fundp.random.key(t), mask=mask_again).grads["w"], out.grads["w"])


def test_train_step_takes_a_batch_value():
    sampler = batches()
    step = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=1.0, sampler=sampler, grad_method="vmap")
    opt = fundp.optim.sgd(0.1)
    state = fundp.TrainState.create(PARAMS, opt, fundp.random.key(0))
    for indices, mask in sampler:
        state, out = fundp.train_step(step, opt, state, fundp.data.gather({"x": X, "y": Y}, indices, mask))
    assert state.ledger.steps == 4 and not torch.equal(state.params["w"], PARAMS["w"])


def test_a_batch_value_under_plain_torch_compile_fullgraph():
    """The Batch is traced with the step (one graph, no break); its sampler is checked when traced."""
    torch._dynamo.reset()
    sampler = batches()
    step = fundp.dp_step(loss_fn, max_norm=C, noise_multiplier=0.0, sampler=sampler, grad_method="vmap")
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    indices, mask = sampler[0]
    out = compiled(PARAMS, fundp.data.gather({"x": X, "y": Y}, indices, mask), fundp.random.key(0))
    torch.testing.assert_close(out.grads["w"], micro_batched(indices[mask].tolist()), rtol=1e-12, atol=1e-14)
    other = fundp.data.gather({"x": X, "y": Y}, *batches(rate=0.5)[0])
    with pytest.raises(Exception) as caught:  # with fullgraph=True dynamo reports the step's ValueError as its cause
        compiled(PARAMS, other, fundp.random.key(9))
    assert "not from the sampler the step was built for" in str(caught.value) + str(caught.value.__cause__)
    torch._dynamo.reset()
