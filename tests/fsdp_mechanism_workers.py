"""Worker processes for test_fsdp_mechanisms.py: correlated noise (fundp.mf) and adaptive clipping
with parameters sharded by FSDP2 (and adaptive clipping with replicated parameters), gloo, CPU, float64.

Each run is three steps with the noise state / clip state threaded and the parameters updated by
SGD; the test compares every step with one process on the whole batch (:func:`single_process`).
"""

from __future__ import annotations


import torch

import fundp
from dist_workers import CLIP_NORM, EXPECTED_BATCH, SIGMA, global_problem, serve
from fsdp_workers import CountingThreefry, sharded_model
from models import classification_loss

STEPS, LR = 3, 0.5
INITIAL_MAX_NORM = 0.95  # about the median per-example norm: the ranks count different numbers unclipped
CFG = fundp.adaptive.quantile_clipping(target_quantile=0.5, learning_rate=0.3, count_noise_multiplier=0.5)


def mechanisms() -> dict:
    """The correlated-noise mechanisms compared (horizon 4 >= the 3 steps run)."""
    single = fundp.mf.single_participation()
    return {
        "blt": fundp.mf.mechanism(fundp.mf.blt([0.9, 0.5], [0.3, 0.2], 4), single),
        "banded": fundp.mf.mechanism(fundp.mf.banded_toeplitz([1.0, 0.6, 0.3], 4), single),
        "tree": fundp.mf.mechanism(fundp.mf.tree(4), single),
    }


def runs() -> list:
    """``(name, mechanism name or None, adaptive?)``."""
    return [("blt", "blt", False), ("banded", "banded", False), ("tree", "tree", False),
            ("adaptive", None, True), ("blt_adaptive", "blt", True)]


def make_step(model, mechanism, adaptive, distributed, **options):
    return fundp.dp_step(classification_loss(model), max_norm=CLIP_NORM, noise_multiplier=SIGMA,
                         expected_batch_size=EXPECTED_BATCH, sample_rate=None if mechanism else 0.1,
                         grad_method="vmap", distributed=distributed, check_key_reuse=False,
                         noise_mechanism=mechanism, adaptive_clipping=CFG if adaptive else None, **options)


def three_steps(model, params, batch, mask, mechanism, adaptive, distributed, full=lambda t: t, **options):
    """Three SGD steps; per step the (gathered) gradients, the clip state and the Threefry counts
    (``options``: more ``dp_step`` arguments, e.g. ``tensor_parallel_dim``)."""
    step = make_step(model, mechanism, adaptive, distributed, **options)
    noise_state = None if mechanism is None else mechanism.init(params)
    clip_state = CFG.init(INITIAL_MAX_NORM) if adaptive else None
    ledger = fundp.Ledger()
    state_shapes = None if noise_state is None else _shapes(noise_state, params)
    out_steps = []
    for t in range(STEPS):
        with CountingThreefry() as counter:
            out = step(params, batch, fundp.random.fold_in(fundp.random.key(50), t), ledger=ledger, mask=mask,
                       noise_state=noise_state, clip_state=clip_state)
        noise_state, clip_state, ledger = out.noise_state, out.clip_state, out.ledger
        out_steps.append({"grads": {n: full(g) for n, g in out.grads.items()}, "loss": out.loss,
                          "max_norm": None if clip_state is None else clip_state.max_norm.clone(),
                          "threefry_counts": counter.counts})
        params = {n: p - LR * out.grads[n] for n, p in params.items()}
    result = {"steps": out_steps, "ledger": ledger.to_dict(), "params": {n: full(p) for n, p in params.items()}}
    if noise_state is not None:
        result["noise_step"] = int(noise_state.step)
        result["buffers"] = {n: full(b) for n, b in noise_state.buffers.items()}
        result["state_shapes"] = state_shapes
        result["final_state_shapes"] = _shapes(noise_state, params)
    return result


def _shapes(noise_state, params) -> dict:
    """Per leaf: (local shape of the state's buffers, local shape of the parameter, placements)."""
    out = {}
    for name, buffer in noise_state.buffers.items():
        local = buffer.to_local() if hasattr(buffer, "to_local") else buffer
        param = params[name].to_local() if hasattr(params[name], "to_local") else params[name]
        out[name] = (tuple(local.shape), tuple(param.shape), str(getattr(buffer, "placements", None)))
    return out


def single_process() -> dict:
    model, params, batch, mask = global_problem()
    mechs = mechanisms()
    return {name: three_steps(model, params, batch, mask, None if m is None else mechs[m], adaptive, False)
            for name, m, adaptive in runs()}


