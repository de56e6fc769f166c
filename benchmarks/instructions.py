"""Instruction counts of one training step: raptr_fx against the model it stands for.

Timings on a shared machine cannot resolve 1% (speed.py: +-1.4% after 150 rounds). Instructions,
counted by valgrind's callgrind through ``torch.utils.benchmark.Timer.collect_callgrind``, can: the
same step counts the same to a few hundredths of a percent, run after run. One step is the forward,
the loss, the backward, ``optimizer.step()`` (with raptr_fx's hooks and the controller's step) and
``zero_grad``. Each variant is built in its own valgrind process from the same seed; only its
training steps are counted (the denoised counts, CPython's known-noisy functions left out), after
warm-up steps that are not.

Cases, on a residual MLP (blocks ``x + proj(gelu(fc(norm(x))))``, hidden 4 x width, SGD):

1. all-on: every unit on (``FullModel``) against the untransformed model, eager and compiled
   (regional and cond gates). Target: at most 1.01x.
2. k of L: k of the L units on (exactly k each step, drawn anew) against a model built with k units
   whose optimizer also holds the other L - k units' parameters (without gradients, as dropped
   units' are). Target: at most 1.03x.
3. narrow-deep: 48 units of width 64, batch 32, half on, against the model built with 24: the
   difference is raptr_fx's host work; its share of the step. Target: at most 1%.
4. width: every MLP keeping f = 0.5 of its hidden units against a model built with f x H hidden
   units. Target: at most 1.05x. The freeze (parts not kept written back after the step) is counted
   on its own, from the same cut without it. The eager case counts it at 16 rows per step; the
   ``wide`` case the same model at 256 rows (WIDE_BATCH). A cut's extra work (gathering the kept
   rows and columns, the full-size gradient, the freeze) grows with the weights, not with the rows,
   while the matmuls it shrinks grow with the rows: 16 rows is the harshest case, and far from the
   thousands of tokens a transformer's step runs, so both are shown.

5. heads: every attention block (nanoGPT's, one fused projection; 4 blocks of 8 heads of 16, 4 x 64
   tokens) keeping f = 0.5 of its heads against a model built with 4 heads. Target: at most 1.05x.

What raptr_fx adds on the host comes from the same counts: the eager gates without the optimizer
hooks against the untransformed model (per gate), and with the hooks and the controller's step
against without (per step).

Compiled variants: compiling under valgrind would take most of an hour, so the parent process
compiles each compiled variant first with torch's on-disk caches on (inductor's FX graph cache and
AOTAutograd's cache, in a directory of this benchmark's own); the valgrind process then traces with
dynamo and loads the compiled graphs from those caches, outside the counted steps. Inductor emits
AVX2 code here (``cpp.simdlen = 256``, ``-march=x86-64-v3``) in both processes: valgrind runs no
AVX-512, and the caches match only under the same settings.

    python benchmarks/instructions.py            # eager, narrow, compiled: ~30 min on one core
    python benchmarks/instructions.py --cases wide   # width at 256 rows: ~25 min more
    python benchmarks/instructions.py --cases heads  # heads cut against half the heads built
    python benchmarks/instructions.py --quick    # a tiny model, eager all-on only: a smoke test (~3 min:
                                                 # valgrind and torch's start-up alone take most of it)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if not __package__:  # run as `python benchmarks/x.py`: the repository first on the path (raptr_fx, benchmarks)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, Row, print_rows  # noqa: E402

import raptr_fx  # noqa: E402

if TYPE_CHECKING:
    from torch.utils.benchmark import FunctionCounts

# Compiled variants load their graphs from here (filled by the parent process, read under valgrind).
CACHE_DIR = Path(tempfile.gettempdir()) / "raptr_fx_instructions_inductor_cache"
FOREVER = 10**9  # a single-stage schedule that never ends


class Block(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.gelu(self.fc(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, width: int, depth: int, hidden: int):
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Block(width, hidden) for _ in range(depth))
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Attention(nn.Module):
    """nanoGPT's causal self-attention with the head count and size given: one fused projection."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim, self.inner = heads, head_dim, heads * head_dim
        self.norm = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * self.inner)
        self.c_proj = nn.Linear(self.inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(self.norm(x)).split(self.inner, dim=2)
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, self.inner))


