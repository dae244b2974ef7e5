"""Correlated noise (fundp.mf: BLT, banded, tree), adaptive clipping and secure mode with
FSDP2-sharded params (gloo, CPU, float64): three steps with the states threaded equal one process
on the whole batch, and no rank holds or draws more noise or noise state than its own shard."""

import math
import multiprocessing

import pytest
import torch

import fsdp_mechanism_workers as workers
import fundp
from test_distributed import launched_results

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed.fsdp", "fundp", "fsdp_workers", "fsdp_mechanism_workers"])


def _results(tmp_path, scenario, world_size, timeout=120):
    return launched_results(tmp_path, scenario, world_size, timeout, workers.run, _CONTEXT)


@pytest.fixture(scope="module")
def reference():
    fundp.guards.forget_keys()
    return workers.single_process()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One launch of two ranks runs every two-rank case (spawning ranks costs more than the steps)."""
    return _results(tmp_path_factory.mktemp("mech2"), "two", 2)


def _close(got, expected, what):
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14, msg=what)


def _check_run(results, expected, name, replicas=1):
    """Every rank's three steps equal one process's: gradients (noise included), loss, clip state,
    final params, mechanism state and ledger; ranks agree bit for bit."""
    for rank, result in enumerate(results):
        got = result[name]
        for t, (step, want) in enumerate(zip(got["steps"], expected["steps"])):
            for leaf, value in want["grads"].items():
                assert torch.equal(step["grads"][leaf], results[0][name]["steps"][t]["grads"][leaf])
                _close(step["grads"][leaf], value, f"{name} rank {rank} step {t} {leaf}")
            _close(step["loss"], want["loss"], f"{name} loss")
            if want["max_norm"] is not None:  # the clip state: identical on every rank, equal to one process
                assert torch.equal(step["max_norm"], want["max_norm"]), (name, t, step["max_norm"], want["max_norm"])
        for leaf, value in expected["params"].items():
            _close(got["params"][leaf], value, f"{name} params {leaf}")
        assert fundp.Ledger.from_dict(got["ledger"]) == fundp.Ledger.from_dict(expected["ledger"])
        if "buffers" in expected:
            assert got["noise_step"] == expected["noise_step"] == workers.STEPS
            for leaf, value in expected["buffers"].items():
                _close(got["buffers"][leaf], value, f"{name} buffers {leaf}")


def _check_state_is_sharded(results, expected, name, replicas=1):
    """The state's buffers on each rank are [m, *local shard shape] (never the full parameter's),
    before and after the steps; together the ranks hold each coordinate once per replica."""
    held = 0
    for result in results:
        for key in ("state_shapes", "final_state_shapes"):
            for leaf, (buffer, local, placements) in result[name][key].items():
                assert buffer[1:] == local, (name, leaf, buffer, local)
                assert "Shard(dim=1)" in placements, placements
        held += sum(math.prod(buffer) for buffer, _, _ in result[name]["state_shapes"].values())
    whole = sum(v.numel() for v in expected["buffers"].values())
    assert held == replicas * whole


def _check_draws_are_local(results, name):
    """Each step draws two Threefry counters per local element of each leaf (no full-size draw)."""
    for result in results:
        local = result["local_numel"]
        drawn = [2 * local[leaf] for leaf in sorted(local) if local[leaf]]
        for step in result[name]["steps"]:
            assert step["threefry_counts"] == drawn, (name, step["threefry_counts"], drawn)


@pytest.mark.parametrize("name", ["blt", "banded", "tree", "blt_adaptive"])
def test_correlated_noise_on_two_fsdp2_ranks_equals_one_process(two_ranks, reference, name):
    results = [r["fsdp"] for r in two_ranks]
    _check_run(results, reference[name], name)
    _check_state_is_sharded(results, reference[name], name)
    if name != "blt_adaptive":  # (the count's own draw is one more Threefry call)
        _check_draws_are_local(results, name)


def test_adaptive_clipping_on_two_fsdp2_and_two_replicated_ranks_equals_one_process(two_ranks, reference):
    _check_run([r["fsdp"] for r in two_ranks], reference["adaptive"], "adaptive")
    _check_run([r["ddp"] for r in two_ranks], reference["adaptive"], "adaptive")
    sizes = [s["max_norm"] for s in reference["adaptive"]["steps"]]
    assert len(set(float(s) for s in sizes)) == len(sizes)  # the threshold moved every step


def test_a_noise_state_built_from_unsharded_params_is_refused(two_ranks):
    for result in two_ranks:
        message = result["fsdp"]["unsharded_state"]
        assert "is not laid out like the sharded gradient" in message and "mechanism.init(params)" in message


def test_the_mechanism_state_of_sharded_params_is_sharded_in_one_process(tmp_path):
    """init on DTensor params gives DTensor buffers laid out like them, in the rank's block only."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        w = distribute_tensor(torch.zeros(5, 3, dtype=torch.float64), init_device_mesh("cpu", (1,)), [Shard(0)])
        single = fundp.mf.single_participation()
        for strategy, m in ((fundp.mf.blt([0.9, 0.5], [0.3, 0.2], 4), 2), (fundp.mf.identity(4), 0), (fundp.mf.tree(4), 3)):
            mech = fundp.mf.mechanism(strategy, single)
            state = mech.init({"w": w})
            assert type(state.buffers["w"]).__name__ == "DTensor"
            assert tuple(state.buffers["w"].shape) == (m, 5, 3) and state.buffers["w"].placements == (Shard(1),)
            plain_state = mech.init({"w": w.full_tensor()})
            for t in range(3):
                key = fundp.random.fold_in(fundp.random.key(3), t)
                noise, state = mech.sample(state, key, 1.5, {"w": w})
                plain, plain_state = mech.sample(plain_state, key, 1.5, {"w": w.full_tensor()})
                assert torch.equal(noise["w"].full_tensor(), plain["w"]) and state.buffers["w"].placements == (Shard(1),)
                assert torch.equal(state.buffers["w"].full_tensor(), plain_state.buffers["w"])
        with pytest.raises(ValueError, match="sharded buffer .* for an unsharded gradient"):
            mech.sample(mech.init({"w": w}), fundp.random.key(4), 1.0, {"w": w.full_tensor()})
    finally:
        dist.destroy_process_group()


