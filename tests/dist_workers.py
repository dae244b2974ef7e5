"""Worker processes for test_distributed.py (a module of its own so `spawn` can import it)."""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist

import fundp
from models import MLP, classification_loss, make, params_of

SIGMA, CLIP_NORM, EXPECTED_BATCH = 1.3, 0.4, 10.0


def global_problem():
    """The same model, params and a padded global batch (NaN in padded rows) on every rank."""
    model = make(MLP)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=g)
    mask = torch.ones(13, dtype=torch.bool)
    mask[[3, 11, 12]] = False
    x[[3, 11, 12]] = float("nan")
    return model, params_of(model), {"x": x, "y": y}, mask


def single_process_result():
    model, params, batch, mask = global_problem()
    step = fundp.dp_step(classification_loss(model), max_norm=CLIP_NORM, noise_multiplier=SIGMA, expected_batch_size=EXPECTED_BATCH, sample_rate=0.1, grad_method="vmap")
    return step(params, batch, fundp.random.key(42), ledger=fundp.Ledger(), mask=mask)


def consistency_checks(rank: int, params) -> dict:
    """Runs each misuse of check_consistent in lockstep on every rank; returns each outcome."""
    outcomes = {}

    def attempt(name, call):
        try:
            call()
            outcomes[name] = "ok"
        except fundp.distributed.RankMismatchError as error:
            outcomes[name] = "RankMismatchError: " + str(error)

    settings = (("noise_multiplier", SIGMA), ("max_norm", CLIP_NORM), ("grad_method", "vmap"), ("ledger", fundp.Ledger()))
    same_key = fundp.random.key(42)
    attempt("consistent", lambda: fundp.distributed.check_consistent(same_key, settings, params=params))
    # Each rank drawing its own production key: the bug this guard exists for.
    attempt("own_os_key", lambda: fundp.distributed.check_consistent(fundp.random.os_key(), settings, params=params))
    attempt("shared_os_key", lambda: fundp.distributed.check_consistent(fundp.distributed.shared_os_key(), settings, params=params))
    other_sigma = (("noise_multiplier", SIGMA + 0.1 * rank),) + settings[1:]
    attempt("setting", lambda: fundp.distributed.check_consistent(same_key, other_sigma))
    other_ledger = settings[:3] + (("ledger", fundp.accountant_step(fundp.Ledger(), noise_multiplier=SIGMA, sample_rate=0.1, steps=1 + rank)),)
    attempt("ledger", lambda: fundp.distributed.check_consistent(same_key, other_ledger))
    tiny = settings[:1] + (("max_norm", CLIP_NORM + rank * 1e-16),) + settings[2:]  # floats are compared exactly
    attempt("tiny_float", lambda: fundp.distributed.check_consistent(same_key, tiny))
    perturbed = dict(params)
    name = sorted(params)[0]
    perturbed[name] = params[name].clone()
    if rank == 1:
        perturbed[name].view(-1)[0] += 1e-12
    attempt("params", lambda: fundp.distributed.check_consistent(same_key, settings, params=perturbed))
    more = settings + ((("extra", 1),) if rank == 1 else ())
    attempt("structure", lambda: fundp.distributed.check_consistent(same_key, more))
    # first_call_check: checks once; after a success later calls do nothing (even on a mismatch).
    check = fundp.distributed.first_call_check(settings)
    attempt("first_call", lambda: check(same_key, params, (("ledger", fundp.Ledger()),)))
    attempt("second_call_skipped", lambda: check(fundp.random.key(rank), params))
    failing = fundp.distributed.first_call_check(settings)
    attempt("first_call_mismatch", lambda: failing(fundp.random.key(rank), params))
    attempt("retried_after_failure", lambda: failing(fundp.random.key(rank), params))
    outcomes["first_call_done"] = str(check.done)
    return outcomes


def step_with_own_keys(rank: int, params, batch, mask, model) -> dict:
    """dp_step(distributed=True) called with a key each rank drew from its own OS entropy."""
    rows, shard_mask = fundp.distributed.shard(torch.arange(13), mask, rank, dist.get_world_size())
    local = {k: v[rows] for k, v in batch.items()}
    step = fundp.dp_step(classification_loss(model), max_norm=CLIP_NORM, noise_multiplier=SIGMA, expected_batch_size=EXPECTED_BATCH, sample_rate=0.1, grad_method="vmap", distributed=True)
    try:
        step(params, local, fundp.random.os_key(), ledger=fundp.Ledger(), mask=shard_mask)
        return {"own_os_key": "ok"}
    except fundp.distributed.RankMismatchError as error:
        return {"own_os_key": "RankMismatchError: " + str(error)}


