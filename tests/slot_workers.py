"""Worker processes for test_reduction_slots.py: ``dp_step(..., reduction_slots=4)`` on 1, 2 and 4
gloo ranks (CPU, float64), plain and FSDP2 params, and a DCP checkpoint resumed onto another world size."""

from __future__ import annotations

import os

import torch

import fundp
from dist_workers import global_problem, serve
from fsdp_workers import saved_or_loaded, sharded_model, step_for
from models import MLP, make

SLOTS = 4


def padded_problem():
    """The 13-row global problem padded to 16 rows (a multiple of SLOTS): padding rows copy row 0, masked."""
    model, params, batch, mask = global_problem()
    rows = torch.cat([torch.arange(13), torch.zeros(3, dtype=torch.long)])
    mask = torch.cat([mask, torch.zeros(3, dtype=torch.bool)])
    return model, params, {k: v[rows] for k, v in batch.items()}, mask


def local_batch(rank, world_size):
    """This rank's shard of the padded problem (``world_size=None``: the whole batch, one process)."""
    _, _, batch, mask = padded_problem()
    if world_size is None:
        return batch, mask
    rows, local_mask = fundp.distributed.shard(torch.arange(16), mask, rank, world_size)
    return {k: v[rows] for k, v in batch.items()}, local_mask


def slot_step(model, distributed, **options):
    return step_for(model, "flat", distributed, reduction_slots=SLOTS, **options)


def adam_steps(step, params, opt_state, ledger, rank, world_size, first, last):
    """Steps ``first..last-1`` of DP-Adam on the padded problem."""
    batch, mask = local_batch(rank, world_size)
    opt = fundp.optim.adam(0.05)
    for t in range(first, last):
        out = step(params, batch, fundp.random.fold_in(fundp.random.key(47), t), ledger=ledger, mask=mask)
        updates, opt_state = opt.update(out.grads, opt_state, params)
        params, ledger = fundp.optim.apply_updates(params, updates), out.ledger
    return params, opt_state, ledger


def single_process(**options) -> dict:
    """One process, no process group: one step's grads (``key 49``) and 4 Adam steps."""
    model, params, _, _ = padded_problem()
    batch, mask = local_batch(0, None)
    step = slot_step(model, False, **options)
    grads = step(params, batch, fundp.random.key(49), mask=mask).grads
    trained, _, ledger = adam_steps(step, params, fundp.optim.adam(0.05).init(params), fundp.Ledger(), 0, None, 0, 4)
    return {"grads": grads, "params": trained, "ledger": ledger}


def one_step(model, params, rank, world_size, **options):
    batch, mask = local_batch(rank, world_size)
    grads = slot_step(model, True, **options)(params, batch, fundp.random.key(49), mask=mask).grads
    return {name: g.full_tensor() if hasattr(g, "full_tensor") else g for name, g in grads.items()}


def checkpointed(rank: int, world_size: int, phase: str, directory: str) -> dict:
    """Plain and FSDP2 steps on this world size; ``save``: 2 DP-Adam steps on FSDP2, a DCP checkpoint,
    2 more (the uninterrupted run); ``resume``: the checkpoint loaded into another initialisation, 2 steps."""
    from torch.distributed.device_mesh import init_device_mesh

    plain_model, plain_params, _, _ = padded_problem()
    result = {"plain": one_step(plain_model, plain_params, rank, world_size),
              "ghost": one_step(plain_model, plain_params, rank, world_size, grad_method="ghost"),
              "accumulate": one_step(plain_model, plain_params, rank, world_size, physical_batch_size=2)}
    model = sharded_model(make(MLP, seed=0 if phase == "save" else 1), init_device_mesh("cpu", (world_size,)))
    params = {name: p.detach() for name, p in model.named_parameters()}
    if phase == "save":
        result["fsdp"] = one_step(model, params, rank, world_size)
    step = slot_step(model, True)
    opt_state = fundp.optim.adam(0.05).init(params)
    params, opt_state, ledger = saved_or_loaded(phase, directory, "slots", params, opt_state,
                                                lambda *state: adam_steps(step, *state, rank, world_size, 0, 2))
    params, opt_state, ledger = adam_steps(step, params, opt_state, ledger, rank, world_size, 2, 4)
    result.update(params={name: p.full_tensor() for name, p in params.items()}, ledger=ledger.to_dict())
    result["mf"] = mechanism_run(rank, world_size, phase, directory + "-mf")
    return result


