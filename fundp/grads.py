"""Per-example gradients: ``vmap`` over ``grad``, each example fed to the loss as a batch of one."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import optree
import torch
from torch.func import grad, vmap

from fundp import random as fundp_random
from fundp._validate import check_batch

__all__ = ["per_sample_grads", "per_sample_grads_and_losses", "keyed_model_rng"]

LossFn = Callable[..., Any]


def _as_batch_of_one(example: Any) -> Any:
    return optree.tree_map(lambda leaf: leaf.unsqueeze(0), example)


def _row_of_one(aux: Any) -> Any:
    """The aux of a batch of one, ``[1, ...]`` leaves, as one example's row ``[...]``: ``vmap``
    then stacks the rows into ``[B, ...]``, the shape ``loss_fn`` gives on the whole batch."""

    def row(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0 or leaf.shape[0] != 1:
            raise ValueError(
                "with has_aux=True, aux must be per-example: every tensor leaf [B, ...]; for a "
                f"batch of one it had shape {tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__}"
            )
        return leaf[0]

    return optree.tree_map(row, aux)


def _single_example_loss(loss_fn: LossFn, has_aux: bool) -> Callable:
    """Wraps ``loss_fn(params, batch) -> [B]`` as ``f(params, example) -> (scalar loss, (loss, aux))``."""

    def single(params, example):
        out = loss_fn(params, _as_batch_of_one(example))
        loss, aux = out if has_aux else (out, None)
        if not isinstance(loss, torch.Tensor) or loss.shape != (1,):
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                "loss_fn must return the per-example losses, a tensor of shape [B] "
                f"(e.g. reduction='none'); for a batch of one it returned {shape}"
            )
        loss = loss[0]
        # torch.func's aux may only hold tensors, so the aux slot exists only with has_aux.
        return loss, ((loss.detach(), _row_of_one(aux)) if has_aux else (loss.detach(),))

    return single


def _seed_from_key(key: torch.Tensor) -> int:
    hi, lo = fundp_random.key_data(key)
    return (hi << 32) | lo


@contextlib.contextmanager
def keyed_model_rng(key: torch.Tensor | None, batch: Any, randomness: str) -> Iterator[None]:
    """Runs the body with torch's RNG seeded from ``key`` (``randomness != "error"``), then restores it.

    The model's random ops (dropout) then depend on ``key`` alone, never on the global RNG's state.

    Example:
      >>> import torch, fundp
      >>> from fundp.grads import keyed_model_rng
      >>> key, x = fundp.random.key(0), torch.zeros(2, 3)
      >>> with keyed_model_rng(key, x, "different"):
      ...     a = torch.rand(2)
      >>> with keyed_model_rng(key, x, "different"):
      ...     b = torch.rand(2)
      >>> torch.equal(a, b)
      True
    """
    if randomness == "error":
        yield
        return
    if key is None:
        raise ValueError(
            f"key is required with randomness={randomness!r}: the model's random ops "
            "(e.g. dropout) are driven by the key, never by torch's global RNG"
        )
    devices = [leaf.device for leaf in optree.tree_leaves(batch) if leaf.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices})):
        torch.manual_seed(_seed_from_key(key) & 0x7FFFFFFFFFFFFFFF)
        yield


# What torch.func's errors mean in a model, and what to do: (words of torch's message, fundp's hint).
_VMAP_HINTS = (
    ("doesn't match the broadcast shape",
     "Under torch.func.vmap (per-example gradients) loss_fn wrote a per-example value in place into a tensor "
     "shared by every example. nn.GRU / nn.RNN called without an initial hidden state do this (the zero state "
     "the module creates): pass h0 = x.new_zeros(num_layers * num_directions, batch_size, hidden_size). In your "
     "own code, create the written-to tensor from the input (x.new_zeros(...), torch.zeros_like(x)) or write "
     "out of place"),
    ("autograd.Function with functorch transforms",
     "Per-example gradients by torch.func.vmap (grad_method='vmap', and 'auto' for parameters the ghost path "
     "cannot handle) need every custom torch.autograd.Function written for torch.func (setup_context and "
     "generate_vmap_rule = True). checkpoint(..., use_reentrant=True) is such a Function: with it use "
     "grad_method='ghost' or 'auto' (which follow it), or drop the checkpoint"),
    ("stack expects each tensor to be equal size",
     "Under torch.func.vmap (per-example gradients) loss_fn gave examples results of different shapes: a shape "
     "read from the data (pack_padded_sequence with per-example lengths, x[:n] with n from the batch). Keep "
     "every example's shapes fixed: run the padded batch with a mask, and read an RNN's output at each "
     "example's last position with gather"),
    ("that would mutate a captured Tensor",
     "loss_fn updates a tensor it does not take as input in place (a buffer or counter updated in forward, a "
     "running statistic, BatchNorm in train mode with track_running_stats): per-example gradients need a pure "
     "forward. Update such state outside the step, or put those modules in eval mode"),
    ("don't yet support saved tensor hooks",
     "Per-example gradients by torch.func.vmap (grad_method='vmap', and 'auto' for parameters the ghost path "
     "cannot handle) cannot run saved-tensor hooks such as torch.utils.checkpoint(..., use_reentrant=False): "
     "pass use_reentrant=True with grad_method='ghost' or 'auto', or drop the checkpoint"),
)


def per_sample_grads_and_losses(
    loss_fn: LossFn, *, has_aux: bool = False, randomness: str = "error"
) -> Callable:
    """Like :func:`per_sample_grads`, but ``f`` returns ``(grads, losses[B], aux)``.

    Example:
      >>> import torch
      >>> from fundp.grads import per_sample_grads_and_losses
      >>> w = {"w": torch.tensor([1.0, 2.0])}
      >>> x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
      >>> g, losses, aux = per_sample_grads_and_losses(lambda p, x: x @ p["w"])(w, x)
      >>> g["w"], losses, aux
      (tensor([[1., 0.],
              [0., 3.]]), tensor([1., 6.]), None)
    """
    if randomness not in ("error", "different", "same"):
        raise ValueError(f"randomness must be 'error', 'different' or 'same', got {randomness!r}")
    grad_fn = grad(_single_example_loss(loss_fn, has_aux), has_aux=True)
    batched = vmap(grad_fn, in_dims=(None, 0), randomness=randomness)

    def f(params, batch, key: torch.Tensor | None = None):
        check_batch(batch)
        with keyed_model_rng(key, batch, randomness):
            try:
                grads, extra = batched(params, batch)
            except RuntimeError as error:
                hint = next((hint for words, hint in _VMAP_HINTS if words in str(error)), None)
                if hint is None:
                    raise
                raise RuntimeError(f"{str(error).rstrip('.')}. {hint}") from error
        return grads, extra[0], (extra[1] if has_aux else None)

    return f


def per_sample_grads(loss_fn: LossFn, *, has_aux: bool = False, randomness: str = "error") -> Callable:
    """Transforms a per-example loss into a function returning per-example gradients.

    Args:
      loss_fn: ``loss_fn(params, batch) -> Tensor[B]``, the per-example losses of a batch
        (or ``(losses, aux)`` with ``has_aux=True``).  It is called on batches of one
        example, so it is written exactly like ordinary batched code.
      has_aux: whether ``loss_fn`` also returns auxiliary output, per example: a pytree of
        ``[B, ...]`` tensors, returned as ``[B, ...]`` (the shape ``loss_fn`` gives on the batch).
      randomness: ``vmap`` randomness for random ops inside the model.  ``"error"`` (default)
        refuses them; ``"different"`` gives each example its own dropout mask, drawn from the
        ``key`` argument of the returned function — never from torch's global RNG.

    Returns:
      ``f(params, batch, key=None) -> grads`` where every leaf of ``grads`` has shape
      ``[B, *param.shape]`` and ``grads[i] = d loss_fn(params, batch[i:i+1])[0] / d params``
      (``(grads, aux)`` with ``has_aux=True``).

    Example:
      >>> import torch, fundp
      >>> w = {"w": torch.tensor([1.0, 2.0])}
      >>> x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
      >>> g = fundp.per_sample_grads(lambda p, x: x @ p["w"])(w, x)
      >>> g["w"]
      tensor([[1., 0.],
              [0., 3.]])
    """
    inner = per_sample_grads_and_losses(loss_fn, has_aux=has_aux, randomness=randomness)

    def f(params, batch, key: torch.Tensor | None = None):
        grads, _, aux = inner(params, batch, key)
        return (grads, aux) if has_aux else grads

    return f

