"""Rule for ``F.embedding`` on batched ids: ``g_i(W) = sum_t onehot(ids_it)^T G_it`` (an :class:`Ids` use).

Its squared norm is ``sum_v ||sum_{t: ids_it = v} G_it||^2``, computed by sorting (see ``_norms``).
The padding row never receives a gradient.  ``max_norm`` (renormalises the table in place) and
``scale_grad_by_freq`` (couples the examples through the batch's counts) are not per-example: not
handled.  A lookup with ids that are not from the batch (``F.embedding(arange(T), pos)``) is a
parameter-only computation, handled where its result meets the batch (:mod:`.broadcast`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fundp.engines.ghost._errors import GhostUnsupportedError
from fundp.engines.ghost._layout import to_examples
from fundp.engines.ghost._registry import register_rule
from fundp.engines.ghost._layout_rules import arg
from fundp.engines.ghost._uses import Ids

__all__ = ["embedding_rule", "drop_padding"]


def drop_padding(ids: torch.Tensor, grads: torch.Tensor, padding_idx) -> torch.Tensor:
    if padding_idx is None:
        return grads
    return torch.where((ids == padding_idx).unsqueeze(-1), torch.zeros_like(grads), grads)


@register_rule(F.embedding)
def embedding_rule(tracer, func, args, kwargs):
    ids, weight = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
    padding_idx, max_norm = arg(args, kwargs, 2, "padding_idx"), arg(args, kwargs, 3, "max_norm")
    scale_grad_by_freq = arg(args, kwargs, 5, "scale_grad_by_freq", False)
    if max_norm is not None and isinstance(weight, torch.Tensor) and tracer.origin(weight) is not None:
        raise GhostUnsupportedError(
            "F.embedding(max_norm=...) (nn.Embedding(max_norm=...)) renormalises the table in place during the "
            "forward, a write to the parameter that per-example gradients cannot follow (grad_method='vmap' cannot "
            "either): drop max_norm and renormalise the table after each update instead (e.g. torch.renorm)")
    layout = tracer.trusted(ids)
    if layout is None or max_norm is not None or scale_grad_by_freq or tracer.layout(weight) is not None:
        return None
    num_rows = weight.shape[0]
    if padding_idx is not None and padding_idx < 0:
        padding_idx += num_rows
    out = F.embedding(ids, weight.detach(), padding_idx)
    tracer.set_layout(out, layout)
    out, index = tracer.probe(out)
    flat_ids = to_examples(ids.detach().unsqueeze(-1), layout, 1).squeeze(-1)

    def resolve(grads):
        g = to_examples(grads[index], layout, 1)
        return Ids(flat_ids, drop_padding(flat_ids, g, padding_idx), num_rows)

    tracer.record(weight, resolve, "embedding")
    return out
