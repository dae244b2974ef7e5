"""Worker processes for test_tp.py: dp_step on parameters sharded by tensor parallelism
(``parallelize_module``), alone on 2 ranks and under FSDP2 on a 2 x 2 ("dp", "tp") mesh.

Each scenario runs on every rank of a gloo process group (CPU, float64) and saves what the test
compares with one process on the whole batch (:func:`fsdp_workers.single_process`).  The ranks of
a tensor-parallel group pass the same rows: the data shard of their "dp" coordinate.
"""

from __future__ import annotations


import torch
from torch import nn

import fsdp_mechanism_workers
import fundp
from dist_workers import global_problem, serve
from fsdp_workers import CLIP_STYLES, CountingThreefry, example, runs, sgd_steps, step_for, tied_problem
from models import MLP, make, params_of


def tp_plan(problem: str) -> dict:
    """Megatron-style plan: column-parallel, then row-parallel (its bias replicated), then a
    column-parallel head gathered to every rank; the tied model's embedding is row-parallel
    (vocabulary rows) and its head, which shares that weight, column-parallel (the same rows)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if problem == "mlp":
        return {"net.0": ColwiseParallel(), "net.2": RowwiseParallel(), "net.4": ColwiseParallel(output_layouts=Replicate())}
    return {"embed": RowwiseParallel(input_layouts=Replicate()), "head": ColwiseParallel(output_layouts=Replicate())}


def parallel_model(model, mesh, problem: str, fsdp: bool):
    """``parallelize_module`` over ``mesh["tp"]`` (the whole mesh when 1-D), then, with ``fsdp``,
    ``fully_shard`` over ``mesh["dp"]`` (each Linear but the tied head, then the root)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, mesh["tp"] if mesh.ndim > 1 else mesh, tp_plan(problem))
    if problem == "tied":
        model.head.weight = model.embed.weight  # parallelize_module replaced both: tie them again
    if fsdp:
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not getattr(model, "head", None):
                fully_shard(module, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def _full(tensor):
    return tensor.full_tensor() if isinstance(tensor, torch.distributed.tensor.DTensor) else tensor


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, torch.distributed.tensor.DTensor) else tensor


def _placements(tensor):
    return str(tuple(tensor.placements)) if isinstance(tensor, torch.distributed.tensor.DTensor) else "plain"


def _problem(name: str):
    return global_problem() if name == "mlp" else tied_problem()


def data_shard(batch, mask, mesh, data_rank=None):
    """The rows of this rank's tensor-parallel group: the shard of its "dp" coordinate (all rows on a 1-D TP mesh)."""
    data_size = mesh.size(0) if mesh.ndim > 1 else 1
    if data_rank is None:
        data_rank = mesh.get_local_rank("dp") if mesh.ndim > 1 else 0
    rows, shard_mask = fundp.distributed.shard(torch.arange(mask.shape[0]), mask, data_rank, data_size)
    return {k: v[rows] for k, v in batch.items()}, shard_mask


def tp_steps(mesh, problem: str, fsdp: bool, styles: tuple = CLIP_STYLES) -> dict:
    model, _, batch, mask = _problem(problem)
    local, shard_mask = data_shard(batch, mask, mesh)
    plain_names = set(params_of(model))
    reference_logits = model(batch["x"]).detach()
    parallel_model(model, mesh, problem, fsdp)
    params = {name: p.detach() for name, p in model.named_parameters()}
    assert set(params) == plain_names, (set(params), plain_names)
    with torch.no_grad():  # the plan is a valid TP model: its own forward computes the plain model's logits
        results = {"forward_error": float((model(batch["x"]) - reference_logits)[mask].abs().max())}
    results["data_world_size"] = fundp.sharding.data_world_size(params, None, "tp")  # the ranks with rows of their own
    for name, style, options, key in runs(problem, styles):
        step = step_for(model, style, True, tensor_parallel_dim="tp", **options)
        with CountingThreefry() as counter:
            out = step(params, local, key, ledger=fundp.Ledger(), mask=shard_mask)
        results[name] = {
            "grads": {n: _full(g) for n, g in out.grads.items()},
            "local_numel": {n: _local(g).numel() for n, g in out.grads.items()},
            "placements": {n: _placements(g) for n, g in out.grads.items()},
            "loss": out.loss,
            "ledger": out.ledger.to_dict(),
            "threefry_counts": counter.counts,
        }
    if problem == "mlp" and styles == CLIP_STYLES:  # frozen layers (as LoRA's base), then two SGD steps
        head = {name: p for name, p in params.items() if name.startswith("net.4.")}
        for engine in ("vmap", "ghost"):
            out = step_for(model, "flat", True, grad_method=engine, tensor_parallel_dim="tp")(
                head, local, fundp.random.key(48), mask=shard_mask)
            results[f"frozen_{engine}"] = {n: _full(g) for n, g in out.grads.items()}
        trained = sgd_steps(params, step_for(model, "flat", True, tensor_parallel_dim="tp"), local, shard_mask)
        results["trained"] = {n: _full(p) for n, p in trained.items()}
        # correlated noise (BLT), its state sharded like the TP / FSDP x TP params, three steps threaded
        results["blt"] = fsdp_mechanism_workers.three_steps(
            model, params, local, shard_mask, fsdp_mechanism_workers.mechanisms()["blt"], False, True, full=_full,
            tensor_parallel_dim="tp")
        # adaptive clipping: the TP group's ranks count the same rows, each group's count once
        results["adaptive"] = fsdp_mechanism_workers.three_steps(
            model, params, local, shard_mask, None, True, True, full=_full, tensor_parallel_dim="tp")
    return results


