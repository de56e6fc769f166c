"""RaPTr with PyTorch's scaling recipe: activation checkpointing, per-block torch.compile, FSDP2,
and distributed checkpoints (DCP) to stop and resume.

    torchrun --nproc-per-node 2 examples/fsdp2_recipe.py --steps 40 --save-at 20 --checkpoint runs/ckpt
    torchrun --nproc-per-node 2 examples/fsdp2_recipe.py --steps 40 --resume runs/ckpt    # steps 20..39
    torchrun --nproc-per-node 8 examples/fsdp2_recipe.py --device cuda --dtype bfloat16 \\
        --layers 24 --width 2048 --seq 1024 --steps 10000 --checkpoint runs/ckpt --save-every 1000

The order, and why:
1. ``raptr_fx.transform`` the bare model (discovery reads the user's modules);
2. ``checkpoint_wrapper`` each block, then ``torch.compile`` each block, then ``fully_shard`` each
   block and the root (as torchtitan does); wrappers may also come before ``transform``;
3. build the optimizer and ``ctl.attach`` it: the gates move onto the outermost wrapper of each
   block, so a dropped block never enters its checkpoint or compiled code, and the compiled blocks
   share one graph as the untransformed stack does;
4. save and load with ``torch.distributed.checkpoint``: the controller is a ``Stateful`` beside the
   model and optimizer, so a resumed run draws the same subnetworks as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import raptr_fx
from nanogpt import GPT, GPTConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--schedule", default="6-8-10-12")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-compile", action="store_true", help="activation checkpointing and FSDP2 only")
    parser.add_argument("--checkpoint", help="directory for distributed checkpoints")
    parser.add_argument("--save-at", type=int, help="save after this many steps, then stop")
    parser.add_argument("--resume", help="a checkpoint directory to continue from")
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        train(args)
        gc.collect()  # free the sharded model while the process group is up (see fsdp2_meta.py)
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace) -> None:
    cuda = args.device == "cuda"
    rank = dist.get_rank()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    config = GPTConfig(n_layer=args.layers, n_embd=args.width, block_size=args.seq)
    model = GPT(config).to(device)
    ctl = raptr_fx.transform(model, args.schedule, total_steps=args.steps)       # 1. the bare model
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.dtype == "bfloat16" else None)
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        block = checkpoint_wrapper(block)                                          # 2. activation checkpointing,
        if not args.no_compile:
            block = torch.compile(block)                                           #    per-block compile,
        fully_shard(block, mp_policy=policy)                                       #    one FSDP unit per block
        blocks[i] = block
    fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    ctl.attach(optimizer)                                                          # 3. gates onto the wrappers

    if args.resume:                                                                # 4. resume: model, optimizer, schedule
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optimizer_state, "raptr": ctl}
        dcp.load(state, checkpoint_id=args.resume)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if rank == 0:
            print(f"resumed at step {ctl.step_count}, stage {ctl.stage}", flush=True)

    start, first = time.perf_counter(), ctl.step_count
    for step in range(ctl.step_count, args.steps):
        generator = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data, by step
        idx = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
        loss = F.cross_entropy(model(idx[:, :-1]).float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:5d}  stage {ctl.stage}  active {sum(ctl.active):2d}/{len(ctl.blocks)}  "
                  f"loss {loss.item():.4f}", flush=True)
        if args.checkpoint and args.save_at == step + 1:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optimizer_state, "raptr": ctl}, checkpoint_id=args.checkpoint)
            if rank == 0:
                print(f"saved at step {ctl.step_count} to {args.checkpoint}", flush=True)
            break
    if rank == 0:
        print(f"done: {ctl.step_count - first} steps on {dist.get_world_size()} ranks in "
              f"{time.perf_counter() - start:.1f} s, controller at step {ctl.step_count}", flush=True)


if __name__ == "__main__":
    main()
