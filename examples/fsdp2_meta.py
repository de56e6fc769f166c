"""RaPTr with FSDP2 and a model built on the meta device: no full copy of the weights anywhere.

    torchrun --nproc-per-node 2 examples/fsdp2_meta.py                       # tiny, CPU (gloo)
    torchrun --nproc-per-node 8 examples/fsdp2_meta.py --device cuda --dtype bfloat16 \\
        --layers 24 --width 2048 --seq 1024 --steps 10000

The recipe: build on meta (no memory), transform, fully_shard each unit and then the root,
to_empty on the real device, initialize. The gates look the parameters up when they run, so
they follow the sharded, materialized ones and keep no unsharded copy alive. Every rank drops
the same units (decisions come from (seed, step)), which FSDP2's collectives require.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
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
    parser.add_argument("--compile", action="store_true")
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
    rank = dist.get_rank()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    config = GPTConfig(n_layer=args.layers, n_embd=args.width, block_size=args.seq)
    with torch.device("meta"):
        model = GPT(config)                                    # 1. no memory yet
    ctl = raptr_fx.transform(model, args.schedule, total_steps=args.steps)  # 2. before sharding
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.dtype == "bfloat16" else None)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)                   # 3. one FSDP unit per RaPTr unit
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)                              # 4. each rank allocates its shard
    torch.manual_seed(0)
    model.init_weights()                                       # 5. initialize the shards
    if args.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    ctl.attach(optimizer)

    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"rank 0 holds {local:,} of {total:,} parameters", flush=True)
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
        loss = F.cross_entropy(model(idx[:, :-1]).float().flatten(0, 1), idx[:, 1:].flatten())
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
