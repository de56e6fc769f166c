"""Training quality (benchmarks 4-5): full model vs RaPTr vs the prior methods, same steps, same seed.

A 12-layer pre-LN GPT learns bytes of the Python standard library's own sources (every machine
has them offline; every 10th file is held out). For each method: final validation loss (full
model, eval mode), wall time, block compute actually run, the training loss just before and after
each stage transition, and the validation loss of the full model at RaPTr's wall time.

    python benchmarks/quality.py --point A          # width 96, 1200 steps: all methods + ablations
    python benchmarks/quality.py --point all        # the tokens-per-parameter sweep (about an hour)
    python benchmarks/quality.py --quick            # a 1-2 minute smoke test
    python benchmarks/quality.py --point A --device cuda --dtype bfloat16 --width 768 --batch 64

Results go to benchmarks/out/quality_<point>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import GPT, GPTConfig, ROOT, add_device_args, byte_corpus, header, sync

import raptr_fx
from raptr_fx import FullModel, LayerDrop, ProgressiveLayerDrop, RaPTr

OUT = ROOT / "benchmarks" / "out"


@dataclass(frozen=True)
class Point:
    """One point of the tokens-per-parameter sweep."""

    width: int  # model width (12 layers always)
    steps: int  # optimizer steps
    methods: tuple[str, ...]  # which runs


ABLATIONS = ("raptr-inverse", "raptr-exact", "raptr-zerograd")
POINTS = {
    "A": Point(96, 1200, ("full", "full-short", "raptr", "pld", "layerdrop") + ABLATIONS),
    "B": Point(64, 2400, ("full", "raptr", "pld")),
    "C": Point(32, 6000, ("full", "raptr", "pld")),
}


def schedule_for(method: str, steps: int) -> tuple[raptr_fx.Schedule, dict]:
    """(schedule, transform options) of a method name."""
    if method in ("full", "full-short"):
        return FullModel(), {}
    if method == "pld":
        return ProgressiveLayerDrop(theta_bar=0.5, gamma=0.001), {}  # the recommended values
    if method == "layerdrop":
        return LayerDrop(p=0.25), {}  # same expected block compute as RaPTr 6-8-10-12
    sampling = "exact" if method == "raptr-exact" else "bernoulli"
    scaling = "inverse" if method == "raptr-inverse" else "none"
    return RaPTr("6-8-10-12", total_steps=steps, sampling=sampling), {"scaling": scaling}


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Warm-up, constant, then linear decay over the last 20% (to 10% of the peak)."""
    warmup, decay_start = min(100, steps // 10), int(0.8 * steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < decay_start:
        return peak
    return peak * (1.0 - 0.9 * (step - decay_start) / (steps - decay_start))


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
    return torch.stack([data[s: s + seq + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: GPT, val: torch.Tensor, args: argparse.Namespace) -> float:
    model.eval()
    generator = torch.Generator().manual_seed(1234)  # the same validation batches every time
    losses = []
    for _ in range(args.eval_batches):
        chunk = batches(val, args.batch, args.seq, generator).to(args.device)
        with autocast(args):
            losses.append(F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1).float(), chunk[:, 1:].flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def autocast(args: argparse.Namespace):
    if args.dtype == "bfloat16":
        return torch.autocast(args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(method: str, point: Point, data: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace) -> dict:
    train_data, val_data = data
    torch.manual_seed(args.seed)
    config = GPTConfig(n_layer=12, n_embd=point.width, n_head=max(1, point.width // 32), block_size=args.seq)
    model = GPT(config).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    # full-short: the full model given RaPTr's expected compute (75% of the steps) and its own
    # LR schedule, the fair equal-wall-time baseline.
    steps = point.steps * 3 // 4 if method == "full-short" else point.steps
    schedule, options = schedule_for(method, steps)
    example = (torch.zeros(1, args.seq, dtype=torch.long, device=args.device),)
    ctl = raptr_fx.transform(model, schedule, example_inputs=example, seed=args.seed, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    zero_grads = method == "raptr-zerograd"
    ctl.attach(optimizer, freeze_dropped=not zero_grads)
    shares = [b.flops_share for b in ctl.blocks]
    generator = torch.Generator().manual_seed(args.seed)  # the same data order for every method
    train_losses, evals, block_compute, elapsed = [], [], 0.0, 0.0
    for step in range(steps):
        if step % args.eval_every == 0:
            evals.append((step, elapsed, evaluate(model, val_data, args)))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, args.lr)
        chunk = batches(train_data, args.batch, args.seq, generator).to(args.device)
        block_compute += sum(s for s, k in zip(shares, ctl.active) if k) / sum(shares)
        sync(args.device)
        start = time.perf_counter()
        with autocast(args):
            loss = F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1).float(), chunk[:, 1:].flatten())
        loss.backward()
        if zero_grads:  # what compiled graphs and DDP give dropped units: zeros, which AdamW still applies
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()  # the controller steps itself after this
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        elapsed += time.perf_counter() - start
        train_losses.append(loss.item())
    final = evaluate(model, val_data, args)
    evals.append((steps, elapsed, final))
    transitions = []
    for start, _ in schedule.stage_bounds()[1:]:
        window = max(5, min(50, steps // 40))
        before = train_losses[max(0, start - window): start]
        after = train_losses[start: start + window]
        transitions.append((start, sum(before) / len(before), sum(after) / len(after)))
    return {
        "method": method, "params": params, "tokens_per_param": steps * args.batch * args.seq / params,
        "final_val": final, "wall_s": elapsed, "block_compute": block_compute / steps,
        "train_losses": train_losses, "evals": evals, "transitions": transitions,
    }


def loss_at_time(run: dict, seconds: float) -> float:
    """Validation loss of a run at a given training wall time (linear between evaluations)."""
    evals = [(t, loss) for _, t, loss in run["evals"]]
    for (t0, l0), (t1, l1) in zip(evals, evals[1:]):
        if t0 <= seconds <= t1:
            return l0 + (l1 - l0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return evals[-1][1]


def report(name: str, point: Point, runs: list[dict], args: argparse.Namespace) -> str:
    full = next((r for r in runs if r["method"] == "full"), None)
    lines = [
        f"### Point {name}: 12 layers, width {point.width}, {point.steps} steps, batch {args.batch}x{args.seq} bytes, "
        f"{runs[0]['params']:,} parameters, {runs[0]['tokens_per_param']:.1f} tokens/parameter",
        "",
        "| method | final val loss (nats/byte) | gap to full | wall s | wall / full | block compute | "
        "full model's val loss at this wall time | transitions: train loss before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        gap = run["final_val"] - full["final_val"] if full else float("nan")
        ratio = run["wall_s"] / full["wall_s"] if full else float("nan")
        at_time = loss_at_time(full, run["wall_s"]) if full else float("nan")
        jumps = ", ".join(f"{s}: {b:.3f}->{a:.3f}" for s, b, a in run["transitions"]) or "-"
        lines.append(f"| {run['method']} | {run['final_val']:.3f} | {gap:+.3f} | {run['wall_s']:.0f} | {ratio:.2f} | "
                     f"{run['block_compute']:.2f} | {at_time:.3f} | {jumps} |")
    return "\n".join(lines) + "\n"


def plot(name: str, runs: list[dict]) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        steps, times, losses = zip(*run["evals"][1:])  # without the untrained model at step 0
        by_step.plot(steps, losses, label=run["method"])
        by_time.plot(times, losses, label=run["method"])
    by_step.set(xlabel="step", ylabel="validation loss (nats/byte)", title=f"point {name}: against steps")
    by_time.set(xlabel="training wall time (s)", title=f"point {name}: against wall time")
    for axis in (by_step, by_time):
        axis.legend()
        axis.grid(alpha=0.3)
    path = OUT / f"quality_{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(parser)
    parser.add_argument("--point", default="A", help="A, B, C or all")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the point's methods")
    parser.add_argument("--quick", action="store_true", help="width 32, 60 steps, full vs raptr")
    parser.add_argument("--width", type=int, default=None, help="override the point's width")
    parser.add_argument("--steps", type=int, default=None, help="override the point's steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=20)
    args = parser.parse_args()
    if args.quick:
        points = {"quick": Point(32, 60, ("full", "raptr"))}
        args.eval_every, args.eval_batches, args.batch = 20, 4, 16
    else:
        points = POINTS if args.point == "all" else {args.point: POINTS[args.point]}
    OUT.mkdir(parents=True, exist_ok=True)
    data = byte_corpus()
    print(header(args), flush=True)
    print(f"# corpus: {len(data[0]):,} train bytes, {len(data[1]):,} validation bytes", flush=True)
    for name, point in points.items():
        if args.width or args.steps:
            point = Point(args.width or point.width, args.steps or point.steps, point.methods)
        methods = args.methods.split(",") if args.methods else point.methods
        runs = []
        for method in methods:
            runs.append(train(method, point, data, args))
            run = runs[-1]
            print(f"  {name} {method:<15} val {run['final_val']:.3f}  wall {run['wall_s']:.0f} s  "
                  f"block compute {run['block_compute']:.2f}", flush=True)
        table = report(name, point, runs, args)
        (OUT / f"quality_{name}.md").write_text(header(args) + "\n\n" + table)
        (OUT / f"quality_{name}.json").write_text(json.dumps(runs))
        image = plot(name, runs)
        print("\n" + table + (f"\nplot: {image}" if image else "\n(no plot: pip install matplotlib)"), flush=True)


if __name__ == "__main__":
    main()