def _check_secure(results, replicas=1):
    """Secure mode: noiseless, equal to one process; noisy, the same on every rank (one draw per
    coordinate, replicas included), N(0, (sigma C)^2) around the noiseless sum, each rank reading
    the entropy of its own block only (4 uniforms per local value)."""
    expected = workers.noiseless_single_process()
    total = sum(v.numel() for v in expected.values())
    read = 0
    for result in results:
        for name, value in expected.items():
            _close(result["noiseless"][name], value, f"secure noiseless {name}")
            assert torch.equal(result["noisy"][name], results[0]["noisy"][name]), name
        local = result["local_numel"]
        assert result["noisy_entropy"] == [4 * local[n] for n in sorted(local) if local[n]]
        read += sum(result["noisy_entropy"])
    assert read == 4 * replicas * total
    z = torch.cat([((results[0]["noisy"][n] - expected[n]) * workers.EXPECTED_BATCH / (workers.SIGMA * workers.CLIP_NORM)).reshape(-1)
                   for n in sorted(expected)])
    assert z.unique().numel() == total  # no value drawn twice (each shard its own draws)
    assert 0.75 < float(z.std()) < 1.25 and abs(float(z.mean())) < 0.35, (z.std(), z.mean())


def test_secure_mode_on_two_fsdp2_ranks_draws_each_coordinate_once_on_its_owner(two_ranks):
    _check_secure([r["secure"] for r in two_ranks])


@pytest.mark.slow
def test_four_fsdp2_ranks_and_a_2x2_hsdp_mesh_equal_one_process(tmp_path, reference):
    """Four ranks (a bias of 3 rows leaves rank 3 an empty shard and an empty state) and HSDP
    ((Replicate(), Shard(0)): each coordinate's state held once per replica)."""
    results = _results(tmp_path, "four", 4)
    for mesh, replicas in (("fsdp", 1), ("hsdp", 2)):
        for name in ("blt", "blt_adaptive", "adaptive"):
            _check_run([r[mesh] for r in results], reference[name], name)
            if name != "adaptive":
                _check_state_is_sharded([r[mesh] for r in results], reference[name], name, replicas)
    assert results[0]["secure_hsdp"]["placements"]["net.0.weight"] == "(Replicate(), Shard(dim=0))"
    _check_secure([r["secure_hsdp"] for r in results], replicas=2)
