"""Training quality (benchmarks 4-5): full model vs RaPTr vs the prior methods.

A 12-layer pre-LN GPT learns bytes of the Python standard library's own sources (every machine
has them offline; every 10th file is held out). For each run: final validation loss (full model,
eval mode), wall time, block compute actually run, the training loss just before and after each
stage transition, and the validation curve against steps and against compute.

    python benchmarks/quality.py --quick            # a 1-2 minute smoke test (CI)
    python benchmarks/quality.py --point A          # width 96, 1200 steps: all methods + ablations
    python benchmarks/quality.py --point all        # the tokens-per-parameter sweep
    python benchmarks/quality.py --plan tuned       # the tuned verdict (hours; resumable, see below)
    python benchmarks/quality.py --plan defaults    # then the defaults search (about an hour on 2 cores)
    python benchmarks/quality.py --report           # tables + plots from the recorded runs
    bash benchmarks/gpu.sh                          # a GPU-sized run (--device cuda --compile --corpus DIR ...)

Comma lists in --point, --methods, --lr, --init and --seeds run every combination (a grid).
--jobs N runs them as N single-process workers (--threads each, default 1: on a small shared
machine one thread per process is far faster than OpenMP threads waiting on busy cores).
With --results FILE every finished run is appended to FILE as one JSON line, keyed by
(point, method, width, steps, lr, init, seed, batch, seq, eval settings, device, dtype, compile,
corpus); a rerun skips the runs already there, so an interrupted grid resumes where it stopped.

--plan tuned is the baseline-tuning protocol (issue 9), results in
benchmarks/results/quality_runs.jsonl by default:
  1. grid at point A, seed 0: peak LR GRID_LRS x init {gpt2, default} for full,
     full-short (full model, 75% of the steps, its own LR schedule: RaPTr's compute) and raptr;
  2. verdict: each method at its own best grid setting, points A, B, C x seeds 0, 1, 2
     (A seed 0 is the grid run), in that order.
--plan defaults screens DEFAULTS_VARIANTS (each at RaPTr 6-8-10-12's compute, at raptr's tuned
setting) at A and B, seed 0; variants that beat raptr at both, and pld-equal, get seeds 1 and 2.

Ad-hoc results go to benchmarks/out/quality_<point>.{md,json,png}; --report writes
benchmarks/results/quality_tuned.md and benchmarks/results/quality_*.png.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if not __package__:  # run as `python benchmarks/x.py`: the repository first on the path (raptr_fx, benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (GPT, GPTConfig, ROOT, add_device_args, byte_corpus, default_init, header,  # noqa: E402
                               set_threads, sync)

import raptr_fx  # noqa: E402
from raptr_fx import FullModel, LayerDrop, ProgressiveLayerDrop, RaPTr, Stage, WidthRaPTr  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
RESULTS = ROOT / "benchmarks" / "results"
RUNS_FILE = RESULTS / "quality_runs.jsonl"


@dataclass(frozen=True)
class Point:
    """One point of the tokens-per-parameter sweep."""

    width: int  # model width (12 layers always)
    steps: int  # optimizer steps
    methods: tuple[str, ...]  # which runs


ABLATIONS = ("raptr-inverse", "raptr-exact", "raptr-zerograd")
POINTS = {
    "A": Point(96, 1200, ("full", "full-short", "raptr", "pld", "layerdrop") + ABLATIONS),
    "B": Point(64, 2400, ("full", "full-short", "raptr", "pld")),
    "C": Point(32, 6000, ("full", "full-short", "raptr", "pld")),
}
QUICK = Point(32, 60, ("full", "raptr", "width"))
VERDICT_METHODS = ("full", "full-short", "raptr")
GRID_LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)  # each edge added when the last edge was best for some method
GRID_INITS = ("gpt2", "default")
VERDICT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Run:
    """Everything that determines one training run (its key in the results file)."""

    point: str
    method: str
    width: int
    steps: int  # the point's steps; full-short trains 75% of them
    lr: float
    init: str  # "gpt2" (std 0.02, residual projections 0.02/sqrt(2L)) or "default" (PyTorch's)
    seed: int
    batch: int = 32
    seq: int = 64
    eval_every: int = 100
    eval_batches: int = 20
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False  # model.compile() after transform (regional gates)
    corpus: str = "stdlib"  # "stdlib" (the standard library's top-level sources) or a directory of .py files

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# The defaults search (issue 9): each variant has RaPTr 6-8-10-12's expected block compute (0.75 on
# 12 units), so each compares with raptr and with full-short directly; all run at raptr's tuned LR.
DEFAULTS_VARIANTS = {
    "raptr-4-8-12-12": "stage shape: the last half of the steps on the full model",
    "raptr-6-7-8-9-10-11-12": "stage shape: seven smaller stages",
    "raptr-12-4-7-10-12": "stage shape: a full-model warm-up stage first",
    "raptr-exact": "exactly k units per step instead of Bernoulli",
    "raptr-inverse": "1/p scaling of a kept unit (the paper's default is none)",
    "raptr-rewarm": "LR warmed up again over 50 steps after each stage transition",
    "pld-equal": "Progressive Layer Dropping at the same compute (gamma 5/steps, theta_bar solved)",
}
REWARM_STEPS = 50
# Width-wise RaPTr (issue 14), each at RaPTr 6-8-10-12's block compute (0.75), so full-short is their
# equal-compute baseline too. The MLP is 2/3 of a block's FLOPs here; width cuts the MLPs only
# (width_kinds=("mlp",): the fused c_attn heads are cuttable since issue 22, but these runs were sized
# and recorded without them): "0.25-0.5-0.75-1" keeps 0.625 of the MLP units on average.
WIDTH_METHODS = {
    "width": "WidthRaPTr 0.25-0.5-0.75-1 (MLP hidden units)",
    "depth-width": "RaPTr 9-10-11-12 x width 0.5-0.7-0.85-1 (both grow every stage)",
}
# Heads cut too (issue 22): the fused c_attn's heads and the MLP's units, schedules chosen for 0.75
# block compute with round(f x heads) kept heads (3 heads at A, 2 at B; C's one head cannot be cut).
HEADS_METHODS = {
    "width-heads": "WidthRaPTr 0.5-0.7-0.8-1 (MLP hidden units and attention heads)",
    "depth-width-heads": "RaPTr 9-10-11-12 x width 0.7-0.8-0.9-1 (MLP hidden units and attention heads)",
}
HEADS_POINTS = ("A", "B")
WIDTH_LRS = (2e-3, 4e-3, 8e-3, 1.6e-2)  # around the tuned LRs of full (4e-3) and raptr (8e-3); 2e-3: 4e-3 was best


def mean_keep(schedule: raptr_fx.Schedule, steps: int, num_units: int = 12) -> float:
    """Expected block compute of equal units over ``steps`` steps, step by step (PLD changes every step)."""
    return sum(sum(schedule.keep_probabilities(t, num_units)) for t in range(steps)) / (steps * num_units)


def pld_at_compute(steps: int, compute: float = 0.75, num_units: int = 12) -> ProgressiveLayerDrop:
    """PLD that decays over the first ~20% of the run and averages ``compute`` of the blocks."""
    gamma = 5.0 / steps
    low, high = 1e-3, 1.0  # mean_keep rises with theta_bar
    for _ in range(40):
        middle = (low + high) / 2
        below = mean_keep(ProgressiveLayerDrop(theta_bar=middle, gamma=gamma), steps, num_units) < compute
        low, high = (middle, high) if below else (low, middle)
    return ProgressiveLayerDrop(theta_bar=(low + high) / 2, gamma=gamma)


def schedule_for(method: str, steps: int) -> tuple[raptr_fx.Schedule, dict]:
    """(schedule, transform options) of a method name."""
    if method in ("full", "full-short"):
        return FullModel(), {}
    if method == "pld":
        return ProgressiveLayerDrop(theta_bar=0.5, gamma=0.001), {}  # the recommended values
    if method == "pld-equal":
        return pld_at_compute(steps), {}
    if method == "layerdrop":
        return LayerDrop(p=0.25), {}  # same expected block compute as RaPTr 6-8-10-12
    if method == "raptr-12-4-7-10-12":  # the warm-up given as keep=1.0: a string's "12" does not say "all units"
        n = steps // 5
        warmup = [Stage(n, keep=1.0), *(Stage(n, active=k) for k in (4, 7, 10)), Stage(steps - 4 * n, active=12)]
        return RaPTr(warmup), {"scaling": "none"}
    if method in ("width", "width-inverse"):
        return WidthRaPTr("0.25-0.5-0.75-1", total_steps=steps, width_kinds=("mlp",),
                          width_scaling="inverse" if method == "width-inverse" else "none"), {}
    if method == "depth-width":
        return RaPTr("9-10-11-12", total_steps=steps, width="0.5-0.7-0.85-1", width_kinds=("mlp",)), {"scaling": "none"}
    if method == "width-heads":
        return WidthRaPTr("0.5-0.7-0.8-1", total_steps=steps, width_kinds=("mlp", "heads")), {}
    if method == "depth-width-heads":
        return RaPTr("9-10-11-12", total_steps=steps, width="0.7-0.8-0.9-1", width_kinds=("mlp", "heads")), {"scaling": "none"}
    stages = method.removeprefix("raptr-")
    if not stages[:1].isdigit():
        stages = "6-8-10-12"
    sampling = "exact" if method == "raptr-exact" else "bernoulli"
    scaling = "inverse" if method == "raptr-inverse" else "none"
    return RaPTr(stages, total_steps=steps, sampling=sampling), {"scaling": scaling}


def step_compute(ctl: raptr_fx.Controller) -> float:
    """Share of the blocks' FLOPs this step runs: kept units, less the width parts cut inside them."""
    shares = {b.name: b.flops_share for b in ctl.blocks}
    kept = {b.name: k for b, k in zip(ctl.blocks, ctl.active)}
    run = sum(share for name, share in shares.items() if kept[name])
    for group in ctl.width_groups:
        if kept[group.unit]:
            run -= group.flops_share * (1 - ctl.kept_parts[group.name] / group.parts)
    return run / sum(shares.values())


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Warm-up, constant, then linear decay over the last 20% (to 10% of the peak)."""
    warmup, decay_start = min(100, steps // 10), int(0.8 * steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < decay_start:
        return peak
    return peak * (1.0 - 0.9 * (step - decay_start) / (steps - decay_start))


def rewarm_factor(step: int, schedule: raptr_fx.Schedule) -> float:
    """LR factor that ramps from 1/REWARM_STEPS back to 1 after each stage transition (not the first stage)."""
    start = max(first for first, _ in schedule.stage_bounds() if first <= step)
    since = step - start
    return (since + 1) / REWARM_STEPS if start > 0 and since < REWARM_STEPS else 1.0


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
    return torch.stack([data[s: s + seq + 1] for s in starts.tolist()])


def autocast(run: Run):
    if run.dtype == "bfloat16":
        return torch.autocast(run.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: GPT, val: torch.Tensor, run: Run) -> float:
    model.eval()
    generator = torch.Generator().manual_seed(1234)  # the same validation batches every time
    losses = []
    for _ in range(run.eval_batches):
        chunk = batches(val, run.batch, run.seq, generator).to(run.device)
        with autocast(run):
            losses.append(F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1).float(), chunk[:, 1:].flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def build_model(run: Run) -> GPT:
    torch.manual_seed(run.seed)
    config = GPTConfig(n_layer=12, n_embd=run.width, n_head=max(1, run.width // 32), block_size=run.seq)
    model = GPT(config)  # GPT-2-style init
    if run.init == "default":
        default_init(model)
    elif run.init != "gpt2":
        raise ValueError(f"unknown init {run.init!r}")
    return model.to(run.device)


def train(run: Run, data: tuple[torch.Tensor, torch.Tensor], verbose: bool = False) -> dict:
    train_data, val_data = data
    model = build_model(run)
    params = sum(p.numel() for p in model.parameters())
    # full-short: the full model given RaPTr's expected compute (75% of the steps) and its own
    # LR schedule, the fair equal-compute baseline.
    steps = run.steps * 3 // 4 if run.method == "full-short" else run.steps
    schedule, options = schedule_for(run.method, steps)
    example = (torch.zeros(1, run.seq, dtype=torch.long, device=run.device),)
    ctl = raptr_fx.transform(model, schedule, example_inputs=example, seed=run.seed, **options)
    if run.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.1, betas=(0.9, 0.95))
    zero_grads = run.method == "raptr-zerograd"
    ctl.attach(optimizer, freeze_dropped=not zero_grads)
    generator = torch.Generator().manual_seed(run.seed)  # the same data order for every method
    train_losses, evals, compute, elapsed = [], [], 0.0, 0.0
    for step in range(steps):
        if step % run.eval_every == 0:
            evals.append((step, elapsed, compute, evaluate(model, val_data, run)))
            if verbose:
                print(f"    {describe(run)}: step {step} val {evals[-1][3]:.4f} ({elapsed:.0f} s)", flush=True)
        lr = learning_rate(step, steps, run.lr)
        if run.method == "raptr-rewarm":
            lr *= rewarm_factor(step, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        chunk = batches(train_data, run.batch, run.seq, generator).to(run.device)
        compute += step_compute(ctl)
        sync(run.device)
        start = time.perf_counter()
        with autocast(run):
            loss = F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1).float(), chunk[:, 1:].flatten())
        loss.backward()
        if zero_grads:  # what compiled graphs and DDP give dropped units: zeros, which AdamW still applies
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()  # the controller steps itself after this
        optimizer.zero_grad(set_to_none=True)
        sync(run.device)
        elapsed += time.perf_counter() - start
        train_losses.append(loss.item())
    final = evaluate(model, val_data, run)
    evals.append((steps, elapsed, compute, final))
    transitions = []
    for start, _ in schedule.stage_bounds()[1:]:
        window = max(5, min(50, steps // 40))
        before = train_losses[max(0, start - window): start]
        after = train_losses[start: start + window]
        transitions.append((start, sum(before) / len(before), sum(after) / len(after)))
    every = max(1, steps // 100)  # the training curve, averaged over windows (for plots)
    curve = [(i + every, sum(train_losses[i:i + every]) / len(train_losses[i:i + every]))
             for i in range(0, steps, every)]
    return {
        "run": asdict(run), "method": run.method, "params": params, "steps_run": steps,
        "tokens_per_param": steps * run.batch * run.seq / params, "threads": torch.get_num_threads(),
        "final_val": final, "wall_s": elapsed, "block_compute": compute / steps,
        "evals": evals, "train_curve": curve, "transitions": transitions,
    }


# ---------------------------------------------------------------- running many runs, resumably

_DATA: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # by corpus, loaded once per process
_VERBOSE = False


def _exit_with_parent(parent: int) -> None:
    # A killed parent leaves pool workers running (they train on, then fail to report): follow it.
    while os.getppid() == parent:
        time.sleep(5)
    os._exit(1)


def _worker_init(threads: int, verbose: bool) -> None:
    global _VERBOSE
    set_threads(threads)
    _VERBOSE = verbose
    if multiprocessing.parent_process() is not None:
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def corpus(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in _DATA:
        _DATA[name] = byte_corpus(root=None if name == "stdlib" else name)
    return _DATA[name]


def _work(run: Run) -> dict:
    return train(run, corpus(run.corpus), _VERBOSE)


def load_results(path: Path | None) -> dict[str, dict]:
    """Finished runs of a results file, by key (the last record of a key wins)."""
    done = {}
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[Run(**record["run"]).key()] = record
    return done


def describe(run: Run) -> str:
    compiled = ", compiled" if run.compile else ""
    return (f"{run.point} {run.method:<14} lr {run.lr:g} init {run.init:<7} seed {run.seed} "
            f"(w{run.width}, {run.steps} steps{compiled})")


def execute(runs: list[Run], args: argparse.Namespace) -> list[dict]:
    """Run what is not in the results file yet (``--jobs`` workers); return all records in order."""
    path = Path(args.results) if args.results else None
    done = load_results(path)
    todo = list(dict.fromkeys(r for r in runs if r.key() not in done))
    if len(todo) < len(runs):
        print(f"# {len(runs) - len(todo)} of {len(runs)} runs already in {path}: skipped", flush=True)

    def record(result: dict) -> None:
        run = Run(**result["run"])
        done[run.key()] = result
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(result) + "\n")
        print(f"  {describe(run)}: val {result['final_val']:.4f}  wall {result['wall_s']:.0f} s  "
              f"block compute {result['block_compute']:.2f}", flush=True)

    if args.jobs <= 1:
        _worker_init(args.threads, args.verbose)
        for run in todo:
            record(_work(run))
    elif todo:
        context = multiprocessing.get_context("spawn")  # no fork of a process with OpenMP threads
        with context.Pool(args.jobs, initializer=_worker_init, initargs=(args.threads, args.verbose)) as pool:
            for result in pool.imap_unordered(_work, todo):
                record(result)
    return [done[r.key()] for r in runs]


def make_run(point: str, method: str, p: Point, lr: float, init: str, seed: int, args: argparse.Namespace) -> Run:
    return Run(point, method, p.width, p.steps, lr, init, seed, args.batch, args.seq,
               args.eval_every, args.eval_batches, args.device, args.dtype, args.compile, args.corpus)


def finite(value: float) -> float:
    return value if math.isfinite(value) else float("inf")


def best_settings(records: dict[str, dict], methods=VERDICT_METHODS) -> dict[str, tuple[float, str]]:
    """Each method's (lr, init) with the lowest final validation loss in the point-A seed-0 grid."""
    best = {}
    for method in methods:
        grid = [r for r in records.values() if r["run"]["point"] == "A" and r["run"]["method"] == method
                and r["run"]["seed"] == 0 and r["run"]["width"] == POINTS["A"].width
                and r["run"]["steps"] == POINTS["A"].steps and r["run"]["lr"] in GRID_LRS]
        if grid:
            top = min(grid, key=lambda r: finite(r["final_val"]))
            best[method] = (top["run"]["lr"], top["run"]["init"])
    return best


