"""Run a test's worker function on 2 real processes (gloo on CPU), with a hang guard."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S = 180  # a hang fails the test instead of CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker: Callable[..., dict], port: int, out_dir: str, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result = worker(rank, out_dir, *args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: after a cold compile it once hung shutting down inductor's
    # compile workers, after the results were written.
    os._exit(0)


def run_ranks(worker: Callable[..., dict], tmp_path: Path, *args: Any) -> list[dict]:
    """Call ``worker(rank, out_dir, *args)`` on each of 2 processes; return each rank's JSON result."""
    workers = mp.spawn(_entry, args=(worker, _free_port(), str(tmp_path), args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not workers.join(timeout=2):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            written = [r for r in range(WORLD) if (tmp_path / f"rank{r}.json").exists()]
            pytest.fail(f"workers still running after {TIMEOUT_S} s (ranks {written} had written their "
                        "results): a collective or the shutdown hung")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
