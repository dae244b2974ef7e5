"""Save and resume everything a DP run needs: params, optimizer state, ledger, key, step, mechanism state.

A resumed run must continue the same key stream and the same privacy ledger — never re-spend
budget it already spent, never forget it.  The file holds only plain tensors, strings, ints and
bools, so it loads with ``torch.load(..., weights_only=True)`` (no pickled code).  Pytrees are
stored as their leaves and their paths; :func:`load` rebuilds them from templates you pass
(``opt.init(params)``), the way JAX checkpointing restores into a target structure.  Stateful
mechanisms are values too: the adaptive-clipping and correlated-noise states of a
:class:`fundp.TrainState` are saved as ``clip_state`` / ``noise_state`` (so
``save(path, **state._asdict())`` stores the whole loop state, and
:meth:`fundp.TrainState.restore` reads it back); any other state goes in ``extra_state`` and is
restored against ``extra_state_like``.

Guards (each one refuses to load rather than resume a run with a wrong privacy record):

* **integrity** — :func:`save` stores a SHA-256 digest of a canonical serialisation of every
  field (each tensor's dtype, shape and bytes; the ledger, key, step, paths and ``extra``);
  :func:`load` first checks the CRC-32 of every record of the zip archive ``torch.save`` writes,
  then recomputes the digest.  A flipped bit anywhere raises :class:`CheckpointError`.  (The
  digest detects corruption and accidental edits, not a forger, who can recompute it.)
* **consistency** — by default the ledger must record exactly ``step`` steps, at save and at
  load: a loop that forgot ``ledger = out.ledger`` cannot checkpoint (pass
  ``check_ledger=False`` when your step counter counts something else, e.g. non-private steps).
* **validation** — every field's type is checked; the key is an ``int64 [2]`` tensor of 32-bit
  words; ``step >= 0``; every restored tensor has its template's path, shape and dtype.
* **run identity** — every checkpoint carries a ``run_id`` (given to :func:`save`, or a fresh
  random one); ``load(..., run_id=...)`` refuses a file of another run (its ledger is another
  run's privacy record) unless ``allow_other_run=True``.  Keep ``state.run_id`` and pass it to
  every later :func:`save` of the resumed run.
* **atomic writes** — a temporary file in the same directory, ``fsync``, then ``os.replace``: a
  run killed mid-save keeps its previous checkpoint.  Temporary files left by a killed save (of
  a process on this host that no longer runs) are removed by the next :func:`save` to the same
  path.

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

import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import sys
import zipfile
from typing import Any, NamedTuple

import optree
import torch

from fundp._validate import check_int

__all__ = ["CheckpointError", "RunState", "save", "load"]

_FORMAT = "fundp-checkpoint-2"
_TREES = ("params", "opt_state", "extra_state")
#: Trees stored only when given (a file without them reads as before, digest included).
_STATE_TREES = ("clip_state", "noise_state")
_FIELDS = frozenset({"format", "params", "opt_state", "extra_state", "paths", "ledger", "check_ledger", "key", "step", "extra", "digest"})
_OPTIONAL_FIELDS = frozenset({"run_id", *_STATE_TREES})
_RUN_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_TEMPORARY = ".fundp-tmp."


class CheckpointError(ValueError):
    """A checkpoint is corrupt, truncated, of an unknown format, inconsistent, or does not match the templates.

    Example:
      >>> import tempfile, os, torch, fundp
      >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
      >>> _ = open(path, "wb").write(b"not a checkpoint")
      >>> try:
      ...     fundp.checkpoint.load(path, params_like={"w": torch.zeros(2)}, opt_state_like=())
      ... except fundp.checkpoint.CheckpointError as error:
      ...     print("not a readable checkpoint archive" in str(error))
      True
    """


class RunState(NamedTuple):
    """What :func:`load` returns.

    Attributes:
      params: restored into ``params_like``'s structure, devices, shapes and dtypes.
      opt_state: restored into ``opt_state_like``'s.
      ledger: the :class:`fundp.Ledger` saved (``None`` for a non-private run).
      key: the run's key, ``int64 [2]`` (on ``device`` if given, else the CPU).
      step: the step counter saved (``>= 0``).
      extra: the JSON dict saved as ``extra`` (``{}`` if none).
      extra_state: mechanism state restored into ``extra_state_like`` (``None`` if none saved).
      run_id: the run the checkpoint belongs to (``None`` for a file written before run ids).
      clip_state: the adaptive-clipping state restored into ``clip_state_like`` (``None`` if none saved).
      noise_state: the correlated-noise state restored into ``noise_state_like`` (``None`` if none saved).

    Example:
      >>> import tempfile, os, torch, fundp
      >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
      >>> fundp.checkpoint.save(path, params={"w": torch.ones(2)}, opt_state=(), ledger=None,
      ...                       key=fundp.random.key(1), step=7, extra={"lr": 0.1})
      >>> state = fundp.checkpoint.load(path, params_like={"w": torch.zeros(2)}, opt_state_like=())
      >>> state.params, state.ledger, state.step, state.extra, state.extra_state
      ({'w': tensor([1., 1.])}, None, 7, {'lr': 0.1}, None)
    """

    params: Any
    opt_state: Any
    ledger: Any
    key: torch.Tensor
    step: int
    extra: dict
    extra_state: Any = None
    run_id: str | None = None
    clip_state: Any = None
    noise_state: Any = None


# --------------------------------------------------------------------------- canonical bytes and digest


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as little-endian bytes, without a copy where possible."""
    flat = tensor.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    if sys.byteorder == "big" and flat.element_size() > 1:  # pragma: no cover - no big-endian CI
        raw = raw.reshape(-1, flat.element_size()).flip(-1).reshape(-1).contiguous()
    return memoryview(raw.numpy().data).cast("B")


