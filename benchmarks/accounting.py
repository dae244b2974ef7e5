"""Epsilon and query time of fundp's accountants against Opacus and Google's dp_accounting.

For each case (noise multiplier sigma, sample rate q, steps, delta) prints epsilon and the median
wall time of a *cold* query (fundp's caches cleared before each repeat):

* fundp "prv" (default; rigorous upper bound, within 0.1%) and "rdp";
* Opacus RDPAccountant and PRVAccountant (default eps_error=0.01) when opacus is importable;
* dp_accounting PLDAccountant (pessimistic, connect-the-dots, interval 1e-4) when importable.

    python benchmarks/accounting.py [--repeats 5] [--interval 1e-4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fundp.accounting import Ledger, accountants, epsilon, prv, rdp  # noqa: E402

CASES = [
    ("Abadi MNIST (60 epochs)", [(1.1, 256 / 60000, 60 * 60000 // 256)], 1e-5),
    ("10^5 steps", [(0.8, 0.001, 100_000)], 1e-6),
    ("10^5 steps, Abadi q", [(1.1, 256 / 60000, 100_000)], 1e-5),
    ("small epsilon", [(20.0, 0.05, 100)], 1e-5),
    ("large epsilon", [(0.8, 0.2, 300)], 1e-6),
    ("heterogeneous (3 segments)", [(1.0, 0.02, 500), (2.0, 0.05, 200), (0.7, 0.002, 3000)], 1e-5),
    ("10^6 steps", [(1.0, 0.001, 1_000_000)], 1e-6),
]


def clear_fundp_caches() -> None:
    accountants._epsilon.cache_clear()
    accountants._delta.cache_clear()
    prv._composed_cached.cache_clear()
    prv._step_pld.cache_clear()
    rdp._rdp_cached.cache_clear()


def timed(fn, repeats: int, before=None) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return value, statistics.median(times)


def opacus_runner(kind: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from opacus.accountants import PRVAccountant, RDPAccountant
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    cls = RDPAccountant if kind == "rdp" else PRVAccountant

    def run(segments, delta):
        accountant = cls()
        accountant.history = [(sigma, q, steps) for sigma, q, steps in segments]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return accountant.get_epsilon(delta)

    return run


def dp_accounting_runner(interval: float):
    try:
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant
    except Exception:  # noqa: BLE001
        return None

    def run(segments, delta):
        accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
        for sigma, q, steps in segments:
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        return accountant.get_epsilon(delta)

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1e-4, help="dp_accounting value_discretization_interval")
    args = parser.parse_args(argv)
    others = {
        "Opacus RDP": opacus_runner("rdp"),
        "Opacus PRV": opacus_runner("prv"),
        f"dp_accounting PLD ({args.interval:g})": dp_accounting_runner(args.interval),
    }
    columns = ["fundp prv", "fundp rdp", *others]
    print(f"{'case':<28} {'sigma':>5} {'q':>8} {'steps':>8} {'delta':>6} | " + " | ".join(f"{c:>26}" for c in columns))
    print("-" * (62 + 29 * len(columns)))
    for name, segments, delta in CASES:
        ledger = Ledger(segments)
        cells = []
        for accountant in ("prv", "rdp"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value, seconds = timed(lambda: epsilon(ledger, delta, accountant=accountant), args.repeats, clear_fundp_caches)
            cells.append(f"{value:11.6f} {seconds * 1e3:9.1f} ms")
        for run in others.values():
            if run is None:
                cells.append(f"{'n/a':>26}")
                continue
            value, seconds = timed(lambda: run(segments, delta), max(1, min(args.repeats, 3)))
            cells.append(f"{value:11.6f} {seconds * 1e3:9.1f} ms")
        sigma, q, steps = segments[0] if len(segments) == 1 else ("mix", "mix", sum(s for *_, s in segments))
        sigma = f"{sigma:5.2f}" if isinstance(sigma, float) else f"{sigma:>5}"
        q = f"{q:8.5f}" if isinstance(q, float) else f"{q:>8}"
        print(f"{name:<28} {sigma} {q} {steps:>8} {delta:6.0e} | " + " | ".join(cells))
    print("\nprv: fundp's default, a rigorous upper bound within 0.1% of the exact epsilon.  Opacus PRV adds")
    print("its eps_error (0.01 absolute).  dp_accounting's pessimistic PLD is an upper bound whose error shrinks")
    print("with its interval; times are medians over repeats, fundp's cold (caches cleared).")


if __name__ == "__main__":
    main()
