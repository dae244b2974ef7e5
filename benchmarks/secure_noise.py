"""Cost of secure-mode noise against research-mode noise and torch.randn.

Prints the median time to draw n Gaussian values for each sampler and the ratio to
``torch.randn`` (an unkeyed, global-RNG draw that fundp never uses, shown as the floor).

    python benchmarks/secure_noise.py [--sizes 100000 1000000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fundp


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    key = fundp.random.key(0)
    compiled_normal = torch.compile(lambda k, n: fundp.random.normal(k, (n,)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'n':>10} | {'torch.randn':>12} | {'research eager':>15} | {'research compiled':>18} | {'secure':>12}")
    for n in args.sizes:
        floor = median_time(lambda: torch.randn(n), args.repeats)
        research = median_time(lambda: fundp.random.normal(key, (n,)), args.repeats)
        compiled = median_time(lambda: compiled_normal(key, n), args.repeats)
        secure = median_time(lambda: fundp.secure.secure_normal((n,)), args.repeats)
        cell = lambda t: f"{t * 1e3:7.2f} ms {t / floor:4.1f}x"
        print(f"{n:>10} | {floor * 1e3:9.2f} ms | {cell(research):>15} | {cell(compiled):>18} | {cell(secure):>12}")


if __name__ == "__main__":
    main()
