"""RaPTr under DDP with torchrun: every rank drops the same units, no find_unused_parameters.

    torchrun --nproc-per-node 2 examples/ddp_torchrun.py                  # tiny, CPU (gloo)
    torchrun --nproc-per-node 8 examples/ddp_torchrun.py --device cuda --compile --dtype bfloat16 \\
        --layers 12 --width 768 --seq 512 --batch 16 --steps 10000

Transform the bare model first, then wrap it in DDP (and compile). Decisions for step t come from
(seed, t) alone, so the ranks agree without communicating. Data here is random tokens: put your
loader (with a DistributedSampler) in its place.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

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
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="regional", choices=["regional", "cond"])
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        train(args)
        # The wrapped model lives in train() so that it is freed while the process group is up
        # (plus a collection for anything held in reference cycles). Freed after
        # destroy_process_group(), it tears the gloo group down while holding the GIL, which
        # deadlocked with gloo's worker thread at exit here (pytorch#56297).
        gc.collect()
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace) -> None:
    cuda = args.device == "cuda"
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    config = GPTConfig(n_layer=args.layers, n_embd=args.width, block_size=args.seq)
    model = GPT(config).to(device)
    ctl = raptr_fx.transform(model, args.schedule, total_steps=args.steps,  # 1. before DDP
                             compile_mode=args.compile_mode)
    runner = DDP(model, device_ids=[local_rank] if cuda else None)      # no find_unused_parameters
    if args.compile:
        runner = torch.compile(runner)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    ctl.attach(optimizer)                                               # 2. steps with the optimizer

    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
        with autocast:
            logits = runner(idx[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:5d}  stage {ctl.stage}  active {sum(ctl.active):2d}/{len(ctl.blocks)}  "
                  f"loss {loss.item():.3f}", flush=True)
    if rank == 0:
        print(f"done: {args.steps} steps on {dist.get_world_size()} ranks in {time.perf_counter() - start:.1f} s, "
              f"{ctl.expected_compute:.0%} of the units' compute", flush=True)


if __name__ == "__main__":
    main()