def mechanism_run(rank, world_size, phase, directory):
    """FSDP2 SGD with a BLT correlated-noise mechanism and adaptive clipping, both states threaded:
    ``save``: 2 steps, a DCP checkpoint of params, ledger, key, noise and clip state, 2 more;
    ``resume``: the checkpoint loaded into states laid out for this world size, 2 steps.
    Returns the final params (gathered), noise buffers (gathered), clip threshold and ledger."""
    from torch.distributed.device_mesh import init_device_mesh

    from models import classification_loss

    mech = fundp.mf.mechanism(fundp.mf.blt([0.9, 0.5], [0.3, 0.2], 4), fundp.mf.single_participation())
    cfg = fundp.adaptive.quantile_clipping(target_quantile=0.5, learning_rate=0.3, count_noise_multiplier=0.5)
    model = sharded_model(make(MLP, seed=0 if phase == "save" else 1), init_device_mesh("cpu", (world_size,)))
    params = {name: p.detach() for name, p in model.named_parameters()}
    step = fundp.dp_step(classification_loss(model), max_norm=1.0, noise_multiplier=1.0, expected_batch_size=10.0,
                         grad_method="vmap", distributed=True, check_key_reuse=False, reduction_slots=SLOTS,
                         noise_mechanism=mech, adaptive_clipping=cfg)
    batch, mask = local_batch(rank, world_size)
    noise_state, clip_state, ledger = mech.init(params), cfg.init(0.95), fundp.Ledger()

    def steps(params, noise_state, clip_state, ledger, first, last):
        for t in range(first, last):
            out = step(params, batch, fundp.random.fold_in(fundp.random.key(53), t), ledger=ledger, mask=mask,
                       noise_state=noise_state, clip_state=clip_state)
            params = {n: p - 0.5 * out.grads[n] for n, p in params.items()}
            noise_state, clip_state, ledger = out.noise_state, out.clip_state, out.ledger
        return params, noise_state, clip_state, ledger

    if phase == "save":
        params, noise_state, clip_state, ledger = steps(params, noise_state, clip_state, ledger, 0, 2)
        fundp.sharded_checkpoint.save(directory, params=params, opt_state=(), ledger=ledger, key=fundp.random.key(53),
                                      step=2, run_id="slots-mf", noise_state=noise_state, clip_state=clip_state)
    else:
        state = fundp.sharded_checkpoint.load(directory, params_like=params, opt_state_like=(), run_id="slots-mf",
                                              noise_state_like=noise_state, clip_state_like=clip_state)
        params, noise_state, clip_state, ledger = state.params, state.noise_state, state.clip_state, state.ledger
        assert all(b.to_local().shape[1:] == params[n].to_local().shape for n, b in noise_state.buffers.items())
    params, noise_state, clip_state, ledger = steps(params, noise_state, clip_state, ledger, 2, 4)
    return {"params": {n: p.full_tensor() for n, p in params.items()},
            "buffers": {n: b.full_tensor() for n, b in noise_state.buffers.items()},
            "noise_step": int(noise_state.step), "max_norm": clip_state.max_norm.clone(), "ledger": ledger.to_dict()}


def run(rank: int, world_size: int, init_file: str, out_dir: str, scenario: str) -> None:
    serve(rank, world_size, init_file, out_dir, lambda: _result(rank, world_size, out_dir, scenario), 20)


def _result(rank: int, world_size: int, out_dir: str, scenario: str):
    if scenario == "refusals":
        result = refusals(rank, world_size)
    else:  # save / resume, the checkpoint in out_dir/../checkpoint
        result = checkpointed(rank, world_size, scenario, os.path.join(os.path.dirname(out_dir), "checkpoint"))
    return result


def refusals(rank: int, world_size: int) -> dict:
    """Messages of the refused calls on 2 ranks: slots the world size does not divide; too few rows."""
    model, params, _, _ = padded_problem()
    batch, mask = local_batch(rank, world_size)
    out = {}
    for name, slots, rows in (("world", 1, 8), ("rows", 8, 6)):
        step = step_for(model, "flat", True, reduction_slots=slots)
        try:
            step(params, {k: v[:rows] for k, v in batch.items()}, fundp.random.key(50), mask=mask[:rows])
            out[name] = "no error"
        except ValueError as error:
            out[name] = str(error)
    return out
