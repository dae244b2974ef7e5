"""dp_step on parameters sharded by tensor parallelism (``parallelize_module``), on 2 ranks and
under FSDP2 on a 2 x 2 ("dp", "tp") mesh (gloo, CPU, float64), equals one process on the whole
batch to 1e-12, noise included; each rank draws only the noise of the coordinates it holds.

The ranks of a tensor-parallel group pass the same rows (``tensor_parallel_dim="tp"``): each
group's clipped sum must be counted once, so a step that summed over the TP ranks would be off by
a factor of 2 (far beyond the tolerance), and one that noised a coordinate on two ranks
differently would not gather to the single-process noise.
"""

import multiprocessing

import pytest
import torch

import fsdp_mechanism_workers
import fsdp_workers
import fundp
import tp_workers
from test_distributed import launched_results

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

STRIDED = "(_StridedShard(dim=0, sf=2), Shard(dim=0))"  # fully_shard over "dp" of a "tp" Shard(0) parameter
PLACEMENTS = {  # (scenario, problem) -> the layout of each parameter (and of its noisy gradient)
    ("tp", "mlp"): {"net.0.weight": "(Shard(dim=0),)", "net.0.bias": "(Shard(dim=0),)", "net.2.weight": "(Shard(dim=1),)",
                    "net.2.bias": "(Replicate(),)", "net.4.weight": "(Shard(dim=0),)", "net.4.bias": "(Shard(dim=0),)"},
    ("tp", "tied"): {"embed.weight": "(Shard(dim=0),)", "mix.weight": "plain", "mix.bias": "plain"},
    ("fsdp_tp", "mlp"): {"net.0.weight": STRIDED, "net.0.bias": STRIDED, "net.2.weight": "(Shard(dim=0), Shard(dim=1))",
                         "net.2.bias": "(Shard(dim=0), Replicate())", "net.4.weight": STRIDED, "net.4.bias": STRIDED},
    # "mix" is not tensor-parallel: fully_shard puts it on the "dp" submesh, replicated over "tp".
    ("fsdp_tp", "tied"): {"embed.weight": STRIDED, "mix.weight": "(Shard(dim=0),)", "mix.bias": "(Shard(dim=0),)"},
}


def _holders(placements: str, world_size: int) -> int:
    """How many ranks hold each coordinate of a leaf with these placements (every mesh dim has 2 ranks)."""
    if placements == "plain":
        return world_size
    dims = placements.count("Shard(") + placements.count("Replicate()")  # "_StridedShard(" counts once
    return 2 ** placements.count("Replicate()") * world_size // 2 ** dims


def check_equal_to_one_process(results, reference, placements, world_size):
    """Every rank's step equals one process on the whole batch (1e-12), the ranks agree bit for bit,
    and no rank draws noise beyond the coordinates it holds (two Threefry counters per element)."""
    for style, expected in reference.items():
        if style in ("frozen", "trained"):
            continue
        for result in results:
            got = result[style]
            assert got["placements"] == placements, style
            for name, value in expected["grads"].items():
                assert torch.equal(got["grads"][name], results[0][style]["grads"][name])  # ranks agree bit for bit
                torch.testing.assert_close(got["grads"][name], value, rtol=1e-12, atol=1e-14, msg=f"{style} {name}")
            torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-12, atol=0)
            assert fundp.Ledger.from_dict(got["ledger"]) == fundp.Ledger.from_dict(expected["ledger"])
            local = got["local_numel"]
            assert got["threefry_counts"] == [2 * local[n] for n in sorted(expected["grads"]) if local[n]], style
        for name, value in expected["grads"].items():  # each coordinate drawn once per rank holding it
            held = sum(r[style]["local_numel"][name] for r in results)
            assert held == _holders(placements[name], world_size) * value.numel(), (style, name)
    for result in results:
        assert result["forward_error"] < 1e-12  # the TP plan's own forward is the plain model's
        assert result["data_world_size"] == world_size // 2  # one TP group of 2 ranks per data shard


def check_frozen_and_trained(results, reference):
    for result in results:
        for engine in ("vmap", "ghost"):  # only the head passed: the frozen layers' TP shards are gathered
            assert set(result[f"frozen_{engine}"]) == set(reference["frozen"])
            for name, value in reference["frozen"].items():
                torch.testing.assert_close(result[f"frozen_{engine}"][name], value, rtol=1e-12, atol=1e-14)
        for name, value in reference["trained"].items():  # two SGD steps on the DTensor params
            torch.testing.assert_close(result["trained"][name], value, rtol=1e-12, atol=1e-14)


