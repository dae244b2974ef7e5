"""Train a differentially private classifier on scikit-learn's bundled digits (no download).

    python examples/train_digits.py --epsilon 8 --epochs 20
    python examples/train_digits.py --dataset mnist --data-dir ~/data   # torchvision MNIST, if downloaded

The loop is the whole recipe: Poisson batches padded to fixed shapes, ``dp_step`` (optionally
compiled), a functional optimizer, and the ledger; the noise multiplier is calibrated up front so
that the whole run spends exactly the target epsilon at delta.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import fundp


def load_digits_dataset(seed: int = 0):
    """Digits (8x8 images, 10 classes) as float tensors scaled to [0, 1]: 1437 train, 360 test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return (x[:split], y[:split]), (x[split:], y[split:])


def load_mnist_dataset(data_dir: str):
    """torchvision MNIST from ``data_dir`` (never downloads), flattened to 784 floats in [0, 1]."""
    try:
        from torchvision.datasets import MNIST
    except ImportError as error:
        raise SystemExit("--dataset mnist needs torchvision: pip install torchvision") from error
    splits = []
    for train in (True, False):
        try:
            dataset = MNIST(data_dir, train=train, download=False)
        except RuntimeError as error:
            raise SystemExit(f"MNIST not found under {data_dir}: download it first ({error})") from error
        x = dataset.data.reshape(len(dataset.data), -1).to(torch.float32) / 255.0
        splits.append((x, dataset.targets.to(torch.long)))
    return splits[0], splits[1]


def make_model(d_in: int, classes: int = 10) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d_in, 64), torch.nn.ReLU(), torch.nn.Linear(64, classes))


def accuracy(model, params, x, y) -> float:
    with torch.no_grad():
        return (fundp.functional_call(model, params, (x,)).argmax(-1) == y).float().mean().item()


def progress(iterable, total, enabled=True):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable, None
    bar = tqdm(iterable, total=total, disable=not enabled, file=sys.stdout, dynamic_ncols=True)
    return bar, bar


def train(args) -> dict:
    device = torch.device(args.device)
    if args.dataset == "digits":
        (x_train, y_train), (x_test, y_test) = load_digits_dataset(args.seed)
    else:
        (x_train, y_train), (x_test, y_test) = load_mnist_dataset(args.data_dir)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    num_examples = len(y_train)
    sample_rate = args.batch_size / num_examples
    steps = max(1, int(args.epochs / sample_rate))
    torch.manual_seed(args.seed)
    model = make_model(x_train.shape[1]).to(device)
    params = {name: p.detach() for name, p in model.named_parameters()}

    if math.isinf(args.epsilon):
        noise_multiplier = 0.0
    else:
        noise_multiplier = fundp.calibrate_noise(args.epsilon, args.delta, sample_rate=sample_rate, steps=steps)

    def loss_fn(params, batch):
        logits = fundp.functional_call(model, params, (batch["x"],))
        return F.cross_entropy(logits, batch["y"], reduction="none")

    # Keys stay on the CPU (the step moves the noise key to the device): the key-reuse guard then
    # reads each step's key without a device sync.
    batch_key, train_key = fundp.random.split(fundp.random.key(args.seed))
    batches = fundp.data.poisson_batches(num_examples, sample_rate, batch_key, steps=steps, pad_to_multiple=args.pad_to_multiple)
    step = fundp.dp_step(
        loss_fn,
        max_norm=args.max_norm,
        noise_multiplier=noise_multiplier,
        sampler=batches,  # sample_rate and expected_batch_size come from the batches; every batch needs its mask
        grad_method=args.grad_method,
    )
    if args.compile:
        step = torch.compile(step)
    opt = fundp.optim.sgd(args.lr, momentum=0.9)
    opt_state = opt.init(params)
    ledger = fundp.Ledger() if noise_multiplier > 0 else None
    iterator, bar = progress(enumerate(batches), steps, enabled=not args.quiet)
    history = {"loss": [], "epsilon": []}
    start = time.perf_counter()
    for t, (indices, mask) in iterator:
        indices, mask = indices.to(device), mask.to(device)
        batch = {"x": x_train[indices], "y": y_train[indices]}
        out = step(params, batch, fundp.random.fold_in(train_key, t), ledger=ledger, mask=mask)
        updates, opt_state = opt.update(out.grads, opt_state, params)
        params, ledger = fundp.optim.apply_updates(params, updates), out.ledger
        history["loss"].append(out.loss.item())
        if bar is not None and (t % 10 == 0 or t == steps - 1):
            spent = fundp.epsilon(ledger, args.delta) if ledger is not None else math.inf
            history["epsilon"].append(spent)
            bar.set_postfix(loss=f"{out.loss.item():.3f}", acc=f"{accuracy(model, params, x_test, y_test):.3f}", eps=f"{spent:.2f}")
    spent = fundp.epsilon(ledger, args.delta) if ledger is not None else math.inf
    summary = {
        "test_accuracy": accuracy(model, params, x_test, y_test),
        "epsilon": spent,
        "delta": args.delta,
        "noise_multiplier": noise_multiplier,
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "history": history,
    }
    print(
        f"done: test accuracy {summary['test_accuracy']:.4f} at epsilon {spent:.3f} (delta {args.delta:g}), "
        f"sigma {noise_multiplier:.3f}, {steps} steps of expected batch {args.batch_size}, {summary['seconds']:.1f}s"
    )
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DP-SGD on digits / MNIST with fundp")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon (inf: non-private)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-norm", type=float, default=1.0, help="per-example clipping norm C")
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--grad-method", choices=["auto", "vmap", "ghost"], default="auto")
    parser.add_argument("--pad-to-multiple", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="wrap dp_step in torch.compile")
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--data-dir", default=os.path.expanduser("~/data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
