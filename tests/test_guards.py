"""Process-wide guards of a DP step (issues 20 item 4 and 25 item 3), each tested by the misuse."""

import warnings

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import fundp
from fundp import guards

from tests.test_step_guards import BATCH, LOSS, PARAMS, make_step  # the same tiny step


def test_a_consumed_ledger_is_refused_by_every_step_object():
    first, second = make_step(), make_step()
    ledger = fundp.Ledger()
    out = first(PARAMS, BATCH, fundp.random.key(0), ledger=ledger)
    with pytest.raises(guards.StaleLedgerError, match="another step object"):
        second(PARAMS, BATCH, fundp.random.key(1), ledger=ledger)
    assert second(PARAMS, BATCH, fundp.random.key(1), ledger=out.ledger).ledger.steps == 2


def test_a_helper_that_drops_the_ledger_is_stopped_at_its_second_epoch():
    """Issue 25: a helper that trains an epoch and does not return the ledger ran 3 x 100 steps
    and reported epsilon 0.718 instead of 1.068.  It now stops at the second epoch."""

    def train_epoch(ledger, seed):
        step = make_step()  # a new step object per epoch
        for t in range(5):
            ledger = step(PARAMS, BATCH, fundp.random.fold_in(fundp.random.key(seed), t), ledger=ledger).ledger
        # (forgets to return ledger)

    run = fundp.Ledger()
    train_epoch(run, 0)
    with pytest.raises(guards.StaleLedgerError, match="ledger = out.ledger"):
        train_epoch(run, 1)


def test_no_cap_on_remembered_ledgers():
    step = make_step()
    history = [fundp.Ledger()]
    for t in range(100):  # more than the old per-step memory of 64
        history.append(step(PARAMS, BATCH, fundp.random.key(t), ledger=history[-1]).ledger)
    with pytest.raises(guards.StaleLedgerError):
        make_step()(PARAMS, BATCH, fundp.random.key(500), ledger=history[0])
    assert history[-1].steps == 100


def test_a_step_that_raises_does_not_consume_its_ledger():
    bad = fundp.dp_step(lambda p, b: (b @ p["w"]).sum(), max_norm=1.0, noise_multiplier=1.0,  # not per-example
                        expected_batch_size=2.0, sample_rate=0.01, grad_method="vmap")
    step = make_step()
    ledger = step(PARAMS, BATCH, fundp.random.key(0), ledger=fundp.Ledger()).ledger
    with pytest.raises(Exception):
        bad(PARAMS, BATCH, fundp.random.key(1), ledger=ledger)
    # The same ledger continues the run: nothing was spent by the failed call.
    out = step(PARAMS, BATCH, fundp.random.key(2), ledger=ledger)
    assert out.ledger == fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.01, steps=2)


def test_key_reuse_is_refused_across_step_objects_by_default():
    first, second = make_step(), make_step()  # no check_key_reuse argument: the guard is on
    first(PARAMS, BATCH, fundp.random.key(3))
    with pytest.raises(guards.KeyReuseError, match="already used by a step in this process") as raised:
        second(PARAMS, BATCH, fundp.random.key(3))  # an equal key, another step object
    message = str(raised.value)  # says what to do
    assert "fold_in(key, t)" in message and "train_step" in message and "check_key_reuse=False" in message
    second(PARAMS, BATCH, fundp.random.key(4))
    guards.forget_keys()  # a new key scope
    second(PARAMS, BATCH, fundp.random.key(3))


def test_a_fresh_key_per_step_is_accepted_and_train_step_loops_never_repeat_one():
    key = fundp.random.key(0)
    steps = [make_step(), make_step(sample_rate=0.02)]
    for t in range(20):  # two step objects, one run: fold_in gives every step its own key
        steps[t % 2](PARAMS, BATCH, fundp.random.fold_in(key, t))
    opt = fundp.optim.sgd(0.1)
    state = fundp.TrainState.create(PARAMS, opt, fundp.random.key(1), ledger=None)
    for _ in range(20):
        state, _ = fundp.train_step(steps[0], opt, state, BATCH)
    assert state.step == 20
    with pytest.raises(guards.KeyReuseError):  # the same run started again from its key: refused
        fundp.train_step(steps[1], opt, fundp.TrainState.create(PARAMS, opt, fundp.random.key(1), ledger=None), BATCH)