def _digest(payload: dict) -> str:
    """SHA-256 over a length-prefixed serialisation of every field except the digest itself."""
    hasher = hashlib.sha256()

    def put(tag: str, data: bytes | memoryview) -> None:
        label = tag.encode()
        hasher.update(len(label).to_bytes(8, "little") + label + len(data).to_bytes(8, "little"))
        hasher.update(data)

    def put_tensor(tag: str, tensor: torch.Tensor) -> None:
        put(tag + ".dtype", str(tensor.dtype).encode())
        put(tag + ".shape", json.dumps(list(tensor.shape)).encode())
        put(tag + ".data", _tensor_bytes(tensor))

    put("format", payload["format"].encode())
    for tree in _TREES:
        leaves = payload[tree]
        put(tree + ".present", b"0" if leaves is None else b"1")
        for index, leaf in enumerate(leaves or ()):
            put_tensor(f"{tree}[{index}]", leaf)
        put(tree + ".count", str(len(leaves or ())).encode())
    for name in ("paths", "ledger", "extra"):
        put(name, payload[name].encode())
    put("check_ledger", b"1" if payload["check_ledger"] else b"0")
    put_tensor("key", payload["key"])
    put("step", str(payload["step"]).encode())
    if payload.get("run_id") is not None:  # files written before run ids keep their digest
        put("run_id", payload["run_id"].encode())
    for tree in _STATE_TREES:  # stored only when given: files without them keep their digest
        if tree in payload:
            put(tree + ".count", str(len(payload[tree])).encode())
            for index, leaf in enumerate(payload[tree]):
                put_tensor(f"{tree}[{index}]", leaf)
    return hasher.hexdigest()


# --------------------------------------------------------------------------- save


