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


def fsdp_width_report(model: Any, kept: list, frozen: list) -> dict:
    """What an FSDP2 width worker returns: its kept parts and frozen checks per step, whether every
    parameter is sharded, and the final parameters gathered whole."""
    from torch.distributed.tensor import DTensor

    return {"kept": kept, "frozen": frozen, "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
            "final": [(p.full_tensor() if isinstance(p, DTensor) else p).detach().tolist() for p in model.parameters()]}


def assert_fsdp_width_run_matches(ranks: list[dict], model: Any, kept: list, frozen: list, parts: str) -> None:
    """Both ranks' FSDP2 width runs (:func:`fsdp_width_report`) against the single-process run of
    ``model``: the same kept parts, every parameter sharded, ``parts`` not kept unchanged, the same
    final parameters (SGD: Adam would amplify reduction-order noise)."""
    import torch

    assert ranks[0]["kept"] == ranks[1]["kept"] == kept
    assert all(r["sharded"] for r in ranks) and all(frozen)
    assert all(ranks[0]["frozen"]) and all(ranks[1]["frozen"]), f"{parts} not kept moved under FSDP2"
    for got, want in zip(ranks[0]["final"], model.parameters()):
        torch.testing.assert_close(torch.tensor(got), want.detach(), rtol=1e-4, atol=1e-5)