_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed.fsdp", "torch.distributed.tensor.parallel", "fundp",
                                  "tp_workers"])


def _results(tmp_path, scenario, world_size, timeout=150):
    return launched_results(tmp_path, scenario, world_size, timeout, tp_workers.run, _CONTEXT)


@pytest.fixture(scope="module")
def references():
    return {"mlp": fsdp_workers.single_process("mlp"), "tied": fsdp_workers.single_process("tied")}


@pytest.fixture(scope="module")
def mechanism_references():
    """Three steps of the BLT mechanism, and three of adaptive clipping, in one process on the whole
    batch (state threaded)."""
    model, params, batch, mask = fsdp_mechanism_workers.global_problem()
    blt = fsdp_mechanism_workers.three_steps(model, params, batch, mask, fsdp_mechanism_workers.mechanisms()["blt"],
                                             False, False)
    adaptive = fsdp_mechanism_workers.three_steps(model, params, batch, mask, None, True, False)
    return {"blt": blt, "adaptive": adaptive}


def check_correlated_noise(results, references):
    """BLT noise with its state sharded like the tensor-parallel params: every step's gathered
    gradient, the final params and buffers equal one process's (1e-12), and each rank's buffers
    have its local shard's shape (no rank holds more state than its coordinates).  Adaptive
    clipping: each TP group's unclipped count is counted once (the clip threshold equals one
    process's bit for bit; counting it once per TP rank would double it)."""
    reference = references["blt"]
    for result in results:
        adaptive = result["adaptive"]
        for step, expected in zip(adaptive["steps"], references["adaptive"]["steps"]):
            assert torch.equal(step["max_norm"], expected["max_norm"])
            for name, value in expected["grads"].items():
                torch.testing.assert_close(step["grads"][name], value, rtol=1e-12, atol=1e-14, msg=name)
        got = result["blt"]
        for step, expected in zip(got["steps"], reference["steps"]):
            for name, value in expected["grads"].items():
                torch.testing.assert_close(step["grads"][name], value, rtol=1e-12, atol=1e-14, msg=name)
        for name, value in reference["buffers"].items():
            torch.testing.assert_close(got["buffers"][name], value, rtol=1e-12, atol=1e-14, msg=name)
        for name, (buffer_shape, param_shape, _) in got["state_shapes"].items():
            assert buffer_shape[1:] == param_shape, name
        assert fundp.Ledger.from_dict(got["ledger"]) == fundp.Ledger.from_dict(reference["ledger"])


@pytest.mark.slow
def test_two_tensor_parallel_ranks_equal_one_process(tmp_path, references, mechanism_references):
    """One launch of 2 ranks sharing every batch: the MLP (column-, row-, column-parallel; a
    replicated bias; uneven shards of a 3-row head) for flat / per-layer / automatic clipping,
    the ghost engine, accumulation, frozen layers and SGD; a tied embedding / head (row- and
    column-parallel views of one weight) next to plain parameters; then the refused misuses."""
    results = _results(tmp_path, "tp", 2)
    for problem in ("mlp", "tied"):
        reference = dict(references[problem])
        check_equal_to_one_process([r[problem] for r in results], reference, PLACEMENTS[("tp", problem)], 2)
    check_frozen_and_trained([r["mlp"] for r in results], references["mlp"])
    check_correlated_noise([r["mlp"] for r in results], mechanism_references)
    assert set(references["tied"]["flat"]["grads"]) == {"embed.weight", "mix.weight", "mix.bias"}  # the tie is one leaf
    outcomes = [r["mismatch"] for r in results]
    assert outcomes[0] == outcomes[1]
    outcome = outcomes[0]
    assert outcome["different_batches"].startswith(
        "RankMismatchError: ranks [0, 1] form one tensor-parallel group (mesh dims ('tp',)) but pass different batches")
    assert "pass the same batch rows" in outcome["no_tp_dim"] and 'tensor_parallel_dim="tp"' in outcome["no_tp_dim"]
    assert outcome["wrong_dim"].startswith("ValueError: tensor_parallel_dim names ['dp'] but params['net.0.bias'] "
                                           "lives on a mesh with dims ('tp',)")
    assert outcome["plain_params"].startswith("ValueError: tensor_parallel_dim=('tp',) but no parameter is a DTensor")
    assert outcome["other_root"].startswith("NotImplementedError: params['net.4.bias'] lives on another root mesh "
                                            "(('tp2',) (2,)) than the other parameters (('tp',) (2,))")
    assert outcome["fine"] == "ok"