def _flatten(name: str, tree: Any) -> tuple[list[torch.Tensor], list[str]]:
    leaves, _ = optree.tree_flatten(tree, none_is_leaf=False)
    paths = [repr(path) for path in optree.tree_paths(tree, none_is_leaf=False)]
    stored = []
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{name} must be a pytree of tensors, got a {type(leaf).__name__} at {path}")
        if leaf.layout != torch.strided or leaf.is_quantized or leaf.is_nested:
            raise TypeError(f"{name}: the tensor at {path} is not a dense tensor (layout {leaf.layout})")
        copy = leaf.detach().to("cpu").contiguous()
        if copy.untyped_storage().nbytes() != copy.numel() * copy.element_size():
            copy = copy.clone()  # a view of a larger storage: save only its own elements
        stored.append(copy)
    return stored, paths


def _temporary_prefix(path: str) -> str:
    return "." + os.path.basename(path) + _TEMPORARY


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's process) or cannot tell: keep its file
    return True


def _remove_stale_temporaries(path: str) -> list[str]:
    """Removes temporary files of interrupted saves to ``path``; returns their names.

    A temporary file is named ``.<name>.fundp-tmp.<host>.<pid>.<token>``; it is stale when it was
    written on this host by a process that no longer runs.  Files of running processes (a save
    in flight) and of other hosts (a shared filesystem) are left alone.
    """
    directory = os.path.dirname(os.path.abspath(path))
    prefix, host = _temporary_prefix(path), _host()
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _process_is_running(pid):
            continue
        try:
            os.remove(os.path.join(directory, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def _fsync_directory(directory: str) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(handle)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(handle)


def save(
    path: str | os.PathLike,
    *,
    params: Any,
    opt_state: Any,
    ledger: Any,
    key: torch.Tensor,
    step: int,
    extra: dict | None = None,
    extra_state: Any = None,
    check_ledger: bool = True,
    run_id: str | None = None,
    clip_state: Any = None,
    noise_state: Any = None,
) -> None:
    """Atomically writes the run state to ``path``, with a SHA-256 digest of its contents.

    Args:
      path: the checkpoint file (its directory must exist).
      params, opt_state: pytrees of tensors (any device; saved on the CPU).
      ledger: the :class:`fundp.Ledger` after the last step, or ``None`` (non-private run).
      key: the run's fundp key (``int64 [2]``).
      step: the number of steps taken, ``>= 0``.
      extra: a JSON-serialisable dict for anything else (epoch, data-loader position, config).
      extra_state: a pytree of tensors with the state of stateful mechanisms (adaptive
        clipping, correlated noise); restore it with ``load(..., extra_state_like=...)``.
      check_ledger: require ``ledger.steps == step`` (default), which catches a loop that does
        not thread ``ledger = out.ledger``; ``False`` when ``step`` counts something else.
      run_id: the run's identity (letters, digits, ``_.:-``, at most 128); default: a fresh
        random id.  A resumed run passes ``state.run_id``, so that ``load(..., run_id=...)``
        can refuse another run's file.
      clip_state, noise_state: the adaptive-clipping and correlated-noise states (pytrees of
        tensors, e.g. :class:`fundp.adaptive.QuantileClipState`, :class:`fundp.mf.NoiseState`)
        of a :class:`fundp.TrainState`; ``None``: not stored.  Restore them with
        ``load(..., clip_state_like=..., noise_state_like=...)``.

    Example:
      >>> import tempfile, os, torch, fundp
      >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
      >>> ledger = fundp.accountant_step(fundp.Ledger(), noise_multiplier=1.0, sample_rate=0.1, steps=3)
      >>> fundp.checkpoint.save(path, params={"w": torch.ones(2)}, opt_state=(), ledger=ledger,
      ...                       key=fundp.random.key(1), step=3, extra_state={"clip": torch.tensor(0.5)})
      >>> fundp.checkpoint.save(path, params={"w": torch.ones(2)}, opt_state=(), ledger=ledger,
      ...                       key=fundp.random.key(1), step=4)
      Traceback (most recent call last):
      ...
      ValueError: the ledger records 3 steps but step=4: ...
    """
    from fundp import random as fundp_random
    from fundp.accounting import Ledger

    step = check_int("step", step, minimum=0)
    if not isinstance(check_ledger, bool):
        raise TypeError(f"check_ledger must be a bool, got {type(check_ledger).__name__}")
    if ledger is not None and not isinstance(ledger, Ledger):
        raise TypeError(f"ledger must be a fundp.Ledger or None, got {type(ledger).__name__}")
    if check_ledger and ledger is not None and ledger.steps != step:
        raise ValueError(
            f"the ledger records {ledger.steps} steps but step={step}: a training loop must thread "
            "the ledger (ledger = out.ledger) or the privacy spent is under-reported; pass "
            "check_ledger=False if your step counter counts something else"
        )
    if not isinstance(key, torch.Tensor):
        raise TypeError(f"key must be a fundp key tensor, got {type(key).__name__}")
    key = key.detach().to("cpu").clone()
    fundp_random._check_key(key)
    if run_id is None:
        run_id = secrets.token_hex(16)
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run_id must be 1 to 128 letters, digits or '_.:-', got {run_id!r}")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    try:
        extra_json = json.dumps(extra, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise TypeError(f"extra must be JSON-serialisable: {error}") from None
    stored: dict[str, Any] = {}
    paths: dict[str, list[str] | None] = {}
    for name, tree in (("params", params), ("opt_state", opt_state), ("extra_state", extra_state)):
        if name == "extra_state" and tree is None:
            stored[name], paths[name] = None, None
        else:
            stored[name], paths[name] = _flatten(name, tree)
    for name, tree in (("clip_state", clip_state), ("noise_state", noise_state)):
        if tree is not None:
            stored[name], paths[name] = _flatten(name, tree)
    payload: dict[str, Any] = {
        "format": _FORMAT,
        **stored,
        "paths": json.dumps(paths, sort_keys=True),
        "ledger": json.dumps(None if ledger is None else ledger.to_dict(), sort_keys=True),
        "check_ledger": check_ledger,
        "key": key,
        "step": step,
        "extra": extra_json,
        "run_id": run_id,
    }
    payload["digest"] = _digest(payload)

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    _remove_stale_temporaries(path)
    temporary = os.path.join(directory, f"{_temporary_prefix(path)}{_host()}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with open(temporary, "xb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_directory(directory)


# --------------------------------------------------------------------------- load


def _read(path: str) -> dict:
    with open(path, "rb") as stream:  # missing file / permissions: the usual OSError
        try:
            with zipfile.ZipFile(stream) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, NotImplementedError) as error:
            raise CheckpointError(f"{path} is not a readable checkpoint archive (corrupt or truncated): {error}") from error
        except Exception as error:  # a damaged header can make zipfile fail in other ways
            raise CheckpointError(f"{path} is not a readable checkpoint archive (corrupt or truncated): {error!r}") from error
        if bad is not None:
            raise CheckpointError(f"{path} is corrupt: the CRC-32 of its record {bad!r} does not match its contents")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} could not be read as a checkpoint (weights_only): {error}") from error
    if not isinstance(payload, dict) or not str(payload.get("format", "")).startswith("fundp-checkpoint-"):
        raise CheckpointError(f"{path} is not a fundp checkpoint")
    if payload["format"] != _FORMAT:
        raise CheckpointError(
            f"{path} has format {payload['format']!r}, this fundp reads {_FORMAT!r} "
            "(checkpoints without an integrity digest are refused)"
        )
    if not _FIELDS <= set(payload) <= _FIELDS | _OPTIONAL_FIELDS:
        unexpected = (set(payload) - _FIELDS - _OPTIONAL_FIELDS) | (_FIELDS - set(payload))
        raise CheckpointError(f"{path}: unexpected fields {sorted(unexpected)} in the checkpoint")
    return payload


def _check_types(payload: dict) -> None:
    for tree in (*_TREES, *(name for name in _STATE_TREES if name in payload)):
        leaves = payload[tree]
        if leaves is None and tree == "extra_state":
            continue
        if not isinstance(leaves, list) or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            raise CheckpointError(f"{tree} must be stored as a list of tensors")
    for name in ("paths", "ledger", "extra", "digest"):
        if not isinstance(payload[name], str):
            raise CheckpointError(f"{name} must be stored as a string, got {type(payload[name]).__name__}")
    if not isinstance(payload["check_ledger"], bool):
        raise CheckpointError("check_ledger must be stored as a bool")
    run_id = payload.get("run_id")
    if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)):
        raise CheckpointError(f"run_id must be stored as a short identifier string, got {run_id!r}")
    if not isinstance(payload["key"], torch.Tensor):
        raise CheckpointError(f"key must be stored as a tensor, got {type(payload['key']).__name__}")
    step = payload["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step must be stored as an int >= 0, got {step!r}")


