"""Every example runs at its smallest size and says it finished.

Add an example: one row in EXAMPLES.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (id, arguments after `python` ({tmp}: a fresh directory), regex the output must contain, modules needed).
SMALL = "--steps 6 --layers 4 --schedule 2-3-4"
EXAMPLES = [
    ("train_loop", f"examples/train_loop.py {SMALL}", r"done: 6 steps, final loss \d+\.\d+", []),
    ("hf_trainer", f"examples/hf_trainer.py {SMALL} --output-dir {{tmp}}/hf",
     r"done: 6 optimizer steps, controller at step 6", ["transformers", "accelerate"]),
    ("lightning_train", f"examples/lightning_train.py {SMALL} --output-dir {{tmp}}/pl",
     r"done: 6 optimizer steps, controller at step 6", ["lightning"]),
    ("ddp_torchrun", f"-m torch.distributed.run --nproc-per-node 2 examples/ddp_torchrun.py {SMALL}",
     r"done: 6 steps on 2 ranks", []),
    ("fsdp2_meta", f"-m torch.distributed.run --nproc-per-node 2 examples/fsdp2_meta.py {SMALL}",
     r"rank 0 holds [\d,]+ of [\d,]+ parameters(.|\n)*done: 6 steps on 2 ranks", []),
    ("fsdp2_recipe", f"-m torch.distributed.run --nproc-per-node 2 examples/fsdp2_recipe.py {SMALL}",
     r"done: 6 steps on 2 ranks .* controller at step 6", []),
]


@pytest.mark.slow
@pytest.mark.parametrize("arguments, pattern, needs", [pytest.param(a, p, n, id=i) for i, a, p, n in EXAMPLES])
def test_example_runs(arguments, pattern, needs, tmp_path):
    for module in needs:
        pytest.importorskip(module)
    command = [sys.executable, *shlex.split(arguments.format(tmp=tmp_path))]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert re.search(pattern, output), output[-3000:]


@pytest.mark.slow
def test_recipe_resumed_from_a_distributed_checkpoint_ends_as_the_uninterrupted_run(tmp_path):
    """examples/fsdp2_recipe.py stopped mid-stage with DCP and resumed prints the last step's loss of
    a run that never stopped, to every printed digit."""
    def run(*extra: str) -> str:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "examples/fsdp2_recipe.py",
                   *shlex.split(SMALL), "--no-compile", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        return result.stdout

    uninterrupted = run()
    saved = run("--checkpoint", str(tmp_path / "ckpt"), "--save-at", "3")
    resumed = run("--resume", str(tmp_path / "ckpt"))
    assert "saved at step 3" in saved and "resumed at step 3, stage 1" in resumed
    last = re.compile(r"step +5 .*loss (\d+\.\d+)")
    assert last.search(resumed).group(1) == last.search(uninterrupted).group(1), (uninterrupted, resumed)
