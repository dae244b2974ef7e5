"""Long fuzzing campaign of fundp's default engine (issue 26, item 5).

Draws ``--programs N`` model programs with :func:`fundp.testing.fuzz.random_spec` (seeds
``--start`` .. ``--start + N - 1``), runs each through :func:`fundp.testing.fuzz.run_program`
(``grad_method="auto"`` against micro-batching in float64, remove-one <= C, replace-one <= 2C) and
prints how many were tried, exact, refused, crashed (a non-fundp exception), ill-conditioned,
imprecise and wrong, with a repro (the spec) for every wrong one, grouped by feature flag.

  python benchmarks/fuzz_engine.py --programs 1000                      # everything, eager mostly
  python benchmarks/fuzz_engine.py --programs 1000 --exclude known      # without KNOWN_WRONG classes
  python benchmarks/fuzz_engine.py --programs 50 --compile-share 0.5    # more compiled programs
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from fundp.testing.fuzz import KNOWN_WRONG, describe_failure, random_spec, run_program, shrink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=200)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--compile-share", type=float, default=0.04,
                        help="share of programs run under fundp.compile and torch.compile (split evenly)")
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend for compiled programs")
    parser.add_argument("--exclude", default="", help="comma-separated feature flags, or 'known' for KNOWN_WRONG")
    parser.add_argument("--shrink", action="store_true", help="greedily shrink every wrong program")
    parser.add_argument("--max-body", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    exclude = tuple(KNOWN_WRONG) if args.exclude == "known" else tuple(x for x in args.exclude.split(",") if x)
    share = args.compile_share
    weights = {"eager": 1.0 - share, "fundp.compile": share / 2, "torch.compile": share / 2}
    counts: collections.Counter = collections.Counter()
    modes: collections.Counter = collections.Counter()
    wrong_by_flag: collections.Counter = collections.Counter()
    wrong: list = []
    started = time.time()
    for seed in range(args.start, args.start + args.programs):
        spec = random_spec(seed, mode_weights=weights, exclude=exclude, max_body=args.max_body, backend=args.backend)
        outcome = run_program(spec)
        counts[outcome.status] += 1
        modes[spec.mode] += 1
        if outcome.status == "wrong":
            flags = sorted(spec.features() & set(KNOWN_WRONG)) or ["NEW"]
            for flag in flags:
                wrong_by_flag[flag] += 1
            if args.shrink:
                outcome = run_program(shrink(spec, lambda s: run_program(s).status == "wrong"))
            wrong.append((seed, flags, outcome))
            print(f"WRONG seed={seed} flags={flags}: {describe_failure(outcome)}", flush=True)
        elif outcome.status == "crashed":
            print(f"crashed seed={seed}: {outcome.detail[:160]}", flush=True)
    elapsed = time.time() - started
    print()
    print(f"programs tried: {args.programs} (seeds {args.start}..{args.start + args.programs - 1}) in {elapsed:.0f} s")
    print("modes: " + ", ".join(f"{m} {n}" for m, n in modes.most_common()))
    print("excluded flags: " + (", ".join(exclude) or "none"))
    for status in ("exact", "refused", "crashed", "ill_conditioned", "imprecise", "wrong"):
        print(f"  {status:16s} {counts[status]}")
    if wrong:
        print("wrong by known class (NEW = no known flag): " + ", ".join(f"{f} {n}" for f, n in wrong_by_flag.most_common()))
        print("repro seeds: " + " ".join(str(seed) for seed, _, _ in wrong))


if __name__ == "__main__":
    main()