def plan_tuned(args: argparse.Namespace) -> None:
    grid = [make_run("A", m, POINTS["A"], lr, init, 0, args)
            for init in GRID_INITS for lr in GRID_LRS for m in VERDICT_METHODS]
    print(f"# phase 1: grid at point A, seed 0 ({len(grid)} runs)", flush=True)
    execute(grid, args)
    best = best_settings(load_results(Path(args.results)))
    print("# best settings: " + ", ".join(f"{m} lr {lr:g} init {i}" for m, (lr, i) in best.items()), flush=True)
    verdict = [make_run(name, m, POINTS[name], *best[m], seed, args)
               for name in ("A", "B", "C") for seed in VERDICT_SEEDS for m in VERDICT_METHODS]
    print(f"# phase 2: verdict, points A, B, C x seeds {VERDICT_SEEDS} ({len(verdict)} runs)", flush=True)
    execute(verdict, args)


def plan_width(args: argparse.Namespace) -> None:
    """Width-wise RaPTr against the tuned verdict: an LR grid for width at A (seed 0), then width and
    depth-width at width's best setting at A, B, C x 3 seeds, seed by seed."""
    grid = [make_run("A", "width", POINTS["A"], lr, "gpt2", 0, args) for lr in WIDTH_LRS]
    print(f"# width grid at point A, seed 0 ({len(grid)} runs)", flush=True)
    execute(grid, args)
    lr, init = best_width_setting(load_results(Path(args.results)))
    verdict = [make_run(p, m, POINTS[p], lr, init, seed, args)
               for seed in VERDICT_SEEDS for p in ("A", "B", "C") for m in WIDTH_METHODS]
    print(f"# width verdict at lr {lr:g}, init {init} ({len(verdict)} runs)", flush=True)
    execute(verdict, args)


