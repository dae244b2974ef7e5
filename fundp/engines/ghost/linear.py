"""Rules for matrix products with a parameter operand: ``F.linear``, ``addmm``, ``@``/``matmul``, ``einsum``.

With the batched operand ``A`` (rows of example ``i``: ``A_i [T, d]``) and the output gradient
``G_i [T, p]``:

* ``F.linear(x, W, b)``, ``W [p, d]``: ``g_i(W) = G_i^T A_i`` (a :class:`Factor`), ``g_i(b) = sum_t G_it``;
* ``x @ W`` / ``torch.addmm(b, x, W)`` (GPT-2's ``Conv1D``), ``W [d, p]``: ``g_i(W) = A_i^T G_i``;
* ``W @ x`` (``x [..., d, n]``): ``g_i(W) = G_i'^T A_i'`` with the last two dims swapped;
* ``einsum`` with one batched and one parameter operand: ``g_i`` materialised by an einsum that
  keeps the batch letter.

``A`` may be ``[B, ..., d]``, sequence-first, or flattened ``[B*T, d]`` rows: rows are mapped back
to examples by the tracked layout (:func:`to_examples`).  A transposed weight (``h @ E.T``) is the
same use with the factors swapped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fundp.engines.ghost._layout import to_examples
from fundp.engines.ghost._registry import register_rule
from fundp.engines.ghost._tracer import arg, op_name
from fundp.engines.ghost._uses import Factor, Rows

__all__ = ["linear_rule", "matmul_rule", "einsum_rule"]


def _detach(tensor):
    return tensor.detach() if isinstance(tensor, torch.Tensor) else tensor


def _bias_rows(tracer, bias, grads_of, out_layout, op, scale=1.0):
    def resolve(grads):
        rows = to_examples(grads_of(grads), out_layout, keep_last=1).sum(dim=1)
        return Rows(rows * scale if scale != 1.0 else rows)

    tracer.record(bias, resolve, op)


@register_rule(F.linear)
def linear_rule(tracer, func, args, kwargs):
    x, weight, bias = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    layout = tracer.trusted(x)
    if layout is None or x.dim() < 1 or (tracer.batch_size > 1 and layout.dim == x.dim() - 1):
        return None
    if tracer.layout(weight) is not None or tracer.layout(bias) is not None:
        return None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None  # a 1-D weight (F.linear(x, w) = x @ w): no Factor form; the generic path takes it
    out = F.linear(x, _detach(weight), _detach(bias))
    tracer.set_layout(out, layout)
    out, index = tracer.probe(out)
    activations = tracer.saved_rows(x, layout)

    def grads_of(grads):
        return grads[index]

    if tracer.origin(weight) is not None:
        tracer.record(weight, lambda grads: Factor(to_examples(grads[index], layout, 1), activations()), "linear")
    if bias is not None and tracer.origin(bias) is not None:
        _bias_rows(tracer, bias, grads_of, layout, "linear")
    return out


_MATMULS = [torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm,
            torch.Tensor.mm, torch.addmm, torch.Tensor.addmm]


@register_rule(*_MATMULS)
def matmul_rule(tracer, func, args, kwargs):
    name = op_name(func)
    scale_product, scale_bias, bias = 1.0, 1.0, None
    if name == "addmm":
        bias, a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "mat1"), arg(args, kwargs, 2, "mat2")
        scale_bias, scale_product = kwargs.get("beta", 1.0), kwargs.get("alpha", 1.0)
        if tracer.layout(bias) is not None or not isinstance(scale_bias, (int, float)) or not isinstance(scale_product, (int, float)):
            return None
    elif name == "__rmatmul__":
        b, a = args[0], args[1]
    else:
        a, b = args[0], args[1]
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    a_layout, b_layout = tracer.trusted(a), tracer.trusted(b)
    a_param, b_param = tracer.origin(a), tracer.origin(b)
    if a_layout is not None and b_param is not None and b.dim() == 2 and a.dim() >= 2 \
            and (tracer.batch_size == 1 or a_layout.dim < a.dim() - 1) and tracer.layout(b) is None:
        # x @ W: per example A_i^T G_i, W [d, p]
        out = torch.matmul(a, b.detach()) * scale_product if scale_product != 1.0 else torch.matmul(a, b.detach())
        layout = a_layout
        activations = tracer.saved_rows(a, layout)
        if bias is not None:
            out = out + (bias.detach() * scale_bias if scale_bias != 1.0 else bias.detach())
        tracer.set_layout(out, layout)
        out, index = tracer.probe(out)

        def resolve(grads):
            g = to_examples(grads[index], layout, 1)
            left = activations()
            return Factor(left * scale_product if scale_product != 1.0 else left, g)

        tracer.record(b, resolve, name)
        if bias is not None and tracer.origin(bias) is not None:
            _bias_rows(tracer, bias, lambda grads: grads[index], layout, name, scale_bias)
        return out
    if b_layout is not None and a_param is not None and a.dim() == 2 and b.dim() >= 2 and bias is None \
            and (tracer.batch_size == 1 or b_layout.dim < b.dim() - 2) and tracer.layout(a) is None:
        # W @ x with x [..., d, n]: per example G'_i^T A'_i on the transposed last two dims
        out = torch.matmul(a.detach(), b)
        layout = b_layout
        tracer.set_layout(out, layout)
        out, index = tracer.probe(out)
        activations = b.detach()

        def resolve(grads):
            g = to_examples(grads[index].transpose(-1, -2), layout, 1)
            return Factor(g, to_examples(activations.transpose(-1, -2), layout, 1))

        tracer.record(a, resolve, name)
        return out
    return None


@register_rule(torch.einsum)
def einsum_rule(tracer, func, args, kwargs):
    equation = args[0]
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if len(operands) != 2 or "..." in equation or "->" not in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    subscripts = inputs.split(",")
    batched = [i for i, t in enumerate(operands) if tracer.trusted(t) is not None]
    params = [i for i, t in enumerate(operands) if tracer.origin(t) is not None and tracer.layout(t) is None]
    if len(batched) != 1 or len(params) != 1:
        return None
    x_pos, w_pos = batched[0], params[0]
    x, w = operands[x_pos], operands[w_pos]
    layout = tracer.trusted(x)
    if len(layout.group) != 1 and tracer.batch_size > 1:
        return None
    x_sub, w_sub = subscripts[x_pos], subscripts[w_pos]
    if len(set(w_sub)) != len(w_sub) or any(c not in x_sub and c not in output for c in w_sub):
        return None  # a diagonal of the parameter ("bi,ii->bi") or a dim summed alone: the generic path
    letter = x_sub[layout.dim] if tracer.batch_size > 1 else None
    if letter is not None and (letter in w_sub or letter not in output):
        return None
    detached = [x, w.detach()] if x_pos == 0 else [w.detach(), x]
    out = torch.einsum(equation, *detached)
    out_layout = layout._replace(dim=output.index(letter)) if letter is not None else layout
    tracer.set_layout(out, out_layout)
    out, index = tracer.probe(out)
    activations = x.detach()
    fresh = next(c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation)
    batch_letter = letter or fresh

    def resolve(grads):
        g = grads[index]
        if letter is None:  # batch of one: add the batch letter
            rows = torch.einsum(f"{x_sub},{output}->{w_sub}", activations, g.to(activations.dtype)).unsqueeze(0)
        else:
            rows = torch.einsum(f"{x_sub},{output}->{batch_letter}{w_sub}", activations, g.to(activations.dtype))
            if layout.order is not None:
                rows = rows.index_select(0, torch.argsort(layout.order))
        return Rows(rows)

    tracer.record(w, resolve, "einsum")
    return out
