"""DP training step time and peak memory: fundp's engines, Opacus and non-private training, side by side.

For every model and batch size, the modes below run *interleaved* in one process on the same batch
(round-robin, after warm-up), and the table reports each mode's median step time and its ratio to
the non-private eager step; a step is gradient + SGD update of the parameters.

  nonprivate        model(x), loss.mean().backward(), torch.optim.SGD step
  nonprivate_comp   the same with torch.compile(model)
  fundp_vmap        fundp.dp_step(grad_method="vmap") + update        (eager)
  fundp_vmap_comp   fundp.compile(that step)  (torch.compile with the engine's backward traced)
  fundp_ghost       fundp.dp_step(grad_method="ghost") + update      (eager)
  fundp_ghost_comp  fundp.compile(that step)
  opacus_hooks      Opacus PrivacyEngine, grad_sample_mode="hooks"
  opacus_ghost      Opacus PrivacyEngine, grad_sample_mode="ghost" (fast gradient clipping)
  floor             the physical floor of a DP step: the non-private eager step plus drawing the noise
                    (one torch.randn of all trainable elements, added to the gradients)
  fundp_auto        fundp.dp_step(grad_method="auto") + update        (eager)
  fundp_auto_comp   fundp.compile(that step)                          (the recommended configuration)
  fundp_auto_plaincomp  torch.compile(that step), plain (no fundp wrapper, no dynamo option)

Transformer models (HuggingFace ``transformers`` / ``peft``, random-initialised from configs, nothing
downloaded; 2 layers, d=128 (``--hf-dim``), 4 heads (d / 32), T=64, eval mode = dropout off): ``gpt2`` (GPT2LMHeadModel,
per-sequence mean next-token loss), ``gpt2_lora`` (the same with LoRA r=8 on ``c_attn``; only the
adapters train), ``bert`` (BertForSequenceClassification), ``vit`` (ViTForImageClassification on
32x32 images, 4x4 patches: 64 patches), ``llama`` (LlamaForCausalLM: RMSNorm, rotary, gated MLP).
Their default modes are nonprivate, floor, fundp_auto, fundp_auto_comp and the two Opacus modes,
and a second table gives fundp_auto_comp / nonprivate, / floor, / each Opacus mode and, with
``--memory``, fundp's peak memory / non-private's.  An Opacus mode that refuses a model is
reported as "refused: <reason>".

Memory (``--memory``; slow on CPU: a process per configuration), two numbers per mode:

* peak: on CUDA ``torch.cuda.max_memory_allocated`` over one step (in-process, reset before each
  mode); on CPU the process's whole peak RSS over a step (``VmHWM``, reset after two warm-up steps so
  that compilation does not count), Python, torch and compiled code included — a few hundred MB
  common to every mode (more for compiled modes), which dilutes the ratios;
* step: the memory the step itself adds, peak minus what was in use just before it (CUDA: allocated
  tensors; CPU: RSS) — activations, gradients, the engine's book-keeping; the ratio that does not
  depend on how large the runtime is.

    python benchmarks/speed.py                           # all models, B in 64 256 1024
    python benchmarks/speed.py --models mlp --batch-sizes 256 --repeats 20 --memory
    python benchmarks/speed.py --models transformers --batch-sizes 64 --repeats 5 --memory   # the five HF models
    python benchmarks/speed.py --models gpt2,bert --modes nonprivate floor fundp_auto_comp
    python benchmarks/speed.py --models bert vit --hf-dim 768 --batch-sizes 16   # BERT-base / ViT-B width

Opacus comes from the ``bench`` extra (``pip install -e ".[bench]"``); without it its columns are skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import fundp

MODES = ["nonprivate", "nonprivate_comp", "fundp_vmap", "fundp_vmap_comp", "fundp_ghost", "fundp_ghost_comp",
         "opacus_hooks", "opacus_ghost"]
EXTRA_MODES = ["floor", "fundp_auto", "fundp_auto_comp", "fundp_auto_plaincomp"]
HF_MODES = ["nonprivate", "floor", "fundp_auto", "fundp_auto_comp", "opacus_hooks", "opacus_ghost"]
MAX_NORM, SIGMA, LR = 1.0, 1.0, 0.05


# ------------------------------------------------------------------------------------------- models


class MLP(nn.Module):
    """784-512-256-10."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)


