"""The tracer: a ``TorchFunctionMode`` that follows rows and parameters through ``loss_fn``.

For every torch call it knows

* which tensors come from the batch, and which of their rows belong to which example
  (:mod:`._layout`); an op that mixes examples raises :class:`ExamplesInteractError` or makes the
  rows untrusted;
* which tensors come from the parameters alone (the parameters, their views, casts, transposes,
  slices, ``expand``-ed copies, position-table lookups): :class:`Derived`;
* which parameter-derived tensors reach a supported layer op (a registered rule records the use
  and adds zero probes) and which reach anything else (reported: that parameter is not handled).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fundp.engines.ghost._index import IdentityMap, is_compiling
from fundp.engines.ghost._layout import (
    UNTRUSTED,
    ExamplesInteractError,
    Layout,
    move_dims,
    reshape_layout,
    standard,
    to_examples,
)
from fundp.engines.ghost._uses import Use

__all__ = ["Tracer", "Derived", "Untrusted", "op_name", "arg"]


class Derived(NamedTuple):
    """A tensor computed from parameters only.

    ``form``: ``"same"`` (the leaf, a cast or contiguous copy of it), ``"T"`` (its 2-D transpose)
    or ``"other"``; ``base``: for an ``expand`` of a smaller tensor, that tensor; ``ids``: for a
    table lookup ``F.embedding(ids, W)`` with ids that are not from the batch, the ids.
    """

    leaves: frozenset
    form: str
    base: Any = None
    ids: Any = None


class Untrusted(NamedTuple):
    """Rows of a batch-derived tensor whose owners the tracer cannot prove (default deny).

    ``mixes``: losses computed from such rows may mix examples, so the whole step leaves the ghost
    path.  Every untrusted tensor mixes until proven otherwise: an op the tracer has no layout rule
    for may move values across the batch (a loss function, a scan, a gather, a reshape that splits
    the batch), and nothing downstream can tell.
    """

    reason: str
    mixes: bool = True


def arg(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def op_name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a property such as Tensor.T / .mT
        return getattr(getattr(func, "__self__", None), "__name__", "__get__")
    if name is None:
        name = str(func)
    return name


def _tensors_in(values: Any) -> list:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(item for item in value if isinstance(item, torch.Tensor))
    return found


def _tensors_out(out: Any) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [item for item in out if isinstance(item, torch.Tensor)]
    return []


def _dims(value: Any, ndim: int) -> Any:
    if value is None:
        return None
    if isinstance(value, int):
        value = [value]
    return [d + ndim if d < 0 else d for d in value]


# Reading metadata is not a use of a value.
_METADATA = {"size", "dim", "numel", "__len__", "stride", "ndimension", "is_floating_point", "is_contiguous",
             "element_size", "nelement", "get_device", "data_ptr", "__hash__", "shape", "dtype", "device",
             "requires_grad", "is_leaf", "grad_fn", "ndim", "layout", "is_cuda", "is_sparse", "names", "__format__",
             "__repr__", "storage_offset", "untyped_storage", "_version", "is_complex", "is_nested", "has_names",
             "__bool__", "__int__", "__float__", "item", "tolist", "is_meta", "is_quantized", "is_mkldnn", "grad",
             "_base", "output_nr", "_cdata", "__index__", "retains_grad", "__reduce_ex__", "__deepcopy__",
             "__array__", "__contains__", "nbytes", "itemsize", "is_inference"}
_CASTS = {"to", "float", "double", "half", "bfloat16", "type", "type_as", "contiguous", "clone", "__get__", "cpu",
          "cuda", "requires_grad_", "as_subclass"}
_TRANSPOSE_2D = {"t", "T", "mT", "H", "mH", "adjoint", "transpose", "swapaxes", "swapdims", "permute"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "ravel", "squeeze", "unsqueeze"}
_EXPANDS = {"expand", "expand_as", "broadcast_to"}
_FLOAT_REDUCTIONS = {"sum", "mean", "nansum", "nanmean", "prod", "std", "var", "std_mean", "var_mean", "norm",
                     "amax", "amin", "logsumexp", "median", "nanmedian", "max", "min", "aminmax", "quantile",
                     "nanquantile", "linalg_vector_norm", "vector_norm", "cumsum", "cumprod", "logcumsumexp",
                     "cummax", "cummin", "softmax", "log_softmax", "softmin", "normalize", "trapz", "trapezoid",
                     "diff"}
_OTHER_REDUCTIONS = {"argmax", "argmin", "all", "any", "count_nonzero", "sort", "argsort", "topk", "kthvalue",
                     "msort", "unique", "unique_consecutive", "mode"}
# Where the ``dim`` argument sits when passed by position.
_DIM_POSITION = {"norm": 2, "normalize": 2, "quantile": 2, "nanquantile": 2, "topk": 2, "kthvalue": 2,
                 "linalg_vector_norm": 2, "vector_norm": 2, "softmax": 1, "log_softmax": 1, "softmin": 1}
_DIM_DEFAULT = {"normalize": 1, "softmax": None, "log_softmax": None, "sort": -1, "argsort": -1, "topk": -1,
                "kthvalue": -1, "msort": 0, "cumsum": None, "logcumsumexp": None}
_BATCH_NORMS = {F.batch_norm}
_ARANGE_VIEWS = {"view", "reshape", "unsqueeze", "__getitem__", "to", "contiguous", "clone", "view_as", "reshape_as"}
# Methods that write into their first argument (a set: dynamo traces membership, not str methods).
_INPLACE = {name for name in dir(torch.Tensor) if name.endswith("_") and not name.startswith("_")} | {
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"} - {"requires_grad_", "share_memory_"}



def _pointwise_names() -> frozenset:
    """Names of torch functions and methods whose aten ops are all elementwise (tagged pointwise).

    Only these (and the explicit extras below) keep the layout of their batch-derived inputs by the
    elementwise rule: default deny, every other op without a layout rule makes its output untrusted.
    """
    candidates = set(dir(torch)) | set(dir(torch.Tensor)) | set(dir(F)) | set(dir(torch.special))
    found = set()
    for name in candidates:
        if name.startswith("_"):
            continue
        packet = getattr(torch.ops.aten, name.rstrip("_"), None)
        try:
            if packet is not None and any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads()):
                found.add(name)
        except (AttributeError, RuntimeError):
            continue
    return frozenset(found - {"max", "min", "equal"})


# Dunder spellings of elementwise operators (reflected and in-place included).
_DUNDER_POINTWISE = {f"__{prefix}{op}__" for op in ("add", "sub", "mul", "truediv", "div", "floordiv", "mod", "pow",
                                                      "and", "or", "xor", "lshift", "rshift")
                     for prefix in ("", "r", "i")} | {
    "__neg__", "__pos__", "__abs__", "__invert__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__"}
# Elementwise in the rows although aten does not tag them so: random masks drawn per element, casts,
# tensors of the same shape whose values do not depend on the data.
_EXTRA_POINTWISE = {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d",
                    "detach", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                    "randint_like", "fill_", "zero_", "copy_", "floor_divide", "floor_divide_", "logsigmoid",
                    "log_sigmoid", "hardswish", "softsign", "tanhshrink", "subtract", "multiply", "divide",
                    "bernoulli", "bernoulli_", "masked_fill", "masked_fill_", "clamp", "clip", "polar", "complex",
                    "real", "imag", "view_as_real", "conj", "resolve_conj", "resolve_neg"}
POINTWISE = _pointwise_names() | _DUNDER_POINTWISE | _EXTRA_POINTWISE | _CASTS
# Loss functions with a layout rule (reduction="none"): the class dim of cross_entropy / nll_loss is 1.
_CLASS_LOSSES = {"cross_entropy", "nll_loss", "multi_margin_loss", "multilabel_margin_loss"}
_ELEMENTWISE_LOSSES = {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
                       "binary_cross_entropy_with_logits", "kl_div", "poisson_nll_loss", "soft_margin_loss",
                       "multilabel_soft_margin_loss"}
# Python values read from a tensor: the computation then depends on the data in ways no layout follows.
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "__array__"}
# In-place writes along a dim given by position 1 (``target.index_add_(dim, index, source)``).
_DIM_WRITES = {"index_add_", "index_copy_", "index_fill_", "index_reduce_", "scatter_", "scatter_add_",
               "scatter_reduce_"}

_BATCHED_MATRIX_OPS = {"cdist", "scaled_dot_product_attention"}
_LAYER_OPS = {"linear", "layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm", "pad",
              "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
              "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
              "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
              "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample",
              "pixel_shuffle", "pixel_unshuffle", "local_response_norm"}
# Ops whose output holds no value of their input (only its shape): not batch data.
_DATA_FREE = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full",
              "rand_like", "randn_like", "randint_like"}
# Recurrent kernels that write each example's state into their initial state ``hx`` (nn.GRU, nn.RNN;
# nn.LSTM's kernel does not): under torch.func.vmap an ``hx`` shared by all examples fails.
_RNN_STATE_OPS = {"gru": "nn.GRU", "rnn_tanh": "nn.RNN", "rnn_relu": "nn.RNN(nonlinearity='relu')"}

_DROPOUTS = {F.dropout: 2, F.alpha_dropout: 2, F.feature_alpha_dropout: 2, F.dropout1d: 2, F.dropout2d: 2,
             F.dropout3d: 2}
_RANDOM = {torch.bernoulli, torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
           torch.randint_like, torch.normal, torch.multinomial, torch.randperm, torch.poisson, torch.Tensor.bernoulli_,
           torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.exponential_,
           torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.bernoulli,
           F.rrelu, F.gumbel_softmax}


def _module_of_caller() -> str:
    """The innermost ``nn.Module`` on the call stack, for error messages."""
    for frame_info in inspect.stack()[2:40]:
        owner = frame_info.frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module):
            return f" in {type(owner).__name__}"
    return ""


class Tracer(TorchFunctionMode):
    """Records supported layer calls on parameter-derived tensors; follows batch rows."""

    def __init__(self, proxies: list, batch_leaves: list, batch_size: int, random_ok: bool, rules: dict,
                 probes: list | None = None, probe_grad: bool = True):
        super().__init__()
        # ``probes``: the probes to add, in order (the primals of a ``torch.func.vjp``: the compiled
        # path), instead of fresh zero leaves; ``probe_grad=False``: plain zero tensors of the full
        # shape, which that ``vjp`` then takes as its primals.
        self.supplied = probes
        self.probe_grad = probe_grad
        self.mismatched = False
        self.proxies = proxies
        self.batch_size = batch_size
        self.random_ok = random_ok
        self.rules = rules
        self.layouts = IdentityMap()  # batch-derived tensor -> Layout | Untrusted
        self.derived = IdentityMap()  # parameter-derived tensor -> Derived
        self.permutations = IdentityMap()  # 1-D index tensors known to be permutations of range(B)
        # arange(B) viewed with B in one dim and size 1 elsewhere ([B, 1, 1, 1]): -> that dim
        self.batch_aranges = IdentityMap()
        self.inverses = IdentityMap()  # permutation -> the permutation it inverts (argsort of it)
        self.flipped = IdentityMap()  # arange(B).flip(0) made by the tracer -> True
        for index, proxy in enumerate(proxies):
            if isinstance(proxy, torch.Tensor):
                self.derived.set(proxy, Derived(frozenset([index]), "same"))
        self.batch_roots = IdentityMap()  # the untracked tensors that batch leaves are views of
        for leaf in batch_leaves:
            self.layouts.set(leaf, standard(batch_size))
            if isinstance(leaf, torch.Tensor) and leaf._base is not None:
                self.batch_roots.set(leaf._base, True)
        self.activations = IdentityMap()  # layer input -> {(layout, keep_last): its [B, T, ...] rows}
        self.batch_shaped = IdentityMap()  # x.new_zeros(...), zeros_like(x) of batch data x -> True
        self.probes: list[torch.Tensor] = []
        self.uses: list[Use] = []
        self.unsupported: dict[int, str] = {}
        self.seen: set = set()
        # Why the computation depends on batch values the layouts cannot follow (a Python number read
        # from the batch), or None: then every call is verified.
        self.data_dependent: str | None = None
        # Whether the engine must run outside torch.compile graphs (a checkpointed block, see dispatch).
        self.eager_only = False

    # ----------------------------------------------------------------------------- queries

    def layout(self, tensor: Any) -> Any:
        """``Layout`` for a batch-derived tensor with trusted rows, ``Untrusted`` or ``None``."""
        return self.layouts.get(tensor)

    def trusted(self, tensor: Any) -> Layout | None:
        found = self.layouts.get(tensor)
        return found if isinstance(found, Layout) else None

    def origin(self, tensor: Any) -> Derived | None:
        found = self.derived.get(tensor)
        if found is None and isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor._base is not None:
            found = self._transposed_view(tensor)
        return found

    def _unseen_view(self, tensor: torch.Tensor) -> None:
        """A view of batch data that reached an op without passing through the mode: under
        torch.compile dynamo does not show Tensor properties (``x.T``, ``x.mT``, ``x.H``).  A full
        reversal or a swap of the last two dims of the base gets the moved layout; any other view is
        untrusted (the parameters it meets go to vmap), never taken for a constant.  (``x.T.T``'s base
        is ``x`` itself: the identity keeps the base's layout.)"""
        base = tensor._base
        if base is None:
            return
        base_layout = self.layouts.get(base)
        if base_layout is None:
            if self.batch_roots.get(base) is None:
                return  # not batch data
            # else a view of the tensor the batch itself views (a dataset slice): its rows are unknown
        elif isinstance(base_layout, Layout):
            n = tensor.dim()
            orders = [list(range(n)), list(range(n))[::-1]] + ([list(range(n - 2)) + [n - 1, n - 2]] if n >= 2 else [])
            for order in orders:
                if _is_permuted_view(tensor, base, order):
                    self.layouts.set(tensor, move_dims(base_layout, n, order))
                    return
        self.layouts.set(tensor, Untrusted("a view of batch data that the tracer did not see being made", mixes=True))

    def _transposed_view(self, tensor: torch.Tensor) -> Derived | None:
        # Under torch.compile dynamo does not show Tensor properties (`W.T`, `W.mT`, `W.H`) to the
        # mode: a view whose base is a tracked 2-D parameter with both dims swapped is its transpose.
        # (Other views of it, slices included, go through the mode; only these properties do not.)
        base = tensor._base
        source = self.derived.get(base)
        if base is None or source is None or source.form not in ("same", "T") or not _is_permuted_view(tensor, base, [1, 0]):
            return None
        record = Derived(source.leaves, "T" if source.form == "same" else "same")
        self.derived.set(tensor, record)
        return record

    def probe(self, tensor: torch.Tensor, shape: Any = None) -> tuple[torch.Tensor, int]:
        """``tensor + z`` with ``z`` a zero probe (a 0-d leaf expanded: no memory); returns its index.

        The gradient of the summed loss with respect to ``z`` is the per-row output gradient.
        """
        shape = tensor.shape if shape is None else shape
        if self.supplied is not None:
            probe = self._supplied_probe(tensor, tuple(shape))
        elif self.probe_grad:
            probe = torch.zeros((), dtype=tensor.dtype, device=tensor.device).requires_grad_().expand(shape)
        else:
            probe = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
        self.probes.append(probe)
        probed = tensor + probe
        layout = self.layouts.get(tensor)
        if layout is not None:
            self.layouts.set(probed, layout)
        return probed, len(self.probes) - 1

    def _supplied_probe(self, tensor: torch.Tensor, shape: tuple) -> torch.Tensor:
        """The next supplied probe; where it does not fit (this run asks for other probes than the run
        that learned them), a plain zero tensor and ``self.mismatched`` set (the caller falls back)."""
        index = len(self.probes)
        supplied = self.supplied or []
        probe = supplied[index] if index < len(supplied) else None
        if probe is None or tuple(probe.shape) != shape or probe.dtype != tensor.dtype:
            self.mismatched = True
            return torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
        return probe

    def saved_rows(self, tensor: torch.Tensor, layout: Layout, keep_last: int = 1) -> Callable[[], torch.Tensor]:
        """Returns ``rows()``: ``to_examples(tensor.detach(), layout, keep_last)``, built on first call.

        Layers that read the same activations (an attention block's q, k and v projections, a gated
        MLP's gate and up projections) get the same rows object, so the norms compute its per-example
        normalisation and Gram matrix once (:class:`fundp.engines.ghost._norms.Shared`).
        """
        detached = tensor.detach()
        cell: list = []

        def rows() -> torch.Tensor:
            if not cell:
                cell.append(to_examples(detached, layout, keep_last))
            return cell[0]

        if layout.order is not None:  # a permuted layout: not shared (keys hold no tensors)
            return rows
        memo = self.activations.get(tensor)
        if memo is None:
            memo = {}
            self.activations.set(tensor, memo)
        return memo.setdefault((layout.dim, layout.group, layout.pos, keep_last), rows)

    def record(self, target: torch.Tensor, resolve: Callable, op: str) -> None:
        self.uses.append(Use(target, resolve, op))
        origin = self.origin(target)
        if origin is not None:
            self.seen.update(origin.leaves)

    def report(self, tensors: list, why: str) -> None:
        for tensor in tensors:
            origin = self.origin(tensor)
            if origin is None:
                continue
            for index in origin.leaves:
                self.unsupported.setdefault(index, why)

    def note_read(self, name: str, tensor: torch.Tensor) -> None:
        """A Python value read from batch data (``int(lengths.max())``, ``if mask.any():``): the
        computation depends on the data in a way no layout follows, so the engine verifies every call."""
        if self.data_dependent is None:
            shown = {"__bool__": "bool()", "__int__": "int()", "__float__": "float()", "__index__": "an index"}.get(
                name, f".{name}()")
            self.data_dependent = f"loss_fn reads a Python value from batch data ({shown}{_module_of_caller()})"

    def interact(self, what: str) -> None:
        raise ExamplesInteractError(
            f"loss_fn mixes examples: {what}{_module_of_caller()}. Per-example gradients (and so DP-SGD's "
            "guarantee) need every example's loss to depend on that example alone: use eval-mode or "
            "GroupNorm/LayerNorm instead of BatchNorm statistics, and reduce only over per-example dims"
        )

    # ----------------------------------------------------------------------------- dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        if name in _METADATA:
            if name in _READS and self.batch_size > 1 and args and self.layouts.get(args[0]) is not None:
                self.note_read(name, args[0])
            return func(*args, **kwargs)
        if not self.random_ok:
            self._refuse_random(func, args, kwargs)
        inputs = _tensors_in(args) + _tensors_in(kwargs.values())
        for tensor in inputs:
            if tensor._base is not None and self.layouts.get(tensor) is None:
                self._unseen_view(tensor)
        batched = [t for t in inputs if self.layouts.get(t) is not None]
        derived = [t for t in inputs if self.origin(t) is not None]
        if batched and self.batch_size > 1:
            self._check_interaction(func, name, args, kwargs, batched)
            self._check_write(name, args, batched)
        if name in _RNN_STATE_OPS:
            self._check_rnn_state(name, args)
        if derived and not torch.is_grad_enabled():
            # A parameter used with grad off inside the traced (grad-on) loss_fn: checkpoint(...,
            # use_reentrant=True) runs its block so, and recomputes it in the backward.  Dynamo would
            # turn that block into one op the tracer cannot look into: the engine stays out of graphs.
            self.eager_only = True
        if derived and not is_compiling() and _in_nonreentrant_checkpoint():
            from fundp.engines.ghost._engine import GhostUnsupportedError  # (the engine imports this module)

            raise GhostUnsupportedError(
                f"a parameter is used by {name} inside torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
                f"{_module_of_caller()}, which recomputes the block during the backward outside the ghost engine's "
                "sight (and torch.func.vmap, which grad_method='auto' and 'vmap' use, does not support it either): "
                "pass use_reentrant=True with grad_method='ghost' or 'auto', or drop the checkpoint")
        rule = self.rules.get(func)
        if rule is not None and (derived or getattr(rule, "always", False)):
            handled = rule(self, func, args, kwargs)
            if handled is not None:
                out = handled
                return out
        if derived and batched:
            from fundp.engines.ghost.broadcast import broadcast_rule

            handled = broadcast_rule(self, func, name, args, kwargs)
            if handled is not None:
                return handled
            lost = [self.layouts.get(t) for t in batched if isinstance(self.layouts.get(t), Untrusted)]
            if lost:
                self.report(derived, f"used by {name} on rows that are not the examples in order ({lost[0].reason})")
            else:
                shown = f"einsum({args[0]!r})" if name == "einsum" and args and isinstance(args[0], str) else name
                self.report(derived, f"used by {shown}, which the ghost engine has no rule for")
            out = func(*args, **kwargs)
            self.propagate(func, name, args, kwargs, out)
            return out
        out = func(*args, **kwargs)
        if derived:
            self._derive(func, name, args, kwargs, out, derived)
        elif batched:
            self.propagate(func, name, args, kwargs, out)
            if name in _DATA_FREE:
                for tensor in _tensors_out(out):
                    self.batch_shaped.set(tensor, True)
        if name in ("argsort", "randperm") or (name == "sort" and isinstance(out, tuple)):
            indices = out[1] if name == "sort" else out
            if isinstance(indices, torch.Tensor) and indices.dim() == 1 and indices.shape[0] == self.batch_size:
                self.permutations.set(indices, True)
                if name == "argsort" and self.permutations.get(args[0]) is not None:
                    self.inverses.set(indices, args[0])
        if name == "arange" and isinstance(out, torch.Tensor) and out.dim() == 1 and out.shape[0] == self.batch_size \
                and len(args) <= 1 and not kwargs.get("start") and kwargs.get("step", 1) == 1:
            self.permutations.set(out, True)
            self.batch_aranges.set(out, 0)
        elif args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor) \
                and self.batch_aranges.get(args[0]) is not None and name in _ARANGE_VIEWS:
            sizes = list(out.shape)
            if sizes.count(self.batch_size) == 1 and all(size in (1, self.batch_size) for size in sizes):
                self.batch_aranges.set(out, sizes.index(self.batch_size))
        return out

    def _refuse_random(self, func, args, kwargs) -> None:
        random = func in _RANDOM
        if func in _DROPOUTS:
            p, training = arg(args, kwargs, 1, "p", 0.5), arg(args, kwargs, _DROPOUTS[func], "training", True)
            random = bool(training) and p > 0
        if func is F.scaled_dot_product_attention:
            random = (arg(args, kwargs, 4, "dropout_p", 0.0) or 0.0) > 0
        if random:
            raise RuntimeError(
                f"loss_fn calls the random op {op_name(func)}: pass randomness='different' (dp_step or "
                "per_sample_grads) so each example's randomness is drawn from the key, or put the model in eval mode"
            )

    def _check_rnn_state(self, name: str, args) -> None:
        """``torch.gru(input, hx, ...)`` (and ``rnn_tanh``, ``rnn_relu``) with an ``hx`` not made from the
        batch, e.g. the zeros ``nn.GRU`` creates when called without one: per-example gradients of these
        layers come from ``vmap`` (``"auto"``, ``"vmap"``), where PyTorch's kernel fails writing an
        example's state into that shared tensor."""
        hx = args[1] if len(args) > 1 else None  # (a packed sequence, (data, batch_sizes, hx, ...), fails vmap anyway)
        if not isinstance(hx, torch.Tensor) or not hx.is_floating_point() or self.layouts.get(hx) is not None \
                or self.batch_shaped.get(hx) is not None:
            return
        from fundp.engines.ghost._engine import GhostUnsupportedError  # (the engine imports this module)

        raise GhostUnsupportedError(
            f"{_RNN_STATE_OPS[name]} is called without an initial hidden state made from the "
            "batch: its per-example gradients come from torch.func.vmap (grad_method='auto' or 'vmap'), where "
            "PyTorch's kernel cannot write each example's state into the zero state the module creates. Pass one "
            "made from the input: h0 = x.new_zeros(num_layers * num_directions, batch_size, hidden_size); "
            "out, h = rnn(x, h0)")

    # ----------------------------------------------------------------------------- parameters

    def _derive(self, func, name: str, args, kwargs, out, derived: list) -> None:
        leaves = frozenset().union(*(self.derived.get(t).leaves for t in derived))
        outs = _tensors_out(out)
        if name == "detach" or not outs:
            return
        source = self.derived.get(args[0]) if args and isinstance(args[0], torch.Tensor) else None
        for tensor in outs:
            if not (tensor.is_floating_point() or tensor.is_complex()):
                continue
            record = Derived(leaves, "other")
            if source is not None and len(derived) == 1:
                if name in _CASTS and tensor.shape == args[0].shape:
                    record = source
                elif name in _TRANSPOSE_2D and args[0].dim() == 2 and source.form in ("same", "T"):
                    record = Derived(leaves, "T" if source.form == "same" else "same")
                elif name in _EXPANDS or (name == "repeat" and _repeat_is_expand(args)):
                    record = Derived(leaves, "other", base=args[0])
            if func is F.embedding and len(derived) == 1:
                ids = arg(args, kwargs, 0, "input")
                weight = arg(args, kwargs, 1, "weight")
                origin = self.derived.get(weight)
                if origin is not None and origin.form == "same" and self.derived.get(ids) is None:
                    record = Derived(leaves, "other", ids=(ids, arg(args, kwargs, 2, "padding_idx"), weight))
            self.derived.set(tensor, record)

    # ----------------------------------------------------------------------------- rows

    def set_layout(self, tensor: torch.Tensor, layout: Any) -> None:
        if layout is not None:
            self.layouts.set(tensor, layout)

    def propagate(self, func, name: str, args, kwargs, out) -> None:
        """Sets the layout of ``out`` from the layouts of the batched inputs."""
        outs = _tensors_out(out)
        if not outs:
            return
        if self.batch_size == 1:
            for tensor in outs:
                self.layouts.set(tensor, standard(1))
            return
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        first_layout = self.layouts.get(first) if first is not None else None
        for tensor in outs:
            self.layouts.set(tensor, self._layout_after(func, name, args, kwargs, first, first_layout, tensor))

    def _layout_after(self, func, name, args, kwargs, first, layout, out) -> Any:
        tracked = [t for t in _tensors_in(args) + _tensors_in(kwargs.values()) if self.layouts.get(t) is not None]
        untrusted = [self.layouts.get(t) for t in tracked
                     if isinstance(self.layouts.get(t), Untrusted) and self.permutations.get(t) is None]
        if untrusted:
            return next((u for u in untrusted if u.mixes), untrusted[0])
        inputs = [t for t in tracked if isinstance(self.layouts.get(t), Layout)]
        if name in _DATA_FREE:
            return None  # the values do not come from the batch
        if name in ("index_add", "index_copy", "index_add_", "index_copy_"):
            return self._unsort_layout(name, args, kwargs)
        if isinstance(layout, Layout):
            ndim = first.dim()
            if name in ("embedding", "one_hot") and first is args[0]:
                return layout  # trailing feature dims appended: the ids' dims keep their places
            if name in _RESHAPES:
                found = reshape_layout(layout, tuple(first.shape), tuple(out.shape))
                return Untrusted(f"{name} splits the batch dimension") if found == UNTRUSTED else found
            if name in ("t", "T", "mT", "H", "mH", "adjoint", "transpose", "swapaxes", "swapdims"):
                if name in ("transpose", "swapaxes", "swapdims"):
                    a, b = _dims([arg(args, kwargs, 1, "dim0")], ndim)[0], _dims([arg(args, kwargs, 2, "dim1")], ndim)[0]
                else:
                    a, b = (0, 1) if ndim < 2 or name in ("t", "T") and ndim == 2 else (ndim - 2, ndim - 1)
                    if name == "T" and ndim > 2:
                        return move_dims(layout, ndim, list(range(ndim))[::-1])
                permutation = list(range(ndim))
                permutation[a], permutation[b] = permutation[b], permutation[a]
                return move_dims(layout, ndim, permutation)
            if name == "permute":
                dims = args[1:] if len(args) > 2 or not isinstance(arg(args, kwargs, 1, "dims"), (list, tuple)) else arg(args, kwargs, 1, "dims")
                return move_dims(layout, ndim, list(dims))
            if name in ("movedim", "moveaxis"):
                source = _dims(arg(args, kwargs, 1, "source"), ndim)
                destination = _dims(arg(args, kwargs, 2, "destination"), ndim)
                order = [d for d in range(ndim) if d not in source]
                slots: list[Any] = [None] * ndim
                for s, d in zip(source, destination):
                    slots[d] = s
                rest = iter(order)
                return move_dims(layout, ndim, [p if p is not None else next(rest) for p in slots])
            if name in _EXPANDS or name == "repeat":
                offset = out.dim() - ndim
                if out.shape[layout.dim + offset] != first.shape[layout.dim]:
                    return Untrusted(f"{name} repeats the batch dimension", mixes=True)
                return layout._replace(dim=layout.dim + offset)
            if name == "__getitem__":
                return self._index_layout(layout, first, args[1], out)
            if name in ("select", "narrow", "split", "chunk", "unbind", "tensor_split", "split_with_sizes"):
                default = 0
                dim = arg(args, kwargs, 2 if name in ("split", "chunk", "tensor_split", "split_with_sizes") else 1, "dim", default)
                dim = _dims(dim, ndim)[0]
                if dim == layout.dim:
                    return Untrusted(f"{name} takes part of the batch", mixes=True)
                if name in ("select", "unbind") and dim < layout.dim:
                    return layout._replace(dim=layout.dim - 1)
                return layout
            if name in _FLOAT_REDUCTIONS or name in _OTHER_REDUCTIONS:
                dims, _ = _reduction_dims(name, args, kwargs, first)
                if dims is None or layout.dim in dims:
                    return Untrusted(f"{name} over the batch dimension", mixes=True)
                if out.dim() == ndim:
                    return layout
                return layout._replace(dim=layout.dim - sum(1 for d in dims if d < layout.dim))
            if name in ("flip", "roll", "index_select", "fliplr", "flipud"):
                return self._reorder_layout(name, layout, first, args, kwargs, out)
            if name in ("gather", "take_along_dim", "scatter", "scatter_add", "index_add", "index_copy", "index_fill",
                        "scatter_reduce", "index_put", "put", "take", "masked_select", "nonzero", "diagonal", "diag",
                        "tril", "triu"):
                dim = _dims(arg(args, kwargs, 1, "dim", 0), ndim)[0] if name not in ("take", "put", "masked_select", "nonzero", "diagonal", "diag", "tril", "triu") else None
                if dim is None or dim == layout.dim:
                    if name in ("tril", "triu", "diagonal") and layout.dim < ndim - 2:
                        return layout
                    return Untrusted(f"{name} moves values across the batch", mixes=True)
        if name in ("cat", "concat", "concatenate", "stack"):
            tensors = arg(args, kwargs, 0, "tensors")
            dim = arg(args, kwargs, 1, "dim", 0)
            return self._cat_layout(name, tensors, dim, out)
        if name in ("matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm"):
            return self._matmul_layout(name, args, kwargs, out)
        if name == "einsum":
            return self._einsum_layout(args, out)
        if name in _CLASS_LOSSES or name in _ELEMENTWISE_LOSSES:
            return self._loss_layout(name, args, kwargs, inputs, out)
        if name in _BATCHED_MATRIX_OPS:
            return self._batched_matrix_layout(name, inputs, out)
        if name in _LAYER_OPS and isinstance(layout, Layout) and len(inputs) == 1:
            return self._layer_layout(name, args, kwargs, layout, first, out)
        if name == "bilinear" and isinstance(out, torch.Tensor):
            # x1 [.., n1], x2 [.., n2] -> [.., out]: the last dims are contracted, the leading ones kept.
            layouts = [self.layouts.get(t) for t in inputs]
            if inputs and all(t.dim() == out.dim() and lay.dim < t.dim() - 1 and _same_rows(lay, layouts[0])
                              for t, lay in zip(inputs, layouts)):
                return layouts[0]
            return Untrusted("bilinear works across the batch dimension")
        if name in POINTWISE:
            return self._elementwise_layout(inputs, out, name)
        # Default deny: an op without a layout rule may move values across the batch.
        return Untrusted(f"{name} has no layout rule, so the rows of its output may mix examples")

    def _permuted_rows(self, target: torch.Tensor, index: Any, source: Any) -> Any:
        """The layout of ``target`` (which held no batch data) after its rows ``index[r]`` receive
        ``source``'s rows ``r`` along dim 0, for a known permutation ``index`` (the unsort idiom), or None."""
        layout = self.trusted(source)
        if self.layouts.get(target) is not None or layout is None or self.permutations.get(index) is None:
            return None
        if layout.dim != 0 or len(layout.group) != 1 or source.dim() != target.dim() \
                or not (index.dim() == 1 and index.shape[0] == self.batch_size == target.shape[0] == source.shape[0]):
            return None
        inverse = index.argsort()
        self.inverses.set(inverse, index)
        # Row j of the target is source row argsort(index)[j], i.e. example order[argsort(index)[j]].
        return layout._replace(order=self._compose(layout.order, inverse))

    def _unsort_layout(self, name, args, kwargs) -> Any:
        target, dim = args[0], arg(args, kwargs, 1, "dim")
        index, source = arg(args, kwargs, 2, "index"), arg(args, kwargs, 3, "source")
        if isinstance(dim, int) and _dims(dim, target.dim())[0] == 0:
            found = self._permuted_rows(target, index, source)
            if found is not None:
                return found
        return Untrusted(f"{name} writes rows in an order the tracer does not follow")

    def _loss_layout(self, name, args, kwargs, inputs, out) -> Any:
        """Per-example losses (``reduction="none"``) keep the rows; any other reduction mixes them."""
        reduction = arg(args, kwargs, {"kl_div": 5, "poisson_nll_loss": 7}.get(name, 4 if name in (
            "cross_entropy", "nll_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits") else 3),
            "reduction", "mean")
        if name == "huber_loss" or name == "smooth_l1_loss":
            reduction = kwargs.get("reduction", args[3] if len(args) > 3 and isinstance(args[3], str) else "mean")
        if reduction != "none" or not isinstance(out, torch.Tensor):
            return Untrusted(f"{name} with reduction={reduction!r} reduces over the batch")
        if name in _CLASS_LOSSES:
            scores = arg(args, kwargs, 0, "input")
            layout = self.layouts.get(scores)
            if isinstance(layout, Layout) and (scores.dim() < 2 or layout.dim == 1):
                return Untrusted(f"{name} normalises over the batch dimension (its class dim)")
            # [N, C, d1, ...] -> [N, d1, ...]: the class dim goes; every input aligns with the output.
            found = None
            for tensor in inputs:
                layout = self.layouts.get(tensor)
                dim = layout.dim
                if tensor is scores and scores.dim() >= 2:
                    dim = dim if dim == 0 else dim - 1
                elif tensor is not scores and (tensor.dim() != out.dim() or tensor.shape[dim] != out.shape[dim]):
                    return Untrusted(f"{name}: the {'weights' if tensor.dim() == 1 else 'target'} do not align with the rows")
                candidate = layout._replace(dim=dim)
                if found is not None and not _same_rows(found, candidate):
                    return Untrusted(f"{name} combines rows of different examples")
                found = candidate
            return found
        return self._elementwise_layout(inputs, out, name)

    def _layer_layout(self, name, args, kwargs, layout, first, out) -> Any:
        """A layer op whose only batch-derived input is its first (frozen weights, or none): ``linear``
        and ``bilinear`` contract the last dim; the norms normalise over trailing dims (checked for
        interaction before the call); the channel-first ops (conv, pooling, resizing) need the batch
        leading; ``pad`` pads trailing dims."""
        ndim = first.dim()
        if name in ("linear", "layer_norm", "rms_norm", "batch_norm"):
            keep = layout.dim < ndim - 1 or name == "batch_norm"
        elif name == "pad":
            pad = arg(args, kwargs, 1, "pad")
            keep = layout.dim < ndim - len(pad) // 2
        else:  # channel-first ops: [N, C, *spatial]
            keep = layout.dim == 0 and ndim >= 3
        if keep and isinstance(out, torch.Tensor) and out.dim() == ndim and out.shape[layout.dim] == first.shape[layout.dim]:
            return layout
        return Untrusted(f"{name} works across the batch dimension")

    def _batched_matrix_layout(self, name, inputs, out) -> Any:
        """``cdist`` and friends: the leading dims are batch dims, the last two are per-matrix."""
        for tensor in inputs:
            if self.layouts.get(tensor).dim >= tensor.dim() - 2:
                return Untrusted(f"{name} combines rows of the batch dimension")
        return self._elementwise_layout(inputs, out, name)

    def _elementwise_layout(self, inputs: list, out: torch.Tensor, name: str) -> Any:
        found = None
        for tensor in inputs:
            layout = self.layouts.get(tensor)
            aligned = layout.dim + (out.dim() - tensor.dim())
            if aligned < 0 or aligned >= out.dim() or out.shape[aligned] != tensor.shape[layout.dim]:
                # Ops that append trailing dims (an embedding lookup, one_hot) keep the leading ones.
                if out.dim() > tensor.dim() and tuple(out.shape[:tensor.dim()]) == tuple(tensor.shape):
                    aligned = layout.dim
                else:
                    return Untrusted(f"{name} changes the batch dimension")
            candidate = layout._replace(dim=aligned)
            if found is None:
                found = candidate
            elif found.dim != candidate.dim or found.group != candidate.group or found.order is not candidate.order:
                return Untrusted(f"{name} combines rows of different examples")
        return found

    def _index_layout(self, layout: Layout, tensor: torch.Tensor, index: Any, out: torch.Tensor) -> Any:
        items = list(index) if isinstance(index, tuple) else [index]
        # Expand the Ellipsis to full slices.
        consumed = sum(1 for item in items if item is not None and item is not Ellipsis and not (
            isinstance(item, torch.Tensor) and item.dtype == torch.bool and item.dim() > 1))
        expanded = []
        for item in items:
            if item is Ellipsis:
                expanded.extend([slice(None)] * (tensor.dim() - consumed))
            else:
                expanded.append(item)
        out_dim, in_dim = 0, 0
        advanced = False
        for item in expanded:
            if item is None:
                out_dim += 1
                continue
            if in_dim == layout.dim:
                if isinstance(item, slice) and item == slice(None):
                    return layout._replace(dim=out_dim) if not advanced else Untrusted("advanced indexing moves the batch")
                if isinstance(item, torch.Tensor) and item.dim() == 1 and item.dtype != torch.bool \
                        and self.permutations.get(item) is not None:
                    position = self._advanced_position(expanded)
                    if position is None:
                        return Untrusted("advanced indexing moves the batch")
                    order = self._compose(layout.order, item)
                    return layout._replace(dim=position, order=order)
                if isinstance(item, torch.Tensor) and self.batch_aranges.get(item) is not None and layout.order is None:
                    position = self._broadcast_arange_position(expanded, item)
                    if position is not None:
                        return layout._replace(dim=position)
                if isinstance(item, slice) and item.step in (None, 1) and (item.start in (None, 0)) and \
                        (item.stop is None or (isinstance(item.stop, int) and item.stop >= tensor.shape[in_dim])):
                    return layout._replace(dim=out_dim)
                return Untrusted("indexing takes a subset or a reordering of the batch", mixes=True)
            if isinstance(item, int):
                in_dim += 1
                continue
            if isinstance(item, torch.Tensor):
                advanced = True
            in_dim += 1
            out_dim += 1
        if in_dim <= layout.dim:
            return layout._replace(dim=out_dim + (layout.dim - in_dim)) if not advanced else Untrusted("advanced indexing moves the batch")
        return Untrusted("indexing moves the batch")

    def _advanced_position(self, items: list) -> int | None:
        """Where the rows land for ``x[..., perm, idx, ...]`` (numpy's advanced-indexing rule), or None.

        Every other tensor index must be 1-D of the batch size or 0-d (paired row by row with the
        permutation, e.g. ``logits[arange(B), lengths]``); the advanced block stays in place when
        its items are adjacent and goes first otherwise.
        """
        advanced = []
        for position, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                if item.dtype == torch.bool or item.dim() > 1 or (item.dim() == 1 and item.shape[0] != self.batch_size):
                    return None
                advanced.append(position)
            elif isinstance(item, int):
                advanced.append(position)
            elif not (item is None or isinstance(item, slice)):
                return None
        if advanced != list(range(advanced[0], advanced[-1] + 1)):
            return 0
        return sum(1 for item in items[: advanced[0]] if item is None or isinstance(item, slice))

    def _broadcast_arange_position(self, items: list, batch_index: torch.Tensor) -> int | None:
        """Where the rows land for ``x[arange(B).view(B, 1, 1, 1), j]`` (broadcast index tensors), or None.

        The other tensor indices must have size 1 where ``batch_index`` has the batch, so that
        result row ``i`` along that dim reads row ``i`` of ``x`` (HuggingFace's padding masks).
        """
        tensors = [item for item in items if isinstance(item, torch.Tensor)]
        if any(t.dtype == torch.bool for t in tensors) or any(
                not (item is None or isinstance(item, (slice, torch.Tensor))) for item in items):
            return None
        rank = max(t.dim() for t in tensors)
        axis = self.batch_aranges.get(batch_index) + rank - batch_index.dim()
        for t in tensors:
            if t is batch_index:
                continue
            local = axis - (rank - t.dim())
            if 0 <= local < t.dim() and t.shape[local] != 1:
                return None
        positions = [i for i, item in enumerate(items) if isinstance(item, torch.Tensor)]
        if positions != list(range(positions[0], positions[-1] + 1)):
            return axis
        return sum(1 for item in items[: positions[0]] if item is None or isinstance(item, slice)) + axis

    def _reorder_layout(self, name, layout, tensor, args, kwargs, out) -> Any:
        ndim = tensor.dim()
        dims: Any
        if name == "fliplr":
            dims = [1]
        elif name == "flipud":
            dims = [0]
        elif name == "flip":
            dims = _dims(arg(args, kwargs, 1, "dims"), ndim) if len(args) <= 2 else _dims(list(args[1:]), ndim)
        elif name == "roll":
            dims = _dims(arg(args, kwargs, 2, "dims"), ndim)
        else:
            dims = _dims(arg(args, kwargs, 1, "dim"), ndim)
        if dims is None or layout.dim in dims:
            if len(layout.group) != 1 or (name == "roll" and (dims is None or len(dims) != 1)):
                return Untrusted(f"{name} reorders the batch", mixes=True)
            if name in ("flip", "fliplr", "flipud"):
                if layout.order is not None and self.flipped.get(layout.order) is not None:
                    return layout._replace(order=None)  # flipped twice: the examples in order
                flipped = (layout.order if layout.order is not None else torch.arange(self.batch_size, device=tensor.device)).flip(0)
                if layout.order is None:
                    self.flipped.set(flipped, True)
                return layout._replace(order=flipped)
            current = layout.order if layout.order is not None else torch.arange(self.batch_size, device=tensor.device)
            if name == "roll":
                return layout._replace(order=current.roll(arg(args, kwargs, 1, "shifts"), 0))
            index = arg(args, kwargs, 2, "index")
            if self.permutations.get(index) is None:
                return Untrusted("index_select picks rows of the batch by an index not known to be a permutation", mixes=True)
            return layout._replace(order=self._compose(layout.order, index))
        return layout

    def _compose(self, order: Any, index: torch.Tensor) -> Any:
        """The order of rows ``index`` of a tensor whose rows are in ``order``: ``order[index]``, with
        ``None`` for the identity (a permutation followed by its inverse, ``h[perm][perm.argsort()]``)."""
        if self.batch_aranges.get(index) == 0 and index.dim() == 1:
            return order  # arange(B): the rows stay where they are
        if order is None:
            return index
        if self.inverses.get(index) is order or self.inverses.get(order) is index:
            return None
        return order.index_select(0, index)

    def _cat_layout(self, name, tensors, dim, out) -> Any:
        found = None
        for tensor in tensors:
            layout = self.layouts.get(tensor)
            if layout is None:
                continue
            ndim = tensor.dim()
            cat_dim = _dims(dim, out.dim() if name == "stack" else ndim)[0]
            if name == "stack":
                candidate = layout._replace(dim=layout.dim + (1 if cat_dim <= layout.dim else 0))
            else:
                if cat_dim == layout.dim:
                    return Untrusted("cat joins along the batch dimension", mixes=True)
                candidate = layout
            if found is None:
                found = candidate
            elif found.dim != candidate.dim or found.group != candidate.group or found.order is not candidate.order:
                return Untrusted(f"{name} combines rows of different examples")
        return found

    def _matmul_layout(self, name, args, kwargs, out) -> Any:
        if name in ("addmm", "baddbmm", "addbmm"):
            a, b, extra = args[1], args[2], args[0]
        elif name == "__rmatmul__":
            a, b, extra = args[1], args[0], None
        else:
            a, b, extra = args[0], args[1], None
        found = []
        for tensor, side in ((a, "left"), (b, "right")):
            layout = self.layouts.get(tensor)
            if not isinstance(layout, Layout):
                continue
            ndim = tensor.dim()
            if ndim == 1:
                self.interact(f"{name} contracts over the batch")
            contracted = ndim - 1 if side == "left" else ndim - 2
            if layout.dim == contracted:
                self.interact(f"{name} contracts over the batch dimension")
            other = b if side == "left" else a
            if isinstance(other, torch.Tensor) and other.dim() == 1:  # a matrix-vector product drops one dim
                found.append(layout if side == "left" or layout.dim < ndim - 2 else layout._replace(dim=out.dim() - 1))
            elif side == "left" and layout.dim == ndim - 2:
                found.append(layout._replace(dim=out.dim() - 2))
            elif side == "right" and layout.dim == ndim - 1:
                found.append(layout._replace(dim=out.dim() - 1))
            else:
                found.append(layout._replace(dim=layout.dim + out.dim() - ndim))
        if isinstance(self.layouts.get(extra), Layout):
            layout = self.layouts.get(extra)
            found.append(layout._replace(dim=layout.dim + out.dim() - extra.dim()))
        if not found:
            return None
        first = found[0]
        for other in found[1:]:
            if other.dim != first.dim or other.group != first.group or other.order is not first.order:
                self.interact(f"{name} combines rows of different examples")
        return first

    def _einsum_layout(self, args, out) -> Any:
        equation = args[0]
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        if "..." in equation or "->" not in equation:
            return Untrusted(f"einsum({equation!r}) with '...' or an implicit output, whose batch dim the tracer does "
                             "not follow; spell every dim out, e.g. 'bti,ij->btj'")
        inputs, output = equation.replace(" ", "").split("->")
        found = None
        for subscripts, tensor in zip(inputs.split(","), operands):
            layout = self.layouts.get(tensor)
            if not isinstance(layout, Layout):
                continue
            letter = subscripts[layout.dim]
            if letter not in output:
                self.interact("einsum sums over the batch dimension")
            candidate = layout._replace(dim=output.index(letter))
            if found is not None and (found.dim != candidate.dim or found.order is not candidate.order):
                self.interact("einsum combines rows of different examples")
            found = candidate
        return found

    # ----------------------------------------------------------------------------- interaction

    def _check_write(self, name: str, args, batched: list) -> None:
        """An in-place write that involves batch data.

        Into a tensor with no room for per-example rows (a buffer): examples interact.  ``x[...] = v``
        gets its layout here (:meth:`_setitem_layout`); every other in-place op is followed by the
        ordinary rules on its output (the target itself), so a write along the batch by an op
        without a rule (``index_add_``, ``scatter_``, ``index_put_``) leaves the target untrusted.
        """
        if name not in _INPLACE or not args or not isinstance(args[0], torch.Tensor):
            return
        target = args[0]
        before = self.layouts.get(target)
        if before is None and not any(size == self.batch_size for size in target.shape):
            self.interact(f"{name} writes values computed from the batch into a tensor that has no per-example "
                          "rows (a buffer or a running statistic)")
        if name == "__setitem__" and len(args) >= 3:
            layout = self._setitem_layout(target, before, args[1], args[2])
            if layout is None:
                return
            self.layouts.set(target, layout)

    def _setitem_layout(self, target: torch.Tensor, before: Any, index: Any, value: Any) -> Any:
        """The layout of ``target`` after ``target[index] = value``.

        Exact for basic indexing (ints, slices, ``None``, ``...``) that writes whole rows along the
        batch (``out[:, :T] = h``) or constants anywhere, and for a boolean mask of the target's shape
        (``scores[~mask] = -inf``); any other index (``out[order] = h``, a subset of the batch) leaves
        the target untrusted: which example owns which row is then the index's business.
        """
        value_layout = self.layouts.get(value)
        if isinstance(before, Untrusted) or isinstance(value_layout, Untrusted):
            return Untrusted("x[index] = value writes rows the tracer could not follow")
        items = list(index) if isinstance(index, tuple) else [index]
        if len(items) == 1 and isinstance(items[0], torch.Tensor) and items[0].dtype == torch.bool \
                and tuple(items[0].shape) == tuple(target.shape) and value_layout is None:
            mask_layout = self.layouts.get(items[0])
            if isinstance(mask_layout, Untrusted):
                return Untrusted("x[mask] = value with a mask the tracer could not follow")
            known = [layout for layout in (before, mask_layout) if layout is not None]
            if len(known) == 2 and not _same_rows(known[0], known[1]):
                return Untrusted("x[mask] = value combines rows of different examples")
            return known[0] if known else None
        if isinstance(items[0], torch.Tensor) and all(item == slice(None) for item in items[1:]) \
                and isinstance(value, torch.Tensor):
            found = self._permuted_rows(target, items[0], value)  # out[order] = h
            if found is not None:
                return found
        if any(isinstance(item, torch.Tensor) or not (item is None or item is Ellipsis or isinstance(item, (int, slice)))
               for item in items):
            return Untrusted("x[index] = value with a tensor index writes rows in an order the tracer does not follow")
        mapping, full = _basic_view_dims(items, tuple(target.shape))
        if not isinstance(value_layout, Layout):
            return before  # constants written into rows: their owners do not change
        aligned = value_layout.dim + (len(mapping) - value.dim())
        target_dim = mapping[aligned] if 0 <= aligned < len(mapping) else None
        if target_dim is None or not full[target_dim] or target.shape[target_dim] != value.shape[value_layout.dim]:
            return Untrusted("x[index] = value writes batch rows across the batch dimension")
        candidate = value_layout._replace(dim=target_dim)
        if before is None or _same_rows(before, candidate):
            return candidate
        return Untrusted("x[index] = value combines rows of different examples")

    def _check_interaction(self, func, name: str, args, kwargs, batched: list) -> None:
        if func in _BATCH_NORMS:
            training = arg(args, kwargs, 5, "training", False)
            if training:
                self.interact("batch_norm normalises with statistics of the whole batch (training mode)")
            return
        if func is F.group_norm:
            layout = self.trusted(args[0])
            if layout is not None and layout.dim != 0:
                self.interact("group_norm normalises across the batch (the batch is not the leading dim)")
            return
        if func is F.layer_norm or func is getattr(F, "rms_norm", None):
            layout = self.trusted(args[0])
            shape = arg(args, kwargs, 1, "normalized_shape")
            count = 1 if isinstance(shape, int) else len(shape)
            if layout is not None and layout.dim >= args[0].dim() - count:
                self.interact(f"{name} normalises over the batch dimension")
            return
        if name not in _FLOAT_REDUCTIONS:
            return
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        layout = self.trusted(tensor)
        if layout is None or tensor is None:
            return
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return  # elementwise maximum/minimum
        dims, full = _reduction_dims(name, args, kwargs, tensor)
        if full or (dims is not None and layout.dim in dims):
            if tensor.is_floating_point() or tensor.is_complex():
                self.interact(f"{name} reduces over the batch dimension")


