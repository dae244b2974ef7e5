"""The ``"ghost"`` engine: exact per-example norms without per-example gradients, and book-keeping.

One forward and one backward, like non-private training.  During the forward a
:class:`torch.overrides.TorchFunctionMode` watches every torch call made by ``loss_fn``.  Each call
of a supported layer op whose weight or bias is a leaf of ``params`` records the layer input ``A``
and adds a zero *probe* ``z`` to the output.  The backward asks for ``d sum_i L_i / d z`` only:
because examples are independent, row ``i`` of it is example ``i``'s output gradient ``G_i``, and
autograd never forms a weight gradient.  Per layer, with ``A_i: [T, d]``, ``G_i: [T, p]``:

* ``nn.Linear`` (any ``[B, ..., d]`` input): ``g_i = G_i^T A_i``.  Its squared norm is
  ``||a_i||^2 ||g_i||^2`` for ``T = 1``, else either the ghost form
  ``sum_{s,t} (A_i A_i^T)_{st} (G_i G_i^T)_{st}`` (``O(T^2 (p + d))``) or the materialised
  ``||G_i^T A_i||^2`` (``O(T p d)``), whichever is cheaper (ghost if ``2 T^2 <= p d``, the
  mixed ghost norm of Bu et al. 2023).  Bias: ``sum_t G_it``.
* ``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups): per-example weight gradients are
  materialised by the native convolution kernel (``vmap`` over its weight backward, 40-80x faster
  on CPU than unfolding), ``[B, *weight.shape]``; bias ``sum_positions G``.
* ``nn.Embedding``: ``g_i`` scatters the rows of ``G_i`` onto the token ids; its squared norm is
  ``sum_v ||sum_{t: id_t = v} G_it||^2``, computed by sorting the ids (static shapes, no ``T x T`` mask).
* ``nn.LayerNorm`` / ``nn.GroupNorm`` / ``nn.RMSNorm`` affine parameters: per-example gradients
  are small and are materialised (``sum_t G_it * xhat_it`` and ``sum_t G_it``).

A parameter used several times (weight tying, a block applied in a loop) has its per-example
contributions summed *before* the norm: the ``(A, G)`` pairs of all its uses are concatenated along
``T``.  All norms are known before any clipped sum is formed.  The clipped sum is *book-keeping*:
``sum_i c_i g_i = (c ⊙ G)^T A`` per layer from the same ``A`` and ``G`` — no second backward.

Anything else — a parameter read by an op the engine does not know (``x @ p["w"]``,
``nn.MultiheadAttention``'s packed projection, an RNN), a supported op fed a tensor that does not
come from the batch (``F.embedding(torch.arange(T), pos)``: its gradient is summed over the
batch), a parameter never seen — is reported.  ``grad_method="ghost"`` then raises
:class:`GhostUnsupportedError` naming the parameter and the op; ``"auto"`` computes those leaves'
per-example gradients with ``vmap(grad)`` (a mixed plan) and keeps the ghost path for the rest.
:func:`ghost_plan` shows the plan for a model.

Assumptions, as for every per-example-gradient method that runs the batch in one forward (Opacus
hooks, fastDP): examples do not interact (no BatchNorm in training mode — see
:func:`fundp.check_model`), and a batched tensor entering a supported layer has the batch in its
leading dimension.  The tests compare this engine with ``vmap(grad)`` in float64.

``torch.compile``: building the engine sets ``torch._dynamo.config.trace_autograd_ops = True`` (where
that option exists) so the engine's single ``torch.autograd.grad`` is traced into the step's graph
instead of breaking it.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fundp import random as fundp_random
from fundp._validate import check_batch
from fundp.clipping import norm_dtype, scale_rows
from fundp.engines.base import EngineOutput
from fundp.grads import keyed_model_rng, per_sample_grads_and_losses

__all__ = ["GhostUnsupportedError", "make_ghost_engine", "ghost_plan"]


class GhostUnsupportedError(ValueError):
    """A parameter cannot be handled by the ghost engine (``grad_method="ghost"``)."""


# ---------------------------------------------------------------------------------------------
# Per-use records.  A "use" is one call of a supported op on a tracked parameter.


class _LinearUse(NamedTuple):
    activations: torch.Tensor  # A: [B, T, d]
    output_grad: Callable[[torch.Tensor], torch.Tensor]  # raw probe grad -> G: [B, T, p]
    shape: torch.Size  # the weight's shape (G^T A is reshaped to it)


class _EmbeddingUse(NamedTuple):
    ids: torch.Tensor  # [B, T] int64
    output_grad: Callable[[torch.Tensor], torch.Tensor]  # raw probe grad -> G: [B, T, d]
    num_embeddings: int


class _RowsUse(NamedTuple):
    rows: Callable[[torch.Tensor], torch.Tensor]  # raw probe grad -> per-example grads [B, *shape]


class _Call(NamedTuple):
    probe: torch.Tensor
    uses: list  # [(leaf index, _LinearUse | _EmbeddingUse | _RowsUse)]


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _sum_middle(tensor: torch.Tensor, keep_last: int) -> torch.Tensor:
    """Sums ``[B, ..., *last]`` over the dims between the batch and the last ``keep_last`` dims."""
    dims = tuple(range(1, tensor.dim() - keep_last))
    return tensor.sum(dim=dims) if dims else tensor


def _sum_spatial(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``[B, C, *spatial]`` over the spatial dims."""
    dims = tuple(range(2, tensor.dim()))
    return tensor.sum(dim=dims) if dims else tensor


