"""Save and resume everything a DP run needs: params, optimizer state, ledger, key and step.

A resumed run must continue the same key stream and the same privacy ledger — never re-spend
budget it already spent, never forget it.  The file holds only plain tensors, strings and ints,
so it loads with ``torch.load(..., weights_only=True)`` (no pickled code).  Pytrees are stored
as their leaves; :func:`load` rebuilds them from templates you pass (``opt.init(params)``), the
way JAX checkpointing restores into a target structure.  Writes are atomic (temp file, then
``os.replace``), so a run killed mid-save keeps its previous checkpoint.

Example:
  >>> import tempfile, os, torch, fundp
  >>> params = {"w": torch.ones(2)}
  >>> opt = fundp.optim.adam(0.1)
  >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
  >>> fundp.checkpoint.save(path, params=params, opt_state=opt.init(params),
  ...                       ledger=fundp.Ledger(), key=fundp.random.key(0), step=0)
  >>> state = fundp.checkpoint.load(path, params_like=params, opt_state_like=opt.init(params))
  >>> state.step, state.key.tolist()
  (0, [0, 0])
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, NamedTuple

import optree
import torch

__all__ = ["RunState", "save", "load"]

_FORMAT = "fundp-checkpoint-1"


class RunState(NamedTuple):
    params: Any
    opt_state: Any
    ledger: Any
    key: torch.Tensor
    step: int
    extra: dict


def _leaves(tree: Any) -> list[torch.Tensor]:
    leaves = optree.tree_leaves(tree, none_is_leaf=False)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"checkpoint pytrees must hold tensors, got {type(leaf).__name__}")
    return [leaf.detach().cpu() for leaf in leaves]


def save(path: str | os.PathLike, *, params: Any, opt_state: Any, ledger: Any, key: torch.Tensor, step: int, extra: dict | None = None) -> None:
    """Atomically writes the run state to ``path``.

    ``ledger`` may be ``None`` (non-private run).  ``extra`` is a JSON-serialisable dict for
    anything else (epoch, data-loader position, config).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    payload = {
        "format": _FORMAT,
        "params": _leaves(params),
        "opt_state": _leaves(opt_state),
        "ledger": json.dumps(None if ledger is None else ledger.to_dict()),
        "key": key.detach().cpu().clone(),
        "step": step,
        "extra": json.dumps(extra or {}),
    }
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".fundp-ckpt-")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _restore(name: str, leaves: list[torch.Tensor], like: Any) -> Any:
    template, treedef = optree.tree_flatten(like, none_is_leaf=False)
    if len(template) != len(leaves):
        raise ValueError(f"{name}: the checkpoint holds {len(leaves)} tensors, the template {len(template)}")
    restored = []
    for i, (saved, reference) in enumerate(zip(leaves, template)):
        if saved.shape != reference.shape or saved.dtype != reference.dtype:
            raise ValueError(
                f"{name}: tensor {i} is {saved.dtype} {tuple(saved.shape)} in the checkpoint but "
                f"{reference.dtype} {tuple(reference.shape)} in the template"
            )
        restored.append(saved.to(reference.device))
    return optree.tree_unflatten(treedef, restored)


def load(path: str | os.PathLike, *, params_like: Any, opt_state_like: Any, device: Any = None) -> RunState:
    """Reads a checkpoint written by :func:`save` (``weights_only=True``) into the templates' structure."""
    from fundp.accounting import Ledger

    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a fundp checkpoint")
    ledger_dict = json.loads(payload["ledger"])
    key = payload["key"] if device is None else payload["key"].to(device)
    return RunState(
        params=_restore("params", payload["params"], params_like),
        opt_state=_restore("opt_state", payload["opt_state"], opt_state_like),
        ledger=None if ledger_dict is None else Ledger.from_dict(ledger_dict),
        key=key,
        step=int(payload["step"]),
        extra=json.loads(payload["extra"]),
    )