def test_the_explicit_opt_out_allows_equal_keys():
    relaxed = make_step(check_key_reuse=False)
    key = fundp.random.key(4)
    assert torch.equal(relaxed(PARAMS, BATCH, key).grads["w"], relaxed(PARAMS, BATCH, key).grads["w"])
    make_step()(PARAMS, BATCH, key)  # an opted-out step does not record its keys
    with pytest.raises(TypeError, match="check_key_reuse"):
        make_step(check_key_reuse=None)


def test_a_noiseless_step_is_not_checked_and_records_nothing():
    quiet = make_step(noise_multiplier=0.0)  # sigma a plain 0: no noise that a repeated key could cancel
    key = fundp.random.key(8)
    assert torch.equal(quiet(PARAMS, BATCH, key).grads["w"], quiet(PARAMS, BATCH, key).grads["w"])
    make_step()(PARAMS, BATCH, key)  # the noiseless calls did not record it
    with pytest.raises(guards.KeyReuseError):
        make_step()(PARAMS, BATCH, key)
    with pytest.raises(guards.KeyReuseError):  # a per-call sigma 0 as a tensor is not read (no sync): checked
        make_step()(PARAMS, BATCH, key, noise_multiplier=torch.tensor(0.0))


def test_an_eager_step_that_raises_leaves_its_key_unused():
    bad = fundp.dp_step(lambda p, b: (b @ p["w"]).sum(), max_norm=1.0, noise_multiplier=1.0,  # not per-example
                        expected_batch_size=2.0, grad_method="vmap")
    key = fundp.random.key(5)
    with pytest.raises(Exception) as raised:
        bad(PARAMS, BATCH, key)
    assert not isinstance(raised.value, guards.KeyReuseError)
    make_step()(PARAMS, BATCH, key)  # nothing was released with it: still usable


@pytest.mark.parametrize("how", ["torch.compile", "fundp.compile"])
def test_a_compiled_step_refuses_a_reused_key_inside_one_graph(how):
    """fullgraph=True: the guard is a custom op in the graph (no graph break), checked every call."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    if how == "torch.compile":
        compiled = torch.compile(make_step(), backend=counter, fullgraph=True)
    else:  # the default engine; its first call per signature runs eagerly
        compiled = fundp.compile(make_step(grad_method="auto"), backend=counter, fullgraph=True)
    key = fundp.random.key(6)
    outs = [compiled(PARAMS, BATCH, fundp.random.fold_in(key, t)) for t in range(3)]
    with pytest.raises(guards.KeyReuseError, match="already used"):
        compiled(PARAMS, BATCH, fundp.random.fold_in(key, 2))  # reused inside the graph
    with pytest.raises(guards.KeyReuseError):
        make_step()(PARAMS, BATCH, fundp.random.fold_in(key, 1))  # one registry, eager and compiled
    make_step()(PARAMS, BATCH, fundp.random.key(7))  # used eagerly ...
    with pytest.raises(guards.KeyReuseError):
        compiled(PARAMS, BATCH, fundp.random.key(7))  # ... refused in the graph
    assert counter.frame_count == 1  # one graph: the guard did not break it
    reference = make_step(check_key_reuse=False)  # the compiled step computes the eager step's noise
    assert torch.equal(outs[2].grads["w"], reference(PARAMS, BATCH, fundp.random.fold_in(key, 2)).grads["w"])
    torch._dynamo.reset()


def graph_depth(tensor):
    """Longest chain of autograd nodes behind ``tensor`` (0 for a tensor with no graph)."""
    depth, frontier = 0, [tensor.grad_fn] if tensor.grad_fn is not None else []
    while frontier:
        depth += 1
        frontier = [n for f in frontier for n, _ in f.next_functions if n is not None]
    return depth


def test_params_that_require_grad_are_detached_and_the_graph_stays_flat():
    """``dict(model.named_parameters())`` kept requires_grad: the step's outputs carried an autograd
    graph, and a loop over them grew one node per step (depth 200 after 200 steps)."""
    model = torch.nn.Linear(3, 1)
    params = dict(model.named_parameters())
    loss_fn = lambda p, b: torch.func.functional_call(model, p, (b,)).squeeze(-1) ** 2  # noqa: E731
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.5, expected_batch_size=4.0, grad_method="vmap")
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    guards._warned_requires_grad = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = step(params, x, fundp.random.key(0))
        opt = fundp.optim.sgd(0.1)
        opt_state = opt.init(out.grads)
        for t in range(200):
            out = step(params, x, fundp.random.key(t + 1))  # a fresh key per step
            assert max(graph_depth(g) for g in (*out.grads.values(), out.loss, out.norms)) == 0
            updates, opt_state = opt.update(out.grads, opt_state, params)
            params = fundp.optim.apply_updates(params, updates)
    assert sum("require grad" in str(w.message) for w in caught) == 1  # one-time warning


def test_refused_combinations_come_from_the_guard_table_with_their_reason():
    mech = fundp.mf.mechanism(fundp.mf.tree(8), fundp.mf.single_participation())
    cyclic = fundp.mf.mechanism(fundp.mf.identity(8), fundp.mf.cyclic_poisson(2, 0.5))
    cfg = fundp.adaptive.quantile_clipping(count_noise_multiplier=10.0)
    cases = {
        ("adaptive_clipping", "noise_mechanism"): dict(adaptive_clipping=cfg, noise_mechanism=cyclic),
        ("budget", "noise_mechanism"): dict(budget=(1.0, 1e-5), noise_mechanism=mech),
        ("noise_mechanism", "secure_mode"): dict(noise_mechanism=mech, secure_mode=True),
        ("adaptive_clipping", "secure_mode"): dict(adaptive_clipping=cfg, secure_mode=True),
    }
    for pair, options in cases.items():
        error, reason = guards.UNSUPPORTED[pair]
        with pytest.raises(error) as raised:
            make_step(**options)
        assert str(raised.value) == reason


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_a_rank_that_switches_max_norm_at_step_5_is_refused_at_step_5(tmp_path):
    """Issue 25 item 4: ranks were checked only on the first call; a rank switching to
    max_norm=50 later went unnoticed.  A fingerprint of each call rides in the step's all-reduce."""
    from test_distributed import launch

    processes, alive, _ = launch(tmp_path, "diverge_at_5")
    errors = {r: (tmp_path / f"rank{r}.err").read_text() for r in range(2) if (tmp_path / f"rank{r}.err").exists()}
    assert not alive and not errors, errors
    for rank in range(2):  # both ranks refuse the same call, before its noise is added
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["raised_at"] == 5 and result["steps"] == 5, result
        assert "checked on every call" in result["error"]