# ---------------------------------------------------------------------------------------------
# Rules: each returns ``(output, uses)`` or ``None`` when the call is not one it can handle.


def _linear_rule(tracer: "_Tracer", func, args, kwargs):
    x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    uses = []
    if not tracer.is_batched(x) or x.dim() < 2:
        return None
    weight_index, bias_index = tracer.index(weight), tracer.index(bias)
    if weight_index is not None:
        flat = x.detach().reshape(x.shape[0], -1, x.shape[-1])
        uses.append((weight_index, _LinearUse(flat, lambda g: g.reshape(g.shape[0], -1, g.shape[-1]), weight.shape)))
    if bias_index is not None:
        uses.append((bias_index, _RowsUse(lambda g: _sum_middle(g, 1))))
    return func(*args, **kwargs), uses


def _conv_weight_rows(inputs, output_grad, weight, stride, padding, dilation, groups):
    """Per-example convolution weight gradients ``[B, *weight.shape]`` by the native kernel.

    ``vmap`` over ``aten.convolution_backward`` (weight gradient only): functorch batches it as one
    grouped convolution.  Measured on CPU it is 40-80x faster than ``F.unfold`` + matmul, so conv
    weights are materialised this way rather than through the unfolded Linear rules.
    """

    def one(example, grad):
        return torch.ops.aten.convolution_backward(
            grad.unsqueeze(0), example.unsqueeze(0), weight, None, stride, padding, dilation, False,
            [0] * len(stride), groups, [False, True, False])[1]

    return torch.vmap(one)(inputs, output_grad.to(inputs.dtype))