class MnistCNN(nn.Module):
    """The CNN of Opacus's MNIST example (SampleConvNet)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        attention = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Transformer(nn.Module):
    """Token embedding + fixed sinusoidal positions, 2 pre-norm blocks (d=64, 4 heads), T=32, classifier."""

    def __init__(self, vocab=1000, dim=64, length=32, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        position = torch.arange(length).unsqueeze(1) * torch.exp(torch.arange(0, dim, 2) * (-math.log(1e4) / dim))
        self.register_buffer("positions", torch.cat([torch.sin(position), torch.cos(position)], dim=1))
        self.blocks = nn.Sequential(Block(dim, 4), Block(dim, 4))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.blocks(self.embed(tokens) + self.positions)
        return self.head(self.norm(h).mean(dim=1))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(8, cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + (x if self.skip is None else self.skip(x)))


class ResNetGN(nn.Module):
    """ResNet-ish CNN for 3x32x32: stem 16, stages 16/32/64 (stride 2), GroupNorm(8), pool, linear."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.norm = nn.GroupNorm(8, 16)
        self.stages = nn.Sequential(ResBlock(16, 16, 1), ResBlock(16, 32, 2), ResBlock(32, 64, 2))
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        h = self.stages(F.relu(self.norm(self.stem(x))))
        return self.head(h.mean(dim=(2, 3)))


# --hf-dim sets the width (heads of 32 dims); through the environment so that memory subprocesses see it.
HF_DIM = int(os.environ.get("FUNDP_BENCH_HF_DIM", "128"))
HF_LAYERS, HF_HEADS, HF_VOCAB, HF_LENGTH, HF_CLASSES = 2, HF_DIM // 32, 1000, 64, 10
LM_MODELS = ("gpt2", "gpt2_lora", "llama")


class Logits(nn.Module):
    """A ``transformers`` model called as ``model(x) -> logits`` (what Opacus and the loss code expect)."""

    def __init__(self, inner, input_name):
        super().__init__()
        self.inner, self.input_name = inner, input_name

    def forward(self, x):
        return self.inner(**{self.input_name: x}).logits