@pytest.mark.parametrize("participation", [fundp.mf.min_separation(2), fundp.mf.cyclic_poisson(2, 0.5)])
def test_a_sigma_schedule_is_refused_where_it_is_not_accounted(participation):
    """A per-call sigma with a non-banded min-separation (tree) or a cyclic-Poisson mechanism: refused
    before any noise, with the table's reason; the built sigma is accepted."""
    strategy = fundp.mf.tree(8) if isinstance(participation, fundp.mf.MinSeparation) else fundp.mf.banded_toeplitz([1.0, 0.5], 8)
    mech = fundp.mf.mechanism(strategy, participation)
    step = fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0, grad_method="vmap",
                         noise_mechanism=mech)
    state = mech.init(PARAMS)
    out = step(PARAMS, BATCH, fundp.random.key(0), noise_state=state)  # the built sigma: accepted
    error, reason = guards.UNSUPPORTED[("noise_mechanism", "noise_multiplier (per call)")]
    with pytest.raises(error) as raised:
        step(PARAMS, BATCH, fundp.random.key(1), noise_state=out.noise_state, noise_multiplier=0.5)
    assert str(raised.value).startswith(reason) and raised.value.pair == ("noise_mechanism", "noise_multiplier (per call)")


def test_a_sigma_schedule_with_a_single_participation_mechanism_is_accepted_and_recorded_per_step():
    mech = fundp.mf.mechanism(fundp.mf.tree(8), fundp.mf.single_participation())
    step = fundp.dp_step(LOSS, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0, grad_method="vmap",
                         noise_mechanism=mech)
    state, ledger = mech.init(PARAMS), fundp.Ledger()
    for t, sigma in enumerate((2.0, 0.5)):
        out = step(PARAMS, BATCH, fundp.random.key(t), noise_state=state, noise_multiplier=sigma, ledger=ledger)
        state, ledger = out.noise_state, out.ledger
    assert [(e.step, e.noise_multiplier) for e in ledger.events] == [(0, 2.0), (1, 0.5)] and ledger.steps == 2