def plan_heads(args: argparse.Namespace) -> None:
    """Heads cut too (after --plan width): at width's best setting, A and B x 3 seeds, seed by seed."""
    lr, init = best_width_setting(load_results(Path(args.results)))
    runs = [make_run(p, m, POINTS[p], lr, init, seed, args)
            for p, m in itertools.product(HEADS_POINTS, HEADS_METHODS) for seed in VERDICT_SEEDS]
    runs.sort(key=lambda r: (r.method == "depth-width-heads" and r.point != "A", r.seed))  # what is asked first
    print(f"# heads verdict at lr {lr:g}, init {init} ({len(runs)} runs)", flush=True)
    execute(runs, args)


def seed0_losses(records: dict[str, dict], point: str, method: str) -> dict[float, float]:
    """Final validation loss by peak LR of ``method``'s seed-0 runs at ``point`` (GPT-2 init, the
    point's own width and steps): an LR grid."""
    p = POINTS[point]
    return {r["run"]["lr"]: r["final_val"] for r in records.values()
            if r["method"] == method and (r["run"]["point"], r["run"]["seed"], r["run"]["init"], r["run"]["width"],
                                          r["run"]["steps"]) == (point, 0, "gpt2", p.width, p.steps)}


def best_lr(grid: dict[float, float]) -> float:
    return min(grid, key=lambda lr: finite(grid[lr]))


