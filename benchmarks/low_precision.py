"""Measured sensitivity of clipped sums in low precision (issue 25 item 1).

An empirical-sensitivity sweep of ``fundp.clipped_grad_sum`` on an ``F.linear`` 16 -> 3 layer
(C = 1): bfloat16 and float16 (and float32 for reference), B in {64, 1024, 4096}, aligned
gradients (every example the same, norm 3 C) and adversarial ones (an aligned background of norms
1.5..50 C plus rows of every scale pointing elsewhere), both engines (``grad_method="vmap"`` and
the default ``"auto"``, i.e. the ghost engine for this layer), eager (parameters and batch in the
dtype) and under autocast (float32 parameters and batch, ``torch.autocast("cpu", dtype)``).

Columns, in units of C: the largest remove-one change ``||S - S_{-i}||`` (claim <= 1) and the
largest replace-one change ``||S - S_{i <- -x_i}||`` (example i replaced by its negation, the
worst direction: claim <= 2), each over 8 rows (first, last, a third, ...; at B = 64 remove-one
over every row, :func:`fundp.testing.empirical_sensitivity`).  Distances in float64
(``fundp.testing.tree_distance``).  Also prints the largest norm of a ``fundp.clip`` row as stored
(4096 rows of 64 features).

    python benchmarks/low_precision.py [--engines vmap auto] [--sizes 64 1024 4096]
    python benchmarks/low_precision.py --ghost-sum float32   # what float32 book-keeping sums would give
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch
import torch.nn.functional as F

import fundp
import fundp.engines.ghost._norms as ghost_norms
from fundp.testing import empirical_sensitivity, tree_distance

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def batch(kind, size, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "aligned":
        row = torch.randn(dim, generator=g, dtype=torch.float64) * 3.0 / math.sqrt(dim)
        return row.expand(size, dim).to(dtype).contiguous()
    direction = torch.randn(dim, generator=g, dtype=torch.float64)
    scales = torch.exp(torch.empty(size, dtype=torch.float64).uniform_(math.log(1.5), math.log(50.0), generator=g))
    rows = direction * scales[:, None] / direction.norm()
    rows[::4] = torch.randn(size // 4, dim, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, size // 4, dtype=torch.float64)[:, None]
    return rows.to(dtype)


def sampled_rows(size):
    return sorted({0, 1, 2, 3, size // 3, size // 2, size - 2, size - 1})


def remove_one(fn, params, x):
    size = x.shape[0]
    if size <= 64:
        return empirical_sensitivity(fn, params, x)
    full = fn(params, x, torch.ones(size, dtype=torch.bool)).grads
    worst = 0.0
    for i in sampled_rows(size):
        mask = torch.ones(size, dtype=torch.bool)
        mask[i] = False
        worst = max(worst, tree_distance(full, fn(params, x, mask).grads))
    return worst


def replace_one(fn, params, x):
    size = x.shape[0]
    full = fn(params, x, torch.ones(size, dtype=torch.bool)).grads
    worst = 0.0
    for i in sampled_rows(size):
        other = x.clone()
        other[i] = -x[i]
        worst = max(worst, tree_distance(full, fn(params, other, torch.ones(size, dtype=torch.bool)).grads))
    return worst


def sweep(engines, sizes, dtypes, modes):
    loss = lambda p, x: F.linear(x, p["weight"], p["bias"]).sum(dim=1)  # noqa: E731
    print("| engine | mode | dtype | B | remove, aligned | remove, adversarial | replace, aligned | replace, adversarial |")
    print("|---|---|---|---|---|---|---|---|")
    worst = {"remove": 0.0, "replace": 0.0}
    for method in engines:
        fn = fundp.clipped_grad_sum(loss, max_norm=1.0, grad_method=method)
        for mode in modes:
            for name in dtypes:
                dtype = DTYPES[name]
                if mode == "autocast" and dtype == torch.float32:
                    continue
                stored = dtype if mode == "eager" else torch.float32
                g = torch.Generator().manual_seed(1)
                params = {"weight": torch.randn(3, 16, generator=g).to(stored), "bias": torch.zeros(3, dtype=stored)}
                context = torch.autocast("cpu", dtype=dtype) if mode == "autocast" else contextlib.nullcontext()
                for size in sizes:
                    cells = []
                    with context:
                        for measure, key in ((remove_one, "remove"), (replace_one, "replace")):
                            for kind in ("aligned", "adversarial"):
                                value = measure(fn, params, batch(kind, size, 16, stored))
                                cells.append(f"{value:.9f}")
                                if dtype != torch.float32:
                                    worst[key] = max(worst[key], value / (1.0 if key == "remove" else 2.0))
                    print(f"| {method} | {mode} | {name} | {size} | " + " | ".join(cells) + " |", flush=True)
    print(f"16-bit worst: remove-one {worst['remove']:.9f} C, replace-one {2 * worst['replace']:.9f} C")


def clip_rows(dtypes):
    print("| dtype | largest clip() row norm as stored / C |")
    print("|---|---|")
    for name in dtypes:
        rows = batch("adversarial", 4096, 64, DTYPES[name], seed=2)
        norm = fundp.clip({"g": rows}, 1.0)["g"].double().norm(dim=1).max().item()
        print(f"| {name} | {norm:.9f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["vmap", "auto"], choices=["vmap", "auto", "ghost"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 1024, 4096])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["eager", "autocast"], choices=["eager", "autocast"])
    parser.add_argument("--ghost-sum", choices=["default", "float32"], default="default",
                        help="float32: accumulate the ghost engine's book-keeping sums in float32 (a what-if)")
    args = parser.parse_args(argv)
    if args.ghost_sum == "float32":
        ghost_norms.sum_dtype = lambda dtype: torch.float64 if dtype == torch.float64 else torch.float32
    print(f"torch {torch.__version__}, ghost book-keeping sums: {args.ghost_sum}")
    sweep(args.engines, args.sizes, args.dtypes, args.modes)
    clip_rows(args.dtypes)


if __name__ == "__main__":
    main()
