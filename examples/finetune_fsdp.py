"""Differentially private fine-tuning of a tiny Llama under FSDP2 (``fully_shard``), LoRA or full.

    torchrun --nproc_per_node 2 examples/finetune_fsdp.py --steps 20          # CPU (gloo)
    torchrun --nproc_per_node 2 examples/finetune_fsdp.py --steps 20 --lora   # LoRA adapters only
    torchrun --nproc_per_node 4 examples/finetune_fsdp.py --steps 20          # FSDP2 x tensor parallelism, 2 x 2
    torchrun --nproc_per_node 2 examples/finetune_fsdp.py --steps 20          # CUDA (nccl): the same command

Nothing is downloaded: the model is ``LlamaForCausalLM`` built from a small config, and the data
are synthetic "sentences" (noisy arithmetic progressions modulo the vocabulary), modelled as a
causal language-modelling task; each example's loss is the mean next-token cross-entropy of its
sequence.  Every decoder layer and the whole model are wrapped by ``fully_shard``: each rank holds
a shard of every parameter.  With ``--tp 2`` (the default from 4 ranks on) the ranks form a
``("dp", "tp")`` mesh: each decoder layer's MLP is tensor-parallel over "tp" (``gate_proj`` and
``up_proj`` column-parallel, ``down_proj`` row-parallel, ``parallelize_module``) and
``fully_shard`` shards over "dp"; the two ranks of a tensor-parallel group pass the same rows
(the shard of their "dp" coordinate) and the step is told so (``tensor_parallel_dim="tp"``).

The DP part is the usual loop: Poisson batches padded to a fixed shape, each rank keeping its rows
(``fundp.distributed.shard``), ``fundp.dp_step(..., distributed=True)`` on the *sharded*
parameters, ``fundp.optim.adam`` on the sharded gradients it returns.  fundp gathers the
parameters once per step, clips each rank's own examples exactly, reduce-scatters the clipped sum
and adds each coordinate's noise once, on the rank that owns it (:mod:`fundp.sharding`): the run
equals one process on the whole batch.  With ``--lora`` only the adapters (rank ``--lora-rank``,
written here without ``peft``) are trained; the frozen base weights stay sharded and are gathered
for each forward by ``fundp.functional_call``.  ``--checkpoint DIR`` saves the run at the end with
:mod:`fundp.sharded_checkpoint`.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fundp

VOCAB, LENGTH = 32, 12


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T`` with a frozen ``base`` and trainable ``A`` [r, d_in], ``B`` [d_out, r] (zero)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float = 1.0):
        super().__init__()
        self.base, self.scale = base, scale
        base.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) / base.in_features**0.5)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


def build_model(lora_rank: int | None, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=LENGTH, attention_dropout=0.0, use_cache=False,
                         attn_implementation="eager")
    model = LlamaForCausalLM(config).to(dtype).eval()
    if lora_rank is not None:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.model.layers:
            layer.self_attn.q_proj = LoRALinear(layer.self_attn.q_proj, lora_rank)
            layer.self_attn.v_proj = LoRALinear(layer.self_attn.v_proj, lora_rank)
    return model


def synthetic_sequences(num: int, seed: int) -> torch.Tensor:
    """``[num, LENGTH]`` tokens: ``start + step * t (mod VOCAB)`` with a token replaced at random now and then."""
    g = torch.Generator().manual_seed(seed)
    start, step = torch.randint(0, VOCAB, (num, 1), generator=g), torch.randint(1, 4, (num, 1), generator=g)
    tokens = (start + step * torch.arange(LENGTH)) % VOCAB
    noise = torch.rand(num, LENGTH, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, (num, LENGTH), generator=g), tokens)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32, help="global expected batch size")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--grad-method", default="auto", choices=["auto", "vmap", "ghost"])
    parser.add_argument("--checkpoint", default=None, help="a fresh directory: save the run there at the end")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, default=None,
                        help="tensor-parallel ranks per group (default: 2 from 4 ranks on when the world size is even, else 1)")
    args = parser.parse_args(argv)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():  # torchrun sets the environment
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tp = args.tp if args.tp is not None else (2 if world_size >= 4 and world_size % 2 == 0 else 1)
    if tp < 1 or world_size % tp:
        raise ValueError(f"--tp {tp} must divide the world size {world_size}")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    sample_rate = args.batch_size / args.num_examples
    noise_multiplier = fundp.calibrate_noise(args.epsilon, args.delta, sample_rate=sample_rate, steps=args.steps)

    torch.manual_seed(args.seed)  # the same initial parameters on every rank, then sharded
    model = build_model(args.lora_rank if args.lora else None, getattr(torch, args.dtype)).to(device)
    if tp == 1:
        mesh = data_mesh = init_device_mesh(device.type, (world_size,))
        data_rank, data_size = rank, world_size
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh(device.type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))
        data_mesh = mesh["dp"]
        data_rank, data_size = data_mesh.get_local_rank(), data_mesh.size()
        plan = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}
        for layer in model.model.layers:
            parallelize_module(layer.mlp, mesh["tp"], plan)
    for layer in model.model.layers:
        fully_shard(layer, mesh=data_mesh)
    fully_shard(model, mesh=data_mesh)
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}  # DTensor shards

    def loss_fn(params, batch):
        logits = fundp.functional_call(model, params, (batch["tokens"],)).logits
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["tokens"][:, 1:], reduction="none")
        return losses.mean(dim=1)  # [B]: one loss per sequence (the privacy unit)

    data = synthetic_sequences(args.num_examples, args.seed)
    batch_key, train_key = fundp.random.split(fundp.random.key(args.seed))
    batches = fundp.data.poisson_batches(args.num_examples, sample_rate, batch_key, steps=args.steps,
                                         pad_to_multiple=16 * data_size)
    step = fundp.dp_step(loss_fn, max_norm=args.max_norm, noise_multiplier=noise_multiplier, sampler=batches,
                         distributed=True, grad_method=args.grad_method, tensor_parallel_dim="tp" if tp > 1 else None)
    opt = fundp.optim.adam(args.lr)
    opt_state, ledger, losses = opt.init(params), fundp.Ledger(), []
    for t, (indices, mask) in enumerate(batches):
        rows, shard_mask = fundp.distributed.shard(indices, mask, data_rank, data_size)  # a TP group's ranks: the same rows
        out = step(params, {"tokens": data[rows].to(device)}, fundp.random.fold_in(train_key, t).to(device),
                   ledger=ledger, mask=shard_mask.to(device))
        updates, opt_state = opt.update(out.grads, opt_state, params)
        params, ledger = fundp.optim.apply_updates(params, updates), out.ledger
        losses.append(float(out.loss))
    if args.checkpoint:
        fundp.sharded_checkpoint.save(args.checkpoint, params=params, opt_state=opt_state, ledger=ledger,
                                      key=train_key, step=args.steps)
    spent = fundp.epsilon(ledger, args.delta)
    shard = sum(p.to_local().numel() for p in params.values())
    total = sum(p.numel() for p in params.values())
    if rank == 0:
        print(f"done: {world_size} ranks ({world_size // tp} x {tp} tensor-parallel), {'LoRA' if args.lora else 'full'} fine-tuning of {total} parameters "
              f"({shard} on rank 0), loss {losses[0]:.3f} -> {losses[-1]:.3f} at epsilon {spent:.3f} (delta {args.delta:g})")
    return {"losses": losses, "epsilon": spent, "params": {n: p.full_tensor() for n, p in params.items()}, "ledger": ledger}


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