def best_width_setting(records: dict[str, dict]) -> tuple[float, str]:
    grid = {lr: loss for lr, loss in seed0_losses(records, "A", "width").items() if lr in WIDTH_LRS}
    return best_lr(grid), "gpt2"


def plan_defaults(args: argparse.Namespace) -> None:
    """Screen each variant at A and B (seed 0); those that beat raptr at both get seeds 1 and 2."""
    lr, init = best_settings(load_results(Path(args.results)))["raptr"]
    points = ("A", "B")
    screen = [make_run(p, m, POINTS[p], lr, init, 0, args) for p in points for m in ("raptr", *DEFAULTS_VARIANTS)]
    print(f"# defaults search, screen: {len(screen)} runs at raptr's lr {lr:g}, init {init}", flush=True)
    execute(screen, args)
    records = load_results(Path(args.results))
    loss = lambda p, m, seed: records[make_run(p, m, POINTS[p], lr, init, seed, args).key()]["final_val"]  # noqa: E731
    winners = [m for m in DEFAULTS_VARIANTS if all(loss(p, m, 0) < loss(p, "raptr", 0) for p in points)]
    confirm = [make_run(p, m, POINTS[p], lr, init, seed, args)
               for seed in VERDICT_SEEDS[1:] for p in points for m in dict.fromkeys([*winners, "pld-equal"])]
    print(f"# defaults search, seeds 1 and 2 of {winners + ['pld-equal']}: {len(confirm)} runs", flush=True)
    execute(confirm, args)


