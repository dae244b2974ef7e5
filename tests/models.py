"""Small models shared by the tests (float64 by default, so comparisons can be tight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fundp


class MLP(nn.Module):
    def __init__(self, d_in=6, hidden=8, classes=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.head = nn.Linear(6 * 3 * 3, classes)

    def forward(self, x):
        x = F.relu(self.norm(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.head(x.flatten(1))


class TinyAttention(nn.Module):
    """Embedding + LayerNorm + single-head self-attention + mean pool + linear head."""

    def __init__(self, vocab=11, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.norm(self.embed(tokens))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + self.out(attn @ v)
        return self.head(h.mean(dim=1))


class TinyGRU(nn.Module):
    def __init__(self, d_in=4, hidden=5, classes=3):
        super().__init__()
        self.rnn = nn.GRU(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def make(model_cls, seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    return model_cls(**kwargs).to(dtype)


def params_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def classification_loss(model):
    def loss_fn(params, batch):
        logits = fundp.functional_call(model, params, (batch["x"],))
        return F.cross_entropy(logits, batch["y"], reduction="none")

    return loss_fn


def data_for(model, batch_size, seed=1, dtype=torch.float64, classes=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (batch_size,), generator=g)
    if isinstance(model, MLP):
        x = torch.randn(batch_size, model.net[0].in_features, generator=g, dtype=dtype)
    elif isinstance(model, SmallCNN):
        x = torch.randn(batch_size, 1, 8, 8, generator=g, dtype=dtype)
    elif isinstance(model, TinyAttention):
        x = torch.randint(0, model.embed.num_embeddings, (batch_size, 5), generator=g)
    elif isinstance(model, TinyGRU):
        x = torch.randn(batch_size, 6, model.rnn.input_size, generator=g, dtype=dtype)
    else:
        raise TypeError(type(model))
    return {"x": x, "y": y}


def micro_batch_grads(model, loss_fn, params, batch):
    """Reference per-example gradients: one ordinary autograd backward per example."""
    size = batch["y"].shape[0]
    rows = []
    for i in range(size):
        leaf_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        example = {k: v[i : i + 1] for k, v in batch.items()}
        loss = loss_fn(leaf_params, example).sum()
        grads = torch.autograd.grad(loss, list(leaf_params.values()), allow_unused=True)
        rows.append({k: (g if g is not None else torch.zeros_like(leaf_params[k])) for k, g in zip(leaf_params, grads)})
    return {k: torch.stack([row[k] for row in rows]) for k in params}


def graph_break_loss(graph_break: str):
    """A two-layer ``loss_fn(p, b)`` (``p``: ``w [h, d]``, ``v [k, h]``; ``b``: ``x``, ``y``, ``m``) with a
    graph break in it: ``"print"``, ``"item"`` (a logged ``.item()``) or ``"branch"`` (a data-dependent
    ``if (mask == 0).any():``, HuggingFace's mask check)."""

    def loss_fn(p, b):
        h = torch.tanh(F.linear(b["x"], p["w"]))
        if graph_break == "print":
            print("logging from loss_fn")
        elif graph_break == "item":
            float(p["w"].sum().item())
        elif (b["m"] == 0).any():
            h = h * 1.0
        return F.cross_entropy(F.linear(h, p["v"]), b["y"], reduction="none")

    return loss_fn
