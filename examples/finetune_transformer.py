"""Differentially private fine-tuning of a small HuggingFace ``transformers`` model, LoRA or full, with fundp.

    python examples/finetune_transformer.py --epsilon 8                 # full fine-tuning of a tiny BERT
    python examples/finetune_transformer.py --epsilon 8 --lora          # LoRA adapters (peft) + classifier head
    python examples/finetune_transformer.py --model gpt2 --lora         # the same on a tiny GPT-2

Nothing is downloaded.  The task is scikit-learn's bundled digits read as *sequences*: each 8x8
image becomes 8 tokens, one per row (the row's pixels thresholded to 8 bits, a vocabulary of 256),
plus a final ``[CLS]`` token, and the transformer classifies the sequence (BERT pools the first
position, GPT-2 the last; both attend to the whole sequence).  The model is built from a config
(``BertForSequenceClassification`` or ``GPT2ForSequenceClassification``: 2 layers, d = 64) and
first pre-trained *non-privately* on the public half of the classes (digits 0-4, ``--pretrain-steps``),
the way a real run starts from a public checkpoint; the private fine-tuning then uses only
digits 5-9 and is the only part that touches private data and spends privacy.  With a real
checkpoint, replace ``build_model`` by ``from_pretrained(...)``: the DP part is unchanged.

``--lora`` freezes the base model and trains ``peft`` LoRA adapters (rank ``--lora-rank``) on the
attention projections plus the new classification head; without it every parameter trains.
Either way ``params`` holds exactly the trainable tensors and ``fundp.functional_call`` runs the
frozen ones as the model holds them.

The DP loop is the one of ``train_digits.py``: Poisson batches padded to fixed shapes,
``fundp.dp_step`` (optionally compiled), ``fundp.optim.adam``, the ledger, and a noise multiplier
calibrated up front so that the run spends exactly the target epsilon at delta.  The models run in
``eval()`` mode: dropout off (the configs set it to 0 as well), which changes nothing for privacy.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

import fundp

ROW_TOKENS = 256  # one token per image row: its 8 pixels thresholded to bits
CLS, PAD = ROW_TOKENS, ROW_TOKENS + 1
VOCAB = ROW_TOKENS + 2
PUBLIC_CLASSES, PRIVATE_CLASSES = range(0, 5), range(5, 10)


def load_digit_sequences(seed: int = 0):
    """Digits as token sequences ``[N, 9]`` and labels 0..9.

    Each 8x8 image (intensities 0..16) becomes 8 tokens, one per row: the row's 8 pixels
    thresholded at 8 and read as the bits of a number in 0..255; a ``[CLS]`` token ends the
    sequence.  Returns ``(train, test)``, each ``(tokens, labels)``: an 80/20 split shuffled with ``seed``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    bits = (torch.tensor(data.data).reshape(-1, 8, 8) >= 8).long()  # [N, 8 rows, 8 pixels]
    rows = (bits * (2 ** torch.arange(8))).sum(dim=2)  # [N, 8] in 0..255
    tokens = torch.cat([rows, torch.full((len(rows), 1), CLS)], dim=1)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    tokens, labels = tokens[order], labels[order]
    split = int(0.8 * len(labels))
    return (tokens[:split], labels[:split]), (tokens[split:], labels[split:])


def only(classes: range, tokens: torch.Tensor, labels: torch.Tensor):
    keep = (labels >= classes.start) & (labels < classes.stop)
    return tokens[keep], labels[keep] - classes.start


def build_model(kind: str, classes: int, *, layers: int = 2, dim: int = 64, heads: int = 4) -> torch.nn.Module:
    """A random-initialised ``transformers`` sequence classifier from a config (no download)."""
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=VOCAB, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * dim, max_position_embeddings=16, num_labels=classes,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
                            pad_token_id=PAD)
        return BertForSequenceClassification(config)
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=VOCAB, n_embd=dim, n_layer=layers, n_head=heads, n_positions=16,
                        num_labels=classes, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        pad_token_id=PAD, bos_token_id=CLS, eos_token_id=CLS,
                        # "eager" attention: with an attention mask, the SDPA path's mask shortcut
                        # is a data-dependent branch that vmap (the fallback engine) cannot batch
                        attn_implementation="eager")
    return GPT2ForSequenceClassification(config)


