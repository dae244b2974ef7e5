"""The tracer: a ``TorchFunctionMode`` that follows rows and parameters through ``loss_fn``.

For every torch call it knows

* which tensors come from the batch, and which of their rows belong to which example
  (:mod:`._layout`); how each op moves them is a table of layout rules keyed by op name
  (:mod:`._layout_rules`, default deny); an op that mixes examples raises
  :class:`ExamplesInteractError` or makes the rows untrusted;
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
from torch._functorch.eager_transforms import _autograd_grad, _set_tensor_requires_grad, enable_inplace_requires_grad
from torch.overrides import TorchFunctionMode

from fundp.engines.ghost import (  # noqa: F401  (register the layout rules)
    _layout_elementwise,
    _layout_indexing,
    _layout_layers,
    _layout_losses,
    _layout_matmul,
    _layout_reductions,
    _layout_views,
)
from fundp.engines.ghost._errors import GhostUnsupportedError
from fundp.engines.ghost._index import IdentityMap, is_compiling
from fundp.engines.ghost._keyed_dropout import CHANNELWISE as _KEYED_CHANNELWISE
from fundp.engines.ghost._keyed_dropout import ELEMENTWISE as _KEYED_ELEMENTWISE
from fundp.engines.ghost._keyed_dropout import RANDOM as _KEYED_RANDOM
from fundp.engines.ghost._keyed_dropout import MORE_RANDOM as _MORE_RANDOM
from fundp.engines.ghost._keyed_dropout import draws as _draws
from fundp.engines.ghost._keyed_dropout import keyable as _keyable
from fundp.engines.ghost._layout import ExamplesInteractError, Layout, Untrusted, move_dims, standard, to_examples
from fundp.engines.ghost._layout_elementwise import CASTS as _CASTS
from fundp.engines.ghost._layout_elementwise import DATA_FREE as _DATA_FREE
from fundp.engines.ghost._layout_indexing import permuted_rows
from fundp.engines.ghost._layout_reductions import FLOAT_REDUCTIONS as _FLOAT_REDUCTIONS
from fundp.engines.ghost._layout_reductions import reduction_dims as _reduction_dims
from fundp.engines.ghost._layout_rules import Call, apply_layout_rule, arg, op_name, same_rows as _same_rows
from fundp.engines.ghost._layout_views import EXPANDS as _EXPANDS
from fundp.engines.ghost._uses import Use
from fundp.engines.ghost.broadcast import broadcast_rule

__all__ = ["Tracer", "Derived", "Untrusted", "op_name", "arg", "transform_grads"]


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


# Reading metadata is not a use of a value.
_METADATA = {"size", "dim", "numel", "__len__", "stride", "ndimension", "is_floating_point", "is_contiguous",
             "element_size", "nelement", "get_device", "data_ptr", "__hash__", "shape", "dtype", "device",
             "requires_grad", "is_leaf", "grad_fn", "ndim", "layout", "is_cuda", "is_sparse", "names", "__format__",
             "__repr__", "storage_offset", "untyped_storage", "_version", "is_complex", "is_nested", "has_names",
             "__bool__", "__int__", "__float__", "item", "tolist", "is_meta", "is_quantized", "is_mkldnn", "grad",
             "_base", "output_nr", "_cdata", "__index__", "retains_grad", "__reduce_ex__", "__deepcopy__",
             "__array__", "__contains__", "nbytes", "itemsize", "is_inference"}
_TRANSPOSE_2D = {"t", "T", "mT", "H", "mH", "adjoint", "transpose", "swapaxes", "swapdims", "permute"}
_BATCH_NORMS = {F.batch_norm}
_ARANGE_VIEWS = {"view", "reshape", "unsqueeze", "__getitem__", "to", "contiguous", "clone", "view_as", "reshape_as"}
# Methods that write into their first argument (a set: dynamo traces membership, not str methods).
_INPLACE = {name for name in dir(torch.Tensor) if name.endswith("_") and not name.startswith("_")} | {
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"} - {"requires_grad_", "share_memory_"}



# Python values read from a tensor: the computation then depends on the data in ways no layout follows.
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "__array__"}
# In-place writes along a dim given by position 1 (``target.index_add_(dim, index, source)``).
_DIM_WRITES = {"index_add_", "index_copy_", "index_fill_", "index_reduce_", "scatter_", "scatter_add_",
               "scatter_reduce_"}

# Recurrent kernels that write each example's state into their initial state ``hx`` (nn.GRU, nn.RNN;
# nn.LSTM's kernel does not): under torch.func.vmap an ``hx`` shared by all examples fails.
_RNN_STATE_OPS = {"gru": "nn.GRU", "rnn_tanh": "nn.RNN", "rnn_relu": "nn.RNN(nonlinearity='relu')"}

_DROPOUTS = {F.dropout: 2, F.alpha_dropout: 2, F.feature_alpha_dropout: 2, F.dropout1d: 2, F.dropout2d: 2,
             F.dropout3d: 2}
_RANDOM = _KEYED_RANDOM


def _transform_leaf(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (made inside a ``torch.func`` transform) differentiable at that transform's level,
    as ``torch.func.vjp`` makes its primals: a leaf created mid-function, whose gradient
    :func:`transform_grads` then takes.  (Dynamo traces both helpers into the graph: they are the
    functions ``torch.func.vjp`` itself is made of.)"""
    with enable_inplace_requires_grad(True):
        _set_tensor_requires_grad(tensor)
    return tensor


