"""Dropout masks drawn per example from the key: a batch, a part of it and one example alone see
the same mask for each example.

With ``randomness="different"`` the ghost engine runs the whole batch in one forward, so torch's
own dropout draws one mask for the whole ``[B, ...]`` tensor from one RNG stream: example ``i``'s
mask then depends on the batch's shape and on the rows before it.  Reruns of a part of the batch
(the per-call consistency check, :mod:`._consistency`) or of one example (the verification's
check 2, :mod:`._verify`) would see other masks and could not be compared.

:class:`KeyedDropout` (a ``TorchFunctionMode``) replaces each dropout call of ``loss_fn`` by a
mask from a counter-based keyed hash: for the ``c``-th dropout call of the run, the row ``j`` of
its input (``[n, ...]``, the examples ``rows[j]`` of the step's batch) and the element ``e`` of
that row (row-major), keep iff ``u >= round(p * 2**32)`` with

  ``s = mix(mix(((rows[j] + k0) & M) ^ c') ^ k1)``, ``a = mix(s ^ A) | 1``,
  ``u = mix'((e * a + s) & M)``

(``k0, k1`` the key's words, ``c' = DOMAIN + c * golden``, ``M = 2**32 - 1``, ``mix`` the
32-bit bijection :func:`~._consistency._mix32`, ``mix'`` the same without its last
``x ^= x >> 16``), so ``P(keep) = 1 - p`` to within ``2**-32``.
The mask depends on (key, ``c``, ``rows[j]``, ``e``) only: not on ``n`` nor on the other rows.
Each row has its own odd multiplier ``a``, so two rows' element streams are never shifted copies
of each other.  The output is torch's: ``x * mask / (1 - p)`` (dropout, ``x * 0`` for ``p = 1``),
``x * mask * a' + alpha * a' * (p - (1 - mask))`` (alpha dropout, SELU's ``alpha``); the channel
dropouts (``dropout1d/2d/3d``, ``feature_alpha_dropout``, ``torch.feature_dropout``) draw one
mask per (row, channel), ``e`` = the channel.  Tensor ops only (12 int64 ops on the mask's
elements, fused by ``torch.compile``; eagerly they are the cost, see benchmarks/RESULTS.md): no host read, no recompilation, no graph break.

Which inputs are keyed.  An input whose first dim is a multiple of ``n = rows.numel()`` is viewed
as ``[n, -1]`` (``[B, T, d]``; GPT-2's ``x.view(-1, d)`` = ``[B * T, d]``; attention weights
``[B, H, T, T]``).  Whether its rows really are the examples in order is known to the ghost
tracer only, which sees every dropout call first (:meth:`~._tracer.Tracer.note_random`): a
sequence-first ``[T, B, d]``, a batch sorted inside ``loss_fn`` or a dropout of parameters is
drawn all the same, but that run is marked *not keyed per example*.

Other random ops (``torch.rand``, ``bernoulli``, ``F.rrelu``, ...; ``scaled_dot_product_attention``
with ``dropout_p > 0`` is run as its math with a keyed dropout of the attention weights) keep
today's behaviour: at the first such op the mode seeds torch's RNG from the key
(:func:`fundp.grads.keyed_model_rng`, restored at exit; a host read of the key, so a graph break
under ``torch.compile``) and marks the run not keyed per example (:attr:`KeyedDropout.unkeyed`).
Under ``torch.compile`` dynamo does not show torch's random functions (``torch.rand``,
``rand_like``, ``bernoulli``, ...) to a ``TorchFunctionMode`` at all (and one traced inside the
engine's ``torch.func.vjp`` fails to compile), so a compiled step runs the engine eagerly, outside
the graph, on each signature's first call, where every random op is seen; only once that run drew
nothing but keyed dropout masks do later calls recompile with the engine in the graph (see
``dispatch`` in :mod:`._engine`); otherwise the engine stays outside the graph, seeded from the key
as above (the same bits as eagerly).  (In the graph no host read is made: a traced run that sees a
dropout the masks do not take leaves the ghost path, ``fallback_reasons``.)  A random op inside another kernel (``nn.LSTM(dropout=...)``) is seen by no mode: it draws from
torch's RNG unseeded (such layers leave the ghost path for ``vmap`` with ``randomness !=
"error"``, whose draws are keyed).  A run not keyed per example keeps the old checks: no
consistency check, verification check 1 only.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fundp._validate import check_batch
from fundp.engines.ghost._consistency import _mix32
from fundp.engines.ghost._index import is_compiling
from fundp.engines.ghost._layout_rules import arg
from fundp.grads import keyed_model_rng

__all__ = ["KeyedDropout", "keyed_randomness", "keep_mask", "ELEMENTWISE", "CHANNELWISE", "ALPHA", "RANDOM", "MORE_RANDOM", "draws", "keyable"]

DOMAIN = 0x4452504B  # "DRPK"
_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_MULTIPLIER_DOMAIN = 0x6D756C74  # "mult"
_SELU_ALPHA = 1.7580993408473766  # torch's alpha dropout: -SELU's scale * alpha

# func -> (position of ``training``, its default).  Element-wise masks:
ELEMENTWISE = {F.dropout: (2, True), F.alpha_dropout: (2, False), torch.dropout: (2, True),
               torch.alpha_dropout: (2, True)}
# One mask per (row, channel): func -> the batched input's dims (None: any >= 2).
CHANNELWISE = {F.dropout1d: 3, F.dropout2d: 4, F.dropout3d: 5, F.feature_alpha_dropout: None,
               torch.feature_dropout: None, torch.feature_alpha_dropout: None}
_CHANNEL_TRAINING = {F.dropout1d: (2, True), F.dropout2d: (2, True), F.dropout3d: (2, True),
                     F.feature_alpha_dropout: (2, False), torch.feature_dropout: (2, True),
                     torch.feature_alpha_dropout: (2, True)}
# Random ops drawn from torch's RNG (not keyed per example: at the first, the RNG is seeded from the key).
RANDOM = {torch.bernoulli, torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
          torch.randint_like, torch.normal, torch.multinomial, torch.randperm, torch.poisson, torch.Tensor.bernoulli_,
          torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.exponential_,
          torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.bernoulli,
          F.rrelu, F.gumbel_softmax}
MORE_RANDOM = {torch.native_dropout, torch.rrelu, torch.rrelu_}  # (not refused by the tracer: eval-mode calls)
ALPHA = {F.alpha_dropout, torch.alpha_dropout, F.feature_alpha_dropout, torch.feature_alpha_dropout}


def draws(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a call of a dropout (:data:`ELEMENTWISE`, :data:`CHANNELWISE`) or of
    ``F.scaled_dot_product_attention`` draws a mask: training, ``p > 0``."""
    if func is F.scaled_dot_product_attention:
        return (arg(args, kwargs, 4, "dropout_p", 0.0) or 0.0) > 0
    position, default = ELEMENTWISE.get(func) or _CHANNEL_TRAINING[func]
    training = arg(args, kwargs, position, "train" if func.__module__ == "torch" else "training", default)
    p = arg(args, kwargs, 1, "p", 0.5)
    return bool(training) and (not isinstance(p, (int, float)) or p > 0)