def new_head(model: torch.nn.Module, kind: str, classes: int) -> str:
    """Replaces the classification head by a fresh one for ``classes``; returns its module name."""
    name = "classifier" if kind == "bert" else "score"
    old = getattr(model, name)
    setattr(model, name, torch.nn.Linear(old.in_features, classes, bias=old.bias is not None))
    model.config.num_labels = classes
    return name


def add_lora(model: torch.nn.Module, kind: str, rank: int, head: str) -> torch.nn.Module:
    """Freezes ``model`` and adds ``peft`` LoRA adapters on the attention projections; the head stays trainable."""
    from peft import LoraConfig, get_peft_model

    targets = ["query", "value"] if kind == "bert" else ["c_attn"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                        fan_in_fan_out=kind == "gpt2", modules_to_save=[head])
    return get_peft_model(model, config)


def trainable_params(model: torch.nn.Module) -> dict:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def forward_kwargs(kind: str, tokens: torch.Tensor) -> dict:
    # GPT-2 with a pad token checks each batch for padding unless it gets a mask (an .item() that
    # vmap cannot batch): our sequences have no padding, so the mask is all ones.
    return {"attention_mask": torch.ones_like(tokens)} if kind == "gpt2" else {}


def make_loss(model: torch.nn.Module, kind: str):
    """``loss_fn(params, batch) -> Tensor[B]``: per-example cross-entropy of the sequence classifier."""

    def loss_fn(params, batch):
        tokens = batch["x"]  # [B, 9]
        logits = fundp.functional_call(model, params, (tokens,), forward_kwargs(kind, tokens)).logits  # [B, classes]
        return F.cross_entropy(logits, batch["y"], reduction="none")  # [B]

    return loss_fn


def accuracy(model, kind, params, x, y) -> float:
    with torch.no_grad():
        logits = fundp.functional_call(model, params, (x,), forward_kwargs(kind, x)).logits
    return (logits.argmax(-1) == y).double().mean().item()


def progress(iterable, total, enabled=True):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable, None
    bar = tqdm(iterable, total=total, disable=not enabled, file=sys.stdout, dynamic_ncols=True)
    return bar, bar