def hf_model(name):
    """The five ``transformers`` / ``peft`` benchmark models (module docstring), in eval mode."""
    import transformers as hf

    if name in ("gpt2", "gpt2_lora"):
        config = hf.GPT2Config(n_layer=HF_LAYERS, n_embd=HF_DIM, n_head=HF_HEADS, vocab_size=HF_VOCAB,
                               n_positions=HF_LENGTH, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               use_cache=False, bos_token_id=0, eos_token_id=0)
        model = hf.GPT2LMHeadModel(config)
        if name == "gpt2_lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0,
                                                     fan_in_fan_out=True, init_lora_weights=False))
    elif name == "bert":
        model = hf.BertForSequenceClassification(hf.BertConfig(
            vocab_size=HF_VOCAB, hidden_size=HF_DIM, num_hidden_layers=HF_LAYERS, num_attention_heads=HF_HEADS,
            intermediate_size=4 * HF_DIM, max_position_embeddings=HF_LENGTH, num_labels=HF_CLASSES,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0))
    elif name == "vit":
        model = hf.ViTForImageClassification(hf.ViTConfig(
            image_size=32, patch_size=4, num_channels=3, hidden_size=HF_DIM, num_hidden_layers=HF_LAYERS,
            num_attention_heads=HF_HEADS, intermediate_size=4 * HF_DIM, num_labels=HF_CLASSES,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    else:
        model = hf.LlamaForCausalLM(hf.LlamaConfig(
            vocab_size=HF_VOCAB, hidden_size=HF_DIM, intermediate_size=4 * HF_DIM, num_hidden_layers=HF_LAYERS,
            num_attention_heads=HF_HEADS, num_key_value_heads=HF_HEADS, max_position_embeddings=HF_LENGTH,
            attention_dropout=0.0, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    return Logits(model.eval(), "pixel_values" if name == "vit" else "input_ids")


MODELS = {"mlp": MLP, "mnist_cnn": MnistCNN, "transformer": Transformer, "resnet_gn": ResNetGN}
HF_MODELS = {name: (lambda name=name: hf_model(name)) for name in ("gpt2", "bert", "vit", "llama", "gpt2_lora")}
ALL_MODELS = {**MODELS, **HF_MODELS}


def per_example_loss(name, logits, y):
    """``[B]`` losses: cross-entropy, or for the language models the sequence's mean next-token loss (y = ids)."""
    if name in LM_MODELS:
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), y[:, 1:], reduction="none").mean(dim=1)
    return F.cross_entropy(logits, y, reduction="none")


def make_batch(name, size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name in LM_MODELS:
        x = torch.randint(0, HF_VOCAB, (size, HF_LENGTH), generator=g)
        return x.to(device), x.to(device)
    if name == "bert":
        x = torch.randint(0, HF_VOCAB, (size, HF_LENGTH), generator=g)
    elif name == "vit":
        x = torch.randn(size, 3, 32, 32, generator=g)
    elif name == "mlp":
        x = torch.randn(size, 784, generator=g)
    elif name == "mnist_cnn":
        x = torch.randn(size, 1, 28, 28, generator=g)
    elif name == "transformer":
        x = torch.randint(0, 1000, (size, 32), generator=g)
    else:
        x = torch.randn(size, 3, 32, 32, generator=g)
    return x.to(device), torch.randint(0, 10, (size,), generator=g).to(device)


# -------------------------------------------------------------------------------------------- steps


def build_step(name, mode, size, device):
    """Returns ``step()`` running one training step of ``mode`` on a fixed batch (same seed everywhere)."""
    torch.manual_seed(0)
    model = ALL_MODELS[name]().to(device)
    x, y = make_batch(name, size, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if mode.startswith("nonprivate") or mode == "floor":
        forward = torch.compile(model) if mode.endswith("_comp") else model
        optimizer = torch.optim.SGD(trainable, lr=LR)
        sizes = [p.numel() for p in trainable]

        def step():
            optimizer.zero_grad(set_to_none=True)
            per_example_loss(name, forward(x), y).mean().backward()
            if mode == "floor":  # the noise no DP step can avoid: one draw of every trainable element
                noise = torch.randn(sum(sizes), device=device).split(sizes)
                torch._foreach_add_([p.grad for p in trainable], [n.view_as(p) for n, p in zip(noise, trainable)])
            optimizer.step()

        return step
    if mode.startswith("fundp"):
        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

        def loss_fn(p, batch):
            return per_example_loss(name, torch.func.functional_call(model, p, (batch[0],)), batch[1])

        method = mode.split("_")[1]
        dp = fundp.dp_step(loss_fn, max_norm=MAX_NORM, noise_multiplier=SIGMA, expected_batch_size=size,
                           grad_method=method)
        # fundp.compile: torch.compile with the ghost engine's autograd.grad traced into the graph
        # (plain torch.compile runs the engine outside the graph); older fundp: torch.compile.
        compile_step = torch.compile if mode.endswith("_plaincomp") else getattr(fundp, "compile", torch.compile)
        dp = compile_step(dp) if mode.endswith("comp") else dp
        keys = [fundp.random.key(0)]

        def step():
            keys[0] = fundp.random.fold_in(keys[0], 1)
            grads = dp(params, (x, y), keys[0]).grads
            torch._foreach_add_(list(params.values()), list(grads.values()), alpha=-LR)

        return step
    from opacus import PrivacyEngine

    # Opacus records activations only in training mode; the HF models' dropout probabilities are 0,
    # so training mode computes the same function as the eval mode the other modes use.
    model.train()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=size)
    optimizer = torch.optim.SGD(trainable, lr=LR)
    engine = PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "opacus_hooks":
            model, optimizer, _ = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                      noise_multiplier=SIGMA, max_grad_norm=MAX_NORM,
                                                      poisson_sampling=False, grad_sample_mode="hooks")
            criterion = None
        else:
            model, optimizer, criterion, _ = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, criterion=nn.CrossEntropyLoss(),
                noise_multiplier=SIGMA, max_grad_norm=MAX_NORM, poisson_sampling=False, grad_sample_mode="ghost")

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        if criterion is None:
            loss = per_example_loss(name, logits, y).mean()
        elif name in LM_MODELS:  # Opacus's per-sequence loss for generative models: flattened tokens + shape
            loss = criterion(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), shape=(size, y.shape[1] - 1))
        else:
            loss = criterion(logits, y)
        loss.backward()
        optimizer.step()

    return step


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def available_modes(requested):
    try:
        import opacus  # noqa: F401
    except ImportError:
        print("opacus not installed (pip install -e '.[bench]'): skipping its modes")
        return [m for m in requested if not m.startswith("opacus")]
    return requested


