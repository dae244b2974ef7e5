"""Sharded DP training (FSDP2): per-rank memory and step time for world sizes 1, 2, 4, against non-private FSDP2.

One model, built from the same seed on every rank and sharded by ``fully_shard`` (every Linear /
decoder layer, then the root; FSDP2's ``Shard(0)`` layout), trained two ways in the same processes,
the modes interleaved step by step on the same rows:

  dp          ``fundp.dp_step(..., distributed=True)`` on the DTensor shards (fundp gathers the
              parameters once per step, clips each rank's own examples, reduce-scatters the clipped
              sum, each rank adds the noise of the coordinates it owns), then ``fundp.optim.adam``
              on the sharded noisy gradient it returns;
  nonprivate  FSDP2 as usual: ``model(x)`` (FSDP2's hooks gather each module's parameters for its
              forward and backward), ``loss.mean().backward()`` (gradients reduce-scattered), then
              the same ``fundp.optim.adam`` on the sharded ``p.grad``.

In both modes the Adam update is added to the shards in place (``p.add_(update)``), so the model's
shards are the training state and no stale copy is kept.  A *step* is gradient + optimizer update.

Per rank and mode (the table shows the largest value over ranks):

* params / grads / opt: bytes of the local shards of the trainable parameters, of the gradient the
  step returns (``out.grads``, DTensors: their local blocks; non-private: ``p.grad``), and of the
  Adam state (``mu``, ``nu``: local blocks);
* peak: the most memory the step holds *above what was live before it* (parameters, Adam state;
  the previous step's gradient is dropped first, in both modes).  CUDA: ``max_memory_allocated``
  minus ``memory_allocated`` before the step.  CPU: torch's CPU allocator keeps a running total of
  the bytes it has allocated (c10's ``caffe2_report_cpu_memory_usage`` flag turned on, so that frees
  in gloo's worker threads count too) and reports it with each allocation and free of the calling
  thread to ``torch.profiler.profile(profile_memory=True)``; the peak is the largest total over one
  extra, untimed step minus the total before it.  This counts torch tensors only (not Python
  objects), exactly, unlike the process's RSS (which glibc's allocator does not give back) or
  ``tracemalloc`` (blind to torch);
* time: the median wall time of the timed steps (each step starts after a barrier; the value is
  the slowest rank's median).

The first table is absolute; the second gives the ratios: world size N / world size 1 of
params + grads + opt (per rank) and of peak, and DP / non-private of time and peak.  ``--phases``
(CPU) adds a third: the DP step's memory on entering, and at most within, ``fundp.sharding``'s
``unshard``, ``reduce_clipped_sum`` and ``standard_normal_shards``; and, at world size 1, the mode
``dp_unsharded``: fundp's single-process ``dp_step`` on the same model without ``fully_shard``.

    python benchmarks/distributed.py                                   # CPU, gloo, world sizes 1 2 4
    python benchmarks/distributed.py --width 512 --phases              # + where the DP step's memory goes
    python benchmarks/distributed.py --model llama --world-sizes 1 2   # tiny Llama (transformers config)
    python benchmarks/distributed.py --device cuda --world-sizes 1 2 4 # CUDA, nccl (one GPU per rank)
    torchrun --nproc_per_node 4 benchmarks/distributed.py              # one world size, under torchrun

Ranks run one thread each (``torch.set_num_threads(1)``) on CPU: with more ranks than cores the
step *times* of different world sizes are not comparable; the DP / non-private time ratio at one
world size is.  Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, NamedTuple

import optree
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import fundp  # noqa: E402

MODES = ("dp", "nonprivate")
MAX_NORM, SIGMA, LR, NUM_EXAMPLES = 1.0, 1.0, 1e-3, 10_000


# --------------------------------------------------------------------------------------------- models


class MLP(nn.Module):
    """``depth`` Linear(width, width) + tanh, then a Linear(width, classes) head: parameters dominate."""

    def __init__(self, width: int, depth: int, classes: int = 10):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def build(args) -> tuple[nn.Module, list[nn.Module]]:
    """The model (same seed on every rank) and the modules that ``fully_shard`` wraps before the root."""
    torch.manual_seed(0)
    if args.model == "mlp":
        model = MLP(args.width, args.depth).to(args.dtype)
        return model, list(model.layers) + [model.head]
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=2 * args.width,
                         num_hidden_layers=args.depth, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.length, attention_dropout=0.0, use_cache=False,
                         attn_implementation="eager", tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(args.dtype).eval()
    return model, list(model.model.layers)


def global_batch(args) -> dict:
    """The global batch (``args.batch_size`` rows), the same on every rank."""
    g = torch.Generator().manual_seed(1)
    if args.model == "mlp":
        return {"x": torch.randn(args.batch_size, args.width, generator=g, dtype=args.dtype),
                "y": torch.randint(0, 10, (args.batch_size,), generator=g)}
    return {"tokens": torch.randint(0, args.vocab, (args.batch_size, args.length), generator=g)}


def per_example_losses(args, logits, batch):
    """``[B]`` losses: cross-entropy (MLP) or the mean next-token cross-entropy of a sequence (Llama)."""
    if args.model == "mlp":
        return F.cross_entropy(logits, batch["y"], reduction="none")
    return F.cross_entropy(logits.logits[:, :-1].transpose(1, 2), batch["tokens"][:, 1:], reduction="none").mean(dim=1)


# --------------------------------------------------------------------------------------------- memory


def local_bytes(tree) -> int:
    """Bytes of the local blocks of a pytree's tensors (a DTensor counts its ``to_local()`` block);
    0-d tensors (Adam's step count) are left out."""
    from torch.distributed.tensor import DTensor

    total = 0
    for leaf in optree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            local = leaf.to_local() if isinstance(leaf, DTensor) else leaf
            total += local.numel() * local.element_size()
    return total


def track_cpu_allocations() -> None:
    """Makes torch's CPU allocator keep its running total of allocated bytes in every thread.

    Sets c10's ``FLAGS_caffe2_report_cpu_memory_usage`` (exported by ``libc10``; no Python binding).
    Without it the total moves only in threads being profiled, so the blocks that gloo's worker
    threads free (its flattened collective buffers) would never be subtracted.  Called once per
    process, before the model is built, so every block the steps free was counted when allocated.
    """
    import ctypes

    library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    ctypes.c_bool.in_dll(library, "FLAGS_caffe2_report_cpu_memory_usage").value = True


def peak_step_memory(step, t: int, device: torch.device) -> tuple[int, Any, dict]:
    """Runs ``step(t)``; returns the most bytes it held above what was live when it started, its
    gradient tree, and (CPU, with :func:`mark_phases`) ``{phase: {"entry", "peak"}}``: the bytes
    above that level when each marked function of :mod:`fundp.sharding` was entered and the most
    within it (see the module docstring).

    CPU: the step runs under ``torch.profiler.profile(profile_memory=True)``; each allocation or
    free in the calling thread is a ``[memory]`` event carrying the allocator's running total over
    all threads (:func:`track_cpu_allocations`), read from the exported trace; the peak is the
    largest total minus the total before the first event.  Blocks allocated *and* freed inside
    another thread between two events of this one are not seen.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        grads = step(t)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, grads, {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        grads = step(t)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)["traceEvents"]
    events = sorted((e for e in trace if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not events:
        return 0, grads, {}
    before = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    phases: dict = {}
    for marker in (e for e in trace if e.get("ph") == "X" and str(e.get("name", "")).startswith(PHASE_PREFIX)):
        name, start, end = marker["name"][len(PHASE_PREFIX):], marker["ts"], marker["ts"] + marker["dur"]
        entry = max([before] + [e["args"]["Total Allocated"] for e in events if e["ts"] < start][-1:]) - before
        inside = [e["args"]["Total Allocated"] - before for e in events if start <= e["ts"] <= end]
        phases[name] = {"entry": entry, "peak": max([entry] + inside)}
    return max(0, max(e["args"]["Total Allocated"] for e in events) - before), grads, phases


PHASE_PREFIX = "fundp_phase:"
PHASES = ("unshard", "reduce_clipped_sum", "standard_normal_shards")


def mark_phases() -> None:
    """Wraps :func:`fundp.sharding.unshard`, ``reduce_clipped_sum`` and ``standard_normal_shards`` in
    profiler ranges (``--phases``; instrumentation of this process only: the step calls them
    through the module, so the wrappers are seen)."""
    from torch.profiler import record_function

    def marked(name, function):
        def wrapper(*args, **kwargs):
            with record_function(PHASE_PREFIX + name):
                return function(*args, **kwargs)

        return wrapper

    for name in PHASES:
        setattr(fundp.sharding, name, marked(name, getattr(fundp.sharding, name)))


# --------------------------------------------------------------------------------------------- one rank


class Trainer(NamedTuple):
    """One mode's training state on this rank: ``step(t)`` runs step ``t`` and returns its gradient tree."""

    step: Callable[[int], dict]
    params: dict  # the model's parameters (DTensor shards, or plain for dp_unsharded)
    state: dict  # {"opt": the Adam state}


def adam_in_place(opt, params: dict, state: dict, grads: dict) -> None:
    """One Adam update of ``params`` (the model's parameters, updated in place) from ``grads``."""
    detached = {n: p.detach() for n, p in params.items()}
    updates, state["opt"] = opt.update(grads, state["opt"], detached)
    with torch.no_grad():
        for name, p in params.items():
            p.add_(updates[name].to(p.dtype))


def make_steps(args, device, rank, world_size) -> dict[str, Trainer]:
    """``{mode: Trainer}`` on this rank's rows of the global batch, each mode on its own copy of the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    batch = global_batch(args)
    rows, mask = fundp.distributed.shard(torch.arange(args.batch_size), torch.ones(args.batch_size, dtype=torch.bool),
                                         rank, world_size)
    local = {k: v[rows].to(device) for k, v in batch.items()}
    inputs = local["x"] if args.model == "mlp" else local["tokens"]
    mask = mask.to(device)
    opt = fundp.optim.adam(LR)
    key = fundp.random.key(2)
    trainers = {}
    for mode in modes_of(args, world_size):
        model, wrapped = build(args)
        model = model.to(device)
        if mode != "dp_unsharded":
            for module in wrapped:
                fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
        params = {name: p for name, p in model.named_parameters()}  # DTensor parameters (Shard(0))
        state = {"opt": opt.init({n: p.detach() for n, p in params.items()})}
        step: Callable[[int], dict]
        if mode.startswith("dp"):
            def loss_fn(p, b, model=model):
                return per_example_losses(args, fundp.functional_call(model, p, (b["x"] if "x" in b else b["tokens"],)), b)

            dp = fundp.dp_step(loss_fn, max_norm=MAX_NORM, noise_multiplier=SIGMA, expected_batch_size=args.batch_size,
                               sample_rate=args.batch_size / NUM_EXAMPLES, distributed=mode == "dp",
                               grad_method=args.grad_method)

            def dp_step(t, params=params, state=state, dp=dp):
                detached = {n: p.detach() for n, p in params.items()}
                grads = dp(detached, local, fundp.random.fold_in(key, t).to(device), mask=mask).grads
                adam_in_place(opt, params, state, grads)
                return grads

            step = dp_step
        else:
            def nonprivate_step(t, model=model, params=params, state=state):
                per_example_losses(args, model(inputs), local).mean().backward()
                grads = {n: p.grad for n, p in params.items()}
                for p in params.values():
                    p.grad = None  # the gradient lives as long as the returned tree, as in the DP mode
                adam_in_place(opt, params, state, grads)
                return grads

            step = nonprivate_step
        trainers[mode] = Trainer(step, params, state)
    return trainers


def modes_of(args, world_size: int) -> tuple[str, ...]:
    """The modes run; with ``--phases`` at world size 1 also ``dp_unsharded``: the same DP step on
    plain (not ``fully_shard``-ed) parameters, ``distributed=False`` — fundp's single-process step."""
    return MODES + (("dp_unsharded",) if args.phases and world_size == 1 else ())


def measure(args, rank: int, world_size: int, device: torch.device) -> dict:
    """This rank's numbers: ``{mode: {params, grads, opt, peak, time, grad_dtype, phases}}``."""
    steps = make_steps(args, device, rank, world_size)
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    t = 0
    for i in range(args.warmup + args.steps):
        for mode in steps:  # interleaved: the machine's load falls on both modes alike
            step = steps[mode].step
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            grads = step(t)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - start)
            del grads
            t += 1
    result = {}
    for mode in steps:
        step, params, state = steps[mode]
        dist.barrier()
        peak, grads, phases = peak_step_memory(step, t, device)
        t += 1
        leaf = next(iter(grads.values()))
        result[mode] = {"params": local_bytes({n: p.detach() for n, p in params.items()}), "grads": local_bytes(grads),
                        "opt": local_bytes(state["opt"]), "peak": peak, "time": statistics.median(times[mode]),
                        "grad_dtype": str(leaf.dtype).replace("torch.", ""),
                        "full_params": sum(p.numel() * p.element_size() for p in params.values()), "phases": phases}
        del grads
    return result


