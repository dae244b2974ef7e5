"""TrainState / train_step carry everything: adaptive clipping's clip_state, a correlated-noise
mechanism's noise_state, schedules of sigma and C (functions of the step) and the optimizer's lr
schedule.  Each run equals the hand-written loop that threads every piece by hand, bit for bit; a
run checkpointed mid-way with fundp.checkpoint and resumed in a fresh state ends bit-identical to
an uninterrupted one; combinations of the table of refused combinations are refused with its
reason.  float64 throughout; small linear softmax model (a few ms a step)."""

import os

import optree
import pytest
import torch

import fundp
import fundp.mf as mf
from fundp import adaptive
from fundp.guards import UNSUPPORTED, forget_keys
from fundp.train_state import TrainState, train_step

N, D, K, Q, STEPS = 48, 5, 3, 0.25, 6


def loss_fn(params, batch):
    logits = batch["x"] @ params["w"] + params["b"]
    return torch.nn.functional.cross_entropy(logits, batch["y"], reduction="none")


def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    params = {"w": 0.1 * torch.randn(D, K, generator=g, dtype=torch.float64), "b": torch.zeros(K, dtype=torch.float64)}
    return params, x, y


def sigma_of(t):
    """A noise schedule: sigma decays with the step (a Python float, as a user would write)."""
    return 1.5 - 0.1 * t


def clip_of(t):
    """A clipping-threshold schedule returning a 0-d tensor (never recompiles a compiled step)."""
    return torch.tensor(0.8 + 0.05 * t, dtype=torch.float64)


LR = fundp.optim.exponential_decay(0.5, transition_steps=1, decay_rate=0.8)  # lr(t) = 0.5 * 0.8^t
CFG = adaptive.quantile_clipping(target_quantile=0.5, learning_rate=0.3, count_noise_multiplier=2.0)


def adaptive_setup():
    batches = fundp.data.poisson_batches(N, Q, fundp.random.key(11), steps=STEPS, pad_to_multiple=8)
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, sampler=batches, grad_method="vmap", adaptive_clipping=CFG)
    return step, batches


def mf_mechanism():
    return mf.mechanism(mf.banded_toeplitz([1.0, 0.4], STEPS), mf.cyclic_poisson(2, 2 * Q))


def mf_setup():
    mech = mf_mechanism()
    batches = mf.cyclic_poisson_batches(N, 2 * Q, fundp.random.key(12), num_partitions=2, steps=STEPS, pad_to_multiple=8)
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.2, sampler=batches, grad_method="vmap", noise_mechanism=mech)
    return step, batches, mech


def batch_at(x, y, batches, t):
    indices, mask = batches[t]
    return {"x": x[indices], "y": y[indices]}, mask


def assert_trees_identical(a, b):
    """Same structure (types included), same dtypes, same bits."""
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    assert len(la) == len(lb) and all(torch.equal(p, q) and p.dtype == q.dtype for p, q in zip(la, lb))


def assert_states_identical(a, b):
    assert a.step == b.step
    assert torch.equal(a.key, b.key)
    assert a.ledger == b.ledger
    for name in ("params", "opt_state", "clip_state", "noise_state"):
        assert_trees_identical(getattr(a, name), getattr(b, name))


# --------------------------------------------------------------------------- (a) adaptive + sigma schedule