def _local_batch(rank, world_size):
    model, params, batch, mask = global_problem()
    rows, shard_mask = fundp.distributed.shard(torch.arange(mask.shape[0]), mask, rank, world_size)
    return model, params, {k: v[rows] for k, v in batch.items()}, shard_mask


def _sharded_problem(rank, world_size, mesh_shape):
    """The global problem's model under fully_shard (a 1-D mesh, or HSDP on ``mesh_shape``), its
    DTensor params and this rank's rows."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard")) if mesh_shape else \
        init_device_mesh("cpu", (world_size,))
    model, _, local, shard_mask = _local_batch(rank, world_size)
    sharded_model(model, mesh)
    return model, {name: p.detach() for name, p in model.named_parameters()}, local, shard_mask


def sharded(rank: int, world_size: int, mesh_shape: tuple | None = None) -> dict:
    model, params, local, shard_mask = _sharded_problem(rank, world_size, mesh_shape)
    mechs = mechanisms()
    results = {name: three_steps(model, params, local, shard_mask, None if m is None else mechs[m], adaptive, True,
                                 full=lambda t: t.full_tensor())
               for name, m, adaptive in runs()}
    results["local_numel"] = {n: p.to_local().numel() for n, p in params.items()}
    # A state built from the unsharded params is refused, naming the layout it needs.
    step = make_step(model, mechs["blt"], False, True)
    try:
        whole = {n: p.full_tensor() for n, p in params.items()}
        step(params, local, fundp.random.key(51), mask=shard_mask, noise_state=mechs["blt"].init(whole))
        results["unsharded_state"] = "ok"
    except ValueError as error:
        results["unsharded_state"] = str(error)
    return results


class CountingEntropy:
    """Records how many OS uniforms each secure-mode draw reads (to show no rank draws full-size noise)."""

    def __enter__(self):
        import fundp.secure

        self.original, self.counts = fundp.secure._os_uniform, []

        def counting(count):
            self.counts.append(int(count))
            return self.original(count)

        fundp.secure._os_uniform = counting
        return self

    def __exit__(self, *exc):
        import fundp.secure

        fundp.secure._os_uniform = self.original


def secure_step(model, sigma, distributed):
    return fundp.dp_step(classification_loss(model), max_norm=CLIP_NORM, noise_multiplier=sigma,
                         expected_batch_size=EXPECTED_BATCH, sample_rate=0.1, grad_method="vmap",
                         distributed=distributed, secure_mode=True, check_key_reuse=False)


def noiseless_single_process() -> dict:
    model, params, batch, mask = global_problem()
    step = fundp.dp_step(classification_loss(model), max_norm=CLIP_NORM, noise_multiplier=0.0,
                         expected_batch_size=EXPECTED_BATCH, grad_method="vmap")
    return step(params, batch, fundp.random.key(52), mask=mask).grads


def secure(rank: int, world_size: int, mesh_shape: tuple | None = None) -> dict:
    """Secure mode on sharded params: noiseless (sigma = 0) and noisy gathered gradients, entropy read."""
    model, params, local, shard_mask = _sharded_problem(rank, world_size, mesh_shape)
    out = {}
    for name, sigma in (("noiseless", 0.0), ("noisy", SIGMA)):
        with CountingEntropy() as counter:
            grads = secure_step(model, sigma, True)(params, local, fundp.random.key(52), mask=shard_mask).grads
        out[name] = {n: g.full_tensor() for n, g in grads.items()}
        out[f"{name}_entropy"] = counter.counts
        out["placements"] = {n: str(g.placements) for n, g in grads.items()}
    out["local_numel"] = {n: p.to_local().numel() for n, p in params.items()}
    return out


def replicated(rank: int, world_size: int) -> dict:
    """Adaptive clipping with replicated (plain) params: the counts are all-reduced too."""
    model, params, local, shard_mask = _local_batch(rank, world_size)
    return {"adaptive": three_steps(model, params, local, shard_mask, None, True, True)}


def run(rank: int, world_size: int, init_file: str, out_dir: str, scenario: str) -> None:
    serve(rank, world_size, init_file, out_dir, lambda: _result(rank, world_size, out_dir, scenario), 30)


def _result(rank: int, world_size: int, out_dir: str, scenario: str):
    if scenario == "two":
        result = {"fsdp": sharded(rank, world_size), "ddp": replicated(rank, world_size), "secure": secure(rank, world_size)}
    elif scenario == "four":  # FSDP over 4 ranks (an empty shard) and HSDP on a 2 x 2 mesh
        result = {"fsdp": sharded(rank, world_size), "hsdp": sharded(rank, world_size, (2, 2)),
                  "secure_hsdp": secure(rank, world_size, (2, 2))}
    else:
        raise ValueError(scenario)
    return result
