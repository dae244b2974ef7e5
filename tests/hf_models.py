"""Tiny random-initialised HuggingFace ``transformers`` / ``peft`` models for the tests (nothing is downloaded).

Each builder returns a :class:`Case`: the model (float64 by default, in ``eval()`` mode and with every
dropout probability 0, so that the forward is deterministic; eval mode changes nothing else in these
architectures — none has BatchNorm), its trainable parameters as a dict of detached clones, a batch,
and ``loss_fn(params, batch) -> Tensor[B]``:

* ``gpt2``       ``GPT2LMHeadModel`` (Conv1D = addmm on ``[B*T, d]`` rows, learned positions, tied head);
                 per-example loss = mean next-token cross-entropy of the sequence;
* ``gpt2_lora``  the same with ``peft`` LoRA adapters on ``c_attn`` (r=4); only the adapters train.
                 ``init_lora_weights=False`` (random ``B``) so that the ``A`` gradients are not all zero;
* ``bert``       ``BertForSequenceClassification`` (token-type and position tables, pooler, 3 classes);
* ``vit``        ``ViTForImageClassification`` (16x16x3 images, 4x4 patches, ``cls`` token, position parameter);
* ``llama`` / ``llama_tied``  ``LlamaForCausalLM`` (RMSNorm, rotary, gated MLP, grouped-query attention),
                 untied and tied input/output embeddings; LM loss as for GPT-2.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import fundp

VOCAB, CLASSES = 128, 3
MODEL_NAMES = ("gpt2", "gpt2_lora", "bert", "vit", "llama", "llama_tied")


class Case(NamedTuple):
    name: str
    model: nn.Module
    params: dict
    batch: dict
    loss_fn: Callable[[Any, Any], torch.Tensor]


def lm_loss(model: nn.Module) -> Callable:
    """Per-example causal-LM loss: mean cross-entropy of tokens ``1..T-1`` given their prefixes."""

    def loss_fn(params, batch):
        ids = batch["ids"]
        logits = fundp.functional_call(model, params, (ids,), {"use_cache": False}).logits  # [B, T, V]
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)

    return loss_fn


def classification_loss(model: nn.Module, input_key: str) -> Callable:
    def loss_fn(params, batch):
        logits = fundp.functional_call(model, params, (batch[input_key],)).logits  # [B, classes]
        return F.cross_entropy(logits, batch["y"], reduction="none")

    return loss_fn


def gpt2_config(layers: int = 2, dim: int = 64, heads: int = 4, vocab: int = VOCAB, positions: int = 64,
                attn: str = "eager"):
    from transformers import GPT2Config

    return GPT2Config(n_layer=layers, n_embd=dim, n_head=heads, vocab_size=vocab, n_positions=positions,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation=attn,
                      bos_token_id=0, eos_token_id=0)


def make_gpt2(layers=2, dim=64, heads=4, vocab=VOCAB, positions=64, attn="eager") -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(gpt2_config(layers, dim, heads, vocab, positions, attn))


def add_lora(model: nn.Module, rank: int = 4) -> nn.Module:
    """``peft`` LoRA on GPT-2's ``c_attn`` (a Conv1D, hence ``fan_in_fan_out=True``), random ``A`` and ``B``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn"], lora_dropout=0.0,
                        fan_in_fan_out=True, init_lora_weights=False)
    return get_peft_model(model, config)


def make_bert(layers=2, dim=64, heads=4, vocab=VOCAB, positions=64, classes=CLASSES, attn="eager") -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * dim, max_position_embeddings=positions, num_labels=classes,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
                        attn_implementation=attn)
    return BertForSequenceClassification(config)


def make_vit(layers=2, dim=32, heads=4, image=16, patch=4, classes=CLASSES, attn="eager") -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=image, patch_size=patch, num_channels=3, hidden_size=dim, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=2 * dim, num_labels=classes,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attn)
    return ViTForImageClassification(config)


def make_llama(layers=2, dim=64, heads=4, kv_heads=2, vocab=VOCAB, positions=64, tied=False,
               attn="eager") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions,
                         tie_word_embeddings=tied, attention_dropout=0.0, use_cache=False, attn_implementation=attn)
    return LlamaForCausalLM(config)


def plan_name(name: str) -> str:
    """The key :func:`fundp.engines.ghost.ghost_plan` uses for the parameter ``name`` of a params dict."""
    return f"params[{name!r}]"


def ghost_fraction(plan: dict, params: dict) -> tuple[float, dict]:
    """Fraction of trainable parameter elements on "ghost" in ``plan``, and ``{name: reason}`` of the others."""
    total = sum(p.numel() for p in params.values())
    others = {name: plan[plan_name(name)] for name in params if plan[plan_name(name)] != "ghost"}
    return 1.0 - sum(params[name].numel() for name in others) / total, others


def trainable(model: nn.Module) -> dict:
    """``{name: detached clone}`` of the parameters that require grad (tied parameters appear once)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def make_batch(name: str, batch_size: int = 4, seq_len: int = 8, seed: int = 1, dtype=torch.float64,
               vocab: int = VOCAB, image: int = 16, classes: int = CLASSES, device: Any = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        batch = {"x": torch.randn(batch_size, 3, image, image, generator=g, dtype=dtype),
                 "y": torch.randint(0, classes, (batch_size,), generator=g)}
    elif name == "bert":
        batch = {"ids": torch.randint(0, vocab, (batch_size, seq_len), generator=g),
                 "y": torch.randint(0, classes, (batch_size,), generator=g)}
    else:
        batch = {"ids": torch.randint(0, vocab, (batch_size, seq_len), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def build(name: str, *, dtype=torch.float64, batch_size: int = 4, seq_len: int = 8, seed: int = 0,
          attn: str = "eager", **sizes: Any) -> Case:
    """The model ``name`` (one of :data:`MODEL_NAMES`) in ``dtype`` and eval mode, its trainable params, a batch."""
    torch.manual_seed(seed)
    if name == "gpt2":
        model = make_gpt2(attn=attn, **sizes)
    elif name == "gpt2_lora":
        model = add_lora(make_gpt2(attn=attn, **sizes))
    elif name == "bert":
        model = make_bert(attn=attn, **sizes)
    elif name == "vit":
        model = make_vit(attn=attn, **sizes)
    elif name in ("llama", "llama_tied"):
        model = make_llama(tied=name == "llama_tied", attn=attn, **sizes)
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    model = model.to(dtype).eval()
    if name == "vit":
        loss_fn = classification_loss(model, "x")
    elif name == "bert":
        loss_fn = classification_loss(model, "ids")
    else:
        loss_fn = lm_loss(model)
    batch = make_batch(name, batch_size, seq_len, seed=seed + 1, dtype=dtype)
    return Case(name, model, trainable(model), batch, loss_fn)
