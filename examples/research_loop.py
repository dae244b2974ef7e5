"""A research loop: DP-SGD on synthetic data until a target epsilon is reached.

    python examples/research_loop.py                          # about 20 s on a laptop CPU
    python examples/research_loop.py --no-compile --target-epsilon 1
    python examples/research_loop.py --physical-batch-size 32  # gradient accumulation, one compiled shape

Every piece is explicit and functional:

* the data is drawn from keys (a random teacher network labels Gaussian inputs);
* batches come from ``fundp.data.poisson_batches`` -- real Poisson sampling, padded to a multiple
  of ``--pad-to-multiple`` rows so the compiled step sees a handful of shapes (or exactly one with
  ``--physical-batch-size``, where ``fundp.data.accumulated_dp_step`` adds fixed-size chunks);
* the step is ``torch.compile(fundp.dp_step(...))`` and the optimizer ``fundp.optim.adam``;
* the ledger records every step with the *sampler's* sample rate (``dp_step(..., sampler=batches)``);
* the run length is the largest number of steps whose epsilon stays within ``--target-epsilon``
  (found up front by bisection on the accountant), and the progress bar shows the loss and the
  running epsilon from the ledger the steps return.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F

import fundp
import fundp.data


def make_data(key: torch.Tensor, num_examples: int, features: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs ``[N, features]`` labelled by a fixed random two-layer teacher (plus label noise)."""
    x_key, w1_key, w2_key, noise_key = fundp.random.split(key, 4)
    x = fundp.random.normal(x_key, (num_examples, features))
    w1 = fundp.random.normal(w1_key, (features, 32)) / math.sqrt(features)
    w2 = fundp.random.normal(w2_key, (32, classes)) / math.sqrt(32)
    logits = torch.tanh(x @ w1) @ w2 * 4.0 + 0.3 * fundp.random.normal(noise_key, (num_examples, classes))
    return x, logits.argmax(dim=1)


def make_model(features: int, hidden: int, classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))


def init_params(model: torch.nn.Module, key: torch.Tensor) -> dict[str, torch.Tensor]:
    """He-normal weights and zero biases from ``key`` (torch's global RNG is never touched)."""
    names = [name for name, _ in model.named_parameters()]
    keys = fundp.random.split(key, len(names))
    params = {}
    for name, param_key in zip(names, keys):
        shape = dict(model.named_parameters())[name].shape
        if name.endswith("bias"):
            params[name] = torch.zeros(shape)
        else:
            params[name] = fundp.random.normal(param_key, shape) * math.sqrt(2.0 / shape[1])
    return params


def steps_within_budget(target_epsilon: float, delta: float, *, noise_multiplier: float, sample_rate: float, max_steps: int) -> int:
    """Largest ``T <= max_steps`` with ``epsilon(T steps) <= target_epsilon`` (bisection, ~log2(max_steps) calls)."""

    def spent(steps: int) -> float:
        if steps == 0:
            return 0.0
        ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return fundp.epsilon(ledger, delta)

    if spent(max_steps) <= target_epsilon:
        return max_steps
    low, high = 0, max_steps  # spent(low) <= target < spent(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if spent(middle) <= target_epsilon else (low, middle)
    return low


