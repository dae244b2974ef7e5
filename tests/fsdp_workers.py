"""Worker processes for test_fsdp.py: dp_step on parameters sharded by FSDP2's ``fully_shard``.

Each scenario runs on every rank of a gloo process group (CPU, float64) and saves what the test
compares with one process on the whole batch (:func:`single_process`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

import fundp
from dist_workers import CLIP_NORM, EXPECTED_BATCH, SIGMA, global_problem, serve
from models import MLP, classification_loss, make, params_of

CLIP_STYLES = ("flat", "per_layer", "automatic")


class TiedHead(nn.Module):
    """Embedding whose weight is also the output layer's (one parameter used twice)."""

    def __init__(self, vocab=7, dim=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.embed(tokens).mean(dim=1)))
        return self.head(h)


def tied_problem():
    model = make(TiedHead)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 7, (9, 4), generator=g)
    y = torch.randint(0, 7, (9,), generator=g)
    mask = torch.ones(9, dtype=torch.bool)
    mask[4] = False
    return model, params_of(model), {"x": tokens, "y": y}, mask


def max_norm_for(style, params):
    if style == "per_layer":
        return {name: CLIP_NORM * (1 + 0.25 * i) for i, name in enumerate(sorted(params))}
    return CLIP_NORM


# Variants beyond the clip styles: (name, dp_step options); each runs with flat clipping.
VARIANTS = (("ghost", {"grad_method": "ghost"}), ("accumulate", {"physical_batch_size": 2}))


def step_for(model, style, distributed, **options):
    options = {"grad_method": "vmap", **options}
    return fundp.dp_step(classification_loss(model), max_norm=max_norm_for(style, params_of(model)), clip_style=style,
                         noise_multiplier=SIGMA, expected_batch_size=EXPECTED_BATCH, sample_rate=0.1,
                         distributed=distributed, check_key_reuse=False, **options)  # keys repeat across problems


def runs(problem, styles):
    """``(name, clip style, options, key)`` of each step compared with one process."""
    if problem != "mlp":
        return [("flat", "flat", {}, fundp.random.key(43))]
    out = [(style, style, {}, fundp.random.fold_in(fundp.random.key(42), i)) for i, style in enumerate(styles)]
    if styles == CLIP_STYLES:
        out += [(name, "flat", options, fundp.random.fold_in(fundp.random.key(44), i)) for i, (name, options) in enumerate(VARIANTS)]
    return out


def without_last_rank(mask, world_size):
    """The global mask with the rows of the last rank (``fundp.distributed.shard``: rows ``r::W``) masked."""
    mask = mask.clone()
    mask[world_size - 1::world_size] = False
    return mask


def empty_rank(rank: int, world_size: int) -> dict:
    """The last rank passes a batch without a real row (a Poisson batch can be empty): the step
    runs on every rank (no collective skipped) and equals one process on the other ranks' rows."""
    from torch.distributed.device_mesh import init_device_mesh

    model, _, batch, mask = global_problem()
    rows, shard_mask = fundp.distributed.shard(torch.arange(mask.shape[0]), without_last_rank(mask, world_size), rank,
                                               world_size)
    assert bool(shard_mask.any()) == (rank != world_size - 1)
    sharded_model(model, init_device_mesh("cpu", (world_size,)))
    params = {name: p.detach() for name, p in model.named_parameters()}
    out = step_for(model, "flat", True)(params, {k: v[rows] for k, v in batch.items()}, fundp.random.key(46), mask=shard_mask)
    return {"grads": {name: g.full_tensor() for name, g in out.grads.items()}, "loss": out.loss}


def sgd_steps(params, step, batch, mask, steps=2, lr=0.5):
    """A short training loop: the params (plain or DTensor) updated by SGD on the private gradients."""
    for t in range(steps):
        grads = step(params, batch, fundp.random.fold_in(fundp.random.key(45), t), mask=mask).grads
        params = {name: p - lr * grads[name] for name, p in params.items()}
    return params


def single_process(problem: str = "mlp", styles: tuple = CLIP_STYLES) -> dict:
    """Per clip style: one process's dp_step on the whole batch (plain params), key 42 + style."""
    model, params, batch, mask = global_problem() if problem == "mlp" else tied_problem()
    results = {}
    for name, style, options, key in runs(problem, styles):
        out = step_for(model, style, False, **options)(params, batch, key, ledger=fundp.Ledger(), mask=mask)
        results[name] = {"grads": out.grads, "loss": out.loss, "ledger": out.ledger.to_dict()}
    if problem == "mlp" and styles == CLIP_STYLES:
        results["trained"] = sgd_steps(params, step_for(model, "flat", False), batch, mask)
        head = {name: p for name, p in params.items() if name.startswith("net.4.")}
        results["frozen"] = step_for(model, "flat", False)(head, batch, fundp.random.key(48), mask=mask).grads
    return results