def _conv_rule(tracer: "_Tracer", func, args, kwargs):
    x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    stride, padding = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0)
    dilation, groups = _arg(args, kwargs, 5, "dilation", 1), _arg(args, kwargs, 6, "groups", 1)
    spatial = _CONV_DIMS[func]
    if not tracer.is_batched(x) or x.dim() != spatial + 2:
        return None
    expand = lambda v: [v] * spatial if isinstance(v, int) else list(v)  # noqa: E731
    stride, dilation = expand(stride), expand(dilation)
    kernel = list(weight.shape[2:])
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0] * spatial
        else:  # "same": symmetric only (an even receptive field pads one side more)
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            if any(t % 2 for t in total):
                return None
            padding = [t // 2 for t in total]
    padding = expand(padding)
    out = func(*args, **kwargs)
    uses = []
    weight_index, bias_index = tracer.index(weight), tracer.index(bias)
    if weight_index is not None:
        saved, frozen = x.detach(), weight.detach()
        uses.append((weight_index, _RowsUse(
            lambda g: _conv_weight_rows(saved, g, frozen, stride, padding, dilation, groups))))
    if bias_index is not None:
        uses.append((bias_index, _RowsUse(_sum_spatial)))
    return out, uses


def _embedding_rule(tracer: "_Tracer", func, args, kwargs):
    ids, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    padding_idx, max_norm = _arg(args, kwargs, 2, "padding_idx"), _arg(args, kwargs, 3, "max_norm")
    scale_grad_by_freq = _arg(args, kwargs, 5, "scale_grad_by_freq", False)
    weight_index = tracer.index(weight)
    # max_norm renormalises the table in place and scale_grad_by_freq couples examples: not per-example.
    if weight_index is None or not tracer.is_batched(ids) or max_norm is not None or scale_grad_by_freq:
        return None
    flat_ids = ids.reshape(ids.shape[0], -1)
    num_embeddings = weight.shape[0]
    if padding_idx is not None and padding_idx < 0:
        padding_idx += num_embeddings

    def output_grad(g):
        g = g.reshape(g.shape[0], -1, g.shape[-1])
        if padding_idx is None:
            return g
        # The padding row never receives a gradient.
        return torch.where((flat_ids == padding_idx).unsqueeze(-1), torch.zeros_like(g), g)

    return func(*args, **kwargs), [(weight_index, _EmbeddingUse(flat_ids, output_grad, num_embeddings))]


def _norm_rule(tracer: "_Tracer", func, args, kwargs):
    x = _arg(args, kwargs, 0, "input")
    if func is F.group_norm:
        groups, weight, bias, eps = (_arg(args, kwargs, 1, "num_groups"), _arg(args, kwargs, 2, "weight"),
                                     _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5))
        normalize = lambda inp: F.group_norm(inp, groups, None, None, eps)  # noqa: E731
        reduce = _sum_spatial
    else:
        shape = _arg(args, kwargs, 1, "normalized_shape")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if func is F.layer_norm:
            weight, bias, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5)
            normalize = lambda inp: F.layer_norm(inp, shape, None, None, eps)  # noqa: E731
        else:
            weight, bias, eps = _arg(args, kwargs, 2, "weight"), None, _arg(args, kwargs, 3, "eps")
            normalize = lambda inp: F.rms_norm(inp, shape, None, eps)  # noqa: E731
        reduce = lambda t: _sum_middle(t, len(shape))  # noqa: E731
    if not tracer.is_batched(x) or x.dim() < 2:
        return None
    uses = []
    weight_index, bias_index = tracer.index(weight), tracer.index(bias)
    if weight_index is not None:
        saved = x.detach()
        uses.append((weight_index, _RowsUse(lambda g: reduce(g * normalize(saved.to(g.dtype))))))
    if bias_index is not None:
        uses.append((bias_index, _RowsUse(reduce)))
    return func(*args, **kwargs), uses


_CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_RULES: dict = {F.linear: _linear_rule, F.conv1d: _conv_rule, F.conv2d: _conv_rule, F.conv3d: _conv_rule,
                F.embedding: _embedding_rule,
                F.layer_norm: _norm_rule, F.group_norm: _norm_rule}
if hasattr(F, "rms_norm"):
    _RULES[F.rms_norm] = _norm_rule

# Reading a parameter's metadata is not a use of its value.
_METADATA = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.__len__, torch.Tensor.stride,
             torch.Tensor.ndimension, torch.Tensor.is_floating_point, torch.Tensor.is_contiguous, torch.Tensor.element_size,
             torch.Tensor.nelement, torch.Tensor.get_device, torch.Tensor.data_ptr, torch.Tensor.__hash__}

_DROPOUTS = {F.dropout: 2, F.alpha_dropout: 2, F.feature_alpha_dropout: 2, F.dropout1d: 2, F.dropout2d: 2,
             F.dropout3d: 2}
_RANDOM = {torch.bernoulli, torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
           torch.randint_like, torch.normal, torch.multinomial, torch.randperm, torch.poisson, torch.Tensor.bernoulli_,
           torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.exponential_,
           torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.bernoulli,
           F.rrelu, F.gumbel_softmax}


def _tensors_in(values) -> list:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(item for item in value if isinstance(item, torch.Tensor))
    return found


def _func_name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False