def test_adaptive_clipping_with_a_sigma_schedule_equals_the_hand_written_loop():
    params0, x, y = problem()
    step, batches = adaptive_setup()

    # The hand-written loop: every piece threaded by hand, lr(t) applied by hand (plain SGD).
    forget_keys()
    params, key, ledger, clip_state = params0, fundp.random.key(7), fundp.Ledger(), CFG.init(1.0)
    thresholds = []
    for t in range(STEPS):
        batch, mask = batch_at(x, y, batches, t)
        key, step_key = fundp.random.split(key)
        out = step(params, batch, step_key, ledger=ledger, mask=mask, noise_multiplier=sigma_of(t), clip_state=clip_state)
        params = {k: params[k] - LR(t) * out.grads[k] for k in params}
        ledger, clip_state = out.ledger, out.clip_state
        thresholds.append(float(clip_state.max_norm))

    forget_keys()
    opt = fundp.optim.sgd(LR)
    state = TrainState.create(params0, opt, fundp.random.key(7), clip_state=CFG.init(1.0))
    for t in range(STEPS):
        batch, mask = batch_at(x, y, batches, t)
        state, out = train_step(step, opt, state, batch, mask=mask, noise_multiplier=sigma_of)
    assert state.step == STEPS and int(state.opt_state.count) == STEPS
    assert_trees_identical(state.params, params)
    assert_trees_identical(state.clip_state, clip_state)
    assert torch.equal(state.key, key) and state.ledger == ledger
    assert len(set(thresholds)) == STEPS  # the threshold moved every step: a dropped clip_state would show
    # The ledger records the schedule, step by step: the pair (gradient at sigma_t, count at sigma_b)
    # is one subsampled Gaussian with z_eff = (sigma_t^-2 + sigma_b^-2)^(-1/2) (Andrew et al.).
    reference = fundp.Ledger()
    for t in range(STEPS):
        z_eff = (sigma_of(t) ** -2 + CFG.count_noise_multiplier**-2) ** -0.5
        reference = fundp.accountant_step(reference, noise_multiplier=z_eff, sample_rate=Q)
    assert state.ledger.steps == STEPS
    assert fundp.epsilon(state.ledger, 1e-5, accountant="rdp") == pytest.approx(fundp.epsilon(reference, 1e-5, accountant="rdp"), rel=1e-12)
    constant = fundp.accountant_step(fundp.Ledger(), noise_multiplier=(1.0 + 0.25) ** -0.5, sample_rate=Q, steps=STEPS)
    assert fundp.epsilon(state.ledger, 1e-5, accountant="rdp") != pytest.approx(fundp.epsilon(constant, 1e-5, accountant="rdp"), rel=1e-6)


# --------------------------------------------------------------------------- (b) correlated noise


def test_correlated_noise_with_a_clip_schedule_equals_the_hand_written_loop():
    params0, x, y = problem()
    step, batches, mech = mf_setup()
    opt = fundp.optim.sgd(LR, momentum=0.9)

    forget_keys()
    params, key, noise_state, opt_state = params0, fundp.random.key(8), mech.init(params0), opt.init(params0)
    for t in range(STEPS):
        batch, mask = batch_at(x, y, batches, t)
        key, step_key = fundp.random.split(key)
        out = step(params, batch, step_key, mask=mask, max_norm=clip_of(t), noise_state=noise_state)
        updates, opt_state = opt.update(out.grads, opt_state, params)
        params = fundp.optim.apply_updates(params, updates)
        noise_state = out.noise_state

    forget_keys()
    state = TrainState.create(params0, opt, fundp.random.key(8), ledger=None, noise_state=mech.init(params0))
    for t in range(STEPS):
        batch, mask = batch_at(x, y, batches, t)
        state, out = train_step(step, opt, state, batch, mask=mask, max_norm=clip_of)
    assert int(state.noise_state.step) == STEPS
    assert_trees_identical(state.params, params)
    assert_trees_identical(state.opt_state, opt_state)
    assert_trees_identical(state.noise_state, noise_state)
    assert torch.equal(state.key, key)
    # The buffers hold the last draws (banded, 1 buffer): not zero, so a reset state would show.
    assert all(float(b.abs().sum()) > 0 for b in optree.tree_leaves(state.noise_state.buffers))


def test_the_noise_state_and_the_schedules_reach_the_step():
    """Independent of the hand-written loop: with noise_multiplier 0 the step is plain clipped SGD,
    computed here one example at a time; a state that was not threaded would fail the second
    step (the mechanism refuses a missing state)."""
    params0, x, y = problem()
    _, batches, mech = mf_setup()
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, sampler=batches, grad_method="vmap", noise_mechanism=mech)
    opt = fundp.optim.sgd(LR)
    state = TrainState.create(params0, opt, fundp.random.key(9), ledger=None, noise_state=mech.init(params0))
    params = params0
    for t in range(3):
        batch, mask = batch_at(x, y, batches, t)
        state, _ = train_step(step, opt, state, batch, mask=mask, max_norm=clip_of)
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        for i in torch.nonzero(mask).flatten().tolist():
            p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            loss = loss_fn(p, {"x": batch["x"][i : i + 1], "y": batch["y"][i : i + 1]}).sum()
            grads = torch.autograd.grad(loss, list(p.values()))
            norm = torch.sqrt(sum((g**2).sum() for g in grads))
            factor = torch.clamp(clip_of(t) / norm, max=1.0)
            for k, g in zip(p, grads):
                total[k] += factor * g
        params = {k: params[k] - LR(t) * total[k] / batches.expected_batch_size for k in params}
        for k in params:
            torch.testing.assert_close(state.params[k], params[k], rtol=1e-12, atol=1e-14)
    assert int(state.noise_state.step) == 3


