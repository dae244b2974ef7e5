"""Checks that a model keeps per-example semantics, and a strict ``functional_call``.

DP-SGD bounds each example's influence by clipping its own gradient.  A layer that mixes
examples inside a batch (BatchNorm's batch statistics) or writes batch statistics into buffers
breaks that bound silently, so fundp refuses such models with an error that names the module
and the fix.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

__all__ = ["UnsupportedModuleError", "check_model", "functional_call"]


class UnsupportedModuleError(ValueError):
    """A module breaks per-example semantics; the message names it and the fix.

    Example:
      >>> import torch, fundp
      >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
      >>> try:
      ...     fundp.functional_call(model, {}, torch.ones(2, 2))
      ... except fundp.UnsupportedModuleError as error:
      ...     print(str(error)[:36])
      1 (BatchNorm1d) normalises with stat
    """


_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
_INSTANCE_NORMS = (nn.modules.instancenorm._InstanceNorm,)
_FUSED_RECURRENT = (nn.RNNBase, nn.RNNCellBase)


def _problem(name: str, module: nn.Module) -> str | None:
    label = f"{name or '<root>'} ({type(module).__name__})"
    if isinstance(module, _BATCH_NORMS) and (module.training or not module.track_running_stats):
        return (
            f"{label} normalises with statistics of the whole batch, so one example changes every "
            "other example's gradient and clipping no longer bounds its influence. Replace it with "
            "nn.GroupNorm or nn.LayerNorm, or freeze it with .eval() (running statistics, which "
            "must then not have been computed on the private data)"
        )
    if isinstance(module, _INSTANCE_NORMS) and module.training and module.track_running_stats:
        return (
            f"{label} updates running statistics from the private batch in training mode, a "
            "leak that clipping does not bound. Construct it with track_running_stats=False "
            "or call .eval() on it"
        )
    if isinstance(module, _FUSED_RECURRENT):
        return (
            f"{label} runs a fused recurrent kernel that torch.func.vmap cannot batch, so its "
            "per-example gradients cannot be computed. Write the recurrence with nn.Linear "
            "layers (h = tanh(W_x x_t + W_h h)), as Opacus's DPLSTM does"
        )
    return None


def check_model(model: nn.Module, params: Any = None) -> None:
    """Raises :class:`UnsupportedModuleError` if ``model`` breaks per-example DP semantics.

    Detected: BatchNorm/SyncBatchNorm in training mode (or without running statistics),
    InstanceNorm that tracks running statistics in training mode, and the fused recurrent
    modules (nn.RNN/LSTM/GRU and their cells), which ``vmap`` cannot batch.  With ``params`` (a dict of
    the parameters being trained, named as in ``model.named_parameters()``) it also checks that
    every name exists, and that every parameter left out is frozen (``requires_grad=False``)
    so no trainable parameter silently stays at its initial value.

    Example:
      >>> import torch, fundp
      >>> fundp.check_model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
      Traceback (most recent call last):
      ...
      fundp.model_check.UnsupportedModuleError: 1 (BatchNorm1d) normalises with statistics ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    problems = [p for p in (_problem(name, m) for name, m in model.named_modules()) if p]
    if problems:
        raise UnsupportedModuleError("; ".join(problems))
    if params is not None:
        if not isinstance(params, dict):
            raise TypeError("params must be a dict named as model.named_parameters()")
        named = dict(model.named_parameters())
        _check_names(params, named, model)
        missing = sorted(n for n, p in named.items() if p.requires_grad and n not in params)
        if missing:
            raise ValueError(
                f"trainable parameters {missing} are not in params: pass them, or freeze them "
                "with .requires_grad_(False) so it is explicit that they are not trained"
            )


def _check_names(params: dict, named: dict, model: nn.Module) -> None:
    known = set(named) | {name for name, _ in model.named_buffers()}
    unknown = [name for name in params if name not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise KeyError(
            f"params has names that are not parameters or buffers of {type(model).__name__}: "
            + ", ".join(hints)
        )


def functional_call(model: nn.Module, params: dict, args: Any, kwargs: dict | None = None) -> Any:
    """``torch.func.functional_call`` that refuses misspelled names and per-example-unsafe modules.

    Every name in ``params`` must be a parameter or buffer of ``model`` (a typo would otherwise
    silently run the module's own tensor).  Parameters left out of ``params`` are used as the
    module holds them, which is how frozen layers work.  ``args`` is a tensor or a tuple.

    Example:
      >>> import torch, fundp
      >>> model = torch.nn.Linear(2, 1)
      >>> params = {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([0.5])}
      >>> fundp.functional_call(model, params, torch.tensor([[1.0, 1.0]]))
      tensor([[3.5000]])
    """
    _check_names(params, dict(model.named_parameters()), model)
    problems = [p for p in (_problem(name, m) for name, m in model.named_modules()) if p]
    if problems:
        raise UnsupportedModuleError("; ".join(problems))
    from fundp.sharding import _has_fsdp, _has_tensor_parallel, fsdp_hooks_suspended, is_sharded, tp_hooks_suspended

    if _has_fsdp(model) or (_has_tensor_parallel(model) and not is_sharded(params)):
        # fundp's sharded step passes the full parameters: FSDP2 must not swap its own in, and
        # tensor parallelism's hooks must not make DTensors of the inputs and outputs.
        from fundp.sharding import gathered_frozen

        with fsdp_hooks_suspended(model), tp_hooks_suspended(model):
            return torch.func.functional_call(model, {**gathered_frozen(model, params), **params}, args, kwargs)
    return torch.func.functional_call(model, params, args, kwargs)
