"""Smoke test of benchmarks/distributed.py: world sizes 1 and 2 of the tiniest MLP under FSDP2 (gloo, CPU).

The per-rank byte counts are checked against the model's sizes computed here from its shapes
(FSDP2 shards dim 0 of every parameter; Adam keeps two moments per coordinate), and the peaks
against what the steps must at least allocate."""

import json
import os
import subprocess
import sys

import pytest
import torch

# ~10 s of launching processes on an idle 2-core machine (26 s measured under load): slow.
pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.slow]

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
WIDTH, DEPTH, CLASSES = 24, 2, 10
SHAPES = [(WIDTH, WIDTH), (WIDTH,)] * DEPTH + [(CLASSES, WIDTH), (CLASSES,)]  # the MLP's parameters


def shard_bytes(shape, rank, world_size, itemsize=4):
    """Bytes of FSDP2's Shard(0) block on ``rank``: ceil(rows / W) rows per rank, the last ones fewer."""
    rows = -(-shape[0] // world_size)
    local_rows = max(0, min(rows, shape[0] - rank * rows))
    return local_rows * int(torch.tensor(shape[1:]).prod()) * itemsize


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out.json"
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "distributed.py"), "--world-sizes", "1", "2",
               "--width", str(WIDTH), "--depth", str(DEPTH), "--batch-size", "4", "--steps", "1", "--warmup", "0",
               "--timeout", "120", "--json", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        return json.load(f), done.stdout


def test_per_rank_bytes_are_the_shards_of_the_model(results):
    data, _ = results
    full = sum(shard_bytes(s, 0, 1) for s in SHAPES)
    for ws in (1, 2):
        per_rank = data["per_rank"][str(ws)]
        assert len(per_rank) == ws
        for rank, numbers in enumerate(per_rank):
            expected = sum(shard_bytes(s, rank, ws) for s in SHAPES)
            for mode in ("dp", "nonprivate"):
                m = numbers[mode]
                assert m["full_params"] == full
                assert m["params"] == expected and m["grads"] == expected and m["grad_dtype"] == "float32"
                assert m["opt"] == 2 * expected  # Adam's mu and nu (the 0-d count is not counted)
                assert m["time"] > 0
    summary = data["summary"]
    for mode in ("dp", "nonprivate"):
        assert summary["1"][mode]["state"] == 4 * full
        assert summary["2"][mode]["state"] == 4 * sum(shard_bytes(s, 0, 2) for s in SHAPES)  # rank 0: the larger shards


def test_peaks_hold_what_the_steps_must_allocate(results):
    data, _ = results
    summary = data["summary"]
    full = summary["1"]["dp"]["full_params"]
    # The DP step forms a float64 clipped sum of the full model on every rank (and gathers the
    # full parameters at world size 2); the non-private step allocates at least its gradient.
    assert summary["1"]["dp"]["peak"] >= 2 * full
    assert summary["2"]["dp"]["peak"] >= 2 * full + summary["2"]["dp"]["grads"]
    for ws in ("1", "2"):
        assert summary[ws]["nonprivate"]["peak"] >= summary[ws]["nonprivate"]["grads"]


def test_the_ratio_table_is_printed_from_the_same_numbers(results):
    data, stdout = results
    summary = data["summary"]
    row = next(line for line in stdout.splitlines() if line.startswith("| 2 | 0."))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(summary["2"]["dp"]["state"] / summary["1"]["dp"]["state"], abs=1e-3)
    assert float(cells[5]) == pytest.approx(summary["2"]["dp"]["time"] / summary["2"]["nonprivate"]["time"], abs=6e-3)
