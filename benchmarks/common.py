"""Shared pieces of the benchmarks: the model, the data, timing and the report header."""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.nanogpt import GPT, GPTConfig  # noqa: E402

__all__ = ["GPT", "GPTConfig", "add_device_args", "header", "sync", "timed_steps", "byte_corpus", "ROOT",
           "set_threads", "default_init"]


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