def _restore(name: str, leaves: list[torch.Tensor], saved_paths: list[str], like: Any) -> Any:
    template, treedef = optree.tree_flatten(like, none_is_leaf=False)
    paths = [repr(path) for path in optree.tree_paths(like, none_is_leaf=False)]
    if len(template) != len(leaves):
        raise CheckpointError(f"{name}: the checkpoint holds {len(leaves)} tensors, the template {len(template)}")
    restored = []
    for i, (saved, reference, saved_path, path) in enumerate(zip(leaves, template, saved_paths, paths)):
        if not isinstance(reference, torch.Tensor):
            raise TypeError(f"{name}_like must be a pytree of tensors, got a {type(reference).__name__} at {path}")
        if saved_path != path:
            raise CheckpointError(f"{name}: tensor {i} is at {saved_path} in the checkpoint but at {path} in the template")
        if saved.shape != reference.shape or saved.dtype != reference.dtype:
            raise CheckpointError(
                f"{name}: tensor {i} at {path} is {saved.dtype} {tuple(saved.shape)} in the checkpoint but "
                f"{reference.dtype} {tuple(reference.shape)} in the template"
            )
        restored.append(saved.to(reference.device))
    return optree.tree_unflatten(treedef, restored)


def load(
    path: str | os.PathLike,
    *,
    params_like: Any,
    opt_state_like: Any,
    extra_state_like: Any = None,
    device: Any = None,
    run_id: str | None = None,
    allow_other_run: bool = False,
    clip_state_like: Any = None,
    noise_state_like: Any = None,
) -> RunState:
    """Reads a checkpoint written by :func:`save` into the templates' structure, after checking it.

    The archive's CRCs, the SHA-256 digest of the contents, every field's type, the key, the
    step, the ledger against the step (if saved with ``check_ledger=True``) and every tensor's
    path, shape and dtype against its template are verified; any failure raises
    :class:`CheckpointError` (a ``ValueError``) naming what is wrong.  Loads with
    ``weights_only=True``.

    Args:
      path: the checkpoint file.
      params_like, opt_state_like: templates (e.g. the freshly built params and
        ``opt.init(params)``); restored tensors take their devices.
      extra_state_like: template of the ``extra_state`` saved; required exactly when one was
        saved (a stateful mechanism's state must not be silently dropped or invented).
      device: where to put the key (default: the CPU).
      run_id: the run you are resuming: a checkpoint of another run (or one without a run id)
        raises :class:`CheckpointError`, unless ``allow_other_run=True`` (e.g. fine-tuning from
        another run's weights, knowingly taking over its ledger).  ``None``: not checked.
      clip_state_like, noise_state_like: templates of the adaptive-clipping and correlated-noise
        states saved (e.g. ``cfg.init(C0)``, ``mechanism.init(params)``); each is required exactly
        when that state was saved, like ``extra_state_like``.

    Example:
      >>> import tempfile, os, torch, fundp
      >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
      >>> fundp.checkpoint.save(path, params={"w": torch.ones(2)}, opt_state=(), ledger=None,
      ...                       key=fundp.random.key(1), step=7, extra_state={"clip": torch.tensor(0.5)})
      >>> state = fundp.checkpoint.load(path, params_like={"w": torch.zeros(2)}, opt_state_like=(),
      ...                               extra_state_like={"clip": torch.tensor(1.0)})
      >>> state.step, state.extra_state["clip"].item()
      (7, 0.5)
    """
    from fundp import random as fundp_random
    from fundp.accounting import Ledger

    path = os.fspath(path)
    payload = _read(path)
    _check_types(payload)
    if not hmac.compare_digest(payload["digest"], _digest(payload)):
        raise CheckpointError(
            f"{path} failed its integrity check: the contents do not match the SHA-256 digest "
            "written with them (the file was modified or corrupted after saving)"
        )
    if not isinstance(allow_other_run, bool):
        raise TypeError(f"allow_other_run must be a bool, got {type(allow_other_run).__name__}")
    saved_run = payload.get("run_id")
    if run_id is not None and saved_run != run_id and not allow_other_run:
        raise CheckpointError(
            f"{path} belongs to run {saved_run!r}, not to run {run_id!r}: resuming from it would continue "
            "another run's key stream and privacy ledger. Pass allow_other_run=True if that is intended"
        )
    try:
        fundp_random._check_key(payload["key"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid key: {error}") from error
    try:
        ledger_dict = json.loads(payload["ledger"])
        ledger = None if ledger_dict is None else Ledger.from_dict(ledger_dict)
        extra = json.loads(payload["extra"])
        paths = json.loads(payload["paths"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid ledger, extra or paths field: {error}") from error
    stored_trees = (*_TREES, *(name for name in _STATE_TREES if name in payload))
    if not isinstance(extra, dict) or not isinstance(paths, dict) or set(paths) != set(stored_trees):
        raise CheckpointError(f"{path}: invalid extra or paths field")
    step = payload["step"]
    if payload["check_ledger"] and ledger is not None and ledger.steps != step:
        raise CheckpointError(f"{path}: the ledger records {ledger.steps} steps but the saved step is {step}")
    for tree in stored_trees:
        leaves, tree_paths = payload[tree], paths[tree]
        if (leaves is None) != (tree_paths is None) or (leaves is not None and len(leaves) != len(tree_paths)):
            raise CheckpointError(f"{path}: {tree} and its paths disagree")
    if payload["extra_state"] is None and extra_state_like is not None:
        raise CheckpointError(f"{path} holds no extra_state, but extra_state_like was given")
    if payload["extra_state"] is not None and extra_state_like is None:
        raise CheckpointError(
            f"{path} holds extra_state ({len(payload['extra_state'])} tensors, mechanism state such as "
            "adaptive clipping or correlated noise): pass extra_state_like= to restore it"
        )
    for tree, like in (("clip_state", clip_state_like), ("noise_state", noise_state_like)):
        if tree not in payload and like is not None:
            raise CheckpointError(f"{path} holds no {tree}, but {tree}_like was given")
        if tree in payload and like is None:
            raise CheckpointError(
                f"{path} holds a {tree} ({len(payload[tree])} tensors): pass {tree}_like= to restore it "
                "(dropping it would restart the mechanism mid-run)")
    key = payload["key"] if device is None else payload["key"].to(device)
    return RunState(
        params=_restore("params", payload["params"], paths["params"], params_like),
        opt_state=_restore("opt_state", payload["opt_state"], paths["opt_state"], opt_state_like),
        ledger=ledger,
        key=key,
        step=step,
        extra=extra,
        extra_state=None if extra_state_like is None else _restore("extra_state", payload["extra_state"], paths["extra_state"], extra_state_like),
        run_id=saved_run,
        clip_state=None if clip_state_like is None else _restore("clip_state", payload["clip_state"], paths["clip_state"], clip_state_like),
        noise_state=None if noise_state_like is None else _restore("noise_state", payload["noise_state"], paths["noise_state"], noise_state_like),
    )
