"""Layout rules of layer ops whose only batch input is their first (frozen weights, or none)."""

from __future__ import annotations

from typing import Any

import torch

from fundp.engines.ghost._layout import Untrusted
from fundp.engines.ghost._layout_rules import Call, arg, deny, layout_rule

__all__ = ["LAYER_OPS"]

LAYER_OPS = {"linear", "layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm", "pad",
             "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
             "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
             "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
             "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample",
             "pixel_shuffle", "pixel_unshuffle", "local_response_norm"}


@layout_rule(*sorted(LAYER_OPS), needs_first=True)
def layer(tracer: Any, call: Call) -> Any:
    """A frozen layer on batch input: ``linear``/``layer_norm``/``rms_norm`` work on the last dim
    (rows kept when the batch is elsewhere; normalising over the batch is refused before the call),
    ``batch_norm`` in eval mode is per element; the channel-first ops (conv, pooling, resizing,
    ``group_norm``) need the batch leading (``[N, C, *spatial]``); ``pad`` pads trailing dims.
    Otherwise -> untrusted.  With a second batch input (batch weights) no rule applies: deny."""
    if len(call.inputs) != 1:
        return deny(tracer, call)
    name, args, kwargs, layout, first, out = call.name, call.args, call.kwargs, call.layout, call.first, call.out
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
