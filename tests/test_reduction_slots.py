"""``dp_step(..., reduction_slots=S)``: the clipped sum is the same bits on 1, 2 and 4 ranks (gloo, CPU,
float64), so a DCP checkpoint taken on 2 ranks resumes on 4 ranks, and on 1, bit for bit."""

import multiprocessing

import pytest
import torch

import fundp
import slot_workers
from test_distributed import launched_results

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed.fsdp", "fundp", "slot_workers"])


def _results(tmp_path, scenario, world_size, timeout=100):
    return launched_results(tmp_path, scenario, world_size, timeout, slot_workers.run, _CONTEXT)


def test_slot_rows_and_the_canonical_tree():
    """Rank r of W holds slots r, r + W, ...; slot s is the global rows = s (mod S), in order."""
    for world_size in (1, 2, 4):
        for rank in range(world_size):
            for slot, rows in fundp.distributed.slot_rows(16 // world_size, 4, rank, world_size):
                assert slot % world_size == rank
                assert (rank + world_size * rows).tolist() == list(range(slot, 16, 4))
    values = [torch.tensor(v, dtype=torch.float64) for v in (1e16, 1.0, -1e16, 1.0)]
    assert fundp.distributed.canonical_tree_sum(values).item() == (1e16 + -1e16) + (1.0 + 1.0)  # pairs s, s + S/2 first
    with pytest.raises(ValueError, match="power-of-two number of values, got 3"):
        fundp.distributed.canonical_tree_sum(values[:3])


def test_reduction_slots_are_checked():
    loss_fn = lambda p, b: b @ p["w"]  # noqa: E731
    with pytest.raises(ValueError, match="reduction_slots must be a power of two, got 6"):
        fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, reduction_slots=6)
    step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=0.0, expected_batch_size=4, reduction_slots=4, grad_method="vmap")
    with pytest.raises(ValueError, match="6 rows on this rank, not a positive multiple of .* = 4"):
        step({"w": torch.zeros(2)}, torch.randn(6, 2), fundp.random.key(0))
    with pytest.raises(NotImplementedError, match="reduction_slots with tensor_parallel_dim: not supported"):
        fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, reduction_slots=4,
                      distributed=True, tensor_parallel_dim="tp")


def test_one_process_with_slots_equals_the_plain_sum():
    """Independent check: the slotted sum is the ordinary clipped sum up to rounding (ghost, accumulation too)."""
    model, params, batch, mask = slot_workers.padded_problem()
    key = fundp.random.key(49)
    for options in ({}, {"grad_method": "ghost"}, {"physical_batch_size": 2}):
        slotted = slot_workers.slot_step(model, False, **options)(params, batch, key, mask=mask)
        plain = slot_workers.step_for(model, "flat", False, **options)(params, batch, key, mask=mask)
        for name, value in plain.grads.items():
            torch.testing.assert_close(slotted.grads[name], value, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(slotted.loss, plain.loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(slotted.norms, plain.norms, rtol=1e-12, atol=0)  # in row order


@pytest.mark.slow
def test_steps_and_a_checkpoint_resumed_onto_other_world_sizes_are_bit_identical(tmp_path):
    """reduction_slots=4: one step on 1 process and on 1, 2, 4 ranks (plain params, ghost, accumulation,
    FSDP2) gives the same bits; a DCP checkpoint of an FSDP2 DP-Adam run on 2 ranks, resumed on 4 ranks
    and on 1, ends bit-identical to the uninterrupted 2-rank run (and to one process without DCP)."""
    for name in ("save", "resume4", "resume1"):
        (tmp_path / name).mkdir()
    saved = _results(tmp_path / "save", "save", 2)
    resumed = _results(tmp_path / "resume4", "resume", 4) + _results(tmp_path / "resume1", "resume", 1)
    reference = {"plain": slot_workers.single_process(), "ghost": slot_workers.single_process(grad_method="ghost"),
                 "accumulate": slot_workers.single_process(physical_batch_size=2)}
    for run in ("plain", "ghost", "accumulate"):
        for result in saved + resumed:
            for name, value in reference[run]["grads"].items():
                assert torch.equal(result[run][name], value), (run, name)
    for result in saved:
        for name, value in reference["plain"]["grads"].items():
            assert torch.equal(result["fsdp"][name], value), name
    # FSDP2 with a BLT mechanism and adaptive clipping: their states saved sharded and resharded by
    # DCP, the resumed runs end bit-identical (params, noise buffers, clip threshold, ledger).
    uninterrupted = saved[0]["mf"]
    assert uninterrupted["noise_step"] == 4 and fundp.Ledger.from_dict(uninterrupted["ledger"]).steps == 4
    for result in saved + resumed:
        for part in ("params", "buffers"):
            for name, value in uninterrupted[part].items():
                assert torch.equal(result["mf"][part][name], value), (part, name)
        assert torch.equal(result["mf"]["max_norm"], uninterrupted["max_norm"])
        assert result["mf"]["ledger"] == uninterrupted["ledger"] and result["mf"]["noise_step"] == 4
    ledger = reference["plain"]["ledger"]
    for result in saved + resumed:
        assert fundp.Ledger.from_dict(result["ledger"]) == ledger
        for name, value in reference["plain"]["params"].items():
            assert torch.equal(result["params"][name], value), name


def test_world_sizes_the_slots_do_not_fit_are_refused(tmp_path):
    results = _results(tmp_path, "refusals", 2)
    for result in results:
        assert "reduction_slots=1 needs a world size that is a power of two dividing it, got 2 ranks" in result["world"]
        assert "not a positive multiple of reduction_slots / world_size = 8 / 2 = 4" in result["rows"]
