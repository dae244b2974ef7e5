"""Sharded checkpoints of a DP run with ``torch.distributed.checkpoint`` (DCP): FSDP2 / DTensor state.

:func:`save` writes the parameters and optimizer state as they are laid out (each rank writes its
own shards, in parallel) together with the privacy record: the ledger, the key, the step count
and the run id.  :func:`load` restores into templates laid out for the *new* run, which may use
another world size or mesh (DCP reshards on load): a run checkpointed on 2 ranks resumes on 4.
The key and ledger continue exactly, so a resumed run on the same layout is bit-identical to an
uninterrupted one.  Every rank must call both (they are collectives).

Guards, as in :mod:`fundp.checkpoint`: the ledger must record ``step`` steps (``check_ledger``);
the key is checked; a template whose paths, shapes or dtypes differ from the saved ones is
refused (:class:`~fundp.checkpoint.CheckpointError`); ``load(..., run_id=...)`` refuses another
run's checkpoint; after loading, every rank must hold the same key, ledger and step
(:func:`fundp.distributed.check_consistent`).  Unlike :mod:`fundp.checkpoint` there is no digest
of the contents (DCP writes one file per rank plus its metadata), and a write is not atomic:
save to a fresh directory per checkpoint.

Example:
  >>> import os, tempfile, torch, torch.distributed as dist, fundp
  >>> dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
  >>> directory = tempfile.mkdtemp()
  >>> params = {"w": torch.ones(2)}
  >>> fundp.sharded_checkpoint.save(directory, params=params, opt_state=(), ledger=None, key=fundp.random.key(3), step=0)
  >>> state = fundp.sharded_checkpoint.load(directory, params_like={"w": torch.zeros(2)}, opt_state_like=())
  >>> state.params, state.key.tolist(), state.step
  ({'w': tensor([1., 1.])}, [0, 3], 0)
  >>> dist.destroy_process_group()
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import optree
import torch

from fundp import random as fundp_random
from fundp.checkpoint import CheckpointError, RunState

__all__ = ["save", "load"]

_FORMAT = "fundp.sharded_checkpoint/1"
_STATES = ("clip_state", "noise_state")  # the mechanism states a checkpoint may hold


def _tensors(name: str, tree: Any) -> dict[str, torch.Tensor]:
    """``{repr(path): leaf}`` of a pytree of tensors (DTensors stay DTensors: DCP saves their shards)."""
    leaves, _ = optree.tree_flatten(tree, none_is_leaf=False)
    paths = [repr(path) for path in optree.tree_paths(tree, none_is_leaf=False)]
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{name} must be a pytree of tensors, got a {type(leaf).__name__} at {path}")
    return {path: leaf.detach() for path, leaf in zip(paths, leaves)}


def _from_rank0(value: Any, group: Any) -> Any:
    """Group rank 0's ``value`` on every rank (a fresh run id must be one id)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def _check_run_id(run_id: Any) -> str:
    if not isinstance(run_id, str) or not run_id or len(run_id) > 128 or not all(c.isalnum() or c in "_.:-" for c in run_id):
        raise ValueError(f"run_id must be 1 to 128 letters, digits or '_.:-', got {run_id!r}")
    return run_id


def save(
    directory: str | os.PathLike,
    *,
    params: Any,
    opt_state: Any,
    ledger: Any,
    key: torch.Tensor,
    step: int,
    check_ledger: bool = True,
    run_id: str | None = None,
    process_group: Any = None,
    clip_state: Any = None,
    noise_state: Any = None,
) -> None:
    """Writes a sharded checkpoint of the run to ``directory`` (every rank calls it).

    Args:
      directory: where DCP writes (one file per rank and the metadata); use a fresh one.
      params, opt_state: pytrees of tensors or DTensors, saved as laid out.
      ledger: the :class:`fundp.Ledger` after the last step, or ``None`` (non-private run).
      key: the run's fundp key (the same on every rank).
      step: the number of steps taken, ``>= 0``.
      check_ledger: require ``ledger.steps == step`` (a loop that does not thread the ledger).
      run_id: the run's identity; default: a fresh random one (rank 0's, broadcast).
      process_group: the group for DCP's collectives (default: the world).
      clip_state, noise_state: the adaptive-clipping state (``out.clip_state``) and the
        correlated-noise state (``out.noise_state``; with sharded params its buffers are DTensors
        laid out like them, saved as their shards), or ``None`` when the run has none.
    """
    import torch.distributed.checkpoint as dcp

    fundp_random._check_key(key.detach().to("cpu"))
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if check_ledger and ledger is not None and ledger.steps != step:
        raise CheckpointError(
            f"the ledger records {ledger.steps} steps but step={step}: thread ledger = out.ledger through the loop "
            "(or pass check_ledger=False when step counts something else)"
        )
    run_id = _check_run_id(run_id if run_id is not None else _from_rank0(secrets.token_hex(16), process_group))
    record = {
        "format": _FORMAT,
        "ledger": None if ledger is None else ledger.to_dict(),
        "key": list(fundp_random.key_data(key.detach().to("cpu"))),
        "step": step,
        "run_id": run_id,
    }
    state = {"params": _tensors("params", params), "opt_state": _tensors("opt_state", opt_state), "fundp": json.dumps(record)}
    for name, tree in zip(_STATES, (clip_state, noise_state)):
        if tree is not None:
            state[name] = _tensors(name, tree)
    dcp.save(state, checkpoint_id=os.fspath(directory), process_group=process_group)


