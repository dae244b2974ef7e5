"""Cost of secure-mode noise against research-mode noise and torch.randn, and what the
floating-point attack on the noisy output still sees.

Cost: the median time to draw n Gaussian values for each sampler and the ratio to
``torch.randn`` (an unkeyed, global-RNG draw that fundp never uses, shown as the floor).

Attack (``--attack``, issue 25 item 2): one coordinate whose clipped sum is 0 in world A and
C = 1 in the neighbouring world B (one example changed it by C); the released value is
``fundp.privatize``'s ``round_dtype(release(sum, z) / B_exp)`` with ``z`` of std ``sigma C``, where
``release`` is ``fl64(sum + z)``, or, snapped (secure mode and research mode's
``snap_float64=True``, float64 parameters only), ``fundp.noise.snapped_sum(sum, z, grid)``.  N
outputs are drawn in world A with the library (research mode: the keyed Threefry stream through
``fundp.privatize``; research + snap: ``fundp.add_gaussian_noise(..., snap_float64=True,
release_dtypes=[dtype])``; secure mode: OS entropy, ``fundp.secure.secure_noise(...,
release_dtypes=[dtype])``, what ``fundp.privatize(secure_mode=True)`` releases once it passes its
dtypes), and each is tested for being *impossible* in world B: no float64 noise value ``t`` gives
the same release from sum 1 (the map is monotone in ``t``, so a binary search over the float64
numbers in order decides it exactly).  This assumes the sampler can
return every float64 value, so it measures what rounding alone leaks (the attack the issue
measured: 43% bfloat16 / 29% float32 when the noise was rounded to the dtype before it was added,
reproduced by the ``before`` rows); gaps in a sampler's own float64 support (Mironov 2012) come
on top, and are what secure mode's four-draw sum is for.

    python benchmarks/secure_noise.py [--sizes 100000 1000000] [--repeats 7]
    python benchmarks/secure_noise.py --attack [--samples 1000000] [--sigma 1.0] [--expected-batch-size 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import fundp
from fundp.noise import float64_grid, snapped_sum


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_MAGNITUDE = 0x7FFFFFFFFFFFFFFF


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """float64 -> int64 keys in the numbers' order (both zeros -> 0)."""
    bits = t.view(torch.int64)
    return torch.where(bits < 0, -(bits & _MAGNITUDE), bits)


def _from_ordered(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key < 0, (-key) | torch.iinfo(torch.int64).min, key)
    return bits.view(torch.float64)


def released(total, noise, dtype, expected, variant="plain", grid=None):
    """What is released for a float64 noise value: ``variant`` "plain" (``fundp.privatize``'s
    ``fl64(sum + noise)``), "snap" (snapped to ``grid`` when ``dtype`` is float64) or "before"
    (the old pipeline, noise rounded to the dtype and added to a sum kept in the dtype)."""
    if variant == "before":
        return ((torch.as_tensor(total, dtype=torch.float64).to(dtype) + noise.to(dtype)) / expected).to(dtype)
    if variant == "snap" and dtype == torch.float64:
        return (snapped_sum(torch.full_like(noise, total), noise, grid) / expected).to(dtype)
    return ((total + noise) / expected).to(dtype)


def impossible_in(outputs, total, dtype, expected, variant="plain", grid=None):
    """``[N]`` bool: no float64 noise value ``t`` gives ``released(total, t) == outputs``
    (binary search for the least ``t`` with ``released >= output``; 64 steps, exact)."""
    target = outputs.double()
    low = _ordered(torch.full_like(target, -1e300))
    high = _ordered(torch.full_like(target, 1e300))
    for _ in range(66):
        middle = low // 2 + high // 2 + ((low % 2) + (high % 2)) // 2
        above = released(total, _from_ordered(middle), dtype, expected, variant, grid).double() >= target
        high = torch.where(above, middle, high)
        low = torch.where(above, low, middle + 1)
    return released(total, _from_ordered(high), dtype, expected, variant, grid).double() != target


def attack(samples, sigma, expected):
    """Share of world-A outputs impossible in world B, per dtype and mode (see the module docstring)."""
    print(f"sigma = {sigma} C, B_exp = {expected}, {samples} outputs per row; share impossible in world B")
    print("| dtype | research mode | research, snap_float64=True | secure mode | before (research, noise rounded to the dtype first) |")
    print("|---|---:|---:|---:|---:|")
    key = fundp.random.key(20261206)
    grid = float64_grid(sigma)
    zeros = torch.zeros(samples, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            research = fundp.privatize({"w": torch.zeros(samples, dtype=dtype)}, key, noise_stddev=sigma,
                                       expected_batch_size=expected)["w"]
        snapped = fundp.add_gaussian_noise({"w": zeros}, key, sigma, snap_float64=True, release_dtypes=[dtype])["w"]
        secure = fundp.secure.secure_noise({"w": zeros}, sigma, release_dtypes=[dtype])["w"]
        cells = [impossible_in(research, 1.0, dtype, expected)]
        for out in (snapped, secure):
            cells.append(impossible_in((out / expected).to(dtype), 1.0, dtype, expected, "snap", grid))
        noise = fundp.random.normal(key, (samples,), torch.float64) * sigma
        old = released(0.0, noise, dtype, expected, "before")
        cells.append(impossible_in(old, 1.0, dtype, expected, "before"))
        cells = [cell.double().mean().item() for cell in cells]
        print(f"| {str(dtype).replace('torch.', '')} | " + " | ".join(f"{100 * c:.3f}%" for c in cells) + " |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--attack", action="store_true", help="measure the share of impossible outputs instead")
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--expected-batch-size", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.attack:
        attack(args.samples, args.sigma, args.expected_batch_size)
        return
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
