"""The certified lower bound (``fundp.epsilon(..., bounds=True)``) on the corner grid of
``benchmarks/accounting.py --grid``: per row the upper bound, the certified lower one, their gap and
the cold times of the plain query and of the ``bounds=True`` query (every fundp cache cleared before
each).  Uses whichever ``fundp`` is importable (run it with ``PYTHONPATH=<checkout>`` to compare
checkouts); ``--rows 0 8`` picks rows, ``--skip-slow`` leaves out the 10^6-step one.

    PYTHONPATH=$PWD python benchmarks/lower_bounds.py [--rows I ...] [--skip-slow]
"""

from __future__ import annotations

import argparse
import functools
import gc
import time
import warnings

import fundp
from fundp.accounting import Ledger, epsilon, prv

#: The rows of ``GRID`` in ``benchmarks/accounting.py``: (sigma, q, steps, delta).
GRID = [
    (1.0, 1e-4, 10_000, 1e-10), (0.9, 1e-4, 1000, 1e-12), (1.0, 1e-4, 10_000, 1e-8), (1.0, 1e-4, 1000, 1e-10),
    (0.5, 1e-4, 10_000, 1e-12), (0.8, 1e-3, 10_000, 1e-12), (1.0, 1e-3, 100_000, 1e-10), (2.0, 1e-3, 10_000, 1e-12),
    (0.5, 1e-5, 100_000, 1e-10), (1.0, 1e-5, 1_000_000, 1e-12), (1.0, 1e-2, 1000, 1e-12), (0.5, 1e-2, 1000, 1e-8),
    (2.0, 0.1, 1000, 1e-12), (5.0, 1.0, 100, 1e-12), (1.0, 1.0, 1000, 1e-5), (1.1, 256 / 60000, 14_062, 1e-5),
]


def clear_caches() -> None:
    """Every ``functools.lru_cache`` in fundp's accounting modules."""
    for module in (fundp.accounting.accountants, prv, fundp.accounting.pld):
        for value in vars(module).values():
            if isinstance(value, functools._lru_cache_wrapper):
                value.cache_clear()
    gc.collect()


def cold(query):
    """``(query(), seconds)`` with every cache cleared first."""
    clear_caches()
    start = time.perf_counter()
    value = query()
    return value, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=None)
    parser.add_argument("--skip-slow", action="store_true")
    args = parser.parse_args(argv)
    rows = args.rows if args.rows is not None else range(len(GRID))
    print("| sigma | q | T | delta | upper | certified lower | gap | `epsilon` s | `bounds=True` s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        sigma, q, steps, delta = GRID[row]
        if args.skip_slow and steps >= 1_000_000:
            continue
        ledger = Ledger([(sigma, q, steps)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            upper, seconds = cold(lambda: epsilon(ledger, delta))
            (lower, upper_again), bounds_seconds = cold(lambda: epsilon(ledger, delta, bounds=True))
        assert upper_again == upper and lower <= upper
        gap = upper / lower - 1 if lower > 0 else float("inf")
        print(f"| {sigma:g} | {q:.3g} | {steps:g} | {delta:g} | {upper:.6f} | {lower:.6f} | {100 * gap:.3f}% | "
              f"{seconds:.2f} | {bounds_seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
