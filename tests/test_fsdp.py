"""dp_step on parameters sharded by FSDP2 (gloo, CPU, float64) equals one process on the whole batch,
and each rank draws only the noise of the coordinates it owns, bit-identical to one process's draw."""

import math
import multiprocessing

import pytest
import torch

import fsdp_workers
import fundp
from fundp.noise import standard_normal_chunks
from test_distributed import launch, launched_results

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


# --------------------------------------------------------------------------- noise at offsets (one process)


@pytest.mark.parametrize("total", [1, 2, 7, 8, 1001])
def test_normal_at_equals_the_whole_stream_bit_for_bit(total):
    key = fundp.random.key(11)
    whole = fundp.random.normal(key, (total,), torch.float64)
    g = torch.Generator().manual_seed(total)
    for indices in (torch.arange(total), torch.randint(0, total, (min(total, 50),), generator=g),
                    torch.arange(total // 2, total), torch.tensor([total - 1])):
        assert torch.equal(fundp.sharding.normal_at(key, total, indices), whole[indices])


def test_normal_at_refuses_positions_outside_the_stream():
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        fundp.sharding.normal_at(fundp.random.key(0), 5, torch.tensor([5]))


def test_box_indices_are_the_row_major_positions_of_a_block():
    full = torch.arange(4 * 5 * 3).reshape(4, 5, 3)
    assert torch.equal(fundp.sharding.box_indices((4, 5, 3), (2, 3, 1), (1, 2, 2)), full[1:3, 2:5, 2:3])
    assert fundp.sharding.box_indices((4, 0), (4, 0), (0, 0)).shape == (4, 0)


def test_blocks_of_leaves_equal_one_draw_of_the_tree_and_cost_two_counters_each():
    """Row blocks of each leaf (what Shard(0) gives a rank) equal the single-process noise; only
    the block's elements are drawn (two Threefry counters per element)."""
    shapes = [(8, 6), (8,), (3, 8), (3,)]
    leaves = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    key = fundp.random.key(5)
    whole = standard_normal_chunks(leaves, key)
    total = sum(math.prod(s) for s in shapes)
    start = 0
    for shape, expected in zip(shapes, whole):
        rows = (shape[0] + 1) // 2  # the second half of the rows, as on rank 1 of 2
        local_shape = (shape[0] - rows,) + shape[1:]
        positions = start + fundp.sharding.box_indices(shape, local_shape, (rows,) + (0,) * (len(shape) - 1))
        with fsdp_workers.CountingThreefry() as counter:
            drawn = fundp.sharding.normal_at(key, total, positions)
        assert torch.equal(drawn, expected[rows:])
        assert counter.counts == [2 * math.prod(local_shape)]
        start += math.prod(shape)


# --------------------------------------------------------------------------- FSDP2 ranks


@pytest.fixture
def one_rank_fsdp_model(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from models import MLP, make

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        model = fsdp_workers.sharded_model(make(MLP), init_device_mesh("cpu", (1,)))
        yield model, {name: p.detach() for name, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


def test_sharded_params_without_distributed_are_refused_naming_the_leaf(one_rank_fsdp_model):
    from models import classification_loss

    model, params = one_rank_fsdp_model
    step = fundp.dp_step(classification_loss(model), max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, grad_method="vmap")
    batch = {"x": torch.randn(2, 6, dtype=torch.float64), "y": torch.tensor([0, 1])}
    with pytest.raises(TypeError, match=r"params\['net.0.bias'\] is a DTensor shard .* distributed=True"):
        step(params, batch, fundp.random.key(0))


class _Mechanism:  # the interface of a correlated-noise mechanism (never reached: refused first)
    def init(self, params):
        return ()

    def sample(self, state, key, stddev, like):
        raise AssertionError("not reached")


@pytest.mark.parametrize("option", ["noise_mechanism"])
def test_sharded_step_refuses_what_it_does_not_support_yet(one_rank_fsdp_model, option):
    from models import classification_loss

    model, params = one_rank_fsdp_model
    extra = {"secure_mode": True} if option == "secure_mode" else {"noise_mechanism": _Mechanism()}
    step = fundp.dp_step(classification_loss(model), max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2,
                         grad_method="vmap", distributed=True, **extra)
    batch = {"x": torch.randn(2, 6, dtype=torch.float64), "y": torch.tensor([0, 1])}
    state = {"noise_state": ()} if option == "noise_mechanism" else {}
    with pytest.raises(NotImplementedError, match=f"sharded .* with {option}: not supported yet"):
        step(params, batch, fundp.random.key(0), **state)


_CONTEXT = multiprocessing.get_context("forkserver")
# The fork server imports torch and fundp once; each rank is a fork of it (not a fresh interpreter
# importing them again, which costs more than the steps on a small machine).
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed.fsdp", "fundp", "fsdp_workers",
                                  "transformers.models.llama.modeling_llama"])


def _results(tmp_path, scenario, world_size, timeout=100):
    return launched_results(tmp_path, scenario, world_size, timeout, fsdp_workers.run, _CONTEXT)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One launch of two ranks runs every two-rank check (spawning ranks costs more than the steps)."""
    return _results(tmp_path_factory.mktemp("fsdp2"), "all", 2)


def _check_equal_to_one_process(results, reference, placement="Shard(dim=0)", replicas=1):
    frozen = reference.pop("frozen", None)
    if frozen is not None:  # only the head passed: the frozen layers' shards are gathered by fundp.functional_call
        for result in results:
            for engine in ("vmap", "ghost"):
                assert set(result[f"frozen_{engine}"]) == set(frozen) == {"net.4.weight", "net.4.bias"}
                for name, value in frozen.items():
                    torch.testing.assert_close(result[f"frozen_{engine}"][name], value, rtol=1e-12, atol=1e-14)
    trained = reference.pop("trained", None)
    if trained is not None:  # two SGD steps on the DTensor params (their gradients are DTensors too)
        for result in results:
            for name, value in trained.items():
                assert result["trained_placements"][name] == "(Shard(dim=0),)"
                torch.testing.assert_close(result["trained"][name], value, rtol=1e-12, atol=1e-14)
    for style, expected in reference.items():
        for rank, result in enumerate(results):
            got = result[style]
            for name, value in expected["grads"].items():
                assert placement in got["placements"][name], got["placements"][name]
                assert torch.equal(got["grads"][name], results[0][style]["grads"][name])  # ranks agree bit for bit
                torch.testing.assert_close(got["grads"][name], value, rtol=1e-12, atol=1e-14, msg=f"{style} {name}")
            torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-12, atol=0)
            assert fundp.Ledger.from_dict(got["ledger"]) == fundp.Ledger.from_dict(expected["ledger"])
            # No rank draws more noise than its shard: one Threefry draw per leaf with a local
            # block, two counters per local element.
            local = got["local_numel"]
            drawn = [2 * local[name] for name in sorted(expected["grads"]) if local[name]]
            assert got["threefry_counts"] == drawn, (got["threefry_counts"], local)
            assert sum(local.values()) < sum(v.numel() for v in expected["grads"].values())
        assert sum(r[style]["local_numel"][n] for r in results for n in expected["grads"]) == \
            replicas * sum(v.numel() for v in expected["grads"].values())  # every coordinate once per replica
    for result in results:
        assert result["noise_equal"] is True


@pytest.mark.slow
def test_two_fsdp2_ranks_equal_one_process_for_every_clip_style(two_ranks):
    """MLP with every Linear under fully_shard (uneven shards: a bias of 3 rows over 2 ranks),
    padded rows holding NaN; flat, per-layer and automatic clipping, the ghost engine, gradient
    accumulation (physical_batch_size=2), and two SGD steps on the DTensor params; noise included."""
    _check_equal_to_one_process([r["mlp"] for r in two_ranks], fsdp_workers.single_process("mlp"))


def test_a_rank_without_real_rows_takes_part_and_the_step_equals_one_process(two_ranks):
    """A Poisson batch can be empty: the rank whose shard has no real row still joins every
    collective (the shared-batch check included), and the step equals one process on the rows of
    the other rank."""
    model, params, batch, mask = fsdp_workers.global_problem()
    expected = fsdp_workers.step_for(model, "flat", False)(params, batch, fundp.random.key(46),
                                                           mask=fsdp_workers.without_last_rank(mask, 2))
    for result in two_ranks:
        for name, value in expected.grads.items():
            torch.testing.assert_close(result["empty_rank"]["grads"][name], value, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(result["empty_rank"]["loss"], expected.loss, rtol=1e-12, atol=0)


@pytest.mark.slow
def test_four_fsdp2_ranks_equal_one_process(tmp_path):
    """Four ranks (a bias of 3 rows leaves rank 3 an empty shard, which draws no noise)."""
    results = _results(tmp_path, "flat", 4)
    reference = fsdp_workers.single_process("mlp", styles=("flat",))
    _check_equal_to_one_process([r["mlp"] for r in results], reference)
    # HSDP: a 2 x 2 mesh, each parameter replicated over the first axis and sharded over the second.
    _check_equal_to_one_process([r["hsdp"] for r in results], reference, placement="(Replicate(), Shard(dim=0))", replicas=2)


@pytest.mark.slow
def test_a_rank_that_dies_makes_the_others_fail_instead_of_hanging(tmp_path):
    processes, alive, elapsed = launch(tmp_path, "dies", world_size=2, timeout=60, target=fsdp_workers.run, context=_CONTEXT)
    assert not alive, "a rank hung"
    assert processes[0].exitcode != 0 and processes[1].exitcode != 0
    assert "rank 1 dies before the step" in (tmp_path / "rank1.err").read_text()
    assert (tmp_path / "rank0.err").exists()  # the survivor raised (the collective timed out or lost its peer)
    assert elapsed < 60


@pytest.mark.slow
def test_fsdp2_tied_embedding_equals_one_process(two_ranks):
    reference = fsdp_workers.single_process("tied")
    assert set(reference["flat"]["grads"]) == {"embed.weight", "mix.weight", "mix.bias"}  # the tie is one leaf
    _check_equal_to_one_process([r["tied"] for r in two_ranks], reference)


@pytest.mark.slow
def test_ranks_with_other_shapes_or_the_same_rows_are_refused_naming_what_differs(two_ranks):
    results = [r["mismatch"] for r in two_ranks]
    for result in results:
        assert result["param_shape"].startswith("RankMismatchError: the 2 ranks of the distributed step disagree on params['net.0.bias']")
        assert 'rank 0 has "torch.float64 [8] placements' in result["param_shape"]
        assert 'rank 1 has "torch.float64 [9] placements' in result["param_shape"]
        assert "disagree on batch shapes:" in result["batch_shape"]
        assert "rank 0 has '[[2, 6], [2]] mask [2]', rank 1 has '[[3, 6], [3]] mask [3]'" in result["batch_shape"]
        assert "pass the same batch rows" in result["shared_rows"] and "tensor parallelism" in result["shared_rows"]
        assert result["fine"] == "ok"
    assert results[0] == results[1]


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_bit_identically_and_onto_four_ranks(tmp_path):
    """2 ranks: 2 Adam steps, a DCP checkpoint, 2 more; resumed on 2 ranks: bit-identical to the
    uninterrupted run; resumed on 4 ranks (resharded by DCP): equal to it and to one process to 1e-12."""
    for name in ("save", "resume2", "resume4"):
        (tmp_path / name).mkdir()
    uninterrupted = _results(tmp_path / "save", "checkpoint_save", 2)
    resumed = _results(tmp_path / "resume2", "checkpoint_resume", 2)
    resharded = _results(tmp_path / "resume4", "checkpoint_resume", 4)
    reference, ledger = fsdp_workers.single_process_adam()
    assert fundp.Ledger.from_dict(uninterrupted[0]["ledger"]) == ledger and ledger.steps == 4
    for name, value in reference.items():
        for result in uninterrupted + resumed + resharded:
            assert result["placements"][name] == "(Shard(dim=0),)"
            torch.testing.assert_close(result["params"][name], value, rtol=1e-12, atol=1e-14)
        for result in resumed:
            assert torch.equal(result["params"][name], uninterrupted[0]["params"][name])
    for result in resumed + resharded:
        assert fundp.Ledger.from_dict(result["ledger"]) == ledger


def test_a_sharded_checkpoint_refuses_other_templates_runs_and_unthreaded_ledgers(one_rank_fsdp_model, tmp_path):
    from fundp.checkpoint import CheckpointError

    _, params = one_rank_fsdp_model
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.1, steps=2)
    save = fundp.sharded_checkpoint.save
    with pytest.raises(CheckpointError, match="the ledger records 2 steps but step=3"):
        save(tmp_path / "a", params=params, opt_state=(), ledger=ledger, key=fundp.random.key(1), step=3)
    save(tmp_path / "b", params=params, opt_state=(), ledger=ledger, key=fundp.random.key(1), step=2, run_id="one")
    state = fundp.sharded_checkpoint.load(tmp_path / "b", params_like=params, opt_state_like=(), run_id="one")
    assert state.ledger == ledger and state.step == 2 and state.run_id == "one"
    with pytest.raises(CheckpointError, match="belongs to run 'one', not 'two'"):
        fundp.sharded_checkpoint.load(tmp_path / "b", params_like=params, opt_state_like=(), run_id="two")
    wider = dict(params, **{"net.0.bias": torch.zeros(9, dtype=torch.float64)})
    with pytest.raises(CheckpointError, match=r"params: the tensor at \('net.0.bias',\) is torch.float64 \(8,\) in the checkpoint but torch.float64 \(9,\)"):
        fundp.sharded_checkpoint.load(tmp_path / "b", params_like=wider, opt_state_like=())
    with pytest.raises(CheckpointError, match="params: the checkpoint holds"):
        fundp.sharded_checkpoint.load(tmp_path / "b", params_like={"w": torch.zeros(2)}, opt_state_like=())
    # Mechanism states: a saved noise state must be restored (a dropped one restarts the correlated
    # noise), and a template without a saved state is refused too.
    mech = fundp.mf.mechanism(fundp.mf.blt([0.9], [0.3], 4), fundp.mf.single_participation())
    save(tmp_path / "c", params=params, opt_state=(), ledger=ledger, key=fundp.random.key(1), step=2,
         noise_state=mech.init(params))
    with pytest.raises(CheckpointError, match="the checkpoint holds noise_state but noise_state_like is None"):
        fundp.sharded_checkpoint.load(tmp_path / "c", params_like=params, opt_state_like=())
    restored = fundp.sharded_checkpoint.load(tmp_path / "c", params_like=params, opt_state_like=(),
                                             noise_state_like=mech.init(params)).noise_state
    assert int(restored.step) == 0 and set(restored.buffers) == set(params)
    with pytest.raises(CheckpointError, match="the checkpoint holds no clip_state but clip_state_like is given"):
        fundp.sharded_checkpoint.load(tmp_path / "b", params_like=params, opt_state_like=(),
                                      clip_state_like=fundp.adaptive.quantile_clipping(count_noise_multiplier=1.0).init(1.0))


@pytest.mark.slow
def test_the_fsdp_example_on_two_ranks_equals_one_rank(tmp_path, capsys):
    """examples/finetune_fsdp.py (tiny Llama, full and LoRA fine-tuning, float64): 2 ranks end where 1 rank does."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _results(tmp_path / "one", "example", 1)[0]
    two = _results(tmp_path / "two", "example", 2)
    for mode in ("full", "lora"):
        assert len(one[mode]["losses"]) == 2 and all(math.isfinite(x) for x in one[mode]["losses"])
        assert one[mode]["ledger"].steps == 2 and one[mode]["epsilon"] <= 8.0 + 1e-6
        for result in two:
            assert set(result[mode]["params"]) == set(one[mode]["params"])
            for name, value in one[mode]["params"].items():
                torch.testing.assert_close(result[mode]["params"][name], value, rtol=1e-10, atol=1e-12)
            assert result[mode]["losses"] == pytest.approx(one[mode]["losses"], rel=1e-10)
    assert all("lora_" in name for name in one["lora"]["params"])
