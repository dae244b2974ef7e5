"""Measured sensitivity of clipped sums in low precision (issue 25 item 1).

For bfloat16 / float16 / float32 parameters, B in {64, 1024, 4096}, aligned gradients (every example
the same, norm 3 C) and adversarial ones (an aligned background of norms 1.5..50 C plus rows of
every scale pointing elsewhere), prints the largest remove-one change ``||S - S_{-i}||`` of
``fundp.clipped_grad_sum(..., grad_method=...)`` over 8 rows, in units of C (the claim is <= 1),
and the largest norm of a ``fundp.clip`` row as stored, over 4096 rows.  Distances are taken in
float64 (``fundp.testing.tree_distance``).  Run: ``python benchmarks/low_precision.py [vmap|auto]``.
"""

import math
import sys

import torch
import torch.nn.functional as F

import fundp
from fundp.testing import tree_distance


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


def remove_one(fn, params, x):
    size = x.shape[0]
    full = fn(params, x, torch.ones(size, dtype=torch.bool)).grads
    worst = 0.0
    for i in sorted({0, 1, 2, 3, size // 3, size // 2, size - 2, size - 1}):
        mask = torch.ones(size, dtype=torch.bool)
        mask[i] = False
        worst = max(worst, tree_distance(full, fn(params, x, mask).grads))
    return worst


def main(method):
    loss = lambda p, x: F.linear(x, p["weight"], p["bias"]).sum(dim=1)  # noqa: E731
    print(f"grad_method={method}: remove-one sensitivity / C (claim <= 1), largest clip() row norm / C")
    print("| dtype | B | aligned | adversarial | clip() row |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        g = torch.Generator().manual_seed(1)
        params = {"weight": torch.randn(3, 16, generator=g).to(dtype), "bias": torch.zeros(3, dtype=dtype)}
        fn = fundp.clipped_grad_sum(loss, max_norm=1.0, grad_method=method)
        rows = batch("adversarial", 4096, 64, dtype, seed=2)
        clipped = fundp.clip({"g": rows}, 1.0)["g"].double().norm(dim=1).max().item()
        for size in (64, 1024, 4096):
            a = remove_one(fn, params, batch("aligned", size, 16, dtype))
            b = remove_one(fn, params, batch("adversarial", size, 16, dtype))
            print(f"| {str(dtype).replace('torch.', '')} | {size} | {a:.9f} | {b:.9f} | {clipped:.9f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vmap")