class _IdentityIndex:
    """Tensors looked up by identity (``is``), never by value.

    Eagerly a dict ``id -> (position, weakref)``: a lookup is O(1), a tensor that dies is not kept
    alive (the forward's temporaries are freed as usual), and a reused id is caught because its
    weakref no longer points at the tensor.  While ``torch.compile`` traces, a list scanned with
    ``is``: ``id()`` of an input tensor would make dynamo guard on that very object and recompile
    for every new batch.
    """

    def __init__(self, tensors: list):
        self.tensors: list | None = None
        self.by_id: dict | None = None
        if _is_compiling():
            self.tensors = list(tensors)
        else:
            self.by_id = {}
            for position, tensor in enumerate(tensors):
                self.by_id.setdefault(id(tensor), (position, weakref.ref(tensor)))

    def index(self, tensor: torch.Tensor) -> int | None:
        if self.by_id is not None:
            found = self.by_id.get(id(tensor))
            return found[0] if found is not None and found[1]() is tensor else None
        for position, known in enumerate(self.tensors):
            if known is tensor:
                return position
        return None

    def add(self, tensor: torch.Tensor) -> None:
        if self.by_id is not None:
            self.by_id[id(tensor)] = (len(self.by_id), weakref.ref(tensor))
        else:
            self.tensors.append(tensor)


