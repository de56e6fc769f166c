"""Speed benchmarks 1-5, measured side by side in one run; ratios printed last.

1. Overhead: the transformed model with every unit active vs the untransformed model.
   Target: at most 2% slower (compiled: 1%). ``--cases all-on`` times this case alone, for runs
   long enough to resolve 1% on a noisy machine (``--rounds 150``).
2. Skipped compute: k of L units active vs the ideal, nonblock + k/L * blocks, where nonblock is
   measured on a copy whose blocks are nn.Identity. Target: within 5% of ideal (compiled: 3%).
3. Compile behaviour: frames compiled over a whole multi-stage run with changing gates.
   Target: no recompiles after the first steps of each kind.
Plus the headline: wall time of RaPTr 6-8-10-12 vs the full model at equal steps, step by step
side by side. Target: at least 22% less.
4. Width (``--cases width``, on by default): WidthRaPTr with each MLP keeping f of its hidden units,
   f = 0.5 and 0.75, against a model built with f x H hidden units, which is what a cut can at best
   reach (target: within 5%), and against the ideal line, outside + f * MLPs, where outside is
   measured on a copy whose MLPs return zeros (shown, no target: smaller matmuls run less
   efficiently than that line assumes, and the optimizer still updates all H units). Overhead with
   f = 1 at most 2%. Also the cost of freezing the parts not kept.
5. Narrow and deep (``--cases narrow``): 48 units of width 64, batch 32, half on: k/ideal against a
   fair ideal line (its optimizer holds the missing units' parameters, without gradients) and
   raptr_fx's own host time per step as a share of the step. Targets: 1.03 and 1%.
6. Heads (``--cases heads``): WidthRaPTr cutting the attention heads (the fused ``c_attn``) at
   f = 0.5 against a model built with half the heads (target: within 5%), and f = 1 (at most 2%).

How ratios are measured: the variants run in rounds of ``--steps`` steps each, in an order rotated
every round; each ratio is taken within each round, and the rounds' ratios are summarized by their
20% trimmed mean with a 95% bootstrap interval. The untransformed model against a second copy of
itself (A/A) shows in every case what the machine resolved in that run. A target counts as met
(or MISSED) only when the whole interval lies on that side of it; otherwise "unresolved".

    python benchmarks/speed.py                 # eager and compiled, ~15 min on 2 CPU cores
    python benchmarks/speed.py --modes eager,compiled --cases all-on --rounds 150   # case 1, ~11 min
    python benchmarks/speed.py --quick         # eager only, small: a smoke test
    python benchmarks/speed.py --device cuda --dtype bfloat16 --width 1024 --batch 32 --seq 512
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

if not __package__:  # run as `python benchmarks/x.py`: the repository first on the path (raptr_fx, benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (GPT, GPTConfig, Interleaved, Row, add_device_args, header, pin_stage,  # noqa: E402
                               print_rows, ratio_of_sums, timed_steps)

import raptr_fx  # noqa: E402

# The "gated" runner is pinned to each stage with load_state_dict and never stepped, on purpose.
warnings.filterwarnings("ignore", category=raptr_fx.RaptrWarning, message=".*schedule is not advancing")

SCHEDULE = "6-8-10-12"


def build(args: argparse.Namespace) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(n_layer=12, n_embd=args.width, n_head=max(1, args.width // 32), block_size=args.seq)
    return GPT(config).to(args.device)


class Runner:
    """One model + optimizer, stepping on a fixed batch."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, compiled: bool,
                 counter: CompileCounterWithBackend | None = None, idle_params: list[nn.Parameter] = ()):
        self.model = model
        self.args = args
        # idle_params: in the optimizer without ever getting a gradient, as a dropped unit's are.
        self.optimizer = torch.optim.AdamW([*model.parameters(), *idle_params], lr=1e-4)
        self.counter = counter or CompileCounterWithBackend("inductor")
        self.forward = torch.compile(model, backend=self.counter) if compiled else model
        self.batch = base_batch(args)

    def step(self) -> None:
        x, y = self.batch[:, :-1], self.batch[:, 1:]
        autocast = (torch.autocast(self.args.device, dtype=torch.bfloat16) if self.args.dtype == "bfloat16"
                    else contextlib.nullcontext())
        with autocast:
            loss = F.cross_entropy(self.forward(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def per_step(self, steps: int) -> list[float]:
        return timed_steps(self.step, steps, self.args.device)


def fresh_compiler() -> None:
    """Each case starts with empty compile caches: models of earlier cases share code objects
    (Block.forward, the gates), whose entries would otherwise count against dynamo's limit."""
    torch._dynamo.reset()


def settle(ctl: raptr_fx.Controller, stage: int, runner: Runner) -> Callable[[], None]:
    """Set-up that pins ``stage`` and runs one untimed step: the first step after a stage change
    (new tensor sizes for the allocator) is not that stage's steady state, and training changes
    stage a few times per run, not every few steps as the rounds here do."""
    def run() -> None:
        pin_stage(ctl, stage)
        runner.per_step(1)
    return run


def measure(args: argparse.Namespace, mode: str) -> list[Row]:
    compiled = mode != "eager"
    fresh_compiler()
    compile_mode = "cond" if mode == "compiled-cond" else "regional"
    base = build(args)
    nonblock = copy.deepcopy(base)
    for i in range(len(nonblock.transformer.h)):
        nonblock.transformer.h[i] = nn.Identity()
    # Regional units compile with the same counting backend as their model, so frames add up.
    counters = {name: CompileCounterWithBackend("inductor") for name in ("gated", "raptr")}
    exact = copy.deepcopy(base)
    ctl = raptr_fx.transform(exact, raptr_fx.RaPTr(SCHEDULE, total_steps=4, sampling="exact"),
                             compile_mode=compile_mode, compile_options={"backend": counters["gated"]})
    bernoulli = copy.deepcopy(base)
    total = args.schedule_steps
    run_ctl = raptr_fx.transform(bernoulli, raptr_fx.RaPTr(SCHEDULE, total_steps=total), seed=0,
                                 compile_mode=compile_mode, compile_options={"backend": counters["raptr"]})

    # "base again": a second untransformed copy, compiled on its own: identical work, so its ratio
    # to base shows what this machine resolves in the same run.
    runners = {"base": Runner(base, args, compiled), "base again": Runner(copy.deepcopy(base), args, compiled),
               "nonblock": Runner(nonblock, args, compiled),
               "gated": Runner(exact, args, compiled, counters["gated"]),
               "raptr": Runner(bernoulli, args, compiled, counters["raptr"])}
    for runner in runners.values():  # warm up (and compile)
        runner.per_step(args.warmup)
    # Each kind of step compiles once: random patterns, and all units on (one whole-model graph).
    for stage in range(4):
        pin_stage(ctl, stage)
        runners["gated"].per_step(1)
    last_stage = run_ctl.schedule.stage_bounds()[-1][0]
    pin_stage(run_ctl, last_stage)
    runners["raptr"].per_step(1)
    frames_after_warmup = {name: counters[name].frame_count for name in counters}

    ks = (6, 8, 10, 12)
    timing = Interleaved({"base": runners["base"].step, "base again": runners["base again"].step,
                          "nonblock": runners["nonblock"].step, **{f"k{k}": runners["gated"].step for k in ks}},
                         args.device,
                         before={f"k{k}": settle(ctl, stage, runners["gated"]) for stage, k in enumerate(ks)})
    timing.run(args.rounds, args.steps)
    t = timing.medians()

    def ideal(r: dict[str, float], k: int) -> float:
        return r["nonblock"] + k / 12 * (r["base"] - r["nonblock"])

    # Headline: a whole schedule vs the full model at equal steps, twice, step by step side by side.
    pairs = []
    for _ in range(2):
        pin_stage(run_ctl, 0)
        for _ in range(total):
            pairs.append((runners["raptr"].per_step(1)[0], runners["base"].per_step(1)[0]))
            run_ctl.step()
    cond = mode == "compiled-cond"  # torch.cond recomputes kept units in backward: for fullgraph, not speed
    rows: list[Row] = [
        (f"{mode} A/A: untransformed copy / untransformed (noise)", timing.ratio(lambda r: r["base again"] / r["base"]),
         None),
        (f"{mode} overhead (all active / untransformed)", timing.ratio(lambda r: r["k12"] / r["base"]),
         1.01 if compiled else 1.02),
        *[(f"{mode} k={k}: measured / ideal", timing.ratio(lambda r, k=k: r[f"k{k}"] / ideal(r, k)),
           None if cond else 1.03 if compiled else 1.05) for k in (6, 8, 10)],
        (f"{mode} RaPTr {SCHEDULE} wall time / full model ({total} steps)", ratio_of_sums(pairs),
         None if cond else 0.78),
        (f"{mode} ideal RaPTr / full (block share {1 - t['nonblock'] / t['base']:.2f})",
         (t["nonblock"] + 0.75 * (t["base"] - t["nonblock"])) / t["base"], None),
    ]
    if compiled:
        for name in counters:
            rows.append((f"{mode} recompiles after warm-up, all stages ({name})",
                         counters[name].frame_count - frames_after_warmup[name], 0))
            rows.append((f"{mode} compiled frames in all ({name})", counters[name].frame_count, None))
    print(f"{mode}: median step ms {timing.step_times()}", flush=True)
    return rows


def measure_all_on(args: argparse.Namespace, mode: str) -> list[Row]:
    """Case 1 alone, for long runs that resolve its 1-2% target: every unit on against the
    untransformed model, with the untransformed model against a copy of itself as the noise line."""
    compiled = mode != "eager"
    fresh_compiler()
    base = build(args)
    gated = copy.deepcopy(base)
    raptr_fx.transform(gated, raptr_fx.FullModel(), compile_mode="cond" if mode == "compiled-cond" else "regional")
    runners = {"base": Runner(base, args, compiled), "base again": Runner(copy.deepcopy(base), args, compiled),
               "all on": Runner(gated, args, compiled)}
    for runner in runners.values():  # warm up (and compile)
        runner.per_step(args.warmup)
    timing = Interleaved({name: runner.step for name, runner in runners.items()}, args.device)
    timing.run(args.rounds, args.steps)
    full_step = timing.medians()["base"]
    # The same models on one sequence of 8 tokens: compute almost vanishes, so the difference is
    # the time raptr_fx adds on the host (guards, hooks, the controller), resolved to microseconds.
    tiny_args = argparse.Namespace(**{**vars(args), "batch": 1, "seq": 8})
    tiny_runners = {name: Runner(runner.model, tiny_args, compiled) for name, runner in runners.items()}
    for runner in tiny_runners.values():
        runner.per_step(args.warmup)
    tiny = Interleaved({name: runner.step for name, runner in tiny_runners.items()}, args.device)
    tiny.run(TINY_ROUNDS, args.steps)
    print(f"{mode} all-on: median step ms {timing.step_times()}; one sequence of 8: {tiny.step_times(2)}", flush=True)
    return [(f"{mode} all-on A/A: untransformed copy / untransformed",
             timing.ratio(lambda r: r["base again"] / r["base"]), None),
            (f"{mode} all-on: every unit on / untransformed", timing.ratio(lambda r: r["all on"] / r["base"]),
             1.01 if compiled else 1.02),
            (f"{mode} all-on: host time added (8 tokens) / full-size step",
             tiny.ratio(lambda r: (r["all on"] - r["base"]) / full_step), 0.01),
            (f"{mode} all-on A/A: the same, untransformed copy",
             tiny.ratio(lambda r: (r["base again"] - r["base"]) / full_step), None)]


TINY_ROUNDS = 300  # a step on 8 tokens takes milliseconds


def with_mlp_width(model: GPT, fraction: float) -> GPT:
    """A copy of ``model`` whose MLPs are built with ``fraction`` of their hidden units."""
    small = copy.deepcopy(model)
    for block in small.transformer.h:
        hidden = round(fraction * block.mlp.c_fc.out_features)
        block.mlp.c_fc = nn.Linear(block.mlp.c_fc.in_features, hidden, device=block.mlp.c_fc.weight.device)
        block.mlp.c_proj = nn.Linear(hidden, block.mlp.c_proj.out_features, device=block.mlp.c_proj.weight.device)
    return small


class _NoMLP(nn.Module):
    """An MLP that computes nothing: the model outside the width groups, for the ideal line."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def measure_width(args: argparse.Namespace, mode: str) -> list[Row]:
    compiled = mode != "eager"
    fresh_compiler()
    base = build(args)
    outside = copy.deepcopy(base)
    for block in outside.transformer.h:
        block.mlp = _NoMLP()
    counter = CompileCounterWithBackend("inductor")
    fractions = (0.5, 0.75, 1.0)
    stages = [raptr_fx.Stage(1, width=f) for f in fractions]
    cut, cut_unfrozen = copy.deepcopy(base), copy.deepcopy(base)
    example = (base_batch(args)[:, :-1],)
    schedule = raptr_fx.WidthRaPTr(stages, width_kinds=("mlp",))
    ctl = raptr_fx.transform(cut, schedule, example_inputs=example, compile_mode="regional")
    ctl_unfrozen = raptr_fx.transform(cut_unfrozen, schedule, example_inputs=example)
    runners = {"base": Runner(base, args, compiled), "outside": Runner(outside, args, compiled),
               "cut": Runner(cut, args, compiled, counter), "unfrozen": Runner(cut_unfrozen, args, compiled),
               **{f"built{f}": Runner(with_mlp_width(base, f), args, compiled) for f in (0.5, 0.75)}}
    ctl.attach(runners["cut"].optimizer, step_with_optimizer=False)  # pinned to each stage below
    ctl_unfrozen.attach(runners["unfrozen"].optimizer, freeze_dropped=False, step_with_optimizer=False)
    for name in ("base", "outside", "unfrozen", "built0.5", "built0.75"):
        runners[name].per_step(args.warmup)
    for stage in range(len(fractions)):  # warm up every kept size: each compiles once
        pin_stage(ctl, stage)
        runners["cut"].per_step(args.warmup)
    frames_after_warmup = counter.frame_count
    timing = Interleaved({**{name: runners[name].step for name in ("base", "outside", "built0.5", "built0.75")},
                          **{f"f{f}": runners["cut"].step for f in fractions},
                          "f0.5 unfrozen": runners["unfrozen"].step}, args.device,
                         before={**{f"f{f}": settle(ctl, stage, runners["cut"]) for stage, f in enumerate(fractions)},
                                 "f0.5 unfrozen": settle(ctl_unfrozen, 0, runners["unfrozen"])})
    timing.run(args.rounds, args.steps)
    t = timing.medians()

    def ideal(r: dict[str, float], f: float) -> float:
        return r["outside"] + f * (r["base"] - r["outside"])

    rows: list[Row] = [
        (f"{mode} width f=1 overhead (all kept / untransformed)", timing.ratio(lambda r: r["f1.0"] / r["base"]), 1.02),
        *[(f"{mode} width f={f}: measured / ideal line", timing.ratio(lambda r, f=f: r[f"f{f}"] / ideal(r, f)), None)
          for f in (0.5, 0.75)],
        *[(f"{mode} width f={f}: model built at f / ideal line",
           timing.ratio(lambda r, f=f: r[f"built{f}"] / ideal(r, f)), None) for f in (0.5, 0.75)],
        # The reachable line: smaller matmuls run less efficiently than the ideal line assumes.
        *[(f"{mode} width f={f}: measured / model built at f",
           timing.ratio(lambda r, f=f: r[f"f{f}"] / r[f"built{f}"]), 1.05) for f in (0.5, 0.75)],
        (f"{mode} width f=0.5 freezing cost (frozen / not frozen)",
         timing.ratio(lambda r: r["f0.5"] / r["f0.5 unfrozen"]), None),
        (f"{mode} width MLP share of the step", (t["base"] - t["outside"]) / t["base"], None),
    ]
    if compiled:
        rows.append((f"{mode} width recompiles after warm-up", counter.frame_count - frames_after_warmup, 0))
        rows.append((f"{mode} width compiled frames in all (3 kept sizes)", counter.frame_count, None))
    print(f"{mode} width: median step ms {timing.step_times()}", flush=True)
    return rows


class FewerHeads(nn.Module):
    """nanoGPT's attention built with ``heads`` heads of ``head_dim``: what a head cut can at best reach."""

    def __init__(self, width: int, heads: int, head_dim: int, device: torch.device):
        super().__init__()
        self.heads, self.head_dim, self.inner = heads, head_dim, heads * head_dim
        self.c_attn = nn.Linear(width, 3 * self.inner, device=device)
        self.c_proj = nn.Linear(self.inner, width, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for z in self.c_attn(x).split(self.inner, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, self.inner))


def with_heads(model: GPT, fraction: float) -> GPT:
    """A copy of ``model`` whose attentions are built with ``fraction`` of their heads."""
    small = copy.deepcopy(model)
    for block in small.transformer.h:
        width, heads = block.attn.c_attn.in_features, block.attn.n_head
        block.attn = FewerHeads(width, round(fraction * heads), width // heads, block.attn.c_attn.weight.device)
    return small


def measure_heads(args: argparse.Namespace, mode: str) -> list[Row]:
    """Attention heads cut at f = 0.5 (the fused c_attn rewritten) against the model built with half the heads."""
    compiled = mode != "eager"
    fresh_compiler()
    base = build(args)
    if base.transformer.h[0].attn.n_head < 2:
        raise SystemExit(f"--cases heads needs at least 2 heads: --width {args.width} gives 1 (width // 32)")
    counter = CompileCounterWithBackend("inductor")
    cut = copy.deepcopy(base)
    fractions = (0.5, 1.0)
    schedule = raptr_fx.WidthRaPTr([raptr_fx.Stage(1, width=f) for f in fractions], width_kinds=("heads",))
    ctl = raptr_fx.transform(cut, schedule, example_inputs=(base_batch(args)[:, :-1],), compile_mode="regional")
    runners = {"base": Runner(base, args, compiled), "built0.5": Runner(with_heads(base, 0.5), args, compiled),
               "cut": Runner(cut, args, compiled, counter)}
    ctl.attach(runners["cut"].optimizer, step_with_optimizer=False)  # pinned to each stage below
    for name in ("base", "built0.5"):
        runners[name].per_step(args.warmup)
    for stage in range(len(fractions)):
        pin_stage(ctl, stage)
        runners["cut"].per_step(args.warmup)
    frames_after_warmup = counter.frame_count
    timing = Interleaved({"base": runners["base"].step, "built0.5": runners["built0.5"].step,
                          **{f"f{f}": runners["cut"].step for f in fractions}}, args.device,
                         before={f"f{f}": settle(ctl, stage, runners["cut"]) for stage, f in enumerate(fractions)})
    timing.run(args.rounds, args.steps)
    heads = base.transformer.h[0].attn.n_head
    rows: list[Row] = [
        (f"{mode} heads f=1 overhead (all kept / untransformed)", timing.ratio(lambda r: r["f1.0"] / r["base"]), 1.02),
        (f"{mode} heads f=0.5: cut / built with {heads // 2} of {heads} heads",
         timing.ratio(lambda r: r["f0.5"] / r["built0.5"]), 1.05),
        (f"{mode} heads f=0.5: built with half the heads / untransformed", timing.ratio(lambda r: r["built0.5"] / r["base"]),
         None),
    ]
    if compiled:
        rows.append((f"{mode} heads recompiles after warm-up", counter.frame_count - frames_after_warmup, 0))
    print(f"{mode} heads: median step ms {timing.step_times()}", flush=True)
    return rows


NARROW_UNITS = 48


def measure_narrow(args: argparse.Namespace, mode: str) -> list[Row]:
    """48 narrow units (width 64, batch 32), half of them on: raptr_fx's own host time per step (gates,
    the controller's step, the usage monitor, the freeze hook) as a share of the step, and k/ideal
    against a fair ideal line whose model without units keeps their parameters in its optimizer,
    without gradients, as dropped units do."""
    compiled = mode != "eager"
    fresh_compiler()
    narrow = argparse.Namespace(**{**vars(args), "width": 64, "batch": 32})
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=NARROW_UNITS, n_embd=64, n_head=2, block_size=args.seq)).to(args.device)
    outside = copy.deepcopy(base)
    idle = [p for block in outside.transformer.h for p in block.parameters()]
    for i in range(NARROW_UNITS):
        outside.transformer.h[i] = nn.Identity()
    gated = copy.deepcopy(base)
    half = NARROW_UNITS // 2
    ctl = raptr_fx.transform(gated, raptr_fx.RaPTr(f"{half}-{NARROW_UNITS}", total_steps=2, sampling="exact"))
    runners = {"base": Runner(base, narrow, compiled), "outside": Runner(outside, narrow, compiled, idle_params=idle),
               "gated": Runner(gated, narrow, compiled)}
    ctl.attach(runners["gated"].optimizer, step_with_optimizer=False)  # pinned to stage 0 (half the units)
    for runner in runners.values():
        runner.per_step(args.warmup)
    timing = Interleaved({name: runner.step for name, runner in runners.items()}, args.device)
    timing.run(args.rounds, args.steps)
    t = timing.medians()
    host = host_seconds_per_step(ctl, runners["gated"].optimizer, narrow)
    print(f"{mode} narrow: median step ms {timing.step_times()}; raptr_fx host {1e6 * host:.0f} us per step",
          flush=True)
    fair_ideal = timing.ratio(lambda r: r["gated"] / (r["outside"] + 0.5 * (r["base"] - r["outside"])))
    return [(f"{mode} narrow 48 units, k=24: measured / fair ideal", fair_ideal, 1.03),
            (f"{mode} narrow 48 units: raptr_fx host time / step", host / t["gated"], 0.01)]


def host_seconds_per_step(ctl: raptr_fx.Controller, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                          repeats: int = 200) -> float:
    """What raptr_fx itself adds to one step on the host, timed part by part in this process: the
    controller's step, the freeze hook, the usage monitor, and the gates' dispatch (skipped units:
    the whole call; kept units: a gate around a module that does nothing, less that module)."""
    def each(call) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        return (time.perf_counter() - start) / repeats

    state = ctl.state_dict()
    step = each(ctl.step)
    ctl.load_state_dict(state)
    freeze = each(ctl.release_dropped_grads)
    usage = each(lambda: ctl._usage.on_optimizer_step(optimizer))
    x = torch.zeros(args.batch, args.seq, args.width, device=args.device)
    skipped = [gate for gate, keep in zip(ctl._gates, ctl.active) if not keep]
    skip_call = each(lambda: skipped[0].module(x)) if skipped else 0.0
    nothing = nn.Identity()
    holder = nn.Sequential(nothing)  # a slot for the probe gate, as a unit's parent gives one
    probe_gate = raptr_fx.gates.GatedForward(nothing, ctl.blocks[0], 0, ctl._state, scaled=False, slot=(holder, "0"))
    kept_overhead = max(0.0, each(lambda: probe_gate(x)) - each(lambda: nothing(x)))
    kept = len(ctl._gates) - len(skipped)
    ctl.load_state_dict(state)
    return step + freeze + usage + len(skipped) * skip_call + kept * kept_overhead


def base_batch(args: argparse.Namespace) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (args.batch, args.seq + 1), generator=generator).to(args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(parser)
    parser.add_argument("--quick", action="store_true", help="small, eager only: a smoke test (~1 min)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=16, help="rounds, interleaving the variants against drift")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--schedule-steps", type=int, default=40, help="steps of the whole-schedule run")
    parser.add_argument("--modes", default="eager,compiled,compiled-cond",
                        help="eager, compiled (regional gates, the default) and/or compiled-cond")
    parser.add_argument("--cases", default="depth,width,narrow",
                        help="depth (cases 1-3 and the headline), width, narrow (48 units: host cost), "
                             "all-on (case 1 alone, for long runs: --rounds 150) and/or heads (attention heads "
                             "cut against a model built with half the heads; not in the default)")
    args = parser.parse_args()
    if args.quick:
        args.width, args.batch, args.seq, args.steps, args.rounds = 64, 4, 32, 3, 2
        args.schedule_steps, args.modes = 12, "eager"
    print(header(args), flush=True)
    rows: list[Row] = []
    cases = args.cases.split(",")
    for mode in args.modes.split(","):
        if "depth" in cases:
            rows += measure(args, mode)
        if "all-on" in cases:
            rows += measure_all_on(args, mode)
        if "width" in cases and mode != "compiled-cond":  # width cuts have no cond mode: they never branch
            rows += measure_width(args, mode)
        if "narrow" in cases and mode != "compiled-cond":
            rows += measure_narrow(args, mode)
        if "heads" in cases and mode != "compiled-cond":
            rows += measure_heads(args, mode)
    print(f"\nratios: trimmed mean over {args.rounds} rounds of the ratio within each round, [95% interval], "
          "target, verdict (met / MISSED only when the interval is wholly on one side)")
    print_rows(rows)


if __name__ == "__main__":
    main()