def sharded_model(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight is not getattr(getattr(model, "embed", None), "weight", None):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class CountingThreefry:
    """Records the number of counters of every Threefry call (to show no rank draws full-size noise)."""

    def __init__(self):
        self.original = fundp.random._threefry2x32
        self.counts: list[int] = []

    def __enter__(self):
        def counting(key, x0, x1):
            if x0.numel() and int(x0.max()) < fundp.random._FOLD_IN_DOMAIN:  # not split / fold_in
                self.counts.append(int(x0.numel()))
            return self.original(key, x0, x1)

        fundp.random._threefry2x32 = counting
        return self

    def __exit__(self, *exc):
        fundp.random._threefry2x32 = self.original


def fsdp_steps(rank: int, world_size: int, problem: str, styles: tuple = CLIP_STYLES, mesh_shape: tuple | None = None) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    # 2-D: HSDP, placements (Replicate(), Shard(0))
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard")) if mesh_shape else init_device_mesh("cpu", (world_size,))
    model, _, batch, mask = global_problem() if problem == "mlp" else tied_problem()
    rows, shard_mask = fundp.distributed.shard(torch.arange(mask.shape[0]), mask, rank, world_size)
    local = {k: v[rows] for k, v in batch.items()}
    plain_names = set(params_of(model))
    sharded_model(model, mesh)
    params = {name: p.detach() for name, p in model.named_parameters()}
    assert set(params) == plain_names, (set(params), plain_names)
    results = {}
    for name, style, options, key in runs(problem, styles):
        step = step_for(model, style, True, **options)
        with CountingThreefry() as counter:
            out = step(params, local, key, ledger=fundp.Ledger(), mask=shard_mask)
        results[name] = {
            "grads": {name: g.full_tensor() for name, g in out.grads.items()},
            "local_numel": {name: g.to_local().numel() for name, g in out.grads.items()},
            "placements": {name: str(g.placements) for name, g in out.grads.items()},
            "loss": out.loss,
            "ledger": out.ledger.to_dict(),
            "threefry_counts": counter.counts,
        }
    if problem == "mlp" and styles == CLIP_STYLES:  # frozen layers (as LoRA's base): only the head is trained
        head = {name: p for name, p in params.items() if name.startswith("net.4.")}
        for engine in ("vmap", "ghost"):
            out = step_for(model, "flat", True, grad_method=engine)(head, local, fundp.random.key(48), mask=shard_mask)
            results[f"frozen_{engine}"] = {name: g.full_tensor() for name, g in out.grads.items()}
        trained = sgd_steps(params, step_for(model, "flat", True), local, shard_mask)
        results["trained"] = {name: p.full_tensor() for name, p in trained.items()}
        results["trained_placements"] = {name: str(p.placements) for name, p in trained.items()}
    # The noise alone: gathered shards equal one process's draw bit for bit.
    from fundp.noise import standard_normal_chunks

    key = fundp.random.key(3)
    names = sorted(params)
    shards = fundp.sharding.standard_normal_shards([params[n].detach() for n in names], key)
    whole = standard_normal_chunks([params[n].detach().full_tensor() for n in names], key)
    results["noise_equal"] = all(torch.equal(s.full_tensor(), w) for s, w in zip(shards, whole))
    results["noise_local_numel"] = sum(s.to_local().numel() for s in shards)
    return results


def mismatches(rank: int, world_size: int) -> dict:
    """Ranks that differ in model or batch shape, or pass the same rows: each raises, naming it."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    model, _, batch, mask = global_problem()
    rows, shard_mask = fundp.distributed.shard(torch.arange(13), mask, rank, world_size)
    local = {k: v[rows] for k, v in batch.items()}
    outcomes = {}

    def attempt(name, model, local, shard_mask):
        step = step_for(model, "flat", True)
        params = {name: p.detach() for name, p in model.named_parameters()}
        try:
            step(params, local, fundp.random.key(42), mask=shard_mask)
            outcomes[name] = "ok"
        except (fundp.distributed.RankMismatchError, NotImplementedError) as error:
            outcomes[name] = f"{type(error).__name__}: {error}"

    other = sharded_model(make(MLP, hidden=8 + rank), mesh)  # rank 1 built a wider model
    attempt("param_shape", other, local, shard_mask)
    same = sharded_model(make(MLP), mesh)
    cut = {k: v[: 2 + rank] for k, v in local.items()}  # rank 1 has one more row
    attempt("batch_shape", same, cut, shard_mask[: 2 + rank])
    everyone = {k: v[:6] for k, v in batch.items()}  # every rank passes the same rows (tensor-parallel style)
    attempt("shared_rows", same, everyone, mask[:6])
    attempt("fine", same, local, shard_mask)
    return outcomes


def adam_steps(step, params, opt_state, ledger, rank, world_size, first, last):
    """Steps ``first..last-1`` of a DP-Adam loop on the global problem (``world_size=None``: one process)."""
    _, _, batch, mask = global_problem()
    opt = fundp.optim.adam(0.05)
    for t in range(first, last):
        if world_size is None:
            local, local_mask = batch, mask
        else:
            rows, local_mask = fundp.distributed.shard(torch.arange(13), mask, rank, world_size)
            local = {k: v[rows] for k, v in batch.items()}
        out = step(params, local, fundp.random.fold_in(fundp.random.key(47), t), ledger=ledger, mask=local_mask)
        updates, opt_state = opt.update(out.grads, opt_state, params)
        params, ledger = fundp.optim.apply_updates(params, updates), out.ledger
    return params, opt_state, ledger


def single_process_adam(steps=4):
    model, params, _, _ = global_problem()
    params, _, ledger = adam_steps(step_for(model, "flat", False), params, fundp.optim.adam(0.05).init(params),
                                   fundp.Ledger(), 0, None, 0, steps)
    return params, ledger


def saved_or_loaded(phase, directory, run_id, params, opt_state, first_steps):
    """``save``: ``first_steps(params, opt_state, Ledger())`` (2 steps), then a sharded checkpoint of
    the result (key 47, step 2); ``resume``: that checkpoint loaded into ``params`` and ``opt_state``'s
    layout.  Returns ``(params, opt_state, ledger)``."""
    if phase == "save":
        params, opt_state, ledger = first_steps(params, opt_state, fundp.Ledger())
        fundp.sharded_checkpoint.save(directory, params=params, opt_state=opt_state, ledger=ledger, key=fundp.random.key(47),
                                      step=2, run_id=run_id)
        return params, opt_state, ledger
    state = fundp.sharded_checkpoint.load(directory, params_like=params, opt_state_like=opt_state, run_id=run_id)
    assert state.step == 2 and state.key.tolist() == fundp.random.key(47).tolist()
    return state.params, state.opt_state, state.ledger


def checkpointed(rank: int, world_size: int, phase: str, directory: str) -> dict:
    """``save``: 2 Adam steps, a sharded checkpoint, 2 more (the uninterrupted run); ``resume``:
    load the checkpoint into params of another initialisation laid out on this world size, 2 steps."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    model = sharded_model(make(MLP, seed=0 if phase == "save" else 1), mesh)
    params = {name: p.detach() for name, p in model.named_parameters()}
    opt_state = fundp.optim.adam(0.05).init(params)
    step = step_for(model, "flat", True)
    params, opt_state, ledger = saved_or_loaded(phase, directory, "fsdp-test", params, opt_state,
                                                lambda *state: adam_steps(step, *state, rank, world_size, 0, 2))
    params, opt_state, ledger = adam_steps(step, params, opt_state, ledger, rank, world_size, 2, 4)
    return {"params": {name: p.full_tensor() for name, p in params.items()}, "ledger": ledger.to_dict(),
            "placements": {name: str(p.placements) for name, p in params.items()}}


def example() -> dict:
    """examples/finetune_fsdp.py, full and LoRA, 2 float64 steps (its default layout for the world size)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
    import finetune_fsdp

    argv = ["--steps", "2", "--num-examples", "64", "--batch-size", "8", "--dtype", "float64", "--grad-method", "vmap"]
    result = {}
    for mode, extra in (("full", []), ("lora", ["--lora"])):
        fundp.guards.forget_keys()  # two independent runs from the same seed
        result[mode] = finetune_fsdp.main(argv + extra)
    return result


def run(rank: int, world_size: int, init_file: str, out_dir: str, scenario: str) -> None:
    serve(rank, world_size, init_file, out_dir, lambda: _result(rank, world_size, out_dir, scenario), 5 if scenario == "dies" else 20)


def _result(rank: int, world_size: int, out_dir: str, scenario: str):
    if scenario == "all":  # one launch for several checks: spawning ranks costs more than the steps
        result = {"mlp": fsdp_steps(rank, world_size, "mlp"), "tied": fsdp_steps(rank, world_size, "tied"),
                  "mismatch": mismatches(rank, world_size), "empty_rank": empty_rank(rank, world_size)}
    elif scenario == "flat":
        result = {"mlp": fsdp_steps(rank, world_size, "mlp", styles=("flat",)),
                  "hsdp": fsdp_steps(rank, world_size, "mlp", styles=("flat",), mesh_shape=(2, world_size // 2))}
    elif scenario == "dies":  # rank 1 dies before the step: the others fail within the group's timeout
        if rank == 1:
            raise RuntimeError("rank 1 dies before the step")
        fsdp_steps(rank, world_size, "mlp", styles=("flat",))
        result = {}
    elif scenario.startswith("example"):
        result = example()
    elif scenario.startswith("checkpoint_"):  # checkpoint_save / checkpoint_resume, in out_dir/../checkpoint
        result = checkpointed(rank, world_size, scenario.split("_")[1], os.path.join(os.path.dirname(out_dir), "checkpoint"))
    else:
        raise ValueError(scenario)
    return result