def keyable(func: Any, x: Any, p: Any, n: int) -> bool:
    """Whether the mode keys a drawing dropout ``func(x, p)`` for ``n`` rows: a floating ``x`` whose
    dim 0 is a multiple of ``n`` (the channel dropouts: ``[n, C, ...]`` with their dims), a number ``p``."""
    if not isinstance(p, (int, float)) or not isinstance(x, torch.Tensor) or n == 0 or x.dim() == 0 \
            or not (x.is_floating_point() or x.is_complex()):
        return False
    if func in CHANNELWISE:
        return x.dim() >= 2 and CHANNELWISE[func] in (None, x.dim()) and x.shape[0] == n
    return x.shape[0] % n == 0


def keep_mask(key: torch.Tensor, call: int, rows: torch.Tensor, width: int, p: float) -> torch.Tensor:
    """``BoolTensor[n, width]``: which elements the ``call``-th dropout of a run keeps, for the
    examples ``rows`` (``[n]``, indices in the step's batch); see the module docstring.

    Example:
      >>> import torch, fundp
      >>> key = fundp.random.key(0)
      >>> both = keep_mask(key, 0, torch.tensor([3, 5]), 4, 0.5)
      >>> torch.equal(both[1], keep_mask(key, 0, torch.tensor([5]), 4, 0.5)[0])  # row 5 alone: same mask
      True
    """
    if width >= 2**31:
        raise ValueError(f"a dropout input with {width} elements per example: keyed masks take at most 2**31 - 1")
    words = key.to(device=rows.device, dtype=torch.int64)
    k0, k1 = words[0], words[1]
    salt = (DOMAIN + call * _GOLDEN) & _MASK32
    seed = _mix32(_mix32(((rows.to(torch.int64) + k0) & _MASK32) ^ salt) ^ k1)  # [n]
    step = _mix32(seed ^ _MULTIPLIER_DOMAIN) | 1  # an odd multiplier per row
    # u = mix((e * a + s) & M), in place (the [n, width] tensor is the cost); mix's last x ^= x >> 16
    # is left out: it keeps the high half that the threshold reads but for ties, and any bijection
    # of uniform words is uniform, so P(keep) is unchanged.
    u = torch.arange(width, dtype=torch.int64, device=rows.device) * step[:, None]  # (< 2**31 * 2**32)
    u.add_(seed[:, None]).bitwise_and_(_MASK32)
    for _ in range(2):
        u.bitwise_xor_(u >> 16).mul_(0x45D9F3B).bitwise_and_(_MASK32)
    return u >= min(round(p * 2**32), 2**32)


