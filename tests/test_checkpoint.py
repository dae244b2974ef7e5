"""fundp.checkpoint guards, each exercised by performing the misuse or the corruption it catches."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import fundp
from fundp.checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMA, RATE, STEPS = 1.0, 0.1, 25


def _run_state():
    params = {"layer": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16)}, "empty": torch.zeros(0, 4)}
    opt = fundp.optim.adam(0.1)
    opt_state = opt.init(params)
    ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=SIGMA, sample_rate=RATE, steps=STEPS)
    extra_state = {"adaptive_clip": torch.tensor(0.75, dtype=torch.float64), "history": (torch.ones(3), torch.full((2, 2), 2.0))}
    return params, opt_state, ledger, extra_state


def _save(path, **overrides):
    params, opt_state, ledger, extra_state = _run_state()
    kwargs = dict(params=params, opt_state=opt_state, ledger=ledger, key=fundp.random.key(2**40 + 9), step=STEPS, extra={"epoch": 3}, extra_state=extra_state)
    kwargs.update(overrides)
    fundp.checkpoint.save(path, **kwargs)


def _load(path, **overrides):
    params, opt_state, _, extra_state = _run_state()
    kwargs = dict(params_like=params, opt_state_like=opt_state, extra_state_like=extra_state)
    kwargs.update(overrides)
    return fundp.checkpoint.load(path, **kwargs)


def _same_state(a, b):
    trees = [(a.params, b.params), (a.opt_state, b.opt_state), (a.extra_state, b.extra_state)]
    for x, y in trees:
        for u, v in zip(fundp_leaves(x), fundp_leaves(y)):
            if u.dtype != v.dtype or u.shape != v.shape or not torch.equal(u, v):
                return False
    return a.ledger == b.ledger and torch.equal(a.key, b.key) and a.step == b.step and a.extra == b.extra


def fundp_leaves(tree):
    import optree

    return optree.tree_leaves(tree)


def test_round_trip_restores_every_field(tmp_path):
    path = tmp_path / "run.pt"
    _save(path)
    state = _load(path)
    params, opt_state, ledger, extra_state = _run_state()
    assert state.step == STEPS and state.ledger == ledger and state.extra == {"epoch": 3}
    assert state.key.tolist() == [2**8, 9] and state.key.dtype == torch.int64
    assert torch.equal(state.params["layer"]["w"], params["layer"]["w"]) and state.params["layer"]["b"].dtype == torch.bfloat16
    assert state.params["empty"].shape == (0, 4)
    assert state.extra_state["adaptive_clip"].item() == 0.75 and torch.equal(state.extra_state["history"][1], extra_state["history"][1])
    assert type(state.opt_state) is type(opt_state)
    torch.load(path, weights_only=True)  # plain tensors and strings: no pickled code


def test_the_reported_bit_flip_in_the_ledger_step_count_is_refused(tmp_path):
    # The case: flipping one bit turned "steps": 25 into 24 and epsilon went from 3.19 to 2.58.
    path = tmp_path / "run.pt"
    _save(path)
    data = bytearray(path.read_bytes())
    where = data.find(b'"steps": 25')
    assert where > 0
    data[where + len(b'"steps": 2')] ^= 0x01  # '5' -> '4'
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        _load(path)


def _record_bytes(path):
    """Offsets of the bytes holding the archive's records (pickle, tensor data, metadata)."""
    import zipfile

    offsets = set()
    with open(path, "rb") as stream, zipfile.ZipFile(stream) as archive:
        for info in archive.infolist():
            stream.seek(info.header_offset + 26)
            name_length, extra_length = (int.from_bytes(stream.read(2), "little") for _ in range(2))
            start = info.header_offset + 30 + name_length + extra_length
            offsets.update(range(start, start + info.compress_size))
    return offsets


@pytest.mark.parametrize("stride", [pytest.param(1, marks=pytest.mark.slow), 7])
def test_every_single_bit_flip_is_refused_or_harmless(tmp_path, stride):
    # Flip one bit in every `stride`-th byte of the file (bit offset % 8): load must raise CheckpointError or
    # return exactly the saved state.  Flips in bytes no reader uses (the alignment padding torch
    # writes into zip headers) are harmless; every flip inside a record must be refused.
    path = tmp_path / "run.pt"
    _save(path)
    original = path.read_bytes()
    records = _record_bytes(path)
    assert len(records) > len(original) // 4
    reference = _load(path)
    flipped = tmp_path / "flipped.pt"
    for offset in range(0, len(original), stride):
        data = bytearray(original)
        data[offset] ^= 1 << (offset % 8)
        flipped.write_bytes(bytes(data))
        try:
            state = _load(flipped)
        except CheckpointError:
            continue
        assert offset not in records, f"a bit flip at byte {offset}, inside a record, was loaded"
        assert _same_state(state, reference), f"a bit flip at byte {offset} loaded a different state"


