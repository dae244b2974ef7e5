"""Per-example gradients against micro-batching (one ordinary backward per example)."""

import pytest
import torch

import fundp
from fundp.testing import assert_trees_close
from models import MLP, SmallCNN, TinyAttention, TinyGRU, classification_loss, data_for, make, micro_batch_grads, params_of


@pytest.mark.parametrize("model_cls", [MLP, SmallCNN, TinyAttention])
def test_matches_micro_batching_float64(model_cls, variant):
    model = make(model_cls)
    params = params_of(model)
    loss_fn = classification_loss(model)
    batch = data_for(model, 7)
    grads = variant(fundp.per_sample_grads(loss_fn))(params, batch)
    expected = micro_batch_grads(model, loss_fn, params, batch)
    assert all(grads[name].shape == (7, *params[name].shape) for name in params)
    assert_trees_close(grads, expected, rtol=1e-10, atol=1e-12)


def test_subset_of_params_is_frozen_layers():
    model = make(MLP)
    model.net[0].requires_grad_(False)
    trained = {k: v for k, v in params_of(model).items() if not k.startswith("net.0")}
    loss_fn = classification_loss(model)
    batch = data_for(model, 5)
    grads = fundp.per_sample_grads(loss_fn)(trained, batch)
    # same keys as the trained subset (the frozen layer gets no gradient), values as micro-batching
    assert_trees_close(grads, micro_batch_grads(model, loss_fn, trained, batch), rtol=1e-10, atol=1e-12)


def test_buffers_passed_in_the_batch_and_closed_over():
    scale = torch.tensor(3.0, dtype=torch.float64)  # closed over

    def loss_fn(params, batch):
        # `shift` is a per-example buffer carried in the batch.
        return ((batch["x"] @ params["w"]) * scale + batch["shift"]) ** 2

    params = {"w": torch.tensor([0.5, -1.0], dtype=torch.float64)}
    batch = {"x": torch.randn(4, 2, dtype=torch.float64), "shift": torch.arange(4.0, dtype=torch.float64)}
    grads = fundp.per_sample_grads(loss_fn)(params, batch)["w"]
    residual = (batch["x"] @ params["w"]) * 3 + batch["shift"]
    assert_trees_close(grads, 2 * residual[:, None] * 3 * batch["x"], rtol=1e-12, atol=1e-12)


def test_has_aux_returns_batched_aux():
    def loss_fn(params, batch):
        pred = batch @ params["w"]
        return pred**2, {"pred": pred}

    params = {"w": torch.tensor([1.0, 2.0])}
    batch = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    grads, aux = fundp.per_sample_grads(loss_fn, has_aux=True)(params, batch)
    # aux is per example, [B, ...]: the shape loss_fn gives on the whole batch
    assert_trees_close(aux, {"pred": torch.tensor([3.0, 2.0])}, rtol=0, atol=0)
    assert_trees_close(grads, {"w": torch.tensor([[6.0, 6.0], [8.0, 0.0]])}, rtol=0, atol=0)


class DropoutNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 1)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.fc(self.drop(x)).squeeze(-1)


def _dropout_setup():
    torch.manual_seed(0)
    model = DropoutNet()
    params = params_of(model)

    def loss_fn(p, x):
        return fundp.functional_call(model, p, (x,))

    return model, params, loss_fn, torch.ones(6, 16)


def test_dropout_is_driven_by_the_key_not_the_global_rng():
    _, params, loss_fn, x = _dropout_setup()
    f = fundp.per_sample_grads(loss_fn, randomness="different")
    state = torch.random.get_rng_state()
    a = f(params, x, fundp.random.key(1))["fc.weight"]
    assert torch.equal(torch.random.get_rng_state(), state), "global RNG was consumed"
    torch.manual_seed(12345)  # a different global state must not matter
    b = f(params, x, fundp.random.key(1))["fc.weight"]
    c = f(params, x, fundp.random.key(2))["fc.weight"]
    assert_trees_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # "different": each example gets its own dropout mask (rows of ones inputs differ).
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 6))
    # Every entry is 0 (dropped) or 2 * 1 (kept, scaled by 1 / (1 - p)).
    assert set(a.unique().tolist()) <= {0.0, 2.0}


def test_dropout_without_randomness_flag_is_refused():
    _, params, loss_fn, x = _dropout_setup()
    with pytest.raises(RuntimeError, match="randomness"):
        fundp.per_sample_grads(loss_fn)(params, x)
    with pytest.raises(ValueError, match="key is required"):
        fundp.per_sample_grads(loss_fn, randomness="different")(params, x)


def test_scalar_loss_is_a_clear_error():
    def mean_loss(params, batch):
        return (batch @ params["w"]).mean()

    with pytest.raises(ValueError, match=r"shape \[B\]"):
        fundp.per_sample_grads(mean_loss)({"w": torch.ones(2)}, torch.ones(3, 2))


def test_mismatched_batch_leaves_are_a_clear_error():
    loss_fn = lambda p, b: b["x"] @ p["w"] + b["y"]
    with pytest.raises(ValueError, match="leading batch dimension"):
        fundp.per_sample_grads(loss_fn)({"w": torch.ones(2)}, {"x": torch.ones(3, 2), "y": torch.ones(4)})


def test_fused_gru_is_a_clear_error_naming_the_module():
    model = make(TinyGRU)
    with pytest.raises(fundp.UnsupportedModuleError, match=r"rnn \(GRU\).*vmap"):
        fundp.per_sample_grads(classification_loss(model))(params_of(model), data_for(model, 3))


class LinearRNN(torch.nn.Module):
    """The recurrence written with nn.Linear, the fix the error message suggests."""

    def __init__(self, d_in=4, hidden=5, classes=3):
        super().__init__()
        self.w_x = torch.nn.Linear(d_in, hidden)
        self.w_h = torch.nn.Linear(hidden, hidden, bias=False)
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.w_h.in_features, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.w_x(x[:, t]) + self.w_h(h))
        return self.head(h)


def test_linear_recurrence_matches_micro_batching():
    model = make(LinearRNN)
    params = params_of(model)
    loss_fn = classification_loss(model)
    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.randn(5, 6, 4, generator=g, dtype=torch.float64), "y": torch.randint(0, 3, (5,), generator=g)}
    grads = fundp.per_sample_grads(loss_fn)(params, batch)
    assert_trees_close(grads, micro_batch_grads(model, loss_fn, params, batch), rtol=1e-10, atol=1e-12)
