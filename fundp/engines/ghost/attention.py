"""``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``/``DecoderLayer``): seen through.

``F.multi_head_attention_forward`` is one opaque call to the tracer, and its packed in-projection,
head reshapes and output projection are exactly the Linear uses the other rules handle.  This rule
runs an equivalent composition of ``F.linear``, views and ``F.scaled_dot_product_attention`` under
the tracer, so every parameter use inside is attributed by the Linear rules with the rows mapped
back to examples (the inputs are sequence-first ``[T, B, E]``; the heads flatten the batch with them).
Options it does not reproduce (``bias_k``/``bias_v``, ``add_zero_attn``, static keys, unbatched
inputs) decline, and those parameters take the ``vmap`` path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fundp.engines.ghost._registry import register_rule
from fundp.engines.ghost._tracer import arg

__all__ = ["multi_head_attention_rule"]

_NAMES = ["query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
          "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
          "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
          "static_k", "static_v", "average_attn_weights", "is_causal"]
_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
             "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None, "v_proj_weight": None,
             "static_k": None, "static_v": None, "average_attn_weights": True, "is_causal": False}


def _as_additive(mask, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _attention(a):
    query, key, value = a["query"], a["key"], a["value"]
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    heads = a["num_heads"]
    head_dim = embed_dim // heads
    if not a["use_separate_proj_weight"]:
        weight, bias = a["in_proj_weight"], a["in_proj_bias"]
        if query is key and key is value:
            q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
        else:
            w_q, w_k, w_v = weight.chunk(3)
            b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    else:
        bias = a["in_proj_bias"]
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        q = F.linear(query, a["q_proj_weight"], b_q)
        k = F.linear(key, a["k_proj_weight"], b_k)
        v = F.linear(value, a["v_proj_weight"], b_v)
    # [T, B, E] -> [B, H, T, dh]
    q = q.reshape(tgt_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
    k = k.reshape(src_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
    v = v.reshape(src_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
    mask = _as_additive(a["attn_mask"], q.dtype)
    if mask is not None:
        mask = mask.reshape(bsz, heads, tgt_len, src_len) if mask.dim() == 3 else mask.reshape(1, 1, tgt_len, src_len)
    padding = _as_additive(a["key_padding_mask"], q.dtype)
    if padding is not None:
        padding = padding.reshape(bsz, 1, 1, src_len)
        mask = padding if mask is None else mask + padding
    is_causal = bool(a["is_causal"]) and mask is None
    dropout_p = a["dropout_p"] if a["training"] else 0.0
    if a["need_weights"]:
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(head_dim)
        if is_causal:
            causal = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.matmul(weights, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        weights = None
    out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"]).reshape(tgt_len, bsz, embed_dim)
    if weights is not None and a["average_attn_weights"]:
        weights = weights.mean(dim=1)
    return out, weights


@register_rule(F.multi_head_attention_forward)
def multi_head_attention_rule(tracer, func, args, kwargs):
    values = {name: arg(args, kwargs, position, name, _DEFAULTS.get(name)) for position, name in enumerate(_NAMES)}
    if values["query"].dim() != 3 or values["bias_k"] is not None or values["bias_v"] is not None \
            or values["add_zero_attn"] or values["static_k"] is not None or values["static_v"] is not None:
        return None
    if values["embed_dim_to_check"] != values["query"].shape[-1] or values["query"].shape[-1] % values["num_heads"]:
        return None
    with tracer:
        return _attention(values)
