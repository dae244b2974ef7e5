"""Multi-process DP-SGD on torch.distributed (gloo on CPU, NCCL on CUDA).

    torchrun --nproc_per_node=2 examples/train_distributed.py --epochs 2

Every rank draws the same global Poisson batch from the shared key, keeps its shard
(``fundp.distributed.shard``: rows ``rank::world_size``) and loads only those examples.
``dp_step(..., distributed=True)`` all-reduces the clipped sums and adds one shared noise draw,
so every rank ends each step with identical parameters and the same ledger.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fundp  # noqa: E402
from train_digits import accuracy, load_digits_dataset, make_model  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=64, help="global expected batch size")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    (x_train, y_train), (x_test, y_test) = load_digits_dataset(args.seed)
    num_examples, sample_rate = len(y_train), args.batch_size / len(y_train)
    steps = max(1, int(args.epochs / sample_rate))
    noise_multiplier = fundp.calibrate_noise(args.epsilon, args.delta, sample_rate=sample_rate, steps=steps)

    torch.manual_seed(args.seed)  # the same initial parameters on every rank
    model = make_model(x_train.shape[1]).to(device)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_fn(params, batch):
        return F.cross_entropy(fundp.functional_call(model, params, (batch["x"],)), batch["y"], reduction="none")

    batch_key, train_key = fundp.random.split(fundp.random.key(args.seed))
    # pad_to_multiple is a multiple of world_size, so every shard has a fixed shape.
    batches = fundp.data.poisson_batches(num_examples, sample_rate, batch_key, steps=steps, pad_to_multiple=16 * world_size)
    step = fundp.dp_step(
        loss_fn, max_norm=args.max_norm, noise_multiplier=noise_multiplier,
        sampler=batches, distributed=True,  # the global batches' rate and E[B]; each rank passes its shard's mask
    )
    opt = fundp.optim.sgd(args.lr, momentum=0.9)
    opt_state, ledger = opt.init(params), fundp.Ledger()
    for t, (indices, mask) in enumerate(batches):
        rows, shard_mask = fundp.distributed.shard(indices, mask, rank, world_size)
        batch = {"x": x_train[rows].to(device), "y": y_train[rows].to(device)}
        out = step(params, batch, fundp.random.fold_in(train_key, t).to(device), ledger=ledger, mask=shard_mask.to(device))
        updates, opt_state = opt.update(out.grads, opt_state, params)
        params, ledger = fundp.optim.apply_updates(params, updates), out.ledger
    test_accuracy = accuracy(model, params, x_test.to(device), y_test.to(device))
    spent = fundp.epsilon(ledger, args.delta)
    if rank == 0:
        print(f"done: {world_size} ranks, test accuracy {test_accuracy:.4f} at epsilon {spent:.3f} (delta {args.delta:g}), {steps} steps")
    dist.destroy_process_group()
    return {"test_accuracy": test_accuracy, "epsilon": spent, "params": params}


if __name__ == "__main__":
    main()