# ------------------------------------------------------------------------------------------- memory


def memory_of(name, mode, size, device):
    """``{"peak": bytes, "step": bytes}`` of one step (see the module docstring)."""
    if device.type == "cuda":
        step = build_step(name, mode, size, device)
        step()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated()
        return {"peak": peak, "step": peak - before}
    # CPU: a fresh process, so that earlier configurations' high-water mark does not count.
    # A fixed mmap threshold: glibc then maps every large tensor on its own and unmaps it when freed,
    # so the RSS follows the live tensors (its dynamic threshold would keep freed memory resident).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--_memory-child", name, mode, str(size)], capture_output=True,
                         text=True, timeout=1800, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def _memory_child(name, mode, size):
    torch.set_num_threads(int(os.environ.get("FUNDP_BENCH_THREADS", torch.get_num_threads())))
    step = build_step(name, mode, size, torch.device("cpu"))
    step()  # warm-up (and compilation): neither the compiler's nor the first call's memory is the step's
    step()
    gc.collect()
    before = _status_kib("VmRSS")
    # VmHWM is this process's own high-water mark (ru_maxrss is not: it starts from the parent's
    # RSS at fork).  Writing 5 to clear_refs resets it to the current RSS.
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak": peak * 1024, "step": (peak - before) * 1024}))


# -------------------------------------------------------------------------------------------- main


def run_config(name, size, modes, device, repeats, warmup, budget_s):
    # Every dp_step shares the code object of `step`; without a reset, dynamo's per-code-object
    # recompile limit (8) is reached after a few configurations and later ones run eagerly.
    torch._dynamo.reset()
    steps, times, refused = {}, {m: [] for m in modes}, {}
    for mode in modes:
        try:
            steps[mode] = build_step(name, mode, size, device)
            start = time.perf_counter()
            for _ in range(warmup):
                steps[mode]()
            synchronize(device)
            # A mode slower than the per-configuration budget is timed fewer times, not skipped.
            per_step = (time.perf_counter() - start) / max(warmup, 1)
            steps[mode].repeats = max(1, min(repeats, int(budget_s / max(per_step, 1e-6))))
        except Exception as error:  # e.g. an Opacus mode that does not support a layer
            reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"
            print(f"  {mode}: {'refused' if mode.startswith('opacus') else 'failed'} ({reason})")
            refused[mode] = reason
            steps.pop(mode, None)
    for r in range(repeats):
        for mode, step in steps.items():
            if r >= step.repeats:
                continue
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[mode].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items() if t}, refused