def _rewrite(path, change):
    """Re-saves the payload with `change` applied: fresh zip CRCs, so only the digest can tell."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


@pytest.mark.parametrize(
    "field, change",
    [
        ("ledger", lambda p: p.update(ledger=p["ledger"].replace('"steps": 25', '"steps": 24'))),
        ("step", lambda p: p.update(step=24)),
        ("params", lambda p: p["params"][-1].view(torch.int16).__ixor__(1)),  # one bit of layer.w
        ("key", lambda p: p["key"].add_(1)),
        ("extra_state", lambda p: p["extra_state"][0].mul_(2)),
        ("extra", lambda p: p.update(extra=json.dumps({"epoch": 4}))),
        ("check_ledger", lambda p: p.update(check_ledger=False)),
    ],
)
def test_an_edit_with_valid_crcs_fails_the_digest(tmp_path, field, change):
    path = tmp_path / "run.pt"
    _save(path)
    _rewrite(path, change)
    with pytest.raises(CheckpointError, match="integrity check"):
        _load(path)


def _resign(path, change):
    """Applies `change` and recomputes the digest: exercises the checks behind the digest."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    try:
        payload["digest"] = fundp.checkpoint._digest(payload)
    except (AttributeError, TypeError, KeyError):
        pass  # a field of the wrong type: load refuses it before the digest
    torch.save(payload, path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.update(ledger=p["ledger"].replace('"steps": 25', '"steps": 24')), "ledger records 24 steps but the saved step is 25"),
        (lambda p: p.update(step=-1), "step must be stored as an int >= 0"),
        (lambda p: p.update(step=True), "step must be stored as an int"),
        (lambda p: p.update(key=torch.tensor([1, 2], dtype=torch.int32)), "invalid key"),
        (lambda p: p.update(key=torch.tensor([-1, 2])), "invalid key: key must hold two unsigned 32-bit words"),
        (lambda p: p.update(key=torch.tensor([1, 2, 3])), "invalid key"),
        (lambda p: p.update(ledger='{"segments": [{"noise_multiplier": -1, "sample_rate": 0.1, "steps": 25}]}'), "invalid ledger"),
        (lambda p: p.update(ledger="not json"), "invalid ledger"),
        (lambda p: p.update(extra="[1, 2]"), "invalid extra"),
        (lambda p: p["params"].append(torch.ones(1)), "params and its paths disagree"),
        (lambda p: p.update(opt_state="oops"), "opt_state must be stored as a list of tensors"),
        (lambda p: p.update(check_ledger=1), "check_ledger must be stored as a bool"),
    ],
)
def test_every_field_is_validated_behind_the_digest(tmp_path, change, message):
    path = tmp_path / "run.pt"
    _save(path)
    _resign(path, change)
    with pytest.raises(CheckpointError, match=message):
        _load(path)


def test_unexpected_or_missing_fields_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "run.pt"
    _save(path)
    _resign(path, lambda p: p.update(surprise=torch.ones(1)))
    with pytest.raises(CheckpointError, match="unexpected fields"):
        _load(path)
    torch.save({"format": "fundp-checkpoint-1", "params": []}, path)
    with pytest.raises(CheckpointError, match="format 'fundp-checkpoint-1'"):
        _load(path)
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not a fundp checkpoint"):
        _load(path)
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint archive"):
        _load(path)
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "missing.pt")


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    _save(path)
    data = path.read_bytes()
    for keep in (len(data) // 3, len(data) - 30):
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError):
            _load(path)