# ---------------------------------------------------------------- tables and plots of one set of runs

def loss_at_time(record: dict, seconds: float) -> float:
    """Validation loss of a run at a given training wall time (linear between evaluations)."""
    evals = [(t, loss) for _, t, _, loss in record["evals"]]
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
        "| method | lr | init | seed | final val loss (nats/byte) | gap to full | wall s | wall / full | block compute | "
        "full model's val loss at this wall time | transitions: train loss before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in runs:
        run = rec["run"]
        gap = rec["final_val"] - full["final_val"] if full else float("nan")
        ratio = rec["wall_s"] / full["wall_s"] if full else float("nan")
        at_time = loss_at_time(full, rec["wall_s"]) if full else float("nan")
        jumps = ", ".join(f"{s}: {b:.3f}->{a:.3f}" for s, b, a in rec["transitions"]) or "-"
        lines.append(f"| {rec['method']} | {run['lr']:g} | {run['init']} | {run['seed']} | {rec['final_val']:.3f} | "
                     f"{gap:+.3f} | {rec['wall_s']:.0f} | {ratio:.2f} | {rec['block_compute']:.2f} | {at_time:.3f} | {jumps} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _ylim(curves: list[tuple[list[float], list[float]]], skip_until: float) -> tuple[float, float]:
    """A y-range for the part that matters: everything after ``skip_until`` steps."""
    values = [v for xs, ys in curves for x, v in zip(xs, ys) if x >= skip_until and math.isfinite(v)]
    if not values:
        return (0.0, 1.0)
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    return low - pad, high + pad


def plot(name: str, runs: list[dict], path: Path) -> str | None:
    plt = _pyplot()
    if plt is None:
        return None
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    curves = []
    for rec in runs:
        steps, times, _, losses = zip(*rec["evals"][1:])  # without the untrained model at step 0
        label = f"{rec['method']} (lr {rec['run']['lr']:g}, {rec['run']['init']})"
        by_step.plot(steps, losses, label=label)
        by_time.plot(times, losses, label=label)
        curves.append((list(steps), list(losses)))
    total = max(r["run"]["steps"] for r in runs)
    for rec in runs:
        if rec["method"].startswith("raptr"):
            for start, _, _ in rec["transitions"]:
                by_step.axvline(start, color="grey", linestyle=":", linewidth=1)
            break
    by_step.set_ylim(*_ylim(curves, 0.25 * total))
    by_time.set_ylim(*_ylim(curves, 0.25 * total))
    by_step.set(xlabel="step (dotted: RaPTr stage transitions)", ylabel="validation loss (nats/byte)",
                title=f"point {name}: against steps")
    by_time.set(xlabel="training wall time (s)", title=f"point {name}: against wall time")
    for axis in (by_step, by_time):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------- the tuned verdict's report

def by_seed(records: dict[str, dict], point: str, method: str, setting: tuple[float, str],
            args: argparse.Namespace, seeds=VERDICT_SEEDS) -> dict[int, dict]:
    """The recorded runs of one method at one point and (lr, init), by seed."""
    found = {seed: records.get(make_run(point, method, POINTS[point], *setting, seed, args).key()) for seed in seeds}
    return {seed: rec for seed, rec in found.items() if rec is not None}


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def tuned_report(args: argparse.Namespace) -> str:
    path = Path(args.results) if args.results else RUNS_FILE
    records = load_results(path)
    if not records:
        return f"no runs in {path}"
    best = best_settings(records)
    lines = [f"Recorded runs: {len(records)} in `{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`.", ""]
    # 1. the grid
    lines += ["#### Tuning grid: point A (width 96, 1200 steps), seed 0, final validation loss (nats/byte)", "",
              "| method | " + " | ".join(f"lr {lr:g}, {init}" for init in GRID_INITS for lr in GRID_LRS) + " | best |",
              "|---|" + "---|" * (len(GRID_LRS) * len(GRID_INITS) + 1)]
    for method in VERDICT_METHODS:
        cells = []
        for init in GRID_INITS:
            for lr in GRID_LRS:
                run = make_run("A", method, POINTS["A"], lr, init, 0, args)
                rec = records.get(run.key())
                cells.append(f"{rec['final_val']:.3f}" if rec else "(not run)")
        setting = f"lr {best[method][0]:g}, {best[method][1]}" if method in best else "-"
        missing = sum(c == "(not run)" for c in cells)
        if missing and method in best:
            setting += f" (so far: {missing} not run)"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {setting} |")
    lines.append("")
    # 2. the verdict
    lines += ["#### Verdict: each method at its best grid setting, mean ± standard deviation over the seeds that finished",
              "",
              "| point | tokens/param (full) | seeds done (full / full-short / raptr) | full | full-short (equal compute) | raptr | "
              "raptr - full (equal steps) | raptr - full-short (equal compute) | per-seed equal-compute gaps |",
              "|---|---|---|---|---|---|---|---|---|"]
    verdict = {}
    for name in ("A", "B", "C"):
        per = {}
        for method in VERDICT_METHODS:
            if method not in best:
                continue
            per[method] = {seed: rec["final_val"] for seed, rec in by_seed(records, name, method, best[method], args).items()}
        verdict[name] = per
        if not any(per.values()):
            lines.append(f"| {name} | | 0 / 0 / 0 | (not run) | | | | | |")
            continue
        full, short, raptr = (per.get(m, {}) for m in VERDICT_METHODS)
        tpp = next((rec["tokens_per_param"] for rec in by_seed(records, name, "full", best["full"], args).values()),
                   float("nan"))
        steps_gap = [raptr[s] - full[s] for s in raptr if s in full]
        compute_gap = [raptr[s] - short[s] for s in raptr if s in short]
        lines.append(f"| {name} | {tpp:.1f} | {len(full)} / {len(short)} / {len(raptr)} | {_fmt(list(full.values()))} | "
                     f"{_fmt(list(short.values()))} | {_fmt(list(raptr.values()))} | {_fmt(steps_gap)} | "
                     f"{_fmt(compute_gap)} | " + ", ".join(f"s{s}: {raptr[s] - short[s]:+.3f}" for s in sorted(raptr) if s in short)
                     + " |")
    lines.append("")
    if "raptr" in best:
        lines += defaults_table(records, *best["raptr"], args)
    lines += width_table(records, best, args)
    lines += tuned_at_table(records, "C", args)
    text = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality_tuned.md").write_text(text + "\n")
    images = [plot_grid(records, args)] + [plot_verdict(name, records, best, args) for name in ("A", "B", "C")]
    return text + "\n" + "\n".join(f"plot: {i}" for i in images if i)


def width_table(records: dict[str, dict], best: dict, args: argparse.Namespace) -> list[str]:
    """Width-wise RaPTr (issue 14) at width's best grid setting against the tuned verdict's methods."""
    grid = [r for r in records.values() if r["run"]["method"] == "width" and r["run"]["point"] == "A"
            and r["run"]["seed"] == 0 and r["run"]["lr"] in WIDTH_LRS]
    if not grid:
        return []
    setting = best_width_setting(records)
    lines = ["#### Width-wise RaPTr (issue 14): grid at point A, seed 0", "",
             "| lr | " + " | ".join(f"{lr:g}" for lr in WIDTH_LRS) + " |", "|---|" + "---|" * len(WIDTH_LRS),
             "| width | " + " | ".join(
                 f"{rec['final_val']:.3f}" if (rec := records.get(make_run('A', 'width', POINTS['A'], lr, 'gpt2', 0, args).key()))
                 else "(not run)" for lr in WIDTH_LRS) + " |", "",
             f"#### Width-wise RaPTr at lr {setting[0]:g}, {setting[1]} (width's best at A), per seed; "
             "the other methods at their own best settings; all but full at 0.75 block compute", "",
             "| point | method | seeds | final val loss | block compute | minus full-short (equal compute) | "
             "minus full (equal steps) | minus raptr (depth-wise) |", "|---|---|---|---|---|---|---|---|"]
    methods = {m: best.get(m) for m in VERDICT_METHODS}
    for name in ("A", "B", "C"):
        base = {m: by_seed(records, name, m, s, args) for m, s in methods.items() if s is not None}
        for method in (*WIDTH_METHODS, "width-inverse", *HEADS_METHODS):
            mine = by_seed(records, name, method, setting, args)
            if not mine:
                continue
            gaps = {m: [mine[seed]["final_val"] - rec[seed]["final_val"] for seed in mine if seed in rec]
                    for m, rec in base.items()}
            lines.append(f"| {name} | {method} | {', '.join(map(str, sorted(mine)))} | "
                         f"{_fmt([r['final_val'] for r in mine.values()])} | "
                         f"{statistics.fmean(r['block_compute'] for r in mine.values()):.3f} | {_fmt(gaps.get('full-short', []))} | "
                         f"{_fmt(gaps.get('full', []))} | {_fmt(gaps.get('raptr', []))} |")
    return lines + [""]


def tuned_at_table(records: dict[str, dict], point: str, args: argparse.Namespace) -> list[str]:
    """Methods tuned at ``point`` itself (not at A): their seed-0 LR grid there (GPT-2 init), then each
    at its own best LR over the seeds, against full-short at its best. Methods with one LR there
    are left out: they were not tuned at this point."""
    methods = sorted({r["method"] for r in records.values() if r["run"]["point"] == point})
    grids = {m: g for m in methods if len(g := seed0_losses(records, point, m)) > 1}
    if "full-short" not in grids:
        return []
    lrs = sorted({lr for g in grids.values() for lr in g})
    best = {m: best_lr(g) for m, g in grids.items()}
    lines = [f"#### Tuned at point {point} itself: LR grid, seed 0 (GPT-2 init), final validation loss", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |", "|---|" + "---|" * (len(lrs) + 1)]
    for method, grid in sorted(grids.items()):
        lines.append(f"| {method} | " + " | ".join(f"{grid[lr]:.3f}" if lr in grid else "(not run)" for lr in lrs)
                     + f" | lr {best[method]:g} |")
    short = {seed: rec["final_val"] for seed, rec in by_seed(records, point, "full-short", (best["full-short"], "gpt2"),
                                                                args).items()}
    lines += ["", f"Each at its best LR at {point}, against full-short at its best ({best['full-short']:g}):", "",
              "| method | lr | seeds | final val loss | minus full-short (equal compute) | per seed |", "|---|---|---|---|---|---|"]
    for method in sorted(grids):
        mine = {seed: rec["final_val"] for seed, rec in by_seed(records, point, method, (best[method], "gpt2"), args).items()}
        gaps = {seed: mine[seed] - short[seed] for seed in mine if seed in short}
        lines.append(f"| {method} | {best[method]:g} | {', '.join(map(str, sorted(mine)))} | {_fmt(list(mine.values()))} | "
                     f"{'-' if method == 'full-short' else _fmt(list(gaps.values()))} | "
                     + ("" if method == "full-short" else ", ".join(f"s{s}: {g:+.3f}" for s, g in sorted(gaps.items())))
                     + " |")
    return lines + [""]


def defaults_table(records: dict[str, dict], lr: float, init: str, args: argparse.Namespace) -> list[str]:
    """Each variant against raptr and full-short, seed by seed (a variant only counts where both ran)."""
    best_short = best_settings(records).get("full-short")
    points = ("A", "B")
    lines = [f"#### Defaults search: variants at raptr's setting (lr {lr:g}, {init}), equal compute (block compute 0.75)",
             "", "| variant | what | " + " | ".join(f"{p}: loss | {p}: - raptr | {p}: - full-short" for p in points) + " |",
             "|---|---|" + "---|---|---|" * len(points)]
    for method in ("raptr", *DEFAULTS_VARIANTS):
        cells = []
        for p in points:
            loss = {seed: rec["final_val"] for seed, rec in by_seed(records, p, method, (lr, init), args).items()}
            ref = {seed: rec["final_val"] for seed, rec in by_seed(records, p, "raptr", (lr, init), args, loss).items()}
            short = {seed: rec["final_val"] for seed, rec in
                     by_seed(records, p, "full-short", best_short, args, loss).items()} if best_short else {}
            seeds = f" ({len(loss)} seed{'s' if len(loss) != 1 else ''})" if loss else ""
            cells += [_fmt(list(loss.values())) + seeds,
                      "-" if method == "raptr" else _fmt([loss[s] - ref[s] for s in ref]),
                      _fmt([loss[s] - short[s] for s in short])]
        what = DEFAULTS_VARIANTS.get(method, "the default: 6-8-10-12, Bernoulli, fixed ends, no scaling")
        lines.append(f"| {method} | {what} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_grid(records: dict[str, dict], args: argparse.Namespace) -> str | None:
    plt = _pyplot()
    if plt is None:
        return None
    fig, axis = plt.subplots(figsize=(6.5, 4.5))
    for method, color in zip(VERDICT_METHODS, ("C0", "C1", "C2")):
        for init, style in zip(GRID_INITS, ("-o", "--s")):
            xs, ys = [], []
            for lr in GRID_LRS:
                rec = records.get(make_run("A", method, POINTS["A"], lr, init, 0, args).key())
                if rec and math.isfinite(rec["final_val"]):
                    xs.append(lr)
                    ys.append(rec["final_val"])
            if xs:
                axis.plot(xs, ys, style, color=color, label=f"{method}, {init} init")
    axis.set_xscale("log")
    axis.minorticks_off()
    axis.set_xticks(GRID_LRS, [f"{lr:g}" for lr in GRID_LRS])
    axis.set(xlabel="peak learning rate", ylabel="final validation loss (nats/byte)",
             title="point A tuning grid (seed 0)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / "quality_grid.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_verdict(name: str, records: dict[str, dict], best: dict, args: argparse.Namespace) -> str | None:
    """Validation loss against steps and against compute, mean line and min-max band over seeds."""
    plt = _pyplot()
    if plt is None:
        return None
    point = POINTS[name]
    series = {}
    for method in VERDICT_METHODS:
        if method not in best:
            continue
        recs = list(by_seed(records, name, method, best[method], args).values())
        if recs:
            series[method] = recs
    if not series:
        return None
    fig, (by_step, by_compute) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"full": "C0", "full-short": "C1", "raptr": "C2"}
    curves = []
    for method, recs in series.items():
        evals = [r["evals"] for r in recs]
        n = min(len(e) for e in evals)
        steps = [e[0] for e in evals[0][1:n]]
        compute = [statistics.fmean(ev[i][2] for ev in evals) for i in range(1, n)]
        values = [[ev[i][3] for ev in evals] for i in range(1, n)]
        mean = [statistics.fmean(v) for v in values]
        low, high = [min(v) for v in values], [max(v) for v in values]
        lr, init = best[method]
        label = f"{method} (lr {lr:g}, {init} init, {len(recs)} seed{'s' if len(recs) > 1 else ''})"
        for axis, xs in ((by_step, steps), (by_compute, compute)):
            axis.plot(xs, mean, color=colors[method], label=label)
            if len(recs) > 1:
                axis.fill_between(xs, low, high, color=colors[method], alpha=0.2)
        curves.append((steps, mean))
        curves.append((steps, high))
    for q in (1, 2, 3):
        by_step.axvline(point.steps * q // 4, color="grey", linestyle=":", linewidth=1)
    y = _ylim(curves, 0.25 * point.steps)
    for axis in (by_step, by_compute):
        axis.set_ylim(*y)
        axis.set_xlim(0.2 * point.steps, 1.02 * point.steps)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    by_step.set(xlabel="step (dotted: RaPTr 6-8-10-12 stage transitions)", ylabel="validation loss (nats/byte)",
                title=f"point {name}: width {point.width}, {point.steps} steps, against steps")
    by_compute.set(xlabel="block compute (full-model step equivalents)",
                   title=f"point {name}: against compute (band: min-max over seeds)")
    fig.tight_layout()
    path = RESULTS / f"quality_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------- command line

def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(parser)
    parser.add_argument("--point", default="A", help="A, B, C, a comma list, or all")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the point's methods")
    parser.add_argument("--quick", action="store_true", help="width 32, 60 steps, full vs raptr vs width")
    parser.add_argument("--width", type=int, default=None, help="override the point's width")
    parser.add_argument("--steps", type=int, default=None, help="override the point's steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", default="2e-3", help="peak learning rate(s), comma list")
    parser.add_argument("--init", default="gpt2", help="gpt2 and/or default (PyTorch's), comma list")
    parser.add_argument("--seed", "--seeds", dest="seeds", default="0", help="seed(s), comma list")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--corpus", default="stdlib",
                        help="stdlib, or a directory whose .py files are the corpus (for larger models)")
    parser.add_argument("--compile", action="store_true", help="model.compile() after transform (regional gates)")
    parser.add_argument("--verbose", action="store_true", help="print each evaluation as it happens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (each --threads threads)")
    parser.add_argument("--results", default=None,
                        help=f"JSON-lines file of finished runs; appended to, and runs in it are skipped "
                             f"(default with --plan/--report: {RUNS_FILE.relative_to(ROOT)})")
    parser.add_argument("--plan", choices=["tuned", "defaults", "width", "heads"], default=None,
                        help="tuned: the tuning grid then the verdict; defaults: the defaults search (after tuned); "
                             "width: width-wise RaPTr's grid and verdict (after tuned); heads: width with the "
                             "attention heads cut too, at width's setting (after width)")
    parser.add_argument("--report", action="store_true", help="tables and plots of --results; runs nothing")
    args = parser.parse_args()
    set_threads(args.threads)
    if (args.plan or args.report) and not args.results:
        args.results = str(RUNS_FILE)
    if args.report:
        print(tuned_report(args))
        return
    print(header(args), flush=True)
    if args.plan:
        print(f"# plan {args.plan}: results in {args.results}, {args.jobs} job(s) x {args.threads} thread(s)", flush=True)
        {"tuned": plan_tuned, "defaults": plan_defaults, "width": plan_width, "heads": plan_heads}[args.plan](args)
        print(tuned_report(args))
        return
    if args.quick:
        points = {"quick": QUICK}
        args.eval_every, args.eval_batches, args.batch = 20, 4, 16
    else:
        names = list(POINTS) if args.point == "all" else args.point.split(",")
        points = {name: POINTS[name] for name in names}
    OUT.mkdir(parents=True, exist_ok=True)
    data = corpus(args.corpus)
    print(f"# corpus {args.corpus}: {len(data[0]):,} train bytes, {len(data[1]):,} validation bytes", flush=True)
    for name, point in points.items():
        if args.width or args.steps:
            point = Point(args.width or point.width, args.steps or point.steps, point.methods)
        methods = args.methods.split(",") if args.methods else point.methods
        runs = [make_run(name, m, point, lr, init, seed, args)
                for lr, init, seed, m in itertools.product(_floats(args.lr), args.init.split(","),
                                                           [int(s) for s in args.seeds.split(",")], methods)]
        records = execute(runs, args)
        table = report(name, point, records, args)
        (OUT / f"quality_{name}.md").write_text(header(args) + "\n\n" + table)
        (OUT / f"quality_{name}.json").write_text(json.dumps(records))
        image = plot(name, records, OUT / f"quality_{name}.png")
        print("\n" + table + (f"\nplot: {image}" if image else "\n(no plot: pip install matplotlib)"), flush=True)


if __name__ == "__main__":
    main()