def _scaled(x: torch.Tensor, keep: torch.Tensor, p: float, alpha: bool, inplace: bool) -> torch.Tensor:
    """torch's dropout output for the mask ``keep`` (broadcast to ``x``)."""
    if p == 1:
        factor = torch.zeros((), dtype=x.dtype, device=x.device)
        return x.mul_(factor) if inplace else x * factor
    noise = keep.to(x.dtype)
    if not alpha:
        noise = noise * (1.0 / (1.0 - p))
        return x.mul_(noise) if inplace else x * noise
    a = 1.0 / math.sqrt((_SELU_ALPHA**2 * p + 1) * (1 - p))
    shift = (noise - 1) * (_SELU_ALPHA * a) + _SELU_ALPHA * a * p
    return x.mul_(noise * a).add_(shift) if inplace else x * (noise * a) + shift


class KeyedDropout(TorchFunctionMode):
    """``with KeyedDropout(key, rows, batch, randomness):`` runs ``loss_fn`` with per-example keyed
    dropout masks (see the module docstring); ``rows`` (``LongTensor[n]``) are the indices in the
    step's batch of the rows of the batch ``loss_fn`` gets.

    After the run, :attr:`unkeyed` is ``None`` when every random op the mode saw was keyed per
    example, else why not (an op name).
    """

    def __init__(self, key: torch.Tensor, rows: torch.Tensor, batch: Any, randomness: str) -> None:
        super().__init__()
        self.key, self.rows, self.batch, self.randomness = key, rows, batch, randomness
        self.calls = 0
        self.unkeyed: str | None = None
        self._rng: Any = None  # keyed_model_rng, entered at the first op the mode does not key

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ELEMENTWISE or func in CHANNELWISE:
            out = self._dropout(func, args, kwargs)
            if out is not None:
                return out
        elif func is F.scaled_dot_product_attention and draws(func, args, kwargs):
            return self._attention(args, kwargs)
        elif func in RANDOM or func in MORE_RANDOM:
            self._seed_global(func)
        return func(*args, **kwargs)

    def __exit__(self, *exc: Any) -> Any:
        try:
            return super().__exit__(*exc)
        finally:
            if self._rng is not None:
                rng, self._rng = self._rng, None
                rng.__exit__(None, None, None)

    def _seed_global(self, func: Any) -> None:
        """Today's behaviour for a random op not keyed per example: torch's RNG seeded from the key."""
        if self.unkeyed is None:
            self.unkeyed = getattr(func, "__name__", str(func))
        if is_compiling():
            return  # (no host read in a graph: the engine then leaves the ghost path, see fallback_reasons)
        if self._rng is None:
            self._rng = keyed_model_rng(self.key, self.batch, self.randomness)
            self._rng.__enter__()

    def _dropout(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        x = arg(args, kwargs, 0, "input")
        p = arg(args, kwargs, 1, "p", 0.5)
        inplace = bool(arg(args, kwargs, 3, "inplace", False))
        if not isinstance(x, torch.Tensor) or not draws(func, args, kwargs):
            return None  # no randomness (or torch's own error for a bad p)
        if isinstance(p, (int, float)) and not p <= 1:
            return None  # torch's own error
        n = self.rows.numel()
        if not keyable(func, x, p, n):
            self._seed_global(func)
            return None
        call, self.calls = self.calls, self.calls + 1
        if func in CHANNELWISE:
            keep = keep_mask(self.key, call, self.rows.to(x.device), x.shape[1], float(p))
            keep = keep.reshape(tuple(x.shape[:2]) + (1,) * (x.dim() - 2))
        else:
            keep = keep_mask(self.key, call, self.rows.to(x.device), x.numel() // n, float(p)).reshape(x.shape)
        return _scaled(x, keep, float(p), func in ALPHA, inplace)

    def _attention(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """``F.scaled_dot_product_attention`` with ``dropout_p > 0`` as its math, the attention
        weights ``[B, ..., L, S]`` dropped by a keyed mask (torch's reference implementation)."""
        q, k, v = arg(args, kwargs, 0, "query"), arg(args, kwargs, 1, "key"), arg(args, kwargs, 2, "value")
        mask = arg(args, kwargs, 3, "attn_mask")
        p = float(arg(args, kwargs, 4, "dropout_p", 0.0))
        causal = bool(arg(args, kwargs, 5, "is_causal", False))
        scale = arg(args, kwargs, 6, "scale")
        if kwargs.get("enable_gqa", False) and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        weights = q @ k.transpose(-2, -1) * scale
        if causal:
            allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            weights = weights.masked_fill(~allowed, float("-inf"))
        if mask is not None:
            weights = weights.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else weights + mask
        weights = torch.softmax(weights, dim=-1)
        dropped = self._dropout(F.dropout, (weights, p, True), {})  # (inside the mode: called directly)
        return (F.dropout(weights, p, training=True) if dropped is None else dropped) @ v


def keyed_randomness(key: torch.Tensor | None, batch: Any, randomness: str, rows: torch.Tensor | None = None) -> Any:
    """The context in which the ghost engine runs ``loss_fn`` on ``batch``: nothing with
    ``randomness="error"``; else :class:`KeyedDropout` with ``rows`` (default ``arange(B)``: the
    step's whole batch).

    Example:
      >>> import torch, fundp
      >>> x, key = torch.ones(4, 3), fundp.random.key(0)
      >>> with keyed_randomness(key, x, "different") as mode:
      ...     whole = torch.nn.functional.dropout(x, 0.5)
      >>> with keyed_randomness(key, x[2:3], "different", rows=torch.tensor([2])):
      ...     alone = torch.nn.functional.dropout(x[2:3], 0.5)
      >>> torch.equal(whole[2:3], alone), mode.unkeyed
      (True, None)
    """
    if randomness == "error":
        return contextlib.nullcontext()
    if key is None:
        raise ValueError(
            f"key is required with randomness={randomness!r}: the model's random ops "
            "(e.g. dropout) are driven by the key, never by torch's global RNG")
    if rows is None:
        size = check_batch(batch)
        device = next((leaf.device for leaf in optree.tree_leaves(batch) if isinstance(leaf, torch.Tensor)), None)
        rows = torch.arange(size, device=device)
    return KeyedDropout(key, rows, batch, randomness)
