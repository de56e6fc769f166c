"""Shared pieces of the benchmarks: the model, the data, timing and the report header."""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from examples.nanogpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["GPT", "GPTConfig", "add_device_args", "header", "sync", "timed_steps", "byte_corpus", "ROOT",
           "set_threads", "default_init", "Estimate", "Interleaved", "Row", "print_rows", "ratio_of_sums", "pin_stage"]


def set_threads(threads: int) -> None:
    """Intra-op and inter-op torch threads (call before any torch work: inter-op is fixed after)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already fixed by earlier parallel work in this process
        pass


def default_init(model: torch.nn.Module) -> None:
    """Re-initialise every module with PyTorch's own ``reset_parameters`` (in module order).

    For the example GPT this undoes its GPT-2-style init (std 0.02, residual projections
    0.02/sqrt(2L)): Linear layers get PyTorch's Kaiming-uniform default, LayerNorm ones and zeros.
    The tied embedding / output weight ends with the output Linear's default, as if the model
    had been built without any init code.
    """
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="autocast dtype for the forward pass (bfloat16 for GPU runs)")


def header(args: argparse.Namespace) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    return (f"# {datetime.date.today()} | torch {torch.__version__} | {args.device} ({device}) | "
            f"{torch.get_num_threads()} threads | dtype {args.dtype} | python {platform.python_version()}\n"
            f"# command: python {' '.join(sys.argv)}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_steps(step: Callable[[], None], steps: int, device: str) -> list[float]:
    """Seconds per call of ``step`` (one optimizer step each)."""
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def pin_stage(ctl, stage: int) -> None:
    """Put a raptr_fx controller at the first step of ``stage``: the benchmarks time each stage
    with its schedule held there, never stepped."""
    ctl.load_state_dict({**ctl.state_dict(), "step": stage})


MIN_ROUNDS_TO_JUDGE = 8  # a bootstrap interval over fewer rounds is too coarse to call a target met


def trimmed_mean(values: list[float], cut: float = 0.2) -> float:
    """The mean of the middle values, ``cut`` of them dropped at each end: robust to the bursts of a
    noisy machine, and nearly as precise as the mean when there are none."""
    ordered = sorted(values)
    k = int(cut * len(ordered))
    return statistics.fmean(ordered[k:len(ordered) - k])


def bootstrap(statistic: Callable[[list], float], items: list, resamples: int = 2000) -> Estimate:
    """``statistic`` of ``items`` with a 95% bootstrap interval (reproducible: a fixed seed)."""
    rng = random.Random(0)
    boot = sorted(statistic(rng.choices(items, k=len(items))) for _ in range(resamples))
    return Estimate(statistic(items), boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1], len(items))


@dataclass(frozen=True)
class Estimate:
    """A measured ratio with its 95% bootstrap interval, over ``rounds`` rounds (or step pairs)."""

    value: float
    low: float
    high: float
    rounds: int

    def verdict(self, target: float) -> str:
        """Against an upper bound: met only if the whole interval is under it, missed only if the whole
        interval is over it; otherwise this machine's noise does not decide."""
        if self.rounds < MIN_ROUNDS_TO_JUDGE:
            return f"no verdict ({self.rounds} rounds)"
        if self.high <= target:
            return "met"
        if self.low > target:
            return "MISSED"
        return "unresolved (point " + ("meets" if self.value <= target else "misses") + ")"


class Interleaved:
    """Variants timed side by side in rounds, each round in a rotated order.

    A ratio is taken within each round (numerator and denominator measured seconds apart), then
    summarized over rounds: drift and bursts of a noisy machine that last longer than a round cancel
    in the ratio, and shorter ones land in a few rounds, which the trimmed mean drops.
    """

    def __init__(self, variants: dict[str, Callable[[], None]], device: str,
                 before: dict[str, Callable[[], None]] | None = None):
        self.variants = variants  # name -> one optimizer step of that variant
        self.before = before or {}  # name -> untimed set-up before that variant's steps (e.g. pin a stage)
        self.device = device
        self.rounds: list[dict[str, float]] = []  # per round: the median step seconds of each variant

    def run(self, rounds: int, steps: int) -> None:
        names = list(self.variants)
        for r in range(rounds):
            times = {}
            for name in names[r % len(names):] + names[:r % len(names)]:
                if name in self.before:
                    self.before[name]()
                times[name] = median(timed_steps(self.variants[name], steps, self.device))
            self.rounds.append(times)

    def medians(self) -> dict[str, float]:
        """Each variant's median step seconds over rounds (for the printed step times)."""
        return {name: median([r[name] for r in self.rounds]) for name in self.variants}

    def step_times(self, digits: int = 1) -> str:
        """The medians as printed: ``name=ms, ...``."""
        return ", ".join(f"{name}={1000 * seconds:.{digits}f}" for name, seconds in self.medians().items())

    def ratio(self, formula: Callable[[dict[str, float]], float]) -> Estimate:
        """``formula`` of one round's step times (e.g. ``lambda t: t["a"] / t["b"]``), taken per round;
        their trimmed mean over rounds."""
        return bootstrap(trimmed_mean, [formula(r) for r in self.rounds])


def ratio_of_sums(pairs: list[tuple[float, float]]) -> Estimate:
    """sum(a) / sum(b) over (a, b) pairs timed side by side, with a paired bootstrap interval."""
    return bootstrap(lambda chosen: sum(a for a, _ in chosen) / sum(b for _, b in chosen), pairs)


Row = tuple[str, "Estimate | float | int", "float | None"]  # name, value, upper-bound target (None: none)


def print_rows(rows: list[Row]) -> None:
    """One line per result: value, its 95% interval over rounds, the target and the verdict."""
    for name, value, target in rows:
        if isinstance(value, Estimate):
            text = f"{value.value:.3f}  [{value.low:.3f}, {value.high:.3f}]"
            verdict = value.verdict(target) if target is not None else ""
        else:  # a count or a single measurement
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            verdict = ("met" if value <= target else "MISSED") if target is not None else ""
        bound = f"<= {target:g}" if target is not None else ""
        print(f"  {name:<62} {text:<24} {bound:<8} {verdict}".rstrip())


def byte_corpus(limit_bytes: int | None = None, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/validation bytes of Python sources: the running interpreter's standard library, or
    every ``.py`` file under ``root`` (a larger corpus for GPU-sized models, e.g. an installed package).

    Every machine has them offline. Files are sorted by path; every 10th file is validation
    (a fixed held-out split).
    """
    files = (sorted(Path(root).rglob("*.py")) if root is not None
             else sorted(Path(platform.__file__).resolve().parent.glob("*.py")))
    if not files:
        raise ValueError(f"no .py files under corpus root {root!r}")
    train, val = bytearray(), bytearray()
    for i, path in enumerate(files):
        (val if i % 10 == 9 else train).extend(path.read_bytes())
        if limit_bytes is not None and len(train) >= limit_bytes:
            break
    return torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(val, dtype=torch.uint8).long()