class _Tracer(TorchFunctionMode):
    """Records supported layer calls on tracked parameters; notes every other use of them."""

    def __init__(self, leaves: list, batch_leaves: list, batch_size: int, random_ok: bool):
        super().__init__()
        self.leaves = leaves
        self.params = _IdentityIndex(leaves)
        self.batched = _IdentityIndex(batch_leaves)  # tensors computed from the batch
        self.batch_size = batch_size
        self.random_ok = random_ok
        self.calls: list[_Call] = []
        self.unsupported: dict[int, str] = {}

    def index(self, tensor: Any) -> int | None:
        return self.params.index(tensor) if isinstance(tensor, torch.Tensor) else None

    def is_batched(self, tensor: Any) -> bool:
        return (isinstance(tensor, torch.Tensor) and tensor.dim() >= 1 and tensor.shape[0] == self.batch_size
                and self.batched.index(tensor) is not None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.random_ok:
            self._refuse_random(func, args, kwargs)
        inputs = _tensors_in(args) + _tensors_in(kwargs.values())
        rule = _RULES.get(func)
        handled = rule(self, func, args, kwargs) if rule is not None else None
        if handled is not None:
            out, uses = handled
            if uses:
                # A 0-d leaf expanded to the output's shape: a probe that costs no memory.
                base = torch.zeros((), dtype=out.dtype, device=out.device).requires_grad_()
                probe = base.expand(out.shape)
                out = out + probe
                self.calls.append(_Call(probe, uses))
                used = [self.leaves[i] for i, _ in uses]
                inputs = [t for t in inputs if not any(t is leaf for leaf in used)]
        else:
            out = func(*args, **kwargs)
        if func not in _METADATA and getattr(func, "__name__", "") != "__get__":
            for tensor in inputs:
                index = self.index(tensor)
                if index is not None and index not in self.unsupported:
                    self.unsupported[index] = _func_name(func)
        if any(self.batched.index(t) is not None for t in inputs):
            for tensor in _tensors_in(out if isinstance(out, (list, tuple)) else (out,)):
                self.batched.add(tensor)
        return out

    def _refuse_random(self, func, args, kwargs) -> None:
        random = func in _RANDOM
        if func in _DROPOUTS:
            p, training = _arg(args, kwargs, 1, "p", 0.5), _arg(args, kwargs, _DROPOUTS[func], "training", True)
            random = bool(training) and p > 0
        if random:
            raise RuntimeError(
                f"loss_fn calls the random op {_func_name(func)}: pass randomness='different' (dp_step or "
                "per_sample_grads) so each example's randomness is drawn from the key, or put the model in eval mode"
            )


# ---------------------------------------------------------------------------------------------
# Norms and book-keeping sums per parameter, from all of its uses.


def _linear_sq_norm(activations: torch.Tensor, output_grad: torch.Tensor) -> torch.Tensor:
    """``||G_i^T A_i||_F^2`` per example for ``A: [B, T, d]``, ``G: [B, T, p]``."""
    steps, width, height = activations.shape[1], activations.shape[2], output_grad.shape[2]
    if steps == 1:
        return activations.square().sum(dim=(1, 2)) * output_grad.square().sum(dim=(1, 2))
    if 2 * steps * steps <= width * height:
        gram_a = torch.bmm(activations, activations.transpose(1, 2))
        gram_g = torch.bmm(output_grad, output_grad.transpose(1, 2))
        return (gram_a * gram_g).sum(dim=(1, 2))
    return torch.bmm(output_grad.transpose(1, 2), activations).square().sum(dim=(1, 2))


def _embedding_sq_norm(ids: torch.Tensor, output_grad: torch.Tensor) -> torch.Tensor:
    """``sum_v ||sum_{t: ids_it = v} G_it||^2`` per example, by sorting each row's ids."""
    sorted_ids, order = ids.sort(dim=1)
    grads = output_grad.gather(1, order.unsqueeze(-1).expand_as(output_grad))
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    segment = (starts.cumsum(dim=1) - 1).unsqueeze(-1).expand_as(grads)
    sums = torch.zeros_like(grads).scatter_add_(1, segment, grads)
    return sums.square().sum(dim=(1, 2))


def _keep_rows(factors: torch.Tensor, tensor: torch.Tensor, scale: bool) -> torch.Tensor:
    """``c_i * t_i`` (or ``t_i``) for rows with ``c_i != 0``, exact zeros elsewhere (NaN-safe)."""
    rows = factors.reshape((-1,) + (1,) * (tensor.dim() - 1))
    kept = tensor * rows.to(tensor.dtype) if scale else tensor
    return torch.where(rows != 0, kept, 0.0)


class _LeafGrads:
    """All uses of one parameter after the backward: its ``[B]`` squared norms and weighted sum."""

    def __init__(self, leaf: torch.Tensor, uses: list):
        self.leaf = leaf
        kinds = {type(use) for use, _ in uses}
        if kinds == {_LinearUse}:
            self.kind = "linear"
            self.activations = torch.cat([use.activations for use, _ in uses], dim=1)
            self.output_grad = torch.cat([use.output_grad(g) for use, g in uses], dim=1)
        elif kinds == {_EmbeddingUse}:
            self.kind = "embedding"
            self.ids = torch.cat([use.ids for use, _ in uses], dim=1)
            self.output_grad = torch.cat([use.output_grad(g) for use, g in uses], dim=1)
        else:  # rows, or a mix of kinds (e.g. a tied embedding and output layer): materialise
            self.kind = "rows"
            rows = [_materialise(use, g, leaf) for use, g in uses]
            self.rows = rows[0] if len(rows) == 1 else torch.stack(rows).sum(dim=0)

    def sq_norms(self) -> torch.Tensor:
        dtype = norm_dtype(self.leaf.dtype)
        if self.kind == "linear":
            return _linear_sq_norm(self.activations.to(dtype), self.output_grad.to(dtype))
        if self.kind == "embedding":
            return _embedding_sq_norm(self.ids, self.output_grad.to(dtype))
        return self.rows.to(dtype).square().flatten(1).sum(dim=1)

    def weighted_sum(self, factors: torch.Tensor) -> torch.Tensor:
        dtype = self.leaf.dtype
        if self.kind == "linear":
            grads = _keep_rows(factors, self.output_grad, scale=True).to(dtype)
            inputs = _keep_rows(factors, self.activations, scale=False).to(dtype)
            total = grads.reshape(-1, grads.shape[-1]).T @ inputs.reshape(-1, inputs.shape[-1])
            return total.reshape(self.leaf.shape)
        if self.kind == "embedding":
            grads = _keep_rows(factors, self.output_grad, scale=True).to(dtype)
            table = torch.zeros(self.leaf.shape, dtype=dtype, device=grads.device)
            return table.index_add_(0, self.ids.reshape(-1), grads.reshape(-1, grads.shape[-1]))
        return scale_rows(self.rows, factors).sum(dim=0).to(dtype)


def _materialise(use, raw_grad: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """Per-example gradients ``[B, *leaf.shape]`` of one use."""
    if isinstance(use, _RowsUse):
        return use.rows(raw_grad).reshape((-1,) + tuple(leaf.shape))
    output_grad = use.output_grad(raw_grad)
    if isinstance(use, _LinearUse):
        return torch.bmm(output_grad.transpose(1, 2), use.activations.to(output_grad.dtype)).reshape((-1,) + tuple(leaf.shape))
    rows = torch.zeros((output_grad.shape[0],) + tuple(leaf.shape), dtype=output_grad.dtype, device=output_grad.device)
    index = use.ids.unsqueeze(-1).expand_as(output_grad)
    return rows.scatter_add_(1, index, output_grad)


class _RowsLeaf:
    """A leaf whose per-example gradients come from ``vmap(grad)`` (the mixed plan)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def sq_norms(self) -> torch.Tensor:
        return self.rows.to(norm_dtype(self.rows.dtype)).square().flatten(1).sum(dim=1)

    def weighted_sum(self, factors: torch.Tensor) -> torch.Tensor:
        return scale_rows(self.rows, factors).sum(dim=0)


# ---------------------------------------------------------------------------------------------


def _trace(loss_fn: Callable, params: Any, batch: Any, has_aux: bool, randomness: str, key):
    """Runs ``loss_fn`` under the tracer; returns ``(tracer, losses, aux)``."""
    leaves = optree.tree_leaves(params)
    size = check_batch(batch)
    tracer = _Tracer(leaves, optree.tree_leaves(batch), size, random_ok=randomness != "error")
    # enable_grad: the probes' gradients are needed even when the caller is under torch.no_grad().
    with keyed_model_rng(key, batch, randomness), torch.enable_grad(), tracer:
        out = loss_fn(params, batch)
    losses, aux = out if has_aux else (out, None)
    if not isinstance(losses, torch.Tensor) or losses.shape != (size,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn must return per-example losses of shape [B] = [{size}] (reduction='none'), got {shape}")
    return tracer, losses, aux


def _fallback_reasons(tracer: _Tracer, leaves: list) -> dict:
    """``{leaf index: reason}`` for every leaf the ghost path cannot handle."""
    seen = {index for call in tracer.calls for index, _ in call.uses}
    reasons = {}
    for index in range(len(leaves)):
        if index in tracer.unsupported:
            reasons[index] = f"used by {tracer.unsupported[index]}, which the ghost engine does not support"
        elif index not in seen:
            reasons[index] = "not used by any torch op the engine can see"
    for index, leaf in enumerate(leaves):
        if sum(other is leaf for other in leaves) > 1:
            reasons[index] = "the same tensor appears twice in params"
    return reasons


def _path_names(params: Any) -> list:
    paths = optree.tree_paths(params)
    return ["params" + "".join(f"[{p!r}]" for p in path) for path in paths]


def ghost_plan(loss_fn: Callable, params: Any, batch: Any, *, has_aux: bool = False) -> dict:
    """Returns ``{parameter path: "ghost" | "vmap: <reason>"}``: how ``grad_method="auto"`` handles each leaf.

    Runs one forward of ``loss_fn`` (no backward).

    Example:
      >>> import torch, fundp
      >>> from fundp.engines.ghost import ghost_plan
      >>> model = torch.nn.Linear(3, 2)
      >>> params = dict(model.named_parameters())
      >>> loss_fn = lambda p, b: fundp.functional_call(model, p, (b,)).sum(dim=1)
      >>> ghost_plan(loss_fn, params, torch.ones(4, 3))
      {"params['bias']": 'ghost', "params['weight']": 'ghost'}
    """
    with torch.no_grad():
        tracer, _, _ = _trace(loss_fn, params, batch, has_aux, "different", fundp_random.key(0))
    leaves = optree.tree_leaves(params)
    reasons = _fallback_reasons(tracer, leaves)
    return {name: ("vmap: " + reasons[i] if i in reasons else "ghost") for i, name in enumerate(_path_names(params))}


def _enable_compiled_autograd_grad() -> None:
    # Lets torch.compile trace the engine's torch.autograd.grad instead of breaking the graph there.
    dynamo_config = getattr(getattr(torch, "_dynamo", None), "config", None)
    if dynamo_config is not None and hasattr(dynamo_config, "trace_autograd_ops"):
        dynamo_config.trace_autograd_ops = True


def make_ghost_engine(
    loss_fn: Callable, *, has_aux: bool = False, randomness: str = "error", fallback: bool = False
) -> Callable:
    """Returns ``engine(params, batch, key) -> EngineOutput`` (see :mod:`fundp.engines.base`).

    ``fallback=False`` (``grad_method="ghost"``): a parameter the ghost path cannot handle raises
    :class:`GhostUnsupportedError`.  ``fallback=True`` (``"auto"``): such parameters get their
    per-example gradients from ``vmap(grad)`` (with ``randomness != "error"`` the whole step falls
    back to ``vmap``, so that every part of an example's gradient sees the same dropout mask).
    """
    if randomness not in ("error", "different", "same"):
        raise ValueError(f"randomness must be 'error', 'different' or 'same', got {randomness!r}")
    if randomness == "same":
        if not fallback:
            raise ValueError("grad_method='ghost' runs the batch in one forward and cannot share one random draw "
                             "across examples (randomness='same'): use grad_method='vmap'")
        from fundp.engines.vmap import make_vmap_engine

        return make_vmap_engine(loss_fn, has_aux=has_aux, randomness=randomness)
    _enable_compiled_autograd_grad()

    def engine(params: Any, batch: Any, key: torch.Tensor | None = None) -> EngineOutput:
        leaves, treespec = optree.tree_flatten(params)
        tracer, losses, aux = _trace(loss_fn, params, batch, has_aux, randomness, key)
        reasons = _fallback_reasons(tracer, leaves)
        if reasons and not fallback:
            names = _path_names(params)
            details = "; ".join(f"{names[i]}: {why}" for i, why in sorted(reasons.items()))
            raise GhostUnsupportedError(f"grad_method='ghost' cannot handle {details}. Use grad_method='auto' "
                                        "(vmap for these parameters) or grad_method='vmap'")
        if reasons and randomness != "error":
            from fundp.engines.vmap import make_vmap_engine

            return make_vmap_engine(loss_fn, has_aux=has_aux, randomness=randomness)(params, batch, key)
        calls = tracer.calls
        raw = []
        if calls:
            raw = torch.autograd.grad(losses, [call.probe for call in calls], grad_outputs=torch.ones_like(losses),
                                      allow_unused=True)
            raw = [torch.zeros(c.probe.shape, dtype=c.probe.dtype, device=c.probe.device) if g is None else g
                   for c, g in zip(calls, raw)]
        per_leaf: dict[int, list] = {}
        for call, grad_out in zip(calls, raw):
            for index, use in call.uses:
                if index not in reasons:
                    per_leaf.setdefault(index, []).append((use, grad_out))
        handlers: list[Any] = [None] * len(leaves)
        for index, uses in per_leaf.items():
            handlers[index] = _LeafGrads(leaves[index], uses)
        if reasons:
            rows = _vmap_rows(loss_fn, leaves, treespec, sorted(reasons), batch, has_aux)
            for index, leaf_rows in rows.items():
                handlers[index] = _RowsLeaf(leaf_rows)
        sq_norms = optree.tree_unflatten(treespec, [handler.sq_norms() for handler in handlers])

        def weighted_sum(factors: Any) -> Any:
            factor_leaves = treespec.flatten_up_to(factors)
            return optree.tree_unflatten(
                treespec, [handler.weighted_sum(c) for handler, c in zip(handlers, factor_leaves)]
            )

        aux = optree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux)
        return EngineOutput(sq_norms, losses.detach(), aux, weighted_sum)

    return engine


def _vmap_rows(loss_fn, leaves: list, treespec, indices: list, batch: Any, has_aux: bool) -> dict:
    """Per-example gradients ``[B, *shape]`` of the leaves at ``indices`` by ``vmap(grad)``."""

    def subset_loss(subset, example_batch):
        merged = list(leaves)
        for index, leaf in zip(indices, subset):
            merged[index] = leaf
        return loss_fn(optree.tree_unflatten(treespec, merged), example_batch)

    grads, _, _ = per_sample_grads_and_losses(subset_loss, has_aux=has_aux)([leaves[i] for i in indices], batch)
    return dict(zip(indices, grads))