def test_save_refuses_a_ledger_that_was_not_threaded(tmp_path):
    # The loop that forgets `ledger = out.ledger` keeps the initial ledger while step advances.
    params, opt_state, _, _ = _run_state()
    stale = fundp.accountant_step(fundp.Ledger(), noise_multiplier=SIGMA, sample_rate=RATE, steps=1)
    with pytest.raises(ValueError, match=r"ledger records 1 steps but step=25.*ledger = out.ledger"):
        fundp.checkpoint.save(tmp_path / "run.pt", params=params, opt_state=opt_state, ledger=stale, key=fundp.random.key(0), step=25)
    assert not (tmp_path / "run.pt").exists()
    # Counting something else than private steps is allowed when said so, and still verified.
    fundp.checkpoint.save(tmp_path / "run.pt", params=params, opt_state=opt_state, ledger=stale, key=fundp.random.key(0), step=25, check_ledger=False)
    state = fundp.checkpoint.load(tmp_path / "run.pt", params_like=params, opt_state_like=opt_state)
    assert state.ledger == stale and state.step == 25


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(step=-1), ValueError, "step must be >= 0"),
        (dict(step=2.5), ValueError, "step must be a whole number"),
        (dict(key=torch.tensor([-1, 0])), ValueError, "key must hold two unsigned 32-bit words"),
        (dict(key=torch.tensor([1.0, 0.0])), TypeError, "key must be a fundp key"),
        (dict(key=7), TypeError, "key must be a fundp key"),
        (dict(ledger={"segments": []}), TypeError, "ledger must be a fundp.Ledger"),
        (dict(params={"w": 1.0}), TypeError, r"params must be a pytree of tensors, got a float at \('w',\)"),
        (dict(extra_state={"s": torch.ones(2).to_sparse()}), TypeError, "not a dense tensor"),
        (dict(extra=[1]), TypeError, "extra must be a dict"),
        (dict(extra={"x": object()}), TypeError, "extra must be JSON-serialisable"),
        (dict(check_ledger="yes"), TypeError, "check_ledger must be a bool"),
    ],
)
def test_save_validates_its_arguments(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        _save(tmp_path / "run.pt", **overrides)


def test_templates_must_match_paths_shapes_and_dtypes(tmp_path):
    path = tmp_path / "run.pt"
    _save(path)
    params, opt_state, _, extra_state = _run_state()
    renamed = {"layer": {"v": params["layer"]["w"], "b": params["layer"]["b"]}, "empty": params["empty"]}  # same shapes, other names
    with pytest.raises(CheckpointError, match="params: tensor .* in the template"):
        _load(path, params_like=renamed)
    reshaped = {"layer": {"w": torch.zeros(3, 2), "b": params["layer"]["b"]}, "empty": params["empty"]}
    with pytest.raises(CheckpointError, match=r"params: tensor \d+ at .* is torch.float32 \(2, 3\) in the checkpoint"):
        _load(path, params_like=reshaped)
    with pytest.raises(CheckpointError, match="opt_state: the checkpoint holds"):
        _load(path, opt_state_like=())
    with pytest.raises(CheckpointError, match="extra_state: tensor 0"):
        _load(path, extra_state_like={"adaptive_clip": torch.tensor(0.0), "history": extra_state["history"]})  # float32 vs float64


def test_mechanism_state_is_never_silently_dropped_or_invented(tmp_path):
    with_state, without_state = tmp_path / "with.pt", tmp_path / "without.pt"
    _save(with_state)
    _save(without_state, extra_state=None)
    with pytest.raises(CheckpointError, match="holds extra_state .* pass extra_state_like"):
        _load(with_state, extra_state_like=None)
    with pytest.raises(CheckpointError, match="holds no extra_state"):
        _load(without_state)
    assert _load(without_state, extra_state_like=None).extra_state is None


def test_key_goes_to_the_requested_device(tmp_path):
    path = tmp_path / "run.pt"
    _save(path)
    assert _load(path, device="cpu").key.device.type == "cpu"


_KILLED_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    import fundp
    params = {{"w": torch.ones(1000)}}
    fundp.checkpoint.save({path!r}, params=params, opt_state=(), ledger=None, key=fundp.random.key(1), step=1)
    def dying_save(obj, stream, *args, **kwargs):
        stream.write(b"PK partial")
        stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying_save
    fundp.checkpoint.save({path!r}, params={{"w": torch.zeros(1000)}}, opt_state=(), ledger=None, key=fundp.random.key(1), step=2)
    """
)


def _temporaries(directory, name):
    return sorted(entry for entry in os.listdir(directory) if entry.startswith("." + name + ".fundp-tmp."))


def test_a_save_killed_half_way_keeps_the_old_checkpoint_and_its_temporary_is_cleaned_up(tmp_path):
    path = tmp_path / "run.pt"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_MID_SAVE.format(root=ROOT, path=str(path))])
    assert child.wait(timeout=120) == -signal.SIGKILL
    dead = child.pid
    stale = _temporaries(tmp_path, "run.pt")
    assert len(stale) == 1 and f".{dead}." in stale[0]  # the interrupted save left its temporary behind
    old = fundp.checkpoint.load(path, params_like={"w": torch.ones(1000)}, opt_state_like=())
    assert old.step == 1 and torch.equal(old.params["w"], torch.ones(1000))  # previous checkpoint intact

    # Temporaries of a running process (a save in flight) and of other hosts are left alone.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = fundp.checkpoint._host()
        in_flight = tmp_path / f".run.pt.fundp-tmp.{host}.{sleeper.pid}.abcd1234"
        other_host = tmp_path / f".run.pt.fundp-tmp.{host}x.{dead}.abcd1234"
        other_file = tmp_path / f".other.pt.fundp-tmp.{host}.{dead}.abcd1234"
        for file in (in_flight, other_host, other_file):
            file.write_bytes(b"partial")
        fundp.checkpoint.save(path, params={"w": torch.full((1000,), 3.0)}, opt_state=(), ledger=None, key=fundp.random.key(1), step=3)
        left = _temporaries(tmp_path, "run.pt")
        assert stale[0] not in left
        assert in_flight.name in left and other_host.name in left and other_file.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert fundp.checkpoint.load(path, params_like={"w": torch.ones(1000)}, opt_state_like=()).step == 3


def test_a_failed_save_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"

    def failing_save(obj, stream, *args, **kwargs):
        stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        fundp.checkpoint.save(path, params={"w": torch.ones(2)}, opt_state=(), ledger=None, key=fundp.random.key(1), step=0)
    assert os.listdir(tmp_path) == []