class PlainProgress:
    """Fallback progress display when tqdm is not installed: one line every ``every`` steps."""

    def __init__(self, total: int, every: int, enabled: bool):
        self.total, self.every, self.enabled, self.count, self.postfix = total, every, enabled, 0, ""

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.enabled and (self.count % self.every == 0 or self.count == self.total):
            print(f"step {self.count}/{self.total} {self.postfix}", flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress_bar(total: int, every: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return PlainProgress(total, every, enabled)
    return tqdm(total=total, disable=not enabled, file=sys.stdout, dynamic_ncols=True)


def accuracy(model: torch.nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (fundp.functional_call(model, params, (x,)).argmax(-1) == y).float().mean().item()


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(max(1, min(args.threads, torch.get_num_threads())))
    data_key, init_key, batch_key, train_key = fundp.random.split(fundp.random.key(args.seed), 4)
    # One draw from the same teacher: the first N rows train, the last 2000 test.
    x, y = make_data(data_key, args.num_examples + 2000, args.features, args.classes)
    x, y, x_test, y_test = x[: args.num_examples], y[: args.num_examples], x[args.num_examples :], y[args.num_examples :]
    model = make_model(args.features, args.hidden, args.classes)
    params = init_params(model, init_key)

    sample_rate = args.batch_size / args.num_examples
    horizon = steps_within_budget(
        args.target_epsilon, args.delta, noise_multiplier=args.noise_multiplier, sample_rate=sample_rate, max_steps=args.max_steps
    )
    batches = fundp.data.poisson_batches(args.num_examples, sample_rate, batch_key, steps=horizon, pad_to_multiple=args.pad_to_multiple)

    def loss_fn(params, batch):
        return F.cross_entropy(fundp.functional_call(model, params, (batch["x"],)), batch["y"], reduction="none")

    compile_fn = None if args.no_compile else (lambda f: torch.compile(f, backend=args.compile_backend, dynamic=False))
    if args.physical_batch_size:
        # One physical shape: only the chunk function is compiled, exactly once.
        step = fundp.data.accumulated_dp_step(
            loss_fn,
            physical_batch_size=args.physical_batch_size,
            max_norm=args.max_norm,
            noise_multiplier=args.noise_multiplier,
            sampler=batches,  # sample_rate and expected_batch_size come from (and are checked against) it
            compile_chunk=compile_fn or False,
        )
    else:
        step = fundp.dp_step(
            loss_fn,
            max_norm=args.max_norm,
            noise_multiplier=args.noise_multiplier,
            sampler=batches,  # the rate the ledger records is the rate the batches are drawn with
        )
        if compile_fn is not None:
            step = compile_fn(step)  # one compilation per padded shape (a handful over the run)

    opt = fundp.optim.adam(args.lr)
    opt_state = opt.init(params)
    ledger = fundp.Ledger()
    bar = progress_bar(horizon, args.log_every, not args.quiet)
    history: dict[str, list] = {"step": [], "loss": [], "epsilon": []}
    shapes: set[int] = set()
    stopped = "target epsilon" if horizon < args.max_steps else "max steps"
    start = time.perf_counter()
    steps_done, spent = 0, 0.0
    for t, (indices, mask) in enumerate(batches):
        shapes.add(indices.shape[0])
        batch = {"x": x[indices], "y": y[indices]}
        out = step(params, batch, fundp.random.fold_in(train_key, t), ledger=ledger, mask=mask)
        updates, opt_state = opt.update(out.grads, opt_state, params)
        params, ledger = fundp.optim.apply_updates(params, updates), out.ledger
        steps_done = t + 1
        bar.update(1)
        if steps_done % args.log_every == 0 or steps_done == horizon:
            spent = fundp.epsilon(ledger, args.delta)
            loss = out.loss.item()
            history["step"].append(steps_done)
            history["loss"].append(loss)
            history["epsilon"].append(spent)
            bar.set_postfix(loss=f"{loss:.3f}", eps=f"{spent:.3f}")
    bar.close()
    spent = fundp.epsilon(ledger, args.delta) if steps_done else 0.0
    if spent > args.target_epsilon * (1 + 1e-9):  # the ledger the steps returned must agree with the plan
        raise RuntimeError(f"spent epsilon {spent} exceeds the target {args.target_epsilon}")
    summary = {
        "steps": steps_done,
        "epsilon": spent,
        "delta": args.delta,
        "target_epsilon": args.target_epsilon,
        "stopped": stopped,
        "test_accuracy": accuracy(model, params, x_test, y_test),
        "batch_shapes": sorted(shapes),
        "seconds": time.perf_counter() - start,
        "history": history,
        "params": params,
    }
    print(
        f"stopped ({stopped}) after {steps_done} steps: epsilon {spent:.3f} <= {args.target_epsilon} at delta "
        f"{args.delta:g}, test accuracy {summary['test_accuracy']:.3f}, batch shapes {summary['batch_shapes']}, "
        f"{summary['seconds']:.1f}s"
    )
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DP-SGD research loop on synthetic data with fundp")
    parser.add_argument("--num-examples", type=int, default=4096)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="expected Poisson batch size q*N")
    parser.add_argument("--pad-to-multiple", type=int, default=64, help="padded batch sizes are multiples of this")
    parser.add_argument("--physical-batch-size", type=int, default=0, help="> 0: gradient accumulation in chunks of this size")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--target-epsilon", type=float, default=2.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--no-compile", action="store_true", help="run the step eagerly")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (e.g. eager, aot_eager)")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("num_examples", "batch_size", "pad_to_multiple", "max_steps", "log_every"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if not 0 < args.batch_size <= args.num_examples:
        parser.error("--batch-size must be in [1, --num-examples]")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