class AttentionStack(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, head_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(Attention(width, heads, head_dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@dataclass(frozen=True)
class Variant:
    """One model and optimizer to count. ``kind``: untransformed, built (k units, or MLPs at
    ``fraction``, with idle parameters as described in the module docstring), gates (all on, not
    attached: the gates' work alone), all-on, k-of-L, k-of-L-gates (not attached: the same k units
    every step), width, width-unfrozen."""

    kind: str
    width: int = 128
    depth: int = 12
    batch: int = 16
    units: int | None = None  # k: units on (k-of-L) or built (built)
    fraction: float | None = None  # f: MLP hidden units kept (width) or built (built)
    compiled: str | None = None  # None: eager; "model": untransformed compiled; "regional" / "cond": gates
    heads: int | None = None  # attention blocks of this many heads (HEAD_DIM each, SEQ tokens) instead of MLPs


def build_step(variant: Variant) -> Callable[[], None]:
    """A closure running one training step of ``variant``; the same seed builds the same weights and batch."""
    warnings.filterwarnings("ignore", category=raptr_fx.RaptrWarning)  # gates without attach, on purpose
    torch.manual_seed(0)
    hidden = 4 * variant.width
    if variant.heads is None:
        model = ResidualMLP(variant.width, variant.depth, hidden)
        x = torch.randn(variant.batch, variant.width)
    else:
        model = AttentionStack(variant.width, variant.depth, variant.heads, HEAD_DIM)
        x = torch.randn(variant.batch, SEQ, variant.width)
    target = torch.randn_like(x)
    params = list(model.parameters())
    kind = variant.kind
    ctl = None
    if kind == "built" and variant.heads is not None:
        # The model built with f x heads heads; the optimizer holds only its parameters, as in built-f.
        model = AttentionStack(variant.width, variant.depth, round(variant.fraction * variant.heads), HEAD_DIM)
        params = list(model.parameters())
    elif kind == "built" and variant.units is not None:
        # The model built with k units; the optimizer also holds the other units', as a dropped unit's.
        model.blocks = model.blocks[:variant.units]
    elif kind == "built" and variant.fraction is not None:
        small = round(variant.fraction * hidden)
        for block in model.blocks:
            block.fc = nn.Linear(variant.width, small)
            block.proj = nn.Linear(small, variant.width)
        params = list(model.parameters())
    elif kind in ("gates", "all-on"):
        ctl = raptr_fx.transform(model, raptr_fx.FullModel(), compile_mode="cond" if variant.compiled == "cond" else "regional")
    elif kind in ("k-of-L", "k-of-L-gates"):
        schedule = raptr_fx.RaPTr([raptr_fx.Stage(FOREVER, active=variant.units)], sampling="exact")
        ctl = raptr_fx.transform(model, schedule)
    elif kind in ("width", "width-unfrozen"):
        kinds = ("mlp",) if variant.heads is None else ("heads",)
        schedule = raptr_fx.WidthRaPTr([raptr_fx.Stage(FOREVER, width=variant.fraction)], width_kinds=kinds)
        ctl = raptr_fx.transform(model, schedule, example_inputs=(x,))
    elif kind != "untransformed":
        raise ValueError(f"unknown variant kind {kind!r}")
    optimizer = torch.optim.SGD(params, lr=1e-3)
    if ctl is not None and kind not in ("gates", "k-of-L-gates"):  # not attached: no hooks, no controller step
        ctl.attach(optimizer, freeze_dropped=kind != "width-unfrozen")
    forward = model
    if variant.compiled is not None:
        use_avx2_inductor()
        forward = torch.compile(model)

    def step() -> None:
        loss = F.mse_loss(forward(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def use_avx2_inductor() -> None:
    """Inductor settings shared by the parent (which fills the caches) and the valgrind process."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(CACHE_DIR)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    import torch._inductor.config as inductor_config

    inductor_config.cpp.simdlen = 256
    inductor_config.cpp.march = "x86-64-v3"


WARMUP_STEPS = 3


class Rotation:
    """The variants of one valgrind process, counted in turn by one ``Timer.collect_callgrind``.

    The timer calls its statement ``min(number, 10)`` times to warm up, then ``repeats`` blocks of
    ``number`` calls, each block its own callgrind dump. With one repeat per variant, block r runs
    variant r: valgrind and torch start once per process, not once per variant (about 3 minutes each).
    Every variant has already run WARMUP_STEPS steps when it is built.
    """

    def __init__(self, steps: list[Callable[[], None]], number: int):
        self.steps = steps
        self.number = number
        self.calls = -min(number, 10)  # the timer's warm-up calls come first: they run variant 0

    def __call__(self) -> None:
        self.steps[max(self.calls, 0) // self.number]()
        self.calls += 1


def warmed_step(variant: Variant) -> Callable[[], None]:
    step = build_step(variant)
    for _ in range(WARMUP_STEPS):
        step()
    return step


@dataclass(frozen=True)
class Count:
    """One variant's instructions per step (denoised) and its per-function counts (exclusive, per step)."""

    per_step: float
    functions: "FunctionCounts"


def count(variants: list[Variant], steps: int) -> list[Count]:
    """Count ``steps`` training steps of each variant in one valgrind process."""
    from torch.utils.benchmark import Timer

    if any(v.compiled is not None for v in variants):
        # Compile natively here first, so that the valgrind process finds the on-disk caches full.
        for variant in variants:
            warmed_step(variant)
        torch._dynamo.reset()
    setup = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
             "from benchmarks.instructions import Rotation, Variant, warmed_step\n"
             f"step = Rotation([warmed_step(Variant(**v)) for v in {[asdict(v) for v in variants]!r}], {steps})")
    timer = Timer("step()", setup=setup, num_threads=1)
    stats = timer.collect_callgrind(number=steps, repeats=len(variants), collect_baseline=False)
    return [Count(s.counts(denoise=True) / steps, s.stats(inclusive=False).denoise() * (1 / steps)) for s in stats]


def ratio(counts: dict[str, Count], numerator: str, denominator: str) -> float:
    return counts[numerator].per_step / counts[denominator].per_step


def share(counts: dict[str, Count], whole: str, without: str) -> float:
    """What ``whole`` adds over ``without``, as a share of ``whole``."""
    return (counts[whole].per_step - counts[without].per_step) / counts[whole].per_step


def function_name(entry: str, width: int = 100) -> str:
    """callgrind_annotate's ``file:function [object]`` as the function alone, cut to ``width`` characters."""
    entry = re.sub(r" \[[^\]]*\]$", "", entry)
    name = entry.split(":", 1)[1] if ":" in entry else entry  # "???" stands for an unknown file
    return name if len(name) <= width else name[:width - 3] + "..."


def top_functions(counts: dict[str, Count], more: str, less: str, rows: int = 8) -> str:
    """The functions that ``more`` spends most instructions on beyond ``less``, per step: where a gap comes from."""
    diff = counts[more].functions - counts[less].functions
    lines = [f"    {c:>+10,}  {function_name(name)}" for c, name in sorted(diff, reverse=True)[:rows]]
    return f"  {more} - {less}, per step, largest first:\n" + "\n".join(lines)


def run_group(label: str, named: dict[str, Variant], steps: int) -> dict[str, Count]:
    start = time.time()
    counts = dict(zip(named, count(list(named.values()), steps)))
    print(f"{label}: instructions per step " + ", ".join(f"{name}={c.per_step:,.0f}" for name, c in counts.items())
          + f"  ({time.time() - start:.0f} s)", flush=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model, eager all-on only: a smoke test")
    parser.add_argument("--steps", type=int, default=5, help="counted steps per variant (the counts are per step)")
    parser.add_argument("--cases", default="eager,narrow,compiled",
                        help="eager (all-on, k of L, width), narrow (48 units), compiled (all-on, both modes), "
                             f"wide (width at {WIDE_BATCH} rows, ~25 min) and/or heads (attention heads cut "
                             "against a model built with half the heads); wide and heads are not in the default")
    parser.add_argument("--profile", action="store_true", help="print the functions behind each gap")
    args = parser.parse_args()
    if args.quick:
        args.steps = 2
    # valgrind's process runs "python" from PATH: make it this interpreter.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    torch.set_num_threads(1)
    print(f"# {time.strftime('%Y-%m-%d')} | torch {torch.__version__} | python {sys.version.split()[0]} | "
          f"1 thread | callgrind, denoised, {args.steps} steps per variant\n# command: python {' '.join(sys.argv)}",
          flush=True)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing counted (apt-get install valgrind)")
        return
    rows: list[Row] = []
    notes: list[str] = []
    if args.quick:
        tiny = Variant("untransformed", width=16, depth=3, batch=2)
        counts = run_group("quick", {"untransformed": tiny, "gates": replace(tiny, kind="gates"),
                                     "all-on": replace(tiny, kind="all-on")}, args.steps)
        rows.append(("quick eager all-on / untransformed", ratio(counts, "all-on", "untransformed"), None))
        print_rows(rows)
        return
    cases = args.cases.split(",")
    base = Variant("untransformed")
    depth, k, f = base.depth, base.depth // 2, 0.5
    if "eager" in cases:
        counts = run_group("eager", {
            "untransformed": base, "gates": replace(base, kind="gates"), "all-on": replace(base, kind="all-on"),
            "k-of-L": replace(base, kind="k-of-L", units=k), "built-k": replace(base, kind="built", units=k),
            "width": replace(base, kind="width", fraction=f), "width-unfrozen": replace(base, kind="width-unfrozen", fraction=f),
            "built-f": replace(base, kind="built", fraction=f)}, args.steps)
        per_gate = (counts["gates"].per_step - counts["untransformed"].per_step) / depth
        per_step = counts["all-on"].per_step - counts["gates"].per_step
        notes.append(f"eager, every unit on: raptr_fx adds {per_gate:,.0f} instructions per gate per step (gates, no "
                     f"hooks, against untransformed) and {per_step:,.0f} per step (optimizer hooks, controller step, "
                     f"usage monitor: attached against not)")
        notes.append(f"width f={f}: the freeze costs {share(counts, 'width', 'width-unfrozen'):.2%} of the cut step; "
                     f"the cut without it is {ratio(counts, 'width-unfrozen', 'built-f'):.4f}x the model built at f")
        rows += [("eager all-on: every unit on / untransformed", ratio(counts, "all-on", "untransformed"), 1.01),
                 ("eager all-on, gates only (no hooks) / untransformed", ratio(counts, "gates", "untransformed"), None),
                 (f"eager k={k} of {depth}: gated / built with {k} units", ratio(counts, "k-of-L", "built-k"), 1.03),
                 (f"eager width f={f}: cut / built at f", ratio(counts, "width", "built-f"), 1.05),
                 (f"eager width f={f}: cut without the freeze / built at f", ratio(counts, "width-unfrozen", "built-f"),
                  None)]
        if args.profile:
            notes += [top_functions(counts, "all-on", "untransformed"), top_functions(counts, "k-of-L", "built-k"),
                      top_functions(counts, "width", "built-f")]
    if "narrow" in cases:
        narrow = replace(base, width=64, batch=32, depth=NARROW_UNITS)
        half = NARROW_UNITS // 2
        counts = run_group("narrow", {"built-k": replace(narrow, kind="built", units=half),
                                      "k-of-L-gates": replace(narrow, kind="k-of-L-gates", units=half),
                                      "k-of-L": replace(narrow, kind="k-of-L", units=half)}, args.steps)
        gates = counts["k-of-L-gates"].per_step - counts["built-k"].per_step
        hooks = counts["k-of-L"].per_step - counts["k-of-L-gates"].per_step
        notes.append(f"narrow-deep, {half} of {NARROW_UNITS} units on: raptr_fx adds {gates + hooks:,.0f} instructions "
                     f"per step: {gates:,.0f} in the {NARROW_UNITS} gated calls ({gates / NARROW_UNITS:,.0f} per unit; "
                     f"not attached against built) and {hooks:,.0f} in the optimizer hooks and the controller's step")
        rows += [(f"narrow {half} of {NARROW_UNITS}: raptr_fx host share of the step", share(counts, "k-of-L", "built-k"),
                  0.01),
                 (f"narrow {half} of {NARROW_UNITS}: gated / built with {half} units", ratio(counts, "k-of-L", "built-k"),
                  None)]
        if args.profile:
            notes.append(top_functions(counts, "k-of-L", "built-k"))
    if "wide" in cases:
        wide = replace(base, batch=WIDE_BATCH)
        counts = run_group("wide", {"width": replace(wide, kind="width", fraction=f),
                                    "width-unfrozen": replace(wide, kind="width-unfrozen", fraction=f),
                                    "built-f": replace(wide, kind="built", fraction=f)}, args.steps)
        notes.append(f"width f={f} at {WIDE_BATCH} rows: the freeze costs {share(counts, 'width', 'width-unfrozen'):.2%} "
                     f"of the cut step; the cut without it is {ratio(counts, 'width-unfrozen', 'built-f'):.4f}x the "
                     f"model built at f")
        rows += [(f"width f={f}, {WIDE_BATCH} rows: cut / built at f", ratio(counts, "width", "built-f"), 1.05),
                 (f"width f={f}, {WIDE_BATCH} rows: cut without the freeze / built at f",
                  ratio(counts, "width-unfrozen", "built-f"), None)]
        if args.profile:
            notes.append(top_functions(counts, "width", "built-f"))
    if "heads" in cases:
        attention = replace(base, depth=HEADS_DEPTH, batch=HEADS_BATCH, heads=HEADS)
        counts = run_group("heads", {"heads": replace(attention, kind="width", fraction=f),
                                     "heads-unfrozen": replace(attention, kind="width-unfrozen", fraction=f),
                                     "built-h": replace(attention, kind="built", fraction=f)}, args.steps)
        shape = f"{HEADS} heads of {HEAD_DIM}, {HEADS_BATCH}x{SEQ} tokens"
        notes.append(f"heads f={f} ({shape}): the freeze costs {share(counts, 'heads', 'heads-unfrozen'):.2%} of the "
                     f"cut step; the cut without it is {ratio(counts, 'heads-unfrozen', 'built-h'):.4f}x the model "
                     f"built with {round(f * HEADS)} heads")
        rows += [(f"heads f={f}: cut / built with {round(f * HEADS)} heads", ratio(counts, "heads", "built-h"), 1.05),
                 (f"heads f={f}: cut without the freeze / built with {round(f * HEADS)} heads",
                  ratio(counts, "heads-unfrozen", "built-h"), None)]
        if args.profile:
            notes.append(top_functions(counts, "heads", "built-h"))
    if "compiled" in cases:
        counts = run_group("compiled", {"untransformed": replace(base, compiled="model"),
                                        "regional": replace(base, kind="all-on", compiled="regional"),
                                        "cond": replace(base, kind="all-on", compiled="cond")}, args.steps)
        rows += [("compiled (regional gates) all-on / untransformed compiled", ratio(counts, "regional", "untransformed"),
                  1.01),
                 ("compiled (cond gates) all-on / untransformed compiled", ratio(counts, "cond", "untransformed"), 1.01)]
        if args.profile:
            notes += [top_functions(counts, "regional", "untransformed"), top_functions(counts, "cond", "untransformed")]
    print("\n" + "\n".join(notes))
    print("\nratios of instructions per step (deterministic: no interval), target, verdict")
    print_rows(rows)


NARROW_UNITS = 48
WIDE_BATCH = 256  # rows per step of the wide width case
# The heads case: 4 attention blocks of 8 heads of 16 (width 128), 4 sequences of 64 tokens.
HEADS, HEAD_DIM, HEADS_DEPTH, HEADS_BATCH, SEQ = 8, 16, 4, 4, 64

if __name__ == "__main__":
    main()