def _in_nonreentrant_checkpoint() -> bool:
    """Whether the innermost saved-tensor hooks are those of ``checkpoint(use_reentrant=False)``."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and "_checkpoint_hook" in getattr(hooks[0], "__qualname__", "")


def _same_rows(a: Layout, b: Layout) -> bool:
    return a.dim == b.dim and a.group == b.group and a.pos == b.pos and a.order is b.order


def _basic_view_dims(items: list, shape: tuple) -> tuple:
    """For a basic index (ints, slices, ``None``, ``...``) of a tensor of ``shape``: ``(mapping, full)``,
    ``mapping[j]`` the tensor dim behind view dim ``j`` (``None`` for an inserted dim) and ``full[d]``
    whether dim ``d`` is indexed whole."""
    consumed = sum(1 for item in items if item is not None and item is not Ellipsis)
    expanded: list = []
    for item in items:
        expanded.extend([slice(None)] * (len(shape) - consumed) if item is Ellipsis else [item])
    expanded.extend([slice(None)] * (len(shape) - sum(1 for item in expanded if item is not None)))
    mapping: list = []
    full: dict = {}
    dim = 0
    for item in expanded:
        if item is None:
            mapping.append(None)
            continue
        if isinstance(item, slice):
            mapping.append(dim)
            full[dim] = item.step in (None, 1) and item.start in (None, 0) and (
                item.stop is None or (isinstance(item.stop, int) and item.stop >= shape[dim]))
        else:
            full[dim] = False
        dim += 1
    return mapping, full


def _is_permuted_view(tensor: torch.Tensor, base: torch.Tensor, order: list) -> bool:
    """``tensor`` has the shape and strides of ``base.permute(order)`` (dim ``j`` is base dim ``order[j]``)."""
    return base.dim() == tensor.dim() == len(order) \
        and tuple(tensor.shape) == tuple(base.shape[d] for d in order) \
        and tuple(tensor.stride()) == tuple(base.stride()[d] for d in order)


def _reduction_dims(name: str, args, kwargs, tensor) -> tuple:
    """``(dims or None for all, full)`` that a reduction/scan ``name`` works along."""
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return [], False
    position = _DIM_POSITION.get(name, 1)
    dim = kwargs.get("dim", kwargs.get("axis", args[position] if len(args) > position else _DIM_DEFAULT.get(name)))
    if name in ("std", "var", "std_mean", "var_mean") and isinstance(dim, bool):
        dim = None
    if name in ("softmax", "log_softmax", "softmin") and dim is None:
        dim = -1 if tensor.dim() in (0, 1, 3) else 1  # torch's legacy implicit dim
    if name == "diff" and dim is None:
        dim = -1
    if isinstance(dim, (list, tuple)) and len(dim) == 0:
        return None, True
    dims = _dims(dim, tensor.dim())
    if dims is None:
        return None, name not in ("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin")
    return dims, False


def _repeat_is_expand(args) -> bool:
    tensor, sizes = args[0], args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
        sizes = tuple(sizes[0])
    shape = (1,) * (len(sizes) - tensor.dim()) + tuple(tensor.shape)
    return all(repeat == 1 or size == 1 for repeat, size in zip(sizes, shape))
