"""The layout rules: how each op moves the rows of batch data (a registry keyed by op name).

The tracer (:mod:`._tracer`) gives every batch-derived tensor a :class:`~._layout.Layout` (which
dim holds the examples, in which order) or :class:`~._layout.Untrusted`.  After a torch call whose
inputs include batch data, the layout of each output comes from the rule registered here for the
call's name (``op_name(func)``: ``"view"``, ``"sum"``, ``"__getitem__"``, ``"cross_entropy"``):

* an input whose rows are untrusted makes the output untrusted (before any rule is asked);
* ``LAYOUT_RULES[name](tracer, call)`` returns the output's ``Layout``, an ``Untrusted`` (the rows
  moved in a way the rule cannot follow; it *mixes* unless said otherwise) or ``None`` (the output
  holds no batch values); a rule may also raise :class:`~._layout.ExamplesInteractError`;
* **default deny**: a name with no rule makes the output untrusted and mixing (:func:`deny`).

Rules are grouped by family, one module each: :mod:`._layout_elementwise` (elementwise ops,
concatenation, values that do not come from the batch), :mod:`._layout_views` (views, reshapes,
transposes, expands, splits), :mod:`._layout_indexing` (indexing, reorderings by a known
permutation and the unsort idioms, gathers and scatters), :mod:`._layout_reductions`,
:mod:`._layout_matmul` (matmul, einsum, batched matrix ops, bilinear), :mod:`._layout_losses`
and :mod:`._layout_layers` (frozen layer ops).  :mod:`._tracer` imports them all.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from fundp.engines.ghost._layout import Layout, Untrusted

__all__ = ["Call", "LAYOUT_RULES", "layout_rule", "apply_layout_rule", "deny", "arg", "op_name", "norm_dims",
           "same_rows", "elementwise_layout"]


class Call(NamedTuple):
    """One torch call as a layout rule sees it.

    ``first``: ``args[0]`` when it is a tensor, else ``None``; ``layout``: its layout (``None``
    when it is not batch data); ``inputs``: the batch-derived inputs with trusted rows (never
    empty: an op without batch inputs is not asked); ``out``: one output tensor (rules run once
    per output).
    """

    func: Any
    name: str
    args: tuple
    kwargs: dict
    first: Any
    layout: Any
    inputs: list
    out: Any


LAYOUT_RULES: dict[str, Callable[[Any, Call], Any]] = {}


def layout_rule(*names: str, needs_first: bool = False) -> Callable:
    """Decorator: ``@layout_rule("view", "reshape")`` makes ``rule(tracer, call)`` give those ops'
    output layouts.  ``needs_first=True``: the rule applies only when the op's first argument is
    batch data with trusted rows; otherwise the op is denied (:func:`deny`).  A name has one rule.
    """

    def decorate(rule: Callable) -> Callable:
        rule.needs_first = needs_first  # type: ignore[attr-defined]
        for name in names:
            if name in LAYOUT_RULES:
                raise ValueError(f"op {name!r} already has the layout rule {LAYOUT_RULES[name].__name__}")
            LAYOUT_RULES[name] = rule
        return rule

    return decorate


def deny(tracer: Any, call: Call) -> Untrusted:
    """Default deny: an op without a layout rule may move values across the batch, so its output
    rows are untrusted and mixing (losses computed from them take the step off the ghost path)."""
    return Untrusted(f"{call.name} has no layout rule, so the rows of its output may mix examples")


def apply_layout_rule(tracer: Any, call: Call) -> Any:
    """The output layout of ``call`` by the rule registered for its name, default deny."""
    rule = LAYOUT_RULES.get(call.name, deny)
    if getattr(rule, "needs_first", False) and not isinstance(call.layout, Layout):
        return deny(tracer, call)
    return rule(tracer, call)


# ----------------------------------------------------------------------------- argument helpers


def arg(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, passed by ``position`` or by keyword."""
    return args[position] if len(args) > position else kwargs.get(name, default)


def op_name(func: Any) -> str:
    """The name a rule is keyed by: ``torch.sum``, ``Tensor.sum`` -> ``"sum"``; ``Tensor.T`` -> ``"T"``."""
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a property such as Tensor.T / .mT
        return getattr(getattr(func, "__self__", None), "__name__", "__get__")
    if name is None:
        name = str(func)
    return name


def norm_dims(value: Any, ndim: int) -> Any:
    """``dim`` argument(s) as a list of non-negative dims of an ``ndim``-D tensor (``None`` kept)."""
    if value is None:
        return None
    if isinstance(value, int):
        value = [value]
    return [d + ndim if d < 0 else d for d in value]


def same_rows(a: Layout, b: Layout) -> bool:
    """Whether two layouts put the same examples at the same places."""
    return a.dim == b.dim and a.group == b.group and a.pos == b.pos and a.order is b.order


def elementwise_layout(tracer: Any, inputs: list, out: torch.Tensor, name: str) -> Any:
    """Broadcasting elementwise: each input's batch dim aligns (from the right) with one output dim
    of the same size, and all inputs agree on it; else the rows are untrusted."""
    found = None
    for tensor in inputs:
        layout = tracer.layouts.get(tensor)
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
