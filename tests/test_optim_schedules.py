"""Learning-rate schedules against their closed forms, scheduled optimizers against hand-computed
updates and ``torch.optim`` with per-step learning rates, one compilation for a changing lr,
``chain`` against ``torch.optim``, and ``set_grads`` refusing leaves an optimizer does not hold."""

import math

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import fundp
import fundp.optim as optim

T = 12


def values(schedule, steps=T):
    return [float(schedule(torch.tensor(t))) for t in range(steps)]


def close(got, expected):
    assert len(got) == len(expected)
    for t, (a, b) in enumerate(zip(got, expected)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15), f"t={t}: {a} != {b}"


# --------------------------------------------------------------------------- closed forms


def test_constant():
    close(values(optim.constant_schedule(0.3)), [0.3] * T)


def test_polynomial_and_linear():
    init, end, power, steps, begin = 2.0, 0.5, 2.0, 5, 3
    expected = []
    for t in range(T):
        s = min(max(t - begin, 0), steps)
        expected.append((init - end) * (1 - s / steps) ** power + end)
    close(values(optim.polynomial_schedule(init, end, power, steps, begin)), expected)
    close(values(optim.linear_schedule(1.0, 0.0, 4)), [1.0, 0.75, 0.5, 0.25] + [0.0] * (T - 4))
    # Rising schedules (warm-up) work the same way.
    close(values(optim.linear_schedule(0.0, 1.0, 4, transition_begin=2)), [0.0, 0.0, 0.0, 0.25, 0.5, 0.75] + [1.0] * (T - 6))


def test_cosine_decay():
    init, steps, alpha, exponent = 0.8, 7, 0.1, 2.0
    expected = [init * ((1 - alpha) * (0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))) ** exponent + alpha) for t in range(T)]
    close(values(optim.cosine_decay_schedule(init, steps, alpha=alpha, exponent=exponent)), expected)
    assert float(optim.cosine_decay_schedule(1.0, 10)(10)) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential_decay(staircase):
    init, steps, rate, begin = 1.5, 3, 0.7, 2

    def expected(t, end=None):
        s = max(t - begin, 0) / steps
        s = math.floor(s) if staircase else s
        v = init * rate**s
        return v if end is None else max(v, end)

    close(values(optim.exponential_decay(init, steps, rate, begin, staircase)), [expected(t) for t in range(T)])
    close(values(optim.exponential_decay(init, steps, rate, begin, staircase, end_value=1.0)), [expected(t, 1.0) for t in range(T)])
    # decay_rate > 1 grows and end_value caps it.
    growth = values(optim.exponential_decay(1.0, 1, 2.0, end_value=10.0))
    close(growth, [min(2.0**t, 10.0) for t in range(T)])


def test_piecewise_constant_and_join():
    close(values(optim.piecewise_constant_schedule(2.0, {3: 0.5, 7: 0.1})), [2.0] * 3 + [1.0] * 4 + [0.1] * (T - 7))
    joined = optim.join_schedules([optim.constant_schedule(1.0), optim.linear_schedule(0.5, 0.0, 4), optim.constant_schedule(9.0)], [2, 8])
    close(values(joined), [1.0, 1.0, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0, 9.0, 9.0, 9.0, 9.0])


def test_warmup_cosine_decay():
    init, peak, warmup, decay, end = 0.01, 1.0, 4, 10, 0.1
    expected = []
    for t in range(T):
        if t < warmup:
            expected.append(init + (peak - init) * t / warmup)
        else:
            s = min(t - warmup, decay - warmup)
            c = 0.5 * (1 + math.cos(math.pi * s / (decay - warmup)))
            expected.append(end + (peak - end) * c)
    close(values(optim.warmup_cosine_decay_schedule(init, peak, warmup, decay, end_value=end)), expected)
    # No warm-up: plain cosine decay.
    close(values(optim.warmup_cosine_decay_schedule(0.0, 1.0, 0, 5)), values(optim.cosine_decay_schedule(1.0, 5)))


def test_schedules_take_python_ints_and_tensors_alike():
    schedule = optim.warmup_cosine_decay_schedule(0.0, 1.0, 3, 9)
    for t in range(T):
        assert float(schedule(t)) == float(schedule(torch.tensor(t, dtype=torch.int64)))
    assert schedule(torch.tensor(4)).dtype == torch.float64 and schedule(torch.tensor(4)).shape == ()


# --------------------------------------------------------------------------- scheduled optimizers