def print_ratios(results, fundp_mode="fundp_auto_comp"):
    """The targets' table: fundp (compiled, auto) against non-private, the floor, Opacus, and in memory."""
    rows = [r for r in results if fundp_mode in r["seconds"] or fundp_mode in r.get("refused", {})]
    if not rows:
        return
    print(f"\n{fundp_mode} ratios (time: medians; memory: {fundp_mode} / nonprivate, peak and the step's own)")
    print("| model | B | fundp ms | / non-private | / floor | / opacus hooks | / opacus ghost | peak memory | step memory |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        sec, mem, refused = r["seconds"], r["memory_bytes"], r.get("refused", {})
        if fundp_mode not in sec:
            print(f"| {r['model']} | {r['batch_size']} | failed: {refused[fundp_mode]} | | | | | | |")
            continue
        ours = sec[fundp_mode]

        def ratio(mode):
            if mode in sec:
                return f"{ours / sec[mode]:.2f}x"
            if mode in refused:
                return f"refused: {refused[mode]}"
            return "n/a"

        def memory(kind):
            if fundp_mode in mem and mem.get("nonprivate"):
                return f"{mem[fundp_mode][kind] / mem['nonprivate'][kind]:.2f}x"
            return "n/a"

        print(f"| {r['model']} | {r['batch_size']} | {ours * 1e3:.1f} | {ratio('nonprivate')} | {ratio('floor')} | "
              f"{ratio('opacus_hooks')} | {ratio('opacus_ghost')} | {memory('peak')} | {memory('step')} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help=f"names, space- or comma-separated, from {', '.join(ALL_MODELS)}; "
                             "'transformers' = the five HF models (default: the four original models)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--modes", nargs="+", default=None, choices=MODES + EXTRA_MODES,
                        help="default: MODES for the original models, HF_MODES for the transformer models")
    parser.add_argument("--memory-modes", nargs="+", default=None, choices=MODES + EXTRA_MODES,
                        help="with --memory: measure only these modes (default: all; nonprivate is always measured)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed steps per mode and configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (CPU: a subprocess each)")
    parser.add_argument("--hf-dim", type=int, default=None,
                        help="width of the transformer models (default 128, 4 heads; heads = width / 32)")
    parser.add_argument("--json", help="write the raw numbers here")
    parser.add_argument("--_memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hf_dim is not None:
        if args.hf_dim <= 0 or args.hf_dim % 32:
            parser.error("--hf-dim must be a positive multiple of 32")
        global HF_DIM, HF_HEADS
        HF_DIM, HF_HEADS = args.hf_dim, args.hf_dim // 32
        os.environ["FUNDP_BENCH_HF_DIM"] = str(args.hf_dim)
    if args._memory_child:
        name, mode, size = args._memory_child
        return _memory_child(name, mode, int(size))
    device = torch.device(args.device)
    names = [n for item in args.models for n in item.split(",") if n]
    names = [m for n in names for m in (list(HF_MODELS) if n == "transformers" else [n])]
    unknown = [n for n in names if n not in ALL_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(ALL_MODELS)} or 'transformers'")
    args.models = names
    if args.modes is None:
        args.modes = HF_MODES if all(n in HF_MODELS for n in names) else MODES
    modes = available_modes(args.modes)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"fundp {fundp.__version__}, torch {torch.__version__}, {where}, {time.strftime('%Y-%m-%d')}")
    print("time: median step (ms) and ratio to the non-private eager step" + ("; memory: ratio to non-private" if args.memory else ""))
    results = []
    header = f"| {'model':<11} | {'B':>4} | " + " | ".join(f"{m:>16}" for m in modes) + " |"
    print(header)
    print("|" + "|".join("---:" for _ in range(len(modes) + 2)) + "|")
    for name in args.models:
        for size in args.batch_sizes:
            medians, refused = run_config(name, size, modes, device, args.repeats, args.warmup, args.budget)
            base = medians.get("nonprivate")
            memory = {}
            if args.memory:
                memory_modes = modes if args.memory_modes is None else \
                    ["nonprivate"] + [m for m in args.memory_modes if m in modes and m != "nonprivate"]
                for mode in memory_modes:
                    if mode in refused:
                        continue
                    try:
                        memory[mode] = memory_of(name, mode, size, device)
                    except Exception as error:
                        print(f"  memory {mode}: failed ({str(error).splitlines()[-1][:120]})")
            cells = []
            for mode in modes:
                if mode not in medians:
                    label = ("refused" if mode.startswith("opacus") else "failed") if mode in refused else "n/a"
                    cells.append(f"{label:>16}")
                    continue
                cell = f"{medians[mode] * 1e3:.1f} ({medians[mode] / base:.2f}x)" if base else f"{medians[mode] * 1e3:.1f}"
                if mode in memory and memory.get("nonprivate"):
                    cell += f" m{memory[mode]['peak'] / memory['nonprivate']['peak']:.2f}"
                cells.append(f"{cell:>16}")
            print(f"| {name:<11} | {size:>4} | " + " | ".join(cells) + " |", flush=True)
            results.append({"model": name, "batch_size": size, "seconds": medians, "memory_bytes": memory,
                            "refused": refused})
    print_ratios(results, "fundp_auto_comp" if "fundp_auto_comp" in modes else "fundp_auto")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": where, "torch": torch.__version__, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
