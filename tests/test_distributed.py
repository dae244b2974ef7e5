"""Two gloo processes on CPU: ranks agree bit for bit and equal one process on the whole batch."""

import multiprocessing
import os
import time

import pytest
import torch

import dist_workers
import fundp

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def launch(tmp_path, scenario, world_size=2, timeout=120, target=dist_workers.run, context=None):
    context = context or multiprocessing.get_context("spawn")
    init_file = tmp_path / "rendezvous"
    processes = [
        context.Process(target=target, args=(rank, world_size, str(init_file), str(tmp_path), scenario))
        for rank in range(world_size)
    ]
    start = time.monotonic()
    for process in processes:
        process.start()
    for process in processes:
        process.join(max(1.0, timeout - (time.monotonic() - start)))
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
    return processes, alive, time.monotonic() - start


def launched_results(tmp_path, scenario, world_size, timeout, target, context):
    """Every rank's saved result of one launch; fails with the ranks' tracebacks if any raised or hung."""
    processes, alive, _ = launch(tmp_path, scenario, world_size=world_size, timeout=timeout, target=target, context=context)
    errors = {r: (tmp_path / f"rank{r}.err").read_text() for r in range(world_size) if (tmp_path / f"rank{r}.err").exists()}
    assert not alive and not errors, errors
    assert all(p.exitcode == 0 for p in processes)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.mark.parametrize("scenario", ["step", "accumulate"])
def test_two_ranks_equal_one_process(tmp_path, scenario):
    processes, alive, _ = launch(tmp_path, scenario)
    errors = {p.name: (tmp_path / f"rank{r}.err").read_text() for r, p in enumerate(processes) if (tmp_path / f"rank{r}.err").exists()}
    assert not alive and not errors, errors
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    reference = dist_workers.single_process_result()
    for name, expected in reference.grads.items():
        assert torch.equal(results[0]["grads"][name], results[1]["grads"][name])  # bit for bit
        torch.testing.assert_close(results[0]["grads"][name], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[0]["loss"], reference.loss, rtol=1e-12, atol=0)
    if scenario == "step":  # each rank's ledger records the logical step once
        assert fundp.Ledger.from_dict(results[0]["ledger"]) == reference.ledger


def test_a_step_built_from_a_sampler_takes_each_ranks_shard(tmp_path):
    """dp_step(sampler=batches, distributed=True): the sampler's row multiple (4) is checked on the
    ranks' rows together (each shard has 2 or 4 rows); the result equals one process."""
    processes, alive, _ = launch(tmp_path, "sampler")
    errors = {r: (tmp_path / f"rank{r}.err").read_text() for r in range(2) if (tmp_path / f"rank{r}.err").exists()}
    assert not alive and not errors, errors
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["grads"] for r in range(2)]
    for t, expected in enumerate(dist_workers.sampler_steps(0)):
        for name, value in expected.items():
            assert torch.equal(results[0][t][name], results[1][t][name])
            torch.testing.assert_close(results[0][t][name], value, rtol=1e-12, atol=1e-14)


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    processes, alive, elapsed = launch(tmp_path, "fail", timeout=90)
    assert not alive, "a rank hung"
    assert processes[1].exitcode != 0 and processes[0].exitcode != 0
    assert "rank 1 fails" in (tmp_path / "rank1.err").read_text()
    assert (tmp_path / "rank0.err").exists()  # the survivor got an error (timeout), not a hang
    assert elapsed < 90


def test_distributed_without_process_group_is_a_clear_error():
    step = fundp.dp_step(lambda p, b: b @ p["w"], max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, distributed=True, grad_method="vmap")
    with pytest.raises(RuntimeError, match="init_process_group"):
        step({"w": torch.ones(2)}, torch.eye(2), fundp.random.key(0))


def test_shard_covers_the_global_batch_once():
    indices, mask = torch.arange(10), torch.tensor([True] * 7 + [False] * 3)
    shards = [fundp.distributed.shard(indices, mask, r, 3) for r in range(3)]
    assert {s[0].shape[0] for s in shards} == {4}
    real = sorted(i for rows, m in shards for i in rows[m].tolist())
    assert real == list(range(7))


def test_ranks_that_disagree_are_named_on_the_first_step(tmp_path):
    processes, alive, _ = launch(tmp_path, "consistency")
    errors = {r: (tmp_path / f"rank{r}.err").read_text() for r in range(2) if (tmp_path / f"rank{r}.err").exists()}
    assert not alive and not errors, errors
    outcomes = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank, result in enumerate(outcomes):
        assert result["consistent"] == "ok" and result["shared_os_key"] == "ok"
        # Each rank calling os_key(): refused, with the key's fingerprint (never its words) and the fix.
        assert result["own_os_key"].startswith("RankMismatchError: the 2 ranks of the distributed step disagree on key:")
        assert "shared_os_key()" in result["own_os_key"] and "fingerprint" in result["own_os_key"]
        assert "disagree on noise_multiplier:" in result["setting"]
        assert f"rank 0 has 1.3, rank 1 has {1.3 + 0.1!r}" in result["setting"]
        assert "disagree on ledger:" in result["ledger"] and "1)])" in result["ledger"] and "2)])" in result["ledger"]
        assert "disagree on max_norm:" in result["tiny_float"]
        assert "disagree on params[" in result["params"] and "broadcast_from_rank0" in result["params"]
        assert "ranks disagree on what they check" in result["structure"] and "'extra'" in result["structure"]
        assert result["first_call"] == "ok" and result["second_call_skipped"] == "ok" and result["first_call_done"] == "True"
        assert "disagree on key" in result["first_call_mismatch"] and "disagree on key" in result["retried_after_failure"]
    assert outcomes[0] == outcomes[1]  # every rank raises the same error: no rank is left waiting


def test_check_consistent_without_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="init_process_group"):
        fundp.distributed.check_consistent(fundp.random.key(0), ())


def test_dp_step_refuses_ranks_with_their_own_os_keys(tmp_path):
    processes, alive, _ = launch(tmp_path, "step_own_os_key")
    errors = {r: (tmp_path / f"rank{r}.err").read_text() for r in range(2) if (tmp_path / f"rank{r}.err").exists()}
    assert not alive and not errors, errors
    for rank in range(2):
        outcome = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)["own_os_key"]
        assert outcome.startswith("RankMismatchError: the 2 ranks of the distributed step disagree on key:"), outcome
