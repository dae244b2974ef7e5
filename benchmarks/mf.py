"""Correlated-noise mechanisms: error of each strategy, and the cost of drawing its noise.

Run: ``OMP_NUM_THREADS=1 python benchmarks/mf.py [--n 1024] [--params 1000000]``.

Table 1: prefix-sum loss (``sens^2 x mean squared error`` of the running sums SGD follows, per
unit noise multiplier, single participation; DP-SGD = (n + 1) / 2) and optimisation time.
Table 2: milliseconds per ``mechanism.sample`` on a ``--params``-element float32 model (eager,
median of repeats) against ``fundp.noise.noise_like`` (DP-SGD), and the state size in copies of
the parameters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fundp
import fundp.mf as mf
from fundp.noise import noise_like


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    n = args.n

    print(f"## Prefix-sum loss, n = {n} (lower is better; single participation)\n")
    print("| strategy | state (x params) | loss | optimise (s) |")
    print("|---|---:|---:|---:|")
    rows = [("DP-SGD (identity)", lambda: mf.identity(n)), ("tree", lambda: mf.tree(n))]
    for bands in (4, 16, 64):
        rows.append((f"banded Toeplitz, {bands} bands", lambda b=bands: mf.optimize_banded_toeplitz(n, b)))
    for buffers in (2, 4):
        rows.append((f"BLT, {buffers} buffers", lambda m=buffers: mf.optimize_blt(n, m)))
    strategies = {}
    for name, build in rows:
        start = time.perf_counter()
        strategy = build()
        elapsed = time.perf_counter() - start
        strategies[name] = strategy
        print(f"| {name} | {strategy.num_buffers} | {mf.prefix_loss(strategy):.3f} | {elapsed:.2f} |")

    like = {"w": torch.zeros(args.params // 2), "b": torch.zeros(args.params - args.params // 2)}
    key = fundp.random.key(0)
    print(f"\n## Noise draw, {args.params:,} float32 parameters (eager CPU, median ms)\n")
    print("| mechanism | ms / step |")
    print("|---|---:|")
    print(f"| fundp.noise.noise_like (DP-SGD) | {_timed(lambda: noise_like(like, key, 1.0), args.repeats):.1f} |")
    for name, strategy in strategies.items():
        mech = mf.mechanism(strategy, mf.single_participation())
        state = mech.init(like)
        for t in range(3):  # fill the buffers
            _, state = mech.sample(state, fundp.random.fold_in(key, t), 1.0, like)
        print(f"| {name} | {_timed(lambda: mech.sample(state, key, 1.0, like), args.repeats):.1f} |")


if __name__ == "__main__":
    main()