# --------------------------------------------------------------------------- (c) the richest combinations, resumed


def _refusal(options):
    """The table's entries that refuse some pair of ``options`` (names as in fundp.guards.UNSUPPORTED)."""
    return [entry for pair, entry in UNSUPPORTED.items() if all(options.get(name) for name in pair)]


COMBINATIONS = {
    # name: (adaptive clipping, correlated noise (None, "minsep" or "cyclic"), sigma schedule, C schedule)
    "adaptive+mf+sigma schedule": (True, "minsep", True, False),
    "mf+sigma schedule": (False, "minsep", True, False),
    "cyclic mf+sigma schedule": (False, "cyclic", True, False),
    "adaptive+sigma schedule+lr schedule": (True, None, True, False),
    "mf+C schedule+lr schedule": (False, "cyclic", False, True),
}


def minsep_mechanism():
    """Banded (2 bands) under min-separation 2: the cyclic batches of 2 partitions respect it, and a
    sigma schedule is accounted (fundp.mf.CorrelatedNoise.account(..., scheduled=True))."""
    return mf.mechanism(mf.banded_toeplitz([1.0, 0.4], STEPS), mf.min_separation(2))


def _build(adaptive_on, mf_kind):
    mech = {"minsep": minsep_mechanism, "cyclic": mf_mechanism}[mf_kind]() if mf_kind else None
    if mf_kind:
        batches = mf.cyclic_poisson_batches(N, 2 * Q, fundp.random.key(12), num_partitions=2, steps=STEPS, pad_to_multiple=8)
    else:
        batches = fundp.data.poisson_batches(N, Q, fundp.random.key(11), steps=STEPS, pad_to_multiple=8)
    step = fundp.dp_step(
        loss_fn, max_norm=1.0, noise_multiplier=1.2, sampler=batches, grad_method="vmap",
        adaptive_clipping=CFG if adaptive_on else None, noise_mechanism=mech)
    return step, batches, mech


def _fresh_state(params, opt, key, adaptive_on, mech):
    cyclic = mech is not None and isinstance(mech.participation, mf.CyclicPoisson)
    return TrainState.create(
        params, opt, key, ledger=None if cyclic else "new",
        clip_state=CFG.init(1.0) if adaptive_on else None, noise_state=mech.init(params) if mech is not None else None)


