"""Where a compiled RaPTr step's time goes: a torch.profiler summary of one all-on and one half-on step.

For each of the two steps: the top kernels (CUDA) or ops (CPU) by self time, and the host time not
covered by them (Python, dynamo guards, graph breaks at the gates, launch gaps).

    python benchmarks/profile_step.py                                   # CPU, small
    python benchmarks/profile_step.py --device cuda --dtype bfloat16 --width 1024 --batch 32 --seq 512
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

if not __package__:  # run as `python benchmarks/x.py`: the repository first on the path (raptr_fx, benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import GPT, GPTConfig, add_device_args, header, pin_stage, sync  # noqa: E402

import raptr_fx  # noqa: E402


def step(model: torch.nn.Module, runner, batch: torch.Tensor, optimizer: torch.optim.Optimizer, args) -> None:
    autocast = (torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())
    with autocast:
        loss = F.cross_entropy(runner(batch[:, :-1]).flatten(0, 1).float(), batch[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def summary(prof, device: str, top: int) -> str:
    cuda = device == "cuda"
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    busy = sum(getattr(e, key) for e in events)  # microseconds of kernels (or ops) in the step
    wall = max(e.time_range.end for e in prof.events()) - min(e.time_range.start for e in prof.events())
    lines = [f"  {'op / kernel':<60} {'self ms':>9} {'calls':>6}"]
    lines += [f"  {e.key[:60]:<60} {getattr(e, key) / 1000:>9.2f} {e.count:>6}" for e in rows]
    if cuda:
        lines.append(f"  step wall {wall / 1000:.2f} ms, kernels {busy / 1000:.2f} ms, "
                     f"not covered by kernels (host, launches, gaps) {max(0.0, wall - busy) / 1000:.2f} ms")
    else:
        lines.append(f"  step wall {wall / 1000:.2f} ms (CPU: ops and host time overlap; see the table)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(parser)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--compile-mode", default="regional", choices=["regional", "cond"])
    args = parser.parse_args()
    print(header(args), flush=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=12, n_embd=args.width, n_head=max(1, args.width // 32),
                          block_size=args.seq)).to(args.device)
    ctl = raptr_fx.transform(model, raptr_fx.RaPTr("6-12", total_steps=2, sampling="exact"),
                             compile_mode=args.compile_mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctl.attach(optimizer, step_with_optimizer=False)  # pinned to each stage below
    runner = torch.compile(model)
    batch = torch.randint(0, 256, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1)).to(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    for stage, name in ((1, "all units on"), (0, "half the units on")):
        pin_stage(ctl, stage)
        for _ in range(3):  # warm up (compile) this kind of step
            step(model, runner, batch, optimizer, args)
        sync(args.device)
        with profile(activities=activities) as prof:
            step(model, runner, batch, optimizer, args)
            sync(args.device)
        print(f"\n# {name} ({sum(ctl.active)} of {len(ctl.active)}), compile_mode={args.compile_mode}")
        print(summary(prof, args.device, args.top), flush=True)


if __name__ == "__main__":
    main()