def worker(rank: int, world_size: int, init: str | None, args, out: str | None) -> None:
    """One rank: measures, gathers every rank's numbers on rank 0, which writes them to ``out``."""
    try:
        cuda = args.device == "cuda"
        if cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            torch.set_num_threads(1)
            track_cpu_allocations()
            device = torch.device("cpu")
        if args.phases:
            mark_phases()
        if not dist.is_initialized():
            backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
            dist.init_process_group(backend, init_method=init, rank=rank, world_size=world_size,  # init None: env://
                                    timeout=datetime.timedelta(seconds=300))
        mine = measure(args, rank, world_size, device)
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
        if rank == 0 and out:
            with open(out, "w") as f:
                json.dump(everyone, f)
        dist.destroy_process_group()
    except Exception:
        if out:
            with open(f"{out}.rank{rank}.err", "w") as f:
                f.write(traceback.format_exc())
        raise


def run_world(args, world_size: int, context, directory: str) -> list[dict]:
    """Launches ``world_size`` ranks (one process each) and returns their numbers."""
    out = os.path.join(directory, f"ws{world_size}.json")
    init = "file://" + os.path.join(directory, f"rdv{world_size}")
    processes = [context.Process(target=worker, args=(r, world_size, init, args, out)) for r in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(args.timeout)
    for process in processes:
        if process.is_alive():
            process.kill()
    errors = [open(f"{out}.rank{r}.err").read() for r in range(world_size) if os.path.exists(f"{out}.rank{r}.err")]
    if errors or not os.path.exists(out):
        raise RuntimeError(f"world size {world_size} failed:\n" + ("\n".join(errors) or "no result (timeout?)"))
    with open(out) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------- report


def summary(per_rank: list[dict]) -> dict:
    """The largest value over ranks of each number, per mode; ``state`` = params + grads + opt."""
    out = {}
    for mode in per_rank[0]:
        rows = [r[mode] for r in per_rank]
        out[mode] = {k: max(r[k] for r in rows) for k in ("params", "grads", "opt", "peak", "time", "full_params")}
        out[mode]["state"] = max(r["params"] + r["grads"] + r["opt"] for r in rows)
        out[mode]["grad_dtype"] = rows[0]["grad_dtype"]
        out[mode]["phases"] = {name: {k: max(r["phases"][name][k] for r in rows) for k in ("entry", "peak")}
                               for name in rows[0]["phases"]}
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def tables(results: dict[int, dict]) -> str:
    """Markdown: absolute per-rank numbers, then the ratios."""
    lines = ["| ws | mode | params MiB | grads MiB (dtype) | opt MiB | params+grads+opt MiB | peak step MiB | step ms |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for ws, s in sorted(results.items()):
        for mode in s:
            m = s[mode]
            lines.append(f"| {ws} | {mode} | {_mib(m['params'])} | {_mib(m['grads'])} ({m['grad_dtype']}) | {_mib(m['opt'])} | "
                         f"{_mib(m['state'])} | {_mib(m['peak'])} | {1e3 * m['time']:.1f} |")
    lines += ["", "| ws | DP state ws N / ws 1 | non-private state ws N / ws 1 | DP peak ws N / ws 1 | "
                  "non-private peak ws N / ws 1 | DP / non-private time | DP / non-private peak |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    base = results.get(1)
    for ws, s in sorted(results.items()):
        dp, np_ = s["dp"], s["nonprivate"]

        def rel(mode, key):
            return f"{s[mode][key] / base[mode][key]:.3f}" if base and base[mode][key] else "—"

        lines.append(f"| {ws} | {rel('dp', 'state')} | {rel('nonprivate', 'state')} | {rel('dp', 'peak')} | "
                     f"{rel('nonprivate', 'peak')} | {dp['time'] / np_['time']:.2f} | "
                     f"{dp['peak'] / np_['peak'] if np_['peak'] else float('nan'):.2f} |")
    if any(s["dp"]["phases"] for s in results.values()):
        lines += ["", "DP step, MiB above what was live before it: on entering each phase / the most within it",
                  "", "| ws | " + " | ".join(f"`{name}`" for name in PHASES) + " | step peak |",
                  "|---:|" + "---:|" * (len(PHASES) + 1)]
        for ws, s in sorted(results.items()):
            phases = s["dp"]["phases"]
            cells = [f"{_mib(phases[n]['entry'])} / {_mib(phases[n]['peak'])}" if n in phases else "—" for n in PHASES]
            lines.append(f"| {ws} | " + " | ".join(cells) + f" | {_mib(s['dp']['peak'])} |")
    return "\n".join(lines)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--model", default="mlp", choices=["mlp", "llama"])
    parser.add_argument("--width", type=int, default=256, help="MLP width / Llama hidden size")
    parser.add_argument("--depth", type=int, default=4, help="MLP hidden layers / Llama decoder layers")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (rows split over the ranks)")
    parser.add_argument("--grad-method", default="auto", choices=["auto", "vmap", "ghost"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None, help="also write the per-rank numbers here")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per world size")
    parser.add_argument("--start-method", default="forkserver", choices=["forkserver", "spawn"])
    parser.add_argument("--phases", action="store_true",
                        help="CPU: where the DP step's memory goes (fundp.sharding's phases), and at world size 1 "
                             "the same step on unsharded params (mode dp_unsharded)")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv=None) -> dict[int, dict]:
    """Runs every world size (or, under ``torchrun``, the launched one) and prints the tables."""
    args = parse(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun: this process is one rank
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        with tempfile.TemporaryDirectory() as directory:
            out = os.path.join(directory, "ws.json")
            worker(rank, world_size, None, args, out if rank == 0 else None)
            if rank != 0:
                return {}
            with open(out) as f:
                results = {world_size: summary(json.load(f))}
    else:
        context = multiprocessing.get_context(args.start_method)
        if args.start_method == "forkserver":  # each rank a fork of one server that imported torch and fundp
            context.set_forkserver_preload(["torch", "torch.distributed.fsdp", "fundp"])
        results, raw = {}, {}
        with tempfile.TemporaryDirectory() as directory:
            for ws in args.world_sizes:
                raw[ws] = run_world(args, ws, context, directory)
                results[ws] = summary(raw[ws])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"per_rank": raw, "summary": results}, f, indent=1)
    dtype = str(args.dtype).replace("torch.", "")
    print(f"{args.model} (width {args.width}, depth {args.depth}), {dtype}, global batch {args.batch_size}, "
          f"grad_method={args.grad_method}, {args.device}; full model {_mib(next(iter(results.values()))['dp']['full_params'])} MiB; "
          f"{args.steps} timed steps per mode (median); largest value over ranks")
    print(tables(results))
    return results


if __name__ == "__main__":
    main()