def _scheduled_epsilon(adaptive_on):
    """Independent epsilon of a min-sep run with sigma_of: the Gaussian mechanism of C D^-1 (plus the
    counts), from the strategy matrix (tests/test_mf_schedule.py's enumeration)."""
    from test_mf_schedule import gaussian_epsilon, reference_mu

    mech = minsep_mechanism()
    sigmas = [sigma_of(t) for t in range(STEPS)]
    mu = reference_mu(mech.strategy.matrix(), sigmas, 2, mech.max_participations(),
                      sigma_b=CFG.count_noise_multiplier if adaptive_on else None)
    return gaussian_epsilon(mu, 1e-5)


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_richest_combinations_resume_bit_identically_or_are_refused_with_the_tables_reason(name, tmp_path):
    adaptive_on, mf_kind, sigma_on, clip_on = COMBINATIONS[name]
    mf_on = mf_kind is not None
    # this test's statement of the table: a schedule is refused with a cyclic-Poisson mechanism only
    refused = _refusal({"adaptive_clipping": adaptive_on and mf_kind != "minsep", "noise_mechanism": mf_on,
                        "noise_multiplier (per call)": sigma_on and mf_kind == "cyclic"})
    params0, x, y = problem()
    opt = fundp.optim.sgd(LR, momentum=0.9)
    schedules = {"noise_multiplier": sigma_of} if sigma_on else {}
    if clip_on:
        schedules["max_norm"] = clip_of
    if refused:
        # Refused at build or at the first step (before anything is spent), with the table's reason.
        with pytest.raises(tuple(error for error, _ in refused)) as caught:
            step, batches, mech = _build(adaptive_on, mf_kind)
            state = _fresh_state(params0, opt, fundp.random.key(5), adaptive_on, mech)
            batch, mask = batch_at(x, y, batches, 0)
            train_step(step, opt, state, batch, mask=mask, **schedules)
        assert any(str(caught.value).startswith(reason) for _, reason in refused)
        return

    def run(state, step, batches, start, stop):
        for t in range(start, stop):
            batch, mask = batch_at(x, y, batches, t)
            state, _ = train_step(step, opt, state, batch, mask=mask, **schedules)
        return state

    forget_keys()  # both runs draw the same keys, by design
    step, batches, mech = _build(adaptive_on, mf_kind)
    uninterrupted = run(_fresh_state(params0, opt, fundp.random.key(5), adaptive_on, mech), step, batches, 0, STEPS)

    forget_keys()
    step, batches, mech = _build(adaptive_on, mf_kind)
    half = run(_fresh_state(params0, opt, fundp.random.key(5), adaptive_on, mech), step, batches, 0, 3)
    path = os.path.join(tmp_path, "run.pt")
    fundp.checkpoint.save(path, **half._asdict(), run_id="full-run")
    del half
    # A fresh process: new step object, a template state from other values, the checkpoint read back.
    step, batches, mech = _build(adaptive_on, mf_kind)
    template = _fresh_state({k: torch.ones_like(v) for k, v in params0.items()}, opt, fundp.random.key(99), adaptive_on, mech)
    resumed = TrainState.restore(path, like=template, run_id="full-run")
    assert resumed.step == 3 and (resumed.clip_state is None) == (not adaptive_on) and (resumed.noise_state is None) == (not mf_on)
    if mf_on:
        assert int(resumed.noise_state.step) == 3
    resumed = run(resumed, step, batches, 3, STEPS)
    assert_states_identical(resumed, uninterrupted)
    if adaptive_on or mf_kind == "minsep":
        assert resumed.ledger.steps == STEPS
    if mf_kind == "minsep" and sigma_on:  # the schedule, step by step, accounted exactly
        assert [e.noise_multiplier for e in resumed.ledger.events] == [sigma_of(t) for t in range(STEPS)]
        assert fundp.epsilon(resumed.ledger, 1e-5) == pytest.approx(_scheduled_epsilon(adaptive_on), rel=1e-7)
    # Dropping a saved mechanism state is refused.
    with pytest.raises(fundp.checkpoint.CheckpointError, match="clip_state|noise_state"):
        TrainState.restore(path, like=template._replace(clip_state=None, noise_state=None))


def test_a_sigma_schedule_with_cyclic_poisson_correlated_noise_is_refused_with_the_tables_reason_and_spends_nothing():
    params0, x, y = problem()
    step, batches, mech = mf_setup()
    opt = fundp.optim.sgd(0.1)
    state = TrainState.create(params0, opt, fundp.random.key(4), ledger=None, noise_state=mech.init(params0))
    batch, mask = batch_at(x, y, batches, 0)
    refused = _refusal({"noise_mechanism": True, "noise_multiplier (per call)": True})
    if not refused:
        pytest.fail("the table no longer refuses a sigma schedule with a noise_mechanism: test it as accepted instead")
    (error, reason), = refused
    with pytest.raises(error) as caught:
        train_step(step, opt, state, batch, mask=mask, noise_multiplier=sigma_of)
    assert str(caught.value).startswith(reason) and "cyclic Poisson" in str(caught.value)
    state, _ = train_step(step, opt, state, batch, mask=mask)  # the same state continues: nothing was spent
    assert state.step == 1 and int(state.noise_state.step) == 1