def _attempt(outcomes, name, step, params, batch, mask):
    try:
        step(params, batch, fundp.random.key(42), mask=mask)
        outcomes[name] = "ok"
    except (fundp.distributed.RankMismatchError, NotImplementedError, ValueError) as error:
        outcomes[name] = f"{type(error).__name__}: {error}"


def mismatches(rank: int, mesh) -> dict:
    """Misuses of tensor parallelism: each raises on every rank, naming what differs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    outcomes: dict = {}
    model, plain, batch, mask = global_problem()
    local, shard_mask = data_shard(batch, mask, mesh)
    parallel_model(model, mesh, "mlp", fsdp=mesh.ndim > 1)
    params = {name: p.detach() for name, p in model.named_parameters()}
    tp = step_for(model, "flat", True, tensor_parallel_dim="tp")
    if mesh.ndim == 1:
        other = {k: v.clone() for k, v in local.items()}
        other["x"][0, 0] += rank  # rank 1 passes another row 0
        _attempt(outcomes, "different_batches", tp, params, other, shard_mask)
        _attempt(outcomes, "no_tp_dim", step_for(model, "flat", True), params, local, shard_mask)
        _attempt(outcomes, "wrong_dim", step_for(model, "flat", True, tensor_parallel_dim="dp"), params, local, shard_mask)
        _attempt(outcomes, "plain_params", tp, plain, local, shard_mask)
        two = make(MLP)
        parallelize_module(two, mesh, {"net.0": tp_plan("mlp")["net.0"]})
        parallelize_module(two, init_device_mesh("cpu", (2,), mesh_dim_names=("tp2",)), {"net.4": tp_plan("mlp")["net.4"]})
        _attempt(outcomes, "other_root", step_for(two, "flat", True, tensor_parallel_dim="tp"),
                 {name: p.detach() for name, p in two.named_parameters()}, local, shard_mask)
    else:
        _attempt(outcomes, "same_rows_across_groups", tp, params, batch, mask)  # every rank passes every row
        dp0, dp0_mask = data_shard(batch, mask, mesh, data_rank=0)
        swapped = (dp0, dp0_mask) if rank == 3 else (local, shard_mask)  # rank 3 takes the other group's rows
        _attempt(outcomes, "split_group", tp, params, *swapped)
    _attempt(outcomes, "fine", tp, params, local, shard_mask)
    return outcomes


def two_ranks(rank: int) -> dict:
    """2 ranks, one tensor-parallel group."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    return {"mlp": tp_steps(mesh, "mlp", fsdp=False), "tied": tp_steps(mesh, "tied", fsdp=False),
            "mismatch": mismatches(rank, mesh)}


def four_ranks(rank: int) -> dict:
    """4 ranks, FSDP2 over "dp" x tensor parallelism over "tp" (and TP under plain data parallelism)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    return {"mlp": tp_steps(mesh, "mlp", fsdp=True), "tied": tp_steps(mesh, "tied", fsdp=True),
            "ddp_tp": tp_steps(mesh, "mlp", fsdp=False, styles=("flat",)), "mismatch": mismatches(rank, mesh),
            "example": example()}  # on 4 ranks the example's default: FSDP2 x TP, 2 x 2


SCENARIOS = {"tp": two_ranks, "fsdp_tp": four_ranks}


def run(rank: int, world_size: int, init_file: str, out_dir: str, scenario: str) -> None:
    serve(rank, world_size, init_file, out_dir, lambda: SCENARIOS[scenario](rank), 30)