def _grads(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, generator=g, dtype=torch.float64), "b": torch.randn(2, 2, generator=g, dtype=torch.float64)} for _ in range(steps)]


def _init():
    return {"a": torch.linspace(-1, 1, 3, dtype=torch.float64), "b": torch.ones(2, 2, dtype=torch.float64)}


def test_sgd_with_a_schedule_equals_hand_computed_updates():
    lr = lambda t: 0.5 * 0.8**t  # noqa: E731  (the closed form, in Python)
    schedule = optim.exponential_decay(0.5, transition_steps=1, decay_rate=0.8)
    for momentum in (0.0, 0.9):
        opt = optim.sgd(schedule, momentum=momentum)
        params, state = _init(), None
        state = opt.init(params)
        expected = _init()
        buffer = {k: torch.zeros_like(v) for k, v in expected.items()}
        for t, grads in enumerate(_grads(9)):
            updates, state = opt.update(grads, state, params)
            params = optim.apply_updates(params, updates)
            for k in expected:
                buffer[k] = momentum * buffer[k] + grads[k]
                expected[k] = expected[k] - lr(t) * buffer[k]
        assert int(state.count) == 9 and state.count.dtype == torch.int64
        for k in expected:
            torch.testing.assert_close(params[k], expected[k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ["sgd_nesterov", "adam", "adamw"])
def test_scheduled_optimizers_match_torch_optim_with_per_step_lr(name):
    schedule = optim.warmup_cosine_decay_schedule(0.0, 0.05, warmup_steps=3, decay_steps=8, end_value=0.005)
    make = {
        "sgd_nesterov": (lambda: optim.sgd(schedule, momentum=0.9, nesterov=True, weight_decay=0.01),
                         lambda p: torch.optim.SGD(p, lr=0.0, momentum=0.9, nesterov=True, weight_decay=0.01)),
        "adam": (lambda: optim.adam(schedule, weight_decay=0.1), lambda p: torch.optim.Adam(p, lr=0.0, weight_decay=0.1)),
        "adamw": (lambda: optim.adamw(schedule, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=0.0, weight_decay=0.1)),
    }[name]
    opt = make[0]()
    params = _init()
    state = opt.init(params)
    reference_params = [v.clone().requires_grad_(True) for v in _init().values()]
    reference = make[1](reference_params)
    for t, grads in enumerate(_grads(10)):
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        reference.param_groups[0]["lr"] = float(schedule(t))
        for p, g in zip(reference_params, grads.values()):
            p.grad = g.clone()
        reference.step()
    for got, want in zip(params.values(), reference_params):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)


