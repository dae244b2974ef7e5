"""Rules for normalisation layers' affine parameters: ``F.layer_norm``, ``F.group_norm``, ``F.rms_norm``.

Per-example gradients are small and materialised: ``g_i(weight) = sum_t G_it * xhat_it`` and
``g_i(bias) = sum_t G_it``, with ``xhat`` the normalised input recomputed from the saved input.
"""

from __future__ import annotations

import torch.nn.functional as F

from fundp.engines.ghost._layout import to_examples
from fundp.engines.ghost._registry import register_rule
from fundp.engines.ghost._tracer import arg
from fundp.engines.ghost._uses import Rows

__all__ = ["norm_rule"]

_FUNCS = [F.layer_norm, F.group_norm] + ([F.rms_norm] if hasattr(F, "rms_norm") else [])


@register_rule(*_FUNCS)
def norm_rule(tracer, func, args, kwargs):
    x = arg(args, kwargs, 0, "input")
    layout = tracer.trusted(x)
    if layout is None or x.dim() < 2:
        return None
    if func is F.group_norm:
        groups, weight, bias = arg(args, kwargs, 1, "num_groups"), arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
        eps = arg(args, kwargs, 4, "eps", 1e-5)
        if tracer.batch_size > 1 and layout.dim != 0:
            return None

        def normalize(inp):
            return F.group_norm(inp, groups, None, None, eps)

        def per_example(t):  # [N, C, *spatial] -> [B, C]
            reduced = t.sum(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t
            return to_examples(reduced, layout, 1).sum(dim=1)

        run = lambda inp, w, b: F.group_norm(inp, groups, w, b, eps)  # noqa: E731
    else:
        shape = arg(args, kwargs, 1, "normalized_shape")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if func is F.layer_norm:
            weight, bias, eps = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias"), arg(args, kwargs, 4, "eps", 1e-5)

            def normalize(inp):
                return F.layer_norm(inp, shape, None, None, eps)

            run = lambda inp, w, b: F.layer_norm(inp, shape, w, b, eps)  # noqa: E731
        else:
            weight, bias, eps = arg(args, kwargs, 2, "weight"), None, arg(args, kwargs, 3, "eps")

            def normalize(inp):
                return F.rms_norm(inp, shape, None, eps)

            run = lambda inp, w, b: F.rms_norm(inp, shape, w, eps)  # noqa: E731
        if tracer.batch_size > 1 and layout.dim >= x.dim() - len(shape):
            return None

        def per_example(t):
            return to_examples(t, layout, len(shape)).sum(dim=1)

    if tracer.layout(weight) is not None or tracer.layout(bias) is not None:
        return None
    out = run(x, weight.detach() if weight is not None else None, bias.detach() if bias is not None else None)
    tracer.set_layout(out, layout)
    out, index = tracer.probe(out)
    saved = x.detach()
    if weight is not None and tracer.origin(weight) is not None:
        tracer.record(weight, lambda grads: Rows(per_example(grads[index] * normalize(saved.to(grads[index].dtype)))),
                      func.__name__)
    if bias is not None and tracer.origin(bias) is not None:
        tracer.record(bias, lambda grads: Rows(per_example(grads[index])), func.__name__)
    return out