def test_checkpoint_stores_the_mechanism_states_under_its_digest(tmp_path):
    params0, _, _ = problem()
    mech = mf_mechanism()
    noise_state = mech.init(params0)._replace(step=torch.tensor(2))
    noise_state = noise_state._replace(buffers={k: torch.full_like(v, 0.25) for k, v in noise_state.buffers.items()})
    clip_state = CFG.init(0.7)
    path = os.path.join(tmp_path, "run.pt")
    kwargs = dict(params=params0, opt_state=(), ledger=None, key=fundp.random.key(1), step=2)
    fundp.checkpoint.save(path, **kwargs, clip_state=clip_state, noise_state=noise_state)
    loaded = fundp.checkpoint.load(path, params_like=params0, opt_state_like=(), clip_state_like=CFG.init(1.0), noise_state_like=mech.init(params0))
    assert_trees_identical(loaded.clip_state, clip_state)
    assert_trees_identical(loaded.noise_state, noise_state)
    assert type(loaded.clip_state) is adaptive.QuantileClipState and type(loaded.noise_state) is mf.NoiseState
    with pytest.raises(fundp.checkpoint.CheckpointError, match="holds a noise_state"):
        fundp.checkpoint.load(path, params_like=params0, opt_state_like=(), clip_state_like=CFG.init(1.0))
    plain = os.path.join(tmp_path, "plain.pt")
    fundp.checkpoint.save(plain, **kwargs)
    with pytest.raises(fundp.checkpoint.CheckpointError, match="holds no clip_state"):
        fundp.checkpoint.load(plain, params_like=params0, opt_state_like=(), clip_state_like=CFG.init(1.0))
    # A modified mechanism state fails the integrity check.
    payload = torch.load(path, weights_only=True)
    payload["noise_state"][1] = payload["noise_state"][1] + 1.0
    torch.save(payload, path)
    with pytest.raises(fundp.checkpoint.CheckpointError, match="integrity"):
        fundp.checkpoint.load(path, params_like=params0, opt_state_like=(), clip_state_like=CFG.init(1.0), noise_state_like=mech.init(params0))


# --------------------------------------------------------------------------- (d) misuse


def test_schedule_arguments_that_are_neither_callable_nor_numbers_are_refused_naming_the_argument():
    params0, x, y = problem()
    step, batches = adaptive_setup()
    opt = fundp.optim.sgd(0.1)
    state = TrainState.create(params0, opt, fundp.random.key(3), clip_state=CFG.init(1.0))
    batch, mask = batch_at(x, y, batches, 0)
    for name, bad in (("noise_multiplier", "1.0"), ("noise_multiplier", True), ("max_norm", "1.0"), ("max_norm", object())):
        with pytest.raises(TypeError, match=f"^{name} must be"):
            train_step(step, opt, state, batch, mask=mask, **{name: bad})
    with pytest.raises(TypeError, match=r"^noise_multiplier\(0\) must return"):
        train_step(step, opt, state, batch, mask=mask, noise_multiplier=lambda t: "high")
    # The step's own refusals pass through: adaptive clipping sets C itself.
    with pytest.raises(ValueError, match="max_norm and clip_state"):
        train_step(step, opt, state, batch, mask=mask, max_norm=clip_of)
    # Nothing was spent: the state runs on.
    state, _ = train_step(step, opt, state, batch, mask=mask, noise_multiplier=1.3)
    assert state.step == 1 and state.ledger.steps == 1


def test_five_field_states_still_work_and_a_step_must_return_the_state_it_was_given():
    params0, x, y = problem()
    opt = fundp.optim.sgd(0.1)
    old = TrainState(params0, opt.init(params0), None, fundp.random.key(0), 0)
    assert old.clip_state is None and old.noise_state is None

    def forgetful_step(params, batch, key, *, ledger, mask, clip_state):
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        return fundp.StepResult(grads, ledger, torch.tensor(0.0), torch.zeros(len(mask)), torch.tensor(0))

    batch = {"x": x[:4], "y": y[:4]}
    with pytest.raises(TypeError, match="out.clip_state"):
        train_step(forgetful_step, opt, old._replace(clip_state=CFG.init(1.0)), batch, mask=torch.ones(4, dtype=torch.bool))
