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

Corner grid (``--grid``; issue 21): one-segment ledgers ``(sigma, q, T, delta)`` from the corners of
``sigma >= 0.5, q in [1e-5, 1], T <= 1e6, delta in [1e-12, 0.1]`` (epsilon in [0.01, 50]), each
against the best available estimate: the least of the upper bounds (fundp, dp_accounting's
pessimistic PLD at intervals 1e-4 and 3e-5, by bisection on its delta curve, and for q = 1 the
closed form), leaving out any below fundp's certified lower bound (``bounds=True``): dp_accounting's
FFT has no round-off control and at delta ~1e-12 its "pessimistic" value can fall below it.
prv_accountant 0.2 (when installed: the ``bench`` extra) is shown beside them with its own
``(lower, estimate, upper)`` at 1% error (``eps_error = 0.01 eps``, ``delta_error = 0.01 delta``:
tighter errors take minutes per corner), each query in a child process killed after 120 s.  The
certified gap (upper / lower - 1) bounds fundp's excess over the exact value.  Also ``fundp.delta``
at the best epsilon against the case's delta, and times per query.

    python benchmarks/accounting.py [--repeats 5] [--interval 1e-4] [--skip-cases] [--skip-schedules] [--only-recording] [--grid]
"""

from __future__ import annotations

import argparse
import math
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
    parser.add_argument("--grid", action="store_true", help="only the corner grid (issue 21)")
    args = parser.parse_args(argv)
    if args.grid:
        grid_table()
        return
    if args.only_recording:
        args.skip_cases = args.skip_schedules = True
    if not args.skip_cases:
        cases_table(args)
    if not args.skip_schedules:
        schedules_table(args)
    if not args.skip_recording:
        recording_table()


#: The corner grid: (sigma, q, steps, delta).  Small q with small delta (where the round-off
#: allowance used to dominate), q = 1 (closed form) and a standard case.
GRID = [
    (1.0, 1e-4, 10_000, 1e-10), (0.9, 1e-4, 1000, 1e-12), (1.0, 1e-4, 10_000, 1e-8), (1.0, 1e-4, 1000, 1e-10),
    (0.5, 1e-4, 10_000, 1e-12), (0.8, 1e-3, 10_000, 1e-12), (1.0, 1e-3, 100_000, 1e-10), (2.0, 1e-3, 10_000, 1e-12),
    (0.5, 1e-5, 100_000, 1e-10), (1.0, 1e-5, 1_000_000, 1e-12), (1.0, 1e-2, 1000, 1e-12), (0.5, 1e-2, 1000, 1e-8),
    (2.0, 0.1, 1000, 1e-12), (5.0, 1.0, 100, 1e-12), (1.0, 1.0, 1000, 1e-5), (1.1, 256 / 60000, 14_062, 1e-5),
]


def _dp_pld(sigma: float, q: float, steps: int, interval: float, pessimistic: bool = True):
    import logging

    from dp_accounting.pld import privacy_loss_distribution

    logging.getLogger().setLevel(logging.ERROR)
    return privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=interval, pessimistic_estimate=pessimistic,
        use_connect_dots=pessimistic).self_compose(steps)


def _prv_accountant_epsilon(sigma: float, q: float, steps: int, delta: float, eps: float, relative_error: float):
    """``(lower, estimate, upper)`` of prv_accountant 0.2 (Gopi et al.'s PRV accountant, the package
    the issue measured) with ``eps_error = relative_error * eps`` (``eps``: fundp's answer) and
    ``delta_error = relative_error * delta``; run in the caller's child process."""
    from prv_accountant import PRVAccountant
    from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

    accountant = PRVAccountant(prvs=PoissonSubsampledGaussianMechanism(noise_multiplier=sigma, sampling_probability=q),
                               max_self_compositions=steps, eps_error=relative_error * eps,
                               delta_error=relative_error * delta)
    return tuple(float(v) for v in accountant.compute_epsilon(delta=delta, num_self_compositions=steps))


def _prv_accountant_cell(sigma: float, q: float, steps: int, delta: float, eps: float, timeout: float = 120.0,
                         relative_error: float = 0.01) -> str:
    """prv_accountant's ``lower / estimate / upper (s)`` for the grid, or why there is none (not
    installed, its own error, or over ``timeout`` seconds: a child process is killed)."""
    import concurrent.futures
    import importlib.util
    import multiprocessing

    if importlib.util.find_spec("prv_accountant") is None:
        return "not installed"
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        future = pool.submit(_prv_accountant_epsilon, sigma, q, steps, delta, eps, relative_error)
        try:
            lower, estimate, upper = future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()
            return f"over {timeout:.0f} s"
        except Exception as error:  # prv_accountant refuses some corners (e.g. its own domain checks)
            return f"error: {type(error).__name__}"
    return f"{lower:.6f} / {estimate:.6f} / {upper:.6f} ({time.perf_counter() - start:.2f})"


def _epsilon_by_bisection(delta_of, delta: float) -> float:
    low, high = 0.0, 64.0
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


def grid_table() -> None:
    from fundp.accounting import delta as fundp_delta

    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        print("dp_accounting is not installed: the grid needs it")
        return
    print("\n## Corner grid: fundp \"prv\" against the best available estimate\n")
    print("| sigma | q | T | delta | fundp eps | certified lower | best upper | excess | certified gap | fundp s "
          "| bounds s | dp_accounting 1e-4 (s) | dp_accounting 3e-5 | prv_accountant 1%: lower / estimate / upper (s) "
          "| fundp delta / delta | delta s | warning |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    worst, worst_gap, worst_delta, slowest_delta, below, inconsistent = 0.0, 0.0, 0.0, 0.0, [], []
    for sigma, q, steps, target in GRID:
        ledger = Ledger([(sigma, q, steps)])
        clear_fundp_caches()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            ours = epsilon(ledger, target)
            seconds = time.perf_counter() - start
            clear_fundp_caches()
            start = time.perf_counter()
            lower, _ = epsilon(ledger, target, bounds=True)
            bounds_seconds = time.perf_counter() - start
        note = "; ".join(sorted({str(w.message)[:60] for w in caught}))
        uppers, coarse, fine, coarse_seconds = [ours], math.nan, math.nan, math.nan
        if q == 1:
            uppers.append(prv._gaussian_epsilon(prv._gaussian_mu(ledger.segments), target))
        else:
            start = time.perf_counter()
            coarse = _epsilon_by_bisection(_dp_pld(sigma, q, steps, 1e-4).get_delta_for_epsilon, target)
            coarse_seconds = time.perf_counter() - start
            fine = _epsilon_by_bisection(_dp_pld(sigma, q, steps, 3e-5).get_delta_for_epsilon, target)
            uppers += [coarse, fine]
        prv_cell = "closed form" if q == 1 else _prv_accountant_cell(sigma, q, steps, target, ours)
        # An "upper bound" below a certified lower bound is not one (dp_accounting's FFT has no
        # round-off control at delta ~1e-12): it is reported, not used.
        trusted = [value for value in uppers if value >= lower]
        inconsistent += [(sigma, q, steps, target)] if len(trusted) < len(uppers) else []
        best = min(trusted)
        excess, gap = ours / best - 1, ours / lower - 1 if lower > 0 else math.inf
        worst, worst_gap = max(worst, excess), max(worst_gap, gap)
        if ours < lower:
            below.append((sigma, q, steps, target))
        clear_fundp_caches()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            our_delta = fundp_delta(ledger, best)
            delta_seconds = time.perf_counter() - start
        worst_delta, slowest_delta = max(worst_delta, abs(our_delta / target - 1)), max(slowest_delta, delta_seconds)
        print(f"| {sigma:g} | {q:.3g} | {steps:g} | {target:g} | {ours:.6f} | {lower:.6f} | {best:.6f} | "
              f"{100 * excess:+.3f}% | {100 * gap:.3f}% | {seconds:.2f} | {bounds_seconds:.2f} | "
              f"{coarse:.6f} ({coarse_seconds:.2f}) | {fine:.6f} | {prv_cell} | {our_delta / target:.4f} | {delta_seconds:.2f} | "
              f"{note or '-'} |")
        sys.stdout.flush()
    print(f"\nworst excess over the best trusted upper estimate: {100 * worst:+.3f}%; worst certified gap "
          f"(upper / certified lower - 1): {100 * worst_gap:.3f}%; worst |fundp.delta(best eps) / delta - 1|: "
          f"{100 * worst_delta:.2f}% (slowest {slowest_delta:.2f} s); fundp below a lower bound: {below or 'never'}; "
          f"dp_accounting below fundp's certified lower bound: {inconsistent or 'never'}")


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
