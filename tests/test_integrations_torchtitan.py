"""raptr_fx.integrations.torchtitan: RaPTrConverter with torchtitan's model registry and its own Trainer (CPU).

torchtitan is not in the ``dev`` extra (with the triton it imports, about 1.3 GB): these tests skip
without it. ``pip install torchtitan triton`` (the CUDA build of torch brings triton) to run them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan")
pytest.importorskip("triton", reason="torchtitan's models import triton (installed with CUDA builds of torch)")

from torchtitan.models.llama3 import model_registry  # noqa: E402
from torchtitan.trainer import Trainer  # noqa: E402

import raptr_fx.integrations.torchtitan as titan  # noqa: E402
from raptr_fx.errors import RaptrError  # noqa: E402
from raptr_fx.integrations.torchtitan import RaPTrConverter, controller_of  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
UNITS = [f"layers.{i}" for i in range(6)]


def build(spec) -> torch.nn.Module:
    with torch.device("meta"):  # as the Trainer builds it
        return spec.model.build()


def test_converter_transforms_the_model_torchtitan_builds_and_leaves_its_parameters_as_they_were():
    spec = model_registry("debugmodel", converters=[RaPTrConverter.Config(schedule="2-4-6", total_steps=30, seed=1)])
    model = build(spec)
    model.verify_module_protocol()  # the Trainer's check after build: every submodule is still torchtitan's
    plain = build(model_registry("debugmodel"))
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    assert list(model.state_dict()) == list(plain.state_dict())
    controller = controller_of([model])
    assert [b.name for b in controller.blocks] == UNITS
    assert sum(controller.active) == 2 and controller.plan()[-1].active == 6
    assert spec.model.to_dict()["raptr"]["schedule"] == "2-4-6"  # shown in torchtitan's config logs


def test_converter_refuses_bad_settings_when_the_config_is_made():
    with pytest.raises(ValueError, match="'2-4-x'"):
        RaPTrConverter.Config(schedule="2-4-x").build()
    with pytest.raises(ValueError, match="'fast'"):
        RaPTrConverter.Config(schedule="2-4-6", compile_mode="fast").build()
    converter = RaPTrConverter.Config(schedule="2-4-6")
    with pytest.raises(RaptrError, match="listed twice"):
        model_registry("debugmodel", converters=[converter, converter])
    with pytest.raises(RaptrError, match="total_steps"):  # built outside a Trainer, which would set it
        build(model_registry("debugmodel", converters=[converter]))


def test_the_trainer_config_sets_the_length_the_optimizer_hook_and_the_checkpoint(monkeypatch):
    spec = model_registry("debugmodel", converters=[RaPTrConverter.Config(schedule="2-4-6")])
    config = Trainer.Config(model_spec=spec)
    config.training.steps = 120
    config.training.disable_cuda_graphs = True
    spec.model.update_from_config(config=config)
    assert spec.model.raptr.total_steps == 120
    assert spec.post_optimizer_build_fn is not None
    assert isinstance(config.checkpoint, titan._SavesController)
    hook, checkpoint = spec.post_optimizer_build_fn, config.checkpoint
    spec.model.update_from_config(config=config)  # called again: nothing is wrapped twice
    assert spec.post_optimizer_build_fn is hook and config.checkpoint is checkpoint

    config.parallelism.pipeline_parallel_degree = 2
    with pytest.raises(RaptrError, match="pipeline_parallel_degree=2"):
        spec.model.update_from_config(config=config)
    config.parallelism.pipeline_parallel_degree = 1
    config.training.disable_cuda_graphs = False
    monkeypatch.setattr(titan, "_captures_cuda_graphs", lambda: True)  # as on a CUDA machine
    with pytest.raises(RaptrError, match="disable_cuda_graphs"):
        spec.model.update_from_config(config=config)


def run_trainer(out: Path, *arguments: str) -> dict:
    """tests/fixtures/titan_trainer.py under torchrun (one gloo rank); its JSON result."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m",
               "tests.fixtures.titan_trainer", str(out), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads((out / "rank0.json").read_text())


@pytest.mark.slow
def test_torchtitan_trainer_trains_with_raptr_and_resumes_its_gate_sequence_from_its_checkpoint(tmp_path):
    """torchtitan's Trainer (meta build, selective activation checkpointing, fully_shard, its optimizer
    container, clipping, DCP checkpoints every 2 steps): one controller step per optimizer step, dropped
    blocks not updated, gates outside the checkpoint wrappers; resumed from step 4, the same gate
    sequence and bitwise the same parameters as the run that never stopped."""
    whole = run_trainer(tmp_path / "whole", "--steps", "8", "--interval", "2")
    assert whole["trainer_step"] == whole["controller_step"] == 8  # 4 saves did not move it
    # fully_shard gives each wrapper a class of its own: FSDPCheckpointWrapper
    assert whole["units"] == UNITS and whole["gates_outermost"]
    assert [t.endswith("CheckpointWrapper") for t in whole["slot_types"]] == [True]
    steps = whole["steps"]
    assert [s["step"] for s in steps] == list(range(8))
    assert any(not all(s["active"]) for s in steps) and all(steps[-1]["active"])
    assert all(s["dropped_unchanged"] and s["kept_moved"] for s in steps)

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoint" / "step-4", resumed_dir / "checkpoint" / "step-4")
    resumed = run_trainer(resumed_dir, "--steps", "8", "--interval", "2", "--load-step", "4")
    assert resumed["steps"] == steps[4:]
    assert resumed["controller_step"] == 8
    final, resumed_final = (torch.load(d / "params-rank0.pt") for d in (tmp_path / "whole", resumed_dir))
    assert final.keys() == resumed_final.keys()
    assert all(torch.equal(final[n], resumed_final[n]) for n in final)

