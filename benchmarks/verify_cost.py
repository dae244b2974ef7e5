"""What the ghost engine's verification pass costs: a step with ``verify="always"`` vs ``verify=False``.

``verify="first"`` (the default) pays this once per input signature; ``"always"`` every step.
Prints the median time of each (interleaved runs) and their ratio.

    python benchmarks/verify_cost.py [--batch 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fundp


def mlp():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

    def batch(size, g):
        return {"x": torch.randn(size, 256, generator=g), "y": torch.randint(0, 10, (size,), generator=g)}

    return model, batch, lambda logits, b: F.cross_entropy(logits, b["y"], reduction="none"), "x"


def transformer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(1000, 128)
            self.layers = nn.ModuleList(nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True) for _ in range(2))
            self.head = nn.Linear(128, 10)

        def forward(self, ids):
            h = self.embed(ids)
            for layer in self.layers:
                h = layer(h)
            return self.head(h.mean(1))

    def batch(size, g):
        return {"x": torch.randint(0, 1000, (size, 64), generator=g), "y": torch.randint(0, 10, (size,), generator=g)}

    return Net(), batch, lambda logits, b: F.cross_entropy(logits, b["y"], reduction="none"), "x"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"| model | B | step, verify=False (ms) | step, verify='always' (ms) | ratio |")
    print("|---|---|---|---|---|")
    for name, build in (("mlp", mlp), ("transformer", transformer)):
        model, make_batch, criterion, field = build()
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss_fn(p, b, model=model, criterion=criterion, field=field):
            return criterion(torch.func.functional_call(model, p, (b[field],)), b)

        g = torch.Generator().manual_seed(1)
        batch = make_batch(args.batch, g)
        steps = {verify: fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=args.batch,
                                       verify=verify) for verify in (False, "always")}
        times: dict = {False: [], "always": []}
        for verify, step in steps.items():
            step(params, batch, fundp.random.key(0))  # warm-up
        for repeat in range(args.repeats):
            for verify, step in steps.items():
                start = time.perf_counter()
                step(params, batch, fundp.random.key(repeat))
                times[verify].append(time.perf_counter() - start)
        plain, verified = statistics.median(times[False]), statistics.median(times["always"])
        print(f"| {name} | {args.batch} | {1e3 * plain:.1f} | {1e3 * verified:.1f} | {verified / plain:.2f}x |")


if __name__ == "__main__":
    main()