def diverge_at_step_5(rank: int, params, batch, mask, model) -> dict:
    """Eight steps; from step 5 rank 1 clips at max_norm=50 (issue 25: unnoticed after the first call)."""
    rows, shard_mask = fundp.distributed.shard(torch.arange(13), mask, rank, dist.get_world_size())
    local = {k: v[rows] for k, v in batch.items()}
    step = fundp.dp_step(classification_loss(model), max_norm=CLIP_NORM, noise_multiplier=SIGMA, expected_batch_size=EXPECTED_BATCH,
                         sample_rate=0.1, grad_method="vmap", distributed=True)
    ledger = fundp.Ledger()
    for t in range(8):
        max_norm = 50.0 if (rank == 1 and t >= 5) else None
        try:
            ledger = step(params, local, fundp.random.fold_in(fundp.random.key(42), t), ledger=ledger, mask=shard_mask,
                          max_norm=max_norm).ledger
        except fundp.distributed.RankMismatchError as error:
            return {"raised_at": t, "error": str(error), "steps": ledger.steps}
    return {"raised_at": None, "steps": ledger.steps}


def sampler_steps(rank: int, world_size: int | None = None) -> list:
    """Three steps of ``dp_step(sampler=batches, distributed=True)`` on each rank's shard of the
    Poisson batches (``world_size=None``: one process, the whole batches, the same keys)."""
    model, params, batch, _ = global_problem()
    clean = {"x": torch.nan_to_num(batch["x"]), "y": batch["y"]}
    batches = fundp.data.poisson_batches(13, 0.5, fundp.random.key(1), steps=3, pad_to_multiple=4)
    step = fundp.dp_step(classification_loss(model), max_norm=CLIP_NORM, noise_multiplier=SIGMA, sampler=batches,
                         grad_method="vmap", distributed=world_size is not None)
    grads = []
    for t, (indices, mask) in enumerate(batches):
        if world_size is not None:
            indices, mask = fundp.distributed.shard(indices, mask, rank, world_size)
        out = step(params, {k: v[indices] for k, v in clean.items()}, fundp.random.fold_in(fundp.random.key(42), t), mask=mask)
        grads.append(out.grads)
    return grads


def run(rank: int, world_size: int, init_file: str, out_dir: str, scenario: str) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=8))
        model, params, batch, mask = global_problem()
        if scenario == "fail" and rank == 1:
            raise RuntimeError("rank 1 fails before the collective")
        if scenario == "diverge_at_5":
            result = diverge_at_step_5(rank, params, batch, mask, model)
            torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
            dist.destroy_process_group()
            return
        if scenario in ("consistency", "step_own_os_key"):
            result = consistency_checks(rank, params) if scenario == "consistency" else step_with_own_keys(rank, params, batch, mask, model)
            torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
            dist.barrier()
            dist.destroy_process_group()
            return
        if scenario == "matrix":  # test_support_matrix's distributed cells, this rank's share
            import test_support_matrix

            torch.save(test_support_matrix.distributed_cells((rank, world_size)), os.path.join(out_dir, f"rank{rank}.pt"))
            dist.barrier()
            dist.destroy_process_group()
            return
        if scenario == "sampler":
            torch.save({"grads": sampler_steps(rank, world_size)}, os.path.join(out_dir, f"rank{rank}.pt"))
            dist.barrier()
            dist.destroy_process_group()
            return
        rows, shard_mask = fundp.distributed.shard(torch.arange(13), mask, rank, world_size)
        local = {k: v[rows] for k, v in batch.items()}
        loss_fn = classification_loss(model)
        key = fundp.random.key(42)
        if scenario in ("step", "fail"):
            step = fundp.dp_step(loss_fn, max_norm=CLIP_NORM, noise_multiplier=SIGMA, expected_batch_size=EXPECTED_BATCH, sample_rate=0.1, grad_method="vmap", distributed=True)
            out = step(params, local, key, ledger=fundp.Ledger(), mask=shard_mask)
            result = {"grads": out.grads, "loss": out.loss, "ledger": out.ledger.to_dict()}
        else:  # "accumulate": two physical chunks per rank, reduced once, noised once
            summed = fundp.clipped_grad_sum(loss_fn, max_norm=CLIP_NORM, grad_method="vmap")
            noise_key, model_key = fundp.random.split(key)
            half = rows.shape[0] // 2
            first = summed(params, {k: v[:half] for k, v in local.items()}, shard_mask[:half], model_key)
            second = summed(params, {k: v[half:] for k, v in local.items()}, shard_mask[half:], model_key)
            total = fundp.distributed.all_reduce_clipped_sum(fundp.add_clipped_sums(first, second))
            grads = fundp.privatize(total, noise_key, noise_multiplier=SIGMA, expected_batch_size=EXPECTED_BATCH)
            result = {"grads": grads, "loss": total.loss_sum / total.num_examples}
        save_and_leave(result, out_dir, rank)
    except Exception:
        record_error(out_dir, rank)
        raise


def save_and_leave(result, out_dir: str, rank: int) -> None:
    """Saves this rank's result, waits for every rank, and leaves the process group."""
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def serve(rank: int, world_size: int, init_file: str, out_dir: str, compute, timeout_s: float) -> None:
    """One rank of a launch: joins the gloo group, saves ``compute()`` (:func:`save_and_leave`), or
    records the traceback (:func:`record_error`) and re-raises."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        save_and_leave(compute(), out_dir, rank)
    except Exception:
        record_error(out_dir, rank)
        raise


def record_error(out_dir: str, rank: int) -> None:
    """Writes the current exception's traceback to ``rank{rank}.err`` (what the tests read)."""
    with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as handle:
        handle.write(traceback.format_exc())
