"""Soak test: compiled 2-rank DDP training with cold inductor caches, many times; counts hangs.

Each run launches `torchrun --nproc-per-node 2 examples/ddp_torchrun.py --compile` with a fresh,
empty inductor cache, so every run really compiles, and kills it after --timeout seconds.

    python benchmarks/ddp_compile_soak.py --runs 10
    python benchmarks/ddp_compile_soak.py --runs 10 --compile-mode cond
    python benchmarks/ddp_compile_soak.py --runs 10 --env TORCHINDUCTOR_COMPILE_THREADS=1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a run counts as hung")
    parser.add_argument("--compile-mode", default="regional", choices=["regional", "cond"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for the ranks")
    args = parser.parse_args()

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               str(ROOT / "examples" / "ddp_torchrun.py"), "--compile", "--compile-mode", args.compile_mode,
               "--steps", str(args.steps), "--layers", "4", "--width", "64", "--seq", "32", "--schedule", "2-3-4"]
    print(" ".join(command[2:]), *args.env, flush=True)
    hangs = failures = 0
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache,
                   **dict(item.split("=", 1) for item in args.env)}
            start = time.perf_counter()
            # Output to a file, not a pipe: a hung rank would hold a pipe open after the kill.
            with open(Path(cache) / "log", "w+") as log:
                process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
                try:
                    process.wait(timeout=args.timeout)
                    status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
                    failures += process.returncode != 0
                except subprocess.TimeoutExpired:
                    process.terminate()  # torchrun passes SIGTERM on to its ranks and ends them
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        process.kill()
                    status, hangs = "HUNG", hangs + 1
                log.seek(0)
                output = log.read()
        print(f"run {run + 1:2d}/{args.runs}: {status:18s} {time.perf_counter() - start:6.1f} s", flush=True)
        if status != "ok":
            print("  " + "\n  ".join((output or "").strip().splitlines()[-15:]), flush=True)
    print(f"\nhangs {hangs} of {args.runs} runs, failures {failures} (timeout {args.timeout:.0f} s, "
          f"compile_mode={args.compile_mode})")
    sys.exit(1 if hangs or failures else 0)


if __name__ == "__main__":
    main()