def transform_grads(output: torch.Tensor, leaves: list) -> list:
    """``d sum(output) / d leaf`` for leaves made by :func:`_transform_leaf` in the same transform
    level (zeros for a leaf the output does not reach)."""
    if not leaves:
        return []
    return list(_autograd_grad([output], leaves, [torch.ones_like(output)], create_graph=False))


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
                 probe_grad: bool | str = True):
        super().__init__()
        # ``probe_grad``: ``True``, fresh zero leaves requiring grad (eager autograd); ``False``, plain
        # zero tensors (a run whose probe gradients nobody takes); ``"transform"``, zero tensors made
        # differentiable at the current ``torch.func`` level (the compiled path, inside one
        # ``torch.func.vjp``: no run beforehand has to learn the probes' shapes).
        self.probe_grad = probe_grad
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
        # Why the run's random draws are not keyed per example (a dropout whose input's rows are not the
        # examples in order at dim 0, see note_random and ._keyed_dropout), or None.
        self.unkeyed: str | None = None

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
        if self.probe_grad == "transform":
            probe = _transform_leaf(torch.zeros(shape, dtype=tensor.dtype, device=tensor.device))
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
        elif self.unkeyed is None and (func in _KEYED_ELEMENTWISE or func in _KEYED_CHANNELWISE
                                       or func is F.scaled_dot_product_attention):
            self.note_random(func, args, kwargs)
        elif self.unkeyed is None and (func in _RANDOM or func in _MORE_RANDOM):
            self.unkeyed = f"{name} draws from torch's RNG"
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

    def note_random(self, func, args, kwargs) -> None:
        """A dropout (or attention with ``dropout_p > 0``) gets keyed per-example masks
        (:mod:`._keyed_dropout`) for the rows at its input's dim 0: exact when those are the examples
        in order (dim 0, the batch outermost, no permutation), else the run is not keyed per example
        (:attr:`unkeyed`, as for an input the masks do not take and any other random op: the
        tracer decides, as its state is what the engine reads under ``torch.compile`` too)."""
        if not _draws(func, args, kwargs):
            return
        inputs = [arg(args, kwargs, 0, "input")]
        if func is F.scaled_dot_product_attention:
            inputs = [arg(args, kwargs, i, name) for i, name in enumerate(("query", "key", "value"))]
            keyed = inputs[0].dim() >= 3 and inputs[0].shape[0] % self.batch_size == 0  # (the weights' dim 0)
        else:
            keyed = _keyable(func, inputs[0], arg(args, kwargs, 1, "p", 0.5), self.batch_size)
        if not keyed:
            self.unkeyed = f"{op_name(func)} with an input the keyed masks do not take"
            return
        layouts = [self.layouts.get(t) for t in inputs if isinstance(t, torch.Tensor)]
        known = [layout for layout in layouts if layout is not None]
        if not known or any(not isinstance(layout, Layout) or layout.dim != 0 or layout.pos != 0
                            or layout.order is not None for layout in known):
            self.unkeyed = f"{op_name(func)} of a tensor whose dim 0 is not the examples in order"

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
        """The layout of ``out``: untrusted where an input's rows are (a known permutation is never
        untrusted), else what the layout rule registered for ``name`` says (:mod:`._layout_rules`;
        default deny)."""
        tracked = [t for t in _tensors_in(args) + _tensors_in(kwargs.values()) if self.layouts.get(t) is not None]
        untrusted = [self.layouts.get(t) for t in tracked
                     if isinstance(self.layouts.get(t), Untrusted) and self.permutations.get(t) is None]
        if untrusted:
            return next((u for u in untrusted if u.mixes), untrusted[0])
        inputs = [t for t in tracked if isinstance(self.layouts.get(t), Layout)]
        return apply_layout_rule(self, Call(func, name, args, kwargs, first, layout, inputs, out))

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
            found = permuted_rows(self, target, items[0], value)  # out[order] = h
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


def _repeat_is_expand(args) -> bool:
    tensor, sizes = args[0], args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
        sizes = tuple(sizes[0])
    shape = (1,) * (len(sizes) - tensor.dim()) + tuple(tensor.shape)
    return all(repeat == 1 or size == 1 for repeat, size in zip(sizes, shape))