def pretrain(model, kind, x, y, *, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """Ordinary (non-private) training on the public classes, in place: the stand-in for a public checkpoint."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(y), (batch_size,), generator=g, device="cpu").to(y.device)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[rows], **forward_kwargs(kind, x[rows])).logits, y[rows]).backward()
        optimizer.step()


def train(args) -> dict:
    device = torch.device(args.device)
    (x_train, y_train), (x_test, y_test) = load_digit_sequences(args.seed)
    public_x, public_y = only(PUBLIC_CLASSES, x_train, y_train)
    x_train, y_train = only(PRIVATE_CLASSES, x_train, y_train)
    x_test, y_test = only(PRIVATE_CLASSES, x_test, y_test)
    x_train, y_train, x_test, y_test, public_x, public_y = (
        t.to(device) for t in (x_train, y_train, x_test, y_test, public_x, public_y))
    torch.manual_seed(args.seed)
    model = build_model(args.model, len(PUBLIC_CLASSES), layers=args.layers, dim=args.dim).to(device)
    start = time.perf_counter()
    if args.pretrain_steps > 0:
        pretrain(model, args.model, public_x, public_y, steps=args.pretrain_steps, batch_size=64, lr=1e-3, seed=args.seed)
    pretrain_seconds = time.perf_counter() - start
    head = new_head(model, args.model, len(PRIVATE_CLASSES))
    model = model.to(device)
    if args.lora:
        model = add_lora(model, args.model, args.lora_rank, head)
    model = model.eval()  # dropout off; nothing else changes in these models
    params = trainable_params(model)
    total = sum(p.numel() for p in model.parameters())
    count = sum(p.numel() for p in params.values())
    if not args.quiet:
        print(f"{args.model} ({'LoRA' if args.lora else 'full'}): {count:,} of {total:,} parameters trainable; "
              f"pre-trained on digits 0-4 in {pretrain_seconds:.1f}s, fine-tuning privately on digits 5-9")

    num_examples = len(y_train)
    sample_rate = args.batch_size / num_examples
    steps = max(1, int(args.epochs / sample_rate)) if args.steps is None else args.steps
    if math.isinf(args.epsilon):
        noise_multiplier = 0.0
    else:
        noise_multiplier = fundp.calibrate_noise(args.epsilon, args.delta, sample_rate=sample_rate, steps=steps)
    # Keys stay on the CPU (the step moves the noise key to the device): the key-reuse guard then
    # reads each step's key without a device sync.
    batch_key, train_key = fundp.random.split(fundp.random.key(args.seed))
    batches = fundp.data.poisson_batches(num_examples, sample_rate, batch_key, steps=steps,
                                         pad_to_multiple=args.pad_to_multiple)
    step = fundp.dp_step(
        make_loss(model, args.model),
        max_norm=args.max_norm,
        noise_multiplier=noise_multiplier,
        sampler=batches,  # sample_rate and expected_batch_size come from the batches; every batch needs its mask
        grad_method=args.grad_method,
    )
    if args.compile:
        step = torch.compile(step)
    opt = fundp.optim.adam(args.lr)
    opt_state = opt.init(params)
    ledger = fundp.Ledger() if noise_multiplier > 0 else None
    iterator, bar = progress(enumerate(batches), steps, enabled=not args.quiet)
    history: dict = {"loss": [], "epsilon": []}
    start = time.perf_counter()
    initial_accuracy = accuracy(model, args.model, params, x_test, y_test)
    for t, (indices, mask) in iterator:
        indices, mask = indices.to(device), mask.to(device)
        batch = {"x": x_train[indices], "y": y_train[indices]}
        out = step(params, batch, fundp.random.fold_in(train_key, t), ledger=ledger, mask=mask)
        updates, opt_state = opt.update(out.grads, opt_state, params)
        params, ledger = fundp.optim.apply_updates(params, updates), out.ledger
        history["loss"].append(out.loss.item())
        if bar is not None and (t % 5 == 0 or t == steps - 1):
            spent = fundp.epsilon(ledger, args.delta) if ledger is not None else math.inf
            history["epsilon"].append(spent)
            bar.set_postfix(loss=f"{out.loss.item():.3f}", eps=f"{spent:.2f}")
    spent = fundp.epsilon(ledger, args.delta) if ledger is not None else math.inf
    summary = {
        "test_accuracy": accuracy(model, args.model, params, x_test, y_test),
        "initial_accuracy": initial_accuracy,
        "epsilon": spent,
        "delta": args.delta,
        "noise_multiplier": noise_multiplier,
        "steps": steps,
        "trainable_parameters": count,
        "seconds": time.perf_counter() - start,
        "history": history,
    }
    print(
        f"done: test accuracy {summary['test_accuracy']:.4f} on digits 5-9 (from {initial_accuracy:.4f} with the "
        f"new head) at epsilon {spent:.3f} (delta {args.delta:g}), sigma {noise_multiplier:.3f}, {steps} steps of "
        f"expected batch {args.batch_size}, {summary['seconds']:.1f}s"
    )
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DP fine-tuning (LoRA or full) of a small transformers model with fundp")
    parser.add_argument("--model", choices=["bert", "gpt2"], default="bert")
    parser.add_argument("--lora", action="store_true", help="train peft LoRA adapters + the head (default: all parameters)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--pretrain-steps", type=int, default=300, help="non-private steps on the public classes 0-4")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon (inf: non-private)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-norm", type=float, default=1.0, help="per-example clipping norm C")
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=None, help="number of DP steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-2 full, 2e-2 LoRA)")
    parser.add_argument("--grad-method", choices=["auto", "vmap", "ghost"], default="auto")
    parser.add_argument("--pad-to-multiple", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="wrap dp_step in torch.compile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 2e-2 if args.lora else 1e-2
    return args


def main(argv=None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
