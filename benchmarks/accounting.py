"""Epsilon and query time of fundp's accountants against Opacus and Google's dp_accounting.

For each case (noise multiplier sigma, sample rate q, steps, delta) prints epsilon and the median
wall time of a *cold* query (fundp's caches cleared before each repeat):

* fundp "prv" (default; rigorous upper bound, within 0.1%), its certified lower bound
  (``bounds=True``; the time is that of the whole ``(lower, upper)`` query) and "rdp";
* Opacus RDPAccountant and PRVAccountant (default eps_error=0.01) when opacus is importable;
* dp_accounting PLDAccountant (pessimistic, connect-the-dots, interval 1e-4) when importable.

Then the scaling with the number of *distinct* segments (a noise schedule: sigma_t on a geometric
ramp from 0.8 to 1.6, q = 0.01, one step each, delta = 1e-5): fundp "prv" for 10 .. 10^4 and "rdp"
for 10 .. 10^5 distinct segments, side by side with dp_accounting composing the same events
(PLDAccountant, pessimistic, interval 1e-4; RdpAccountant with its default orders), whose sizes are
capped so the script finishes in a few minutes; ratios are dp_accounting's time over fundp's.

Last, recording step by step (issue 20: 10^5 distinct sigmas recorded in < 1 s, their epsilon in
< 1 s with "rdp" and 10^3 in < 2 s with "prv"), also with truncation events and a correlated-noise
run's events.

    python benchmarks/accounting.py [--repeats 5] [--interval 1e-4] [--skip-cases] [--skip-schedules] [--only-recording]
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
    accountants._epsilon_bounds.cache_clear()
    accountants._delta_bounds.cache_clear()
    prv._composed_cached.cache_clear()
    prv._step_pld.cache_clear()
    prv._step_plds_cached.cache_clear()
    prv._stack.cache_clear()
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


SCHEDULE_DELTA = 1e-5
PRV_SIZES = (10, 100, 1000, 10_000)
RDP_SIZES = (10, 100, 1000, 10_000, 100_000)


def schedule(n: int) -> list:
    """``n`` distinct segments: sigma on a geometric ramp 0.8 -> 1.6, q = 0.01, one step each."""
    import numpy as np

    return [(float(sigma), 0.01, 1) for sigma in np.geomspace(0.8, 1.6, n)]


def dp_accounting_schedule(kind: str, interval: float):
    try:
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant
        from dp_accounting.rdp import rdp_privacy_accountant
    except Exception:  # noqa: BLE001
        return None

    def run(segments, delta):
        if kind == "pld":
            accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
        else:
            accountant = rdp_privacy_accountant.RdpAccountant()  # its default orders, as a user would
        for sigma, q, steps in segments:
            accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        return accountant.get_epsilon(delta)

    return run


def schedules_table(args) -> None:
    print(f"\nNoise schedules: n distinct (sigma, q) segments, sigma 0.8 -> 1.6 (geometric), q = 0.01, one step each, "
          f"delta = {SCHEDULE_DELTA:g}; seconds (cold), epsilon in brackets")
    others = {"pld": dp_accounting_schedule("pld", args.interval), "rdp": dp_accounting_schedule("rdp", args.interval)}
    caps = {"pld": args.dp_pld_max, "rdp": args.dp_rdp_max}
    header = (f"| {'n':>7} | {'fundp prv':>22} | {f'dp_accounting PLD ({args.interval:g})':>26} | {'ratio':>6} "
              f"| {'fundp rdp':>22} | {'dp_accounting RDP':>22} | {'ratio':>6} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for n in sorted(set(PRV_SIZES) | set(RDP_SIZES)):
        ledger = Ledger(schedule(n))
        row = [f"{n:>7}"]
        for accountant, sizes in (("prv", PRV_SIZES), ("rdp", RDP_SIZES)):
            if n in sizes:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    value, seconds = timed(lambda: epsilon(ledger, SCHEDULE_DELTA, accountant=accountant),
                                           1 if n >= 10_000 else args.repeats, clear_fundp_caches)
                row.append(f"{seconds:9.3f} s ({value:8.5f})")
            else:
                seconds = None
                row.append(f"{'-':>22}")
            kind = "pld" if accountant == "prv" else "rdp"
            run = others[kind]
            if run is not None and n <= caps[kind] and seconds is not None:
                theirs, their_seconds = timed(lambda: run(ledger.segments, SCHEDULE_DELTA), 1)
                row.append(f"{their_seconds:9.3f} s ({theirs:8.5f})".rjust(26 if kind == "pld" else 22))
                row.append(f"{their_seconds / seconds:6.1f}")
            else:
                row.append(f"{'-':>26}" if kind == "pld" else f"{'-':>22}")
                row.append(f"{'-':>6}")
        print("| " + " | ".join(row) + " |")
        sys.stdout.flush()
    print(f"dp_accounting is capped at n <= {args.dp_pld_max} (PLD) and n <= {args.dp_rdp_max} (RDP); "
          "ratio = dp_accounting seconds / fundp seconds.")


RECORD_SIZES = (1000, 10_000, 100_000)
PRV_RECORD_SIZES = (1000,)


def record(n: int, kind: str):
    """``n`` steps recorded one by one, as a training loop does: a distinct sigma per step
    (``"poisson"``), the same with each step's truncation event (``"truncated"``), or the steps of a
    cyclic-Poisson correlated-noise run (``"mf"``, 4 partitions, one sigma)."""
    from fundp.accounting import accountant_step

    ledger = Ledger()
    if kind == "mf":
        import fundp.mf as mf

        mech = mf.mechanism(mf.identity(n), mf.cyclic_poisson(4, 0.04))
        start, cpu = time.perf_counter(), time.process_time()
        for t in range(n):
            ledger = mech.account(ledger, noise_multiplier=1.0, step=t)
        return ledger, time.perf_counter() - start, time.process_time() - cpu
    sigmas = [sigma for sigma, _, _ in schedule(n)]
    truncation = (100_000, 1_500) if kind == "truncated" else None
    start, cpu = time.perf_counter(), time.process_time()
    for sigma in sigmas:
        ledger = accountant_step(ledger, noise_multiplier=sigma, sample_rate=0.01, truncation=truncation)
    return ledger, time.perf_counter() - start, time.process_time() - cpu


def recording_table() -> None:
    """Recording step by step (O(1) amortised appends), then epsilon of the recorded ledger (cold).

    Each cell is ``wall / cpu`` seconds: the process CPU time (``time.process_time``) is what the
    work costs on a machine shared with other jobs, where the wall time also counts waiting."""
    print("\nRecording n steps one by one (accountant_step / mech.account per step, as a training loop does), "
          f"then epsilon at delta = {SCHEDULE_DELTA:g} (cold, from the recorded ledger); 'poisson' and 'truncated' "
          "have n distinct sigmas; seconds wall / cpu")
    print(f"| {'ledger':>9} | {'n':>7} | {'record':>15} | {'rdp epsilon':>26} | {'prv epsilon':>26} |")
    print(f"|{'-' * 11}|{'-' * 9}|{'-' * 17}|{'-' * 28}|{'-' * 28}|")
    for kind in ("poisson", "truncated", "mf"):
        for n in RECORD_SIZES:
            ledger, wall, cpu = record(n, kind)
            cells = [f"{wall:6.3f} / {cpu:6.3f}"]
            for accountant in ("rdp", "prv"):
                if accountant == "prv" and n not in PRV_RECORD_SIZES:
                    cells.append(f"{'-':>26}")
                    continue
                clear_fundp_caches()
                start, cpu = time.perf_counter(), time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    value = epsilon(ledger, SCHEDULE_DELTA, accountant=accountant)
                cells.append(f"{time.perf_counter() - start:6.3f} / {time.process_time() - cpu:6.3f} ({value:8.5f})")
            print(f"| {kind:>9} | {n:>7} | " + " | ".join(cells) + " |")
            sys.stdout.flush()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1e-4, help="dp_accounting value_discretization_interval")
    parser.add_argument("--skip-cases", action="store_true", help="only the schedules table")
    parser.add_argument("--skip-schedules", action="store_true", help="only the single-setting cases")
    parser.add_argument("--skip-recording", action="store_true", help="skip the step-by-step recording table")
    parser.add_argument("--only-recording", action="store_true", help="only the step-by-step recording table")
    parser.add_argument("--dp-pld-max", type=int, default=100, help="largest n dp_accounting's PLD composes")
    parser.add_argument("--dp-rdp-max", type=int, default=1000, help="largest n dp_accounting's RDP composes")
    args = parser.parse_args(argv)
    if args.only_recording:
        args.skip_cases = args.skip_schedules = True
    if not args.skip_cases:
        cases_table(args)
    if not args.skip_schedules:
        schedules_table(args)
    if not args.skip_recording:
        recording_table()


def cases_table(args) -> None:
    others = {
        "Opacus RDP": opacus_runner("rdp"),
        "Opacus PRV": opacus_runner("prv"),
        f"dp_accounting PLD ({args.interval:g})": dp_accounting_runner(args.interval),
    }
    columns = ["fundp prv", "prv certified lower", "fundp rdp", *others]
    print(f"{'case':<28} {'sigma':>5} {'q':>8} {'steps':>8} {'delta':>6} | " + " | ".join(f"{c:>26}" for c in columns))
    print("-" * (62 + 29 * len(columns)))
    for name, segments, delta in CASES:
        ledger = Ledger(segments)
        cells = []
        for accountant in ("prv", "lower", "rdp"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if accountant == "lower":
                    (value, _), seconds = timed(lambda: epsilon(ledger, delta, bounds=True), args.repeats, clear_fundp_caches)
                else:
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
    print("\nprv: fundp's default, a rigorous upper bound within 0.1% of the exact epsilon; certified lower: the")
    print("exact epsilon is at least this (fundp.epsilon(..., bounds=True)[0]).  Opacus PRV adds")
    print("its eps_error (0.01 absolute).  dp_accounting's pessimistic PLD is an upper bound whose error shrinks")
    print("with its interval; times are medians over repeats, fundp's cold (caches cleared).")


if __name__ == "__main__":
    main()
