"""RaPTr in a plain PyTorch training loop, with a rich progress bar (stage, active units, loss, tokens/s).

    python examples/train_loop.py                      # tiny byte-level GPT on this repo's text, CPU, ~1 min
    python examples/train_loop.py --steps 6            # smoke test
    python examples/train_loop.py --device cuda --compile --dtype bfloat16 \\
        --layers 12 --width 768 --seq 256 --batch 32 --steps 5000

The whole adoption is two lines: ``raptr_fx.transform`` on the bare model, then
``ctl.attach(optimizer)``; compile after transforming.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import raptr_fx
from nanogpt import GPT, GPTConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent


def corpus() -> torch.Tensor:
    """This repository's README and sources as bytes: real text, no download."""
    files = [ROOT / "README.md", *sorted((ROOT / "raptr_fx").rglob("*.py"))]
    data = b"\n".join(f.read_bytes() for f in files if f.is_file())
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--schedule", default="6-8-10-12")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    console = Console()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    data = corpus()
    model = GPT(GPTConfig(n_layer=args.layers, n_embd=args.width, block_size=args.seq)).to(device)
    ctl = raptr_fx.transform(model, args.schedule, total_steps=args.steps, seed=args.seed)   # 1. gate the blocks
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    ctl.attach(optimizer)                                                                   # 2. step with it
    runner = torch.compile(model) if args.compile else model                               # compile after
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())
    console.print(f"{len(ctl.blocks)} units gated, schedule {args.schedule} over {args.steps} steps: "
                  f"{100 * ctl.expected_compute:.0f}% of the unit compute")

    generator = torch.Generator().manual_seed(args.seed)
    columns = [TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
               TextColumn("stage {task.fields[stage]} · {task.fields[active]}/{task.fields[units]} units · "
                          "loss {task.fields[loss]:.3f} · {task.fields[tps]:,.0f} tok/s"), TimeRemainingColumn()]
    model.train()
    loss_value, tokens, started = float("nan"), 0, time.perf_counter()
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=args.steps, stage=0, active=sum(ctl.active),
                                 units=len(ctl.blocks), loss=loss_value, tps=0.0)
        for _ in range(args.steps):
            starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=generator)
            batch = torch.stack([data[s:s + args.seq + 1] for s in starts.tolist()]).to(device)
            active = sum(ctl.active)  # this step's subnetwork, drawn when the previous step ended
            with autocast:
                logits = runner(batch[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            optimizer.step()          # the controller steps here and draws the next subnetwork
            optimizer.zero_grad(set_to_none=True)
            loss_value, tokens = loss.item(), tokens + batch[:, :-1].numel()
            progress.update(task, advance=1, stage=ctl.stage, active=active, loss=loss_value,
                            tps=tokens / (time.perf_counter() - started))
    elapsed = time.perf_counter() - started
    console.print(f"done: {ctl.step_count} steps, final loss {loss_value:.3f}, stage {ctl.stage}, "
                  f"{tokens / elapsed:,.0f} tokens/s, {elapsed:.1f} s")


if __name__ == "__main__":
    main()
