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

__all__ = ["GPT", "GPTConfig", "add_device_args", "header", "sync", "timed_steps", "byte_corpus", "ROOT"]


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


def byte_corpus(limit_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/validation bytes from the running interpreter's standard library sources.

    Every machine has them offline. Files are sorted by path; every 10th file is validation
    (a fixed held-out split).
    """
    lib = Path(platform.__file__).resolve().parent
    files = sorted(p for p in lib.glob("*.py"))
    train, val = bytearray(), bytearray()
    for i, path in enumerate(files):
        (val if i % 10 == 9 else train).extend(path.read_bytes())
        if limit_bytes is not None and len(train) >= limit_bytes:
            break
    return torch.frombuffer(bytes(train), dtype=torch.uint8).long(), torch.frombuffer(bytes(val), dtype=torch.uint8).long()
