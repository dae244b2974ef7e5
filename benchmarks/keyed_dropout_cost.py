"""Cost of the ghost engine's per-example keyed dropout masks (fundp/engines/ghost/_keyed_dropout.py).

A tiny pre-norm transformer with dropout (embedding, attention weights via
``scaled_dot_product_attention(dropout_p=0.1)``, residual branches; d=64, 4 heads, T=32, 2 blocks),
``dp_step(randomness="different")`` (default ``"auto"``, verify="first", the per-call check on),
B = 64, float32.  Prints the median step time (ms) over ``--steps`` calls after warm-up, eager and
under ``fundp.compile`` (backend inductor).  Run it with ``PYTHONPATH`` set to each checkout,
alternating, to compare two versions (see benchmarks/RESULTS.md).  The key is fixed
(``check_key_reuse=False``): a checkout whose masks come from a seed read on the host compiles a
graph per key, which would time recompilation, not steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fundp
import speed  # (benchmarks/: the directory of this script)

P = 0.1


class Block(speed.Block):
    """benchmarks/speed.py's block with dropout on the attention weights and the residual branches."""

    def __init__(self, dim, heads):
        super().__init__(dim, heads)
        self.drop = nn.Dropout(P)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        attention = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)),
                                                   is_causal=True, dropout_p=P if self.training else 0.0)
        x = x + self.drop(self.o(attention.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.down(F.gelu(self.up(self.norm2(x)))))


class Transformer(speed.Transformer):
    """benchmarks/speed.py's transformer with these blocks and a dropout of the embeddings."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(64, 4), Block(64, 4))
        self.drop = nn.Dropout(P)

    def forward(self, tokens):
        h = self.blocks(self.drop(self.embed(tokens) + self.positions))
        return self.head(self.norm(h).mean(dim=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-check", action="store_true", help="check_batch_consistency=False")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer().train()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_fn(p, b):
        logits = torch.func.functional_call(model, {**p, **buffers}, (b["x"],))
        return F.cross_entropy(logits, b["y"], reduction="none")

    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=args.batch_size,
                         randomness="different", check_key_reuse=False,
                         check_batch_consistency=not args.no_check)
    if args.mode == "compiled":
        step = fundp.compile(step)
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randint(0, 1000, (args.batch_size, 32), generator=g),
             "y": torch.randint(0, 10, (args.batch_size,), generator=g)}
    key = fundp.random.key(0)
    for _ in range(3):
        step(params, batch, key)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(params, batch, key)
        times.append(time.perf_counter() - start)
    print(f"{args.mode} median_ms {1e3 * statistics.median(times):.1f} min_ms {1e3 * min(times):.1f}")


if __name__ == "__main__":
    main()
