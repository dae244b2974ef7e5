"""What the ghost engine's checks cost.

1. The verification pass: a step with ``verify="always"`` vs ``verify=False``.  ``verify="first"``
   (the default) pays this once per input signature; ``"always"`` every step.
2. The per-call batch-consistency check (issue 26 item 4): the default step with
   ``check_batch_consistency=True`` vs ``False``, eagerly, under ``fundp.compile`` (the engine in
   the graph) and under plain ``torch.compile``.

Prints the median time of each (interleaved runs) and their ratio.

    python benchmarks/verify_cost.py [--batch 64] [--repeats 7] [--only verify|consistency]
        [--modes eager,fundp.compile,torch.compile] [--threads 1 --cpu-time]
"""

from __future__ import annotations

import argparse
import itertools
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


def build_case(build, size):
    model, make_batch, criterion, field = build()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p, b, model=model, criterion=criterion, field=field):
        return criterion(torch.func.functional_call(model, p, (b[field],)), b)

    return loss_fn, params, make_batch(size, torch.Generator().manual_seed(1))


_STREAMS = itertools.count()  # one key stream per step built in this process


def interleaved_medians(steps: dict, params, batch, repeats: int, clock=time.perf_counter) -> dict:
    """``{name: median seconds}`` of ``steps[name](params, batch, key)``, runs interleaved after a warm-up.

    ``clock``: ``time.perf_counter`` (wall) or ``time.process_time`` (this process's CPU time: on a
    shared, overloaded machine wall times measure the other processes' scheduling, not the step)."""
    times: dict = {name: [] for name in steps}
    # Each step its own keys (the steps refuse a key used before in this process: check_key_reuse).
    keys = {name: fundp.random.fold_in(fundp.random.key(2026), next(_STREAMS)) for name in steps}
    for name, step in steps.items():
        for warm in range(2):  # compiles (and the first call's verification) happen here
            step(params, batch, fundp.random.fold_in(keys[name], 100 + warm))
    for repeat in range(repeats):
        for name, step in steps.items():
            key = fundp.random.fold_in(keys[name], repeat)
            start = clock()
            step(params, batch, key)
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def verify_table(args) -> None:
    print("| model | B | step, verify=False (ms) | step, verify='always' (ms) | ratio |")
    print("|---|---|---|---|---|")
    for name, build in (("mlp", mlp), ("transformer", transformer)):
        loss_fn, params, batch = build_case(build, args.batch)
        steps = {verify: fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=args.batch,
                                       verify=verify, check_batch_consistency=False) for verify in (False, "always")}
        medians = interleaved_medians(steps, params, batch, args.repeats, args.clock)
        plain, verified = medians[False], medians["always"]
        print(f"| {name} | {args.batch} | {1e3 * plain:.1f} | {1e3 * verified:.1f} | {verified / plain:.2f}x |")


COMPILERS = {"eager": lambda step: step, "fundp.compile": fundp.compile, "torch.compile": torch.compile}


def consistency_table(args) -> None:
    print("| model | B | mode | check off (ms) | check on (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    for name, build in (("mlp", mlp), ("transformer", transformer)):
        loss_fn, params, batch = build_case(build, args.batch)
        for mode in args.modes.split(","):
            steps = {check: COMPILERS[mode](fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0,
                                                          expected_batch_size=args.batch, check_batch_consistency=check))
                     for check in (False, True)}
            medians = interleaved_medians(steps, params, batch, args.repeats, args.clock)
            off, on = medians[False], medians[True]
            print(f"| {name} | {args.batch} | {mode} | {1e3 * off:.1f} | {1e3 * on:.1f} | {on / off:.3f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", choices=("verify", "consistency"), default=None)
    parser.add_argument("--modes", default="eager,fundp.compile,torch.compile")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU time (use with --threads 1 on a loaded machine)")
    args = parser.parse_args()
    args.clock = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"clock: {'process CPU time' if args.cpu_time else 'wall'}, threads: {torch.get_num_threads()}")
    torch.manual_seed(0)
    if args.only in (None, "verify"):
        verify_table(args)
    if args.only in (None, "consistency"):
        consistency_table(args)


if __name__ == "__main__":
    main()