@pytest.mark.slow
def test_fsdp_over_tensor_parallel_on_a_2x2_mesh_equals_one_process(tmp_path, references, mechanism_references):
    """4 ranks, mesh ("dp", "tp"): parallelize_module over "tp", fully_shard over "dp" (strided
    shards where both cut dim 0, an empty shard of the 3-row head); each TP group passes its "dp"
    shard.  Every clip style and variant, the tied model (its untouched layer on the "dp"
    submesh), and tensor parallelism under plain data parallelism (parameters on the "tp"
    submesh, their sums all-reduced over "dp"); then the refused misuses."""
    results = _results(tmp_path, "fsdp_tp", 4)
    for problem in ("mlp", "tied"):
        check_equal_to_one_process([r[problem] for r in results], dict(references[problem]), PLACEMENTS[("fsdp_tp", problem)], 4)
    check_frozen_and_trained([r["mlp"] for r in results], references["mlp"])
    check_correlated_noise([r["mlp"] for r in results], mechanism_references)
    flat = {"flat": references["mlp"]["flat"]}
    check_equal_to_one_process([r["ddp_tp"] for r in results], flat, PLACEMENTS[("tp", "mlp")], 4)
    outcomes = [r["mismatch"] for r in results]
    assert all(o == outcomes[0] for o in outcomes)
    assert outcomes[0]["same_rows_across_groups"] == (
        "RankMismatchError: the tensor-parallel groups of ranks [0, 1] and [2, 3] pass the same batch rows: along the "
        "data dims ('dp',) every group must pass its own examples (fundp.distributed.shard with the group's data rank "
        "and the number of groups)")
    assert outcomes[0]["split_group"].startswith(
        "RankMismatchError: ranks [2, 3] form one tensor-parallel group (mesh dims ('tp',), data coordinate {'dp': 1}) "
        "but pass different batches")
    assert outcomes[0]["fine"] == "ok"
    # examples/finetune_fsdp.py on 4 ranks (its default there: FSDP2 x TP, 2 x 2) ends where 1 rank does.
    one = _one_rank_example(tmp_path)
    for mode in ("full", "lora"):
        assert one[mode]["ledger"].steps == 2
        for result in results:
            assert set(result["example"][mode]["params"]) == set(one[mode]["params"])
            for name, value in one[mode]["params"].items():
                torch.testing.assert_close(result["example"][mode]["params"][name], value, rtol=1e-10, atol=1e-12)
            assert result["example"][mode]["losses"] == pytest.approx(one[mode]["losses"], rel=1e-10)


def _one_rank_example(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'one_rank'}", rank=0, world_size=1)
    try:
        return fsdp_workers.example()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- one process


def test_tensor_parallel_dim_needs_distributed_and_mesh_dim_names():
    from models import MLP, classification_loss, make

    loss_fn = classification_loss(make(MLP))
    options = {"max_norm": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 2}
    with pytest.raises(ValueError, match="tensor_parallel_dim needs distributed=True"):
        fundp.dp_step(loss_fn, tensor_parallel_dim="tp", **options)
    for bad in (3, (), ("tp", 1)):
        with pytest.raises(TypeError, match="tensor_parallel_dim must be a mesh dim name"):
            fundp.dp_step(loss_fn, tensor_parallel_dim=bad, distributed=True, **options)
    with pytest.raises(ValueError, match="names a mesh dim twice"):
        fundp.dp_step(loss_fn, tensor_parallel_dim=("tp", "tp"), distributed=True, **options)


def test_tensor_parallel_hooks_are_suspended_for_fundps_call_only(tmp_path):
    """On a one-rank TP model, fundp.functional_call with plain full params runs without the
    layout hooks (the plain model's output), and the hooks are back afterwards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from models import MLP, make, params_of

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        model = make(MLP)
        params = params_of(model)
        x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        expected = model(x)
        tp_workers.parallel_model(model, init_device_mesh("cpu", (1,), mesh_dim_names=("tp",)), "mlp", fsdp=False)
        hooks = {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()}
        assert sum(len(a) + len(b) for a, b in hooks.values()) == 6  # input and output hooks of 3 layers
        torch.testing.assert_close(fundp.functional_call(model, params, (x,)), expected, rtol=0, atol=0)
        assert {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()} == hooks
        with fundp.sharding.tp_hooks_suspended(model):
            assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-15)  # the TP forward, hooks back
    finally:
        dist.destroy_process_group()