def load(
    directory: str | os.PathLike,
    *,
    params_like: Any,
    opt_state_like: Any,
    run_id: str | None = None,
    allow_other_run: bool = False,
    check_ledger: bool = True,
    process_group: Any = None,
    clip_state_like: Any = None,
    noise_state_like: Any = None,
) -> RunState:
    """Restores a checkpoint written by :func:`save` into templates laid out for this run.

    ``params_like`` / ``opt_state_like``: pytrees of tensors or DTensors with the saved paths,
    global shapes and dtypes, in any layout (e.g. ``opt.init(params_like)`` on a new mesh);
    they are copied, not modified.  ``clip_state_like`` / ``noise_state_like``: templates of the
    saved mechanism states (e.g. ``mechanism.init(params_like)``, laid out for the new run); a
    checkpoint holding a state must be given its template, and a template its saved state
    (:class:`~fundp.checkpoint.CheckpointError` otherwise: a dropped correlated-noise state would
    restart the mechanism's noise).  Returns a :class:`fundp.checkpoint.RunState` (``extra``
    empty; ``clip_state`` / ``noise_state`` restored, or ``None``).
    """
    import torch.distributed.checkpoint as dcp

    from fundp.accounting import Ledger
    from fundp.distributed import check_consistent

    likes = {"params": params_like, "opt_state": opt_state_like, "clip_state": clip_state_like,
             "noise_state": noise_state_like}
    flats = {name: {path: leaf.clone() for path, leaf in _tensors(f"{name}_like", like).items()}
             for name, like in likes.items() if like is not None}
    metadata = dcp.FileSystemReader(os.fspath(directory)).read_metadata().state_dict_metadata
    for name in _STATES:
        held = any(fqn.startswith(name + ".") for fqn in metadata)
        if held != (name in flats):
            raise CheckpointError(
                f"the checkpoint {'holds' if held else 'holds no'} {name} but {name}_like is "
                f"{'None' if held else 'given'}: pass the template of every saved state (a dropped noise state "
                "restarts the mechanism's correlated noise), and none of a state that was not saved")
    for name, flat in flats.items():
        saved = {fqn[len(name) + 1:]: meta for fqn, meta in metadata.items() if fqn.startswith(name + ".")}
        if set(saved) != set(flat):
            raise CheckpointError(f"{name}: the checkpoint holds {sorted(saved)[:8]}, the template {sorted(flat)[:8]}")
        for path, leaf in flat.items():
            meta = saved[path]
            shape, dtype = tuple(getattr(meta, "size", ())), getattr(getattr(meta, "properties", None), "dtype", None)
            if shape != tuple(leaf.shape) or dtype != leaf.dtype:
                raise CheckpointError(
                    f"{name}: the tensor at {path} is {dtype} {shape} in the checkpoint but {leaf.dtype} "
                    f"{tuple(leaf.shape)} in the template"
                )
    state: dict[str, Any] = {**flats, "fundp": ""}
    dcp.load(state, checkpoint_id=os.fspath(directory), process_group=process_group)
    record = json.loads(state["fundp"])
    if record.get("format") != _FORMAT:
        raise CheckpointError(f"not a fundp sharded checkpoint (format {record.get('format')!r})")
    if run_id is not None and record["run_id"] != run_id and not allow_other_run:
        raise CheckpointError(
            f"the checkpoint belongs to run {record['run_id']!r}, not {run_id!r}: its ledger is another run's privacy "
            "record (pass allow_other_run=True to load it anyway)"
        )
    ledger = None if record["ledger"] is None else Ledger.from_dict(record["ledger"])
    if check_ledger and ledger is not None and ledger.steps != record["step"]:
        raise CheckpointError(f"the ledger records {ledger.steps} steps but the checkpoint's step is {record['step']}")
    key = torch.tensor(record["key"], dtype=torch.int64)
    fundp_random._check_key(key)
    check_consistent(key, (("ledger", ledger), ("step", record["step"]), ("run_id", record["run_id"])), process_group)

    def rebuild(like: Any, flat: dict) -> Any:
        _, treedef = optree.tree_flatten(like, none_is_leaf=False)
        paths = [repr(path) for path in optree.tree_paths(like, none_is_leaf=False)]
        return optree.tree_unflatten(treedef, [flat[path] for path in paths])

    restored = {name: rebuild(likes[name], flat) for name, flat in flats.items()}
    return RunState(restored["params"], restored["opt_state"], ledger, key, record["step"], {}, run_id=record["run_id"],
                    clip_state=restored.get("clip_state"), noise_state=restored.get("noise_state"))