def test_chain_matches_torch_optim():
    cases = [
        (optim.chain(optim.add_decayed_weights(0.01), optim.trace(0.9, nesterov=True), optim.scale_by_learning_rate(0.1)),
         lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
        (optim.chain(optim.scale_by_adam(b1=0.8, b2=0.99, eps=1e-6), optim.add_decayed_weights(0.1), optim.scale_by_learning_rate(0.01)),
         lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ]
    for opt, make_reference in cases:
        params = _init()
        state = opt.init(params)
        reference_params = [v.clone().requires_grad_(True) for v in _init().values()]
        reference = make_reference(reference_params)
        for grads in _grads(7):
            updates, state = opt.update(grads, state, params)
            params = optim.apply_updates(params, updates)
            optim.set_grads(reference_params, list(grads.values()))
            reference.step()
        for got, want in zip(params.values(), reference_params):
            torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)


def test_scale_by_schedule_and_scale():
    opt = optim.chain(optim.scale_by_schedule(optim.linear_schedule(1.0, 0.0, 4)), optim.scale(-2.0))
    params = {"w": torch.zeros(1, dtype=torch.float64)}
    state = opt.init(params)
    seen = []
    for _ in range(6):
        updates, state = opt.update({"w": torch.ones(1, dtype=torch.float64)}, state, params)
        seen.append(float(updates["w"]))
    close(seen, [-2.0, -1.5, -1.0, -0.5, 0.0, 0.0])


# --------------------------------------------------------------------------- no recompiles


def test_a_decaying_schedule_compiles_once():
    torch._dynamo.reset()
    schedule = optim.cosine_decay_schedule(0.1, decay_steps=9, alpha=0.01)
    opt = optim.sgd(schedule, momentum=0.9)

    def train_step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(train_step, backend=counter, fullgraph=True)
    params = eager_params = {"w": torch.ones(3)}
    state = eager_state = opt.init(params)
    for grads in _grads(9):
        g = {"w": grads["a"].float()}
        params, state = compiled(params, state, g)
        eager_params, eager_state = train_step(eager_params, eager_state, g)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 9 updates"
    assert int(state.count) == 9
    torch.testing.assert_close(params["w"], eager_params["w"], rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def test_a_tensor_lr_changed_in_place_takes_effect_without_recompiling():
    torch._dynamo.reset()
    lr = torch.tensor(0.1, dtype=torch.float64)
    opt = optim.adam(lr, eps=0.0)

    def train_step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(train_step, backend=counter)
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    state = opt.init(params)
    grads = {"w": torch.tensor([2.0, -3.0], dtype=torch.float64)}
    for t in range(5):
        lr.fill_(0.1 / (t + 1))
        before = params["w"]
        params, state = compiled(params, state, grads)
        # A constant gradient makes Adam's direction exactly sign(g): the step is lr(t).
        torch.testing.assert_close(params["w"] - before, -0.1 / (t + 1) * grads["w"].sign(), rtol=1e-9, atol=1e-12)
    assert counter.frame_count == 1
    torch._dynamo.reset()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, name", [
    (lambda: optim.sgd(-0.1), "lr"),
    (lambda: optim.sgd(torch.tensor([0.1, 0.2])), "lr"),
    (lambda: optim.adam(torch.tensor(-1.0)), "lr"),
    (lambda: optim.sgd(lambda t: float("nan")), "lr"),
    (lambda: optim.sgd(0.1, momentum=-0.5), "momentum"),
    (lambda: optim.adam(0.1, b1=1.0), "b1"),
    (lambda: optim.polynomial_schedule(1.0, 0.0, 1.0, transition_steps=0), "transition_steps"),
    (lambda: optim.cosine_decay_schedule(1.0, 10, alpha=1.5), "alpha"),
    (lambda: optim.exponential_decay(1.0, 5, decay_rate=0.0), "decay_rate"),
    (lambda: optim.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=5, decay_steps=5), "decay_steps"),
    (lambda: optim.join_schedules([optim.constant_schedule(1.0)], [3]), "one more schedule"),
    (lambda: optim.constant_schedule(1.0)(-1), "count"),
    (lambda: optim.constant_schedule(1.0)(torch.tensor(1.0)), "count"),
    (lambda: optim.add_decayed_weights(0.1).update({"w": torch.ones(1)}, ()), "params"),
    (lambda: optim.chain(optim.scale(1.0), object()), "transforms"),
])  # fmt: skip
def test_bad_input_names_the_argument(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()


# --------------------------------------------------------------------------- set_grads guards


def test_set_grads_refuses_a_detached_params_dict_and_changes_nothing():
    model = torch.nn.Linear(3, 2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch_opt = torch.optim.SGD(model.parameters(), lr=1.0)
    detached = {name: p.detach() for name, p in model.named_parameters()}  # the quickstart's params
    grads = {name: torch.ones_like(p) for name, p in detached.items()}
    with pytest.raises(TypeError, match=r"params\['bias'\].*detached.*set_grads\(model, grads\)"):
        fundp.optim.set_grads(detached, grads)
    torch_opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p.detach(), before[k]) for k, p in model.named_parameters())
    # Passing the module does what was meant.
    fundp.optim.set_grads(model, grads)
    torch_opt.step()
    assert all(torch.equal(p.detach(), before[k] - 1.0) for k, p in model.named_parameters())


def test_set_grads_guards():
    model = torch.nn.Linear(3, 2)
    params = list(model.parameters())
    with pytest.raises(TypeError, match="non-leaf"):
        fundp.optim.set_grads([params[0] * 2, params[1]], [torch.ones(2, 3), torch.ones(2)])
    with pytest.raises(ValueError, match="structure"):
        fundp.optim.set_grads(params, [torch.ones(2, 3)])
    with pytest.raises(ValueError, match=r"grads\['weight'\] has shape \(3, 2\)"):
        fundp.optim.set_grads(model, {"weight": torch.ones(3, 2)})
    with pytest.raises(TypeError, match="dict keyed by parameter names"):
        fundp.optim.set_grads(model, [torch.ones(2, 3), torch.ones(2)])
    # The parameters themselves (a list, as a torch.optim param group holds them) are accepted.
    fundp.optim.set_grads(params, [torch.full((2, 3), 3.0), torch.full((2,), 4.0)])
    assert torch.equal(model.weight.grad, torch.full((2, 3), 3.0)) and torch.equal(model.bias.grad, torch.full((2,), 4.0))
