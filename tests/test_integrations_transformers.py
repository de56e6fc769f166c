"""raptr_fx.integrations.transformers: RaPTrCallback under a real Hugging Face Trainer (CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raptr_fx
from raptr_fx import RaPTr, Schedule
from raptr_fx.errors import RaptrWarning
from tests.distributed import run_ranks
from tests.fixtures.models import GPT

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
transformers.logging.set_verbosity_error()

from raptr_fx.integrations.transformers import STATE_FILE, TRAINER_STATE_KEY, RaPTrCallback  # noqa: E402

VOCAB = 64
STEPS = 12


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config)


class LM(nn.Module):
    """A plain (non-transformers) model the Trainer can train: returns {"loss": ...}."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gpt = GPT(n_layer=4)

    def forward(self, input_ids, labels):
        logits = self.gpt(input_ids)
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten())}


def dataset() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (64, 8), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": x, "labels": x} for x in ids]


def train(model: nn.Module, callback: RaPTrCallback, out, resume=None, **overrides):
    """Train STEPS optimizer steps; returns (trainer, [(controller step, active) per forward], optimizer steps)."""
    seen: list[tuple[int, tuple[bool, ...]]] = []

    def record(*_):
        if callback.controller is not None:  # None while transform probes the model
            seen.append((callback.controller.step_count, tuple(callback.controller.active)))

    model.register_forward_hook(record)
    options = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                   use_cpu=True, report_to=[], save_strategy="steps", save_steps=4, logging_steps=2,
                   disable_tqdm=True, learning_rate=1e-3, seed=0)
    options.update(overrides)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**options),
                                   train_dataset=dataset(), callbacks=[callback])
    steps = [0]
    real = trainer.create_optimizer()
    real.register_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, seen, steps[0]


def without_entry(checkpoint) -> None:
    """Drop the callback's entry from a checkpoint's trainer_state.json (as in older checkpoints)."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["stateful_callbacks"][TRAINER_STATE_KEY]
    path.write_text(json.dumps(state))


def by_step(seen):
    """{step: active}; every micro-batch of one optimizer step must have run the same subnetwork."""
    result: dict[int, tuple[bool, ...]] = {}
    for step, active in seen:
        assert result.setdefault(step, active) == active, f"micro-batches of step {step} ran different units"
    return result


@pytest.mark.slow
def test_llama_first_batch_accumulation_resume_and_logs(tmp_path):
    # a transformers model: transformed at its first forward with the first batch as example inputs
    callback = RaPTrCallback("3-3-4", seed=3)
    trainer, seen, optimizer_steps = train(llama(), callback, tmp_path / "a")
    ctl = callback.controller
    assert [b.name for b in ctl.blocks] == [f"model.layers.{i}" for i in range(4)]
    assert optimizer_steps == STEPS and ctl.step_count == STEPS and trainer.state.global_step == STEPS
    full = by_step(seen)
    assert sorted(full) == list(range(STEPS))
    assert len(set(full.values())) > 1  # the sequence is not constant: a wrong resume would show
    assert len(seen) == 2 * STEPS  # two micro-batches per step, the first one after the transform
    # the state is in every checkpoint
    saved = json.loads((tmp_path / "a" / "checkpoint-4" / STATE_FILE).read_text())
    assert saved["global_step"] == 4 and saved["controller"]["step"] == 4 and saved["controller"]["seed"] == 3
    # logs
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all({"raptr/stage", "raptr/active_units", "raptr/expected_compute"} <= set(h) for h in logged)
    assert logged[-1]["raptr/stage"] == 2.0 and logged[-1]["raptr/expected_compute"] == 1.0
    # resumed from the step-4 checkpoint: the same gates, step for step (a new callback, another seed
    # passed by mistake: the checkpoint's seed wins)
    resumed_cb = RaPTrCallback("3-3-4", seed=99)
    _, seen, optimizer_steps = train(llama(), resumed_cb, tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-4"))
    resumed = by_step(seen)
    assert sorted(resumed) == list(range(4, STEPS))
    assert all(resumed[t] == full[t] for t in resumed)
    assert optimizer_steps == STEPS - 4 and resumed_cb.controller.step_count == STEPS
    # a checkpoint of an older version (only the state file): read from the state file
    without_entry(tmp_path / "a" / "checkpoint-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RaptrWarning)
        _, seen, _ = train(llama(), RaPTrCallback("3-3-4", seed=99), tmp_path / "a",
                           resume=str(tmp_path / "a" / "checkpoint-8"))
    resumed = by_step(seen)
    assert sorted(resumed) == list(range(8, STEPS)) and all(resumed[t] == full[t] for t in resumed)
    # neither: a warning, then the schedule continues at the Trainer's step with the callback's seed
    os.remove(tmp_path / "a" / "checkpoint-8" / STATE_FILE)
    with pytest.warns(RaptrWarning, match="no raptr_fx_state.json"):
        _, seen, _ = train(llama(), RaPTrCallback("3-3-4", seed=3), tmp_path / "a",
                           resume=str(tmp_path / "a" / "checkpoint-8"))
    resumed = by_step(seen)
    assert sorted(resumed) == list(range(8, STEPS)) and all(resumed[t] == full[t] for t in resumed)


@pytest.mark.slow
def test_bf16_mixed_precision(tmp_path):
    # Accelerate wraps the root forward in autocast; the callback traces the original forward
    callback = RaPTrCallback("3-3-4")
    model = llama()
    _, seen, optimizer_steps = train(model, callback, tmp_path, bf16=True, max_steps=4, save_steps=100)
    assert "_original_forward" in vars(model)  # Accelerate's autocast wrapper was there
    assert [b.name for b in callback.controller.blocks] == [f"model.layers.{i}" for i in range(4)]
    assert optimizer_steps == 4 and callback.controller.step_count == 4 and sorted(by_step(seen)) == [0, 1, 2, 3]


def test_logged_values_are_those_of_the_step_on_the_row(tmp_path):
    model = LM()
    callback = RaPTrCallback("3-3-4", seed=1)
    ran: dict[int, tuple[float, float]] = {}  # controller step -> (stage, units) the gates ran in its forward

    def record(*_):
        ctl = callback.controller
        ran[ctl.step_count] = (float(ctl.stage), float(sum(ctl.active)))

    model.register_forward_hook(record)
    trainer, _, _ = train(model, callback, tmp_path, logging_steps=1, save_steps=100)
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in rows] == list(range(1, STEPS + 1))
    # row `step` logs the loss of optimizer step step - 1 (counted from 0)
    assert [(h["raptr/stage"], h["raptr/active_units"]) for h in rows] == [ran[h["step"] - 1] for h in rows]
    assert {stage for stage, _ in ran.values()} == {0.0, 1.0, 2.0}  # an off-by-one shows at the stage boundaries


def test_resume_from_a_checkpoint_outside_output_dir(tmp_path):
    callback = RaPTrCallback("3-3-4", seed=3)
    _, seen, _ = train(LM(), callback, tmp_path / "run")
    full = by_step(seen)
    moved = tmp_path / "elsewhere" / "checkpoint-4"
    shutil.copytree(tmp_path / "run" / "checkpoint-4", moved)
    # another output_dir, whose checkpoint-4 does not exist, and another seed by mistake: the
    # checkpoint's state must win, with no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RaptrWarning)
        _, seen, optimizer_steps = train(LM(), RaPTrCallback("3-3-4", seed=99), tmp_path / "other",
                                         resume=str(moved))
    resumed = by_step(seen)
    assert optimizer_steps == STEPS - 4 and sorted(resumed) == list(range(4, STEPS))
    assert [resumed[t] for t in resumed] == [full[t] for t in resumed]
    assert len({full[t] for t in resumed}) > 1


class HalfThenAll(Schedule):
    """A Schedule subclass the callbacks know nothing about (as a width-wise one would be)."""

    def stage_bounds(self):
        return [(0, STEPS // 2), (STEPS // 2, STEPS)]

    def stage_index(self, step):
        return int(step >= STEPS // 2)

    def keep_probabilities(self, step, num_units):
        return [0.5 if step < STEPS // 2 else 1.0] * num_units


def test_any_schedule_subclass(tmp_path):
    callback = RaPTrCallback(HalfThenAll(), seed=2)  # no total_steps: the schedule knows its length
    trainer, seen, _ = train(LM(), callback, tmp_path, save_steps=100)
    assert isinstance(callback.controller.schedule, HalfThenAll)
    ran = by_step(seen)
    assert any(not all(ran[t]) for t in range(STEPS // 2)) and all(all(ran[t]) for t in range(STEPS // 2, STEPS))
    assert [h["raptr/stage"] for h in trainer.state.log_history if "loss" in h] == [0, 0, 0, 1, 1, 1]


def test_existing_controller_plain_model(tmp_path):
    model = LM()
    ctl = raptr_fx.transform(model, RaPTr("3-3-4", total_steps=STEPS))
    callback = RaPTrCallback(controller=ctl)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RaptrWarning)
        trainer, seen, optimizer_steps = train(model, callback, tmp_path, save_steps=100,
                                               gradient_accumulation_steps=4)
        assert callback.controller is ctl
        assert optimizer_steps == STEPS and ctl.step_count == STEPS
        assert sorted(by_step(seen)) == list(range(STEPS))
        assert len(seen) == 4 * STEPS
        trainer.train()  # again: the callback detached at train end, so it attaches again (once)
    assert ctl.step_count == 2 * STEPS


def test_dropped_units_are_not_updated(tmp_path):
    model = LM()
    ctl = raptr_fx.transform(model, RaPTr("2-2", total_steps=STEPS))  # middle units never run
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, RaPTrCallback(controller=ctl), tmp_path, save_steps=100)
    after = model.state_dict()
    changed = {k.split(".")[3] for k in before if k.startswith("gpt.transformer.h.")
               and not torch.equal(before[k], after[k])}
    assert changed == {"0", "3"}


def test_width_schedule_cuts_and_freezes_under_the_trainer(tmp_path):
    """A width schedule through the callback: rows not kept in a step do not move in that step."""
    model = LM()
    callback = RaPTrCallback(raptr_fx.WidthRaPTr("0.5-1", total_steps=STEPS, width_kinds=("mlp",)),
                             example_inputs={k: v[None] for k, v in dataset()[0].items()})
    weight = model.gpt.transformer.h[0].mlp.c_fc.weight
    seen = []  # (controller step, kept rows, weight) at each forward

    def record(*_):
        if callback.controller is not None and callback.controller.width_groups:
            kept = list(callback.controller.kept_indices.values())[0]
            seen.append((callback.controller.step_count, kept, weight.detach().clone()))

    model.gpt.transformer.h[0].mlp.c_fc.register_forward_hook(record)
    trainer, _, _ = train(model, callback, tmp_path, save_steps=100, max_steps=STEPS // 2 + 1, weight_decay=0.1)
    steps = {}
    for step, kept, value in seen:  # the first micro-batch of each step: the weight before its update
        steps.setdefault(step, (kept, value))
    checked = 0
    for step in sorted(steps)[:-1]:
        kept, before = steps[step]
        after = steps[step + 1][1]
        dropped = sorted(set(range(64)) - set(kept))
        assert torch.equal(before[dropped], after[dropped]) and not torch.equal(before[kept], after[kept])
        checked += 1
    assert checked >= 5 and steps[max(steps)][0] is None  # the last step is in the full-width stage
    logged = [row["raptr/width"] for row in trainer.state.log_history if "raptr/width" in row]
    assert logged and set(logged) <= {0.5, 1.0} and 0.5 in logged


def test_bad_arguments():
    with pytest.raises(ValueError, match="pass a schedule"):
        RaPTrCallback()
    with pytest.raises(TypeError, match="schedule must be .* got int 12"):
        RaPTrCallback(12)
    with pytest.raises(ValueError, match="total_steps must be a positive int, got -5"):
        RaPTrCallback("6-8", total_steps=-5)
    with pytest.raises(ValueError, match="'6-x'"):
        RaPTrCallback("6-x")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['scalling'\]"):
        RaPTrCallback("6-8", scalling="none")
    ctl = raptr_fx.transform(GPT(n_layer=4), RaPTr("3-4", total_steps=4))
    with pytest.raises(ValueError, match="not both"):
        RaPTrCallback("3-4", controller=ctl)
    with pytest.raises(TypeError, match=r"\['seed'\] only apply"):
        RaPTrCallback(controller=ctl, seed=1)
    with pytest.raises(TypeError, match="controller must be a raptr_fx.Controller, got str"):
        RaPTrCallback(controller="ctl")


def test_core_imports_no_framework():
    code = ("import sys, raptr_fx, raptr_fx.integrations; "
            "bad = [m for m in ('transformers', 'lightning', 'accelerate') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def _ddp_worker(rank: int, out_dir: str) -> dict:
    # The Trainer reads the process group's rank and size from the environment (torchrun's variables).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    transformers.logging.set_verbosity_error()
    options = dict(output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=2, use_cpu=True, report_to=[],
                   save_strategy="no", disable_tqdm=True, learning_rate=1e-3, seed=0)
    # Does the callback warn exactly when the Trainer will pass find_unused_parameters=True to DDP?
    # (It cannot change the option: the Trainer fixes it before the first callback event.)
    warned_and_found = []
    for make_model, overrides in [(LM, {}), (llama, {"activation_checkpointing": True}),
                                  (LM, {"ddp_find_unused_parameters": False})]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RaptrWarning)
            args = transformers.TrainingArguments(**options, **overrides)
            built = transformers.Trainer(model=make_model(), args=args, train_dataset=dataset(),
                                         callbacks=[RaPTrCallback("3-3-4")])
        warned = [str(w.message) for w in caught if issubclass(w.category, RaptrWarning)]
        assert all("ddp_find_unused_parameters=False" in w for w in warned), warned
        warned_and_found.append((len(warned), built.accelerator.ddp_handler.find_unused_parameters))
    model = llama()  # transformed at its first forward, inside DDP's
    callback = RaPTrCallback("3-3-4", seed=3)
    decisions: list[list[bool]] = []

    def record(*_):
        if callback.controller is not None:  # None while transform probes the model
            decisions.append(callback.controller.active)

    model.register_forward_hook(record)
    trainer = transformers.Trainer(model=model, train_dataset=dataset(), callbacks=[callback],
                                   args=transformers.TrainingArguments(**options, ddp_find_unused_parameters=False))
    trainer.train()
    return {"warned_and_found": warned_and_found, "find_unused": trainer.model_wrapped.find_unused_parameters,
            "decisions": decisions, "steps": callback.controller.step_count,
            "checksum": [float(p.detach().double().sum()) for p in model.parameters()]}


@pytest.mark.slow
def test_ddp_two_ranks_decide_alike_without_find_unused_parameters(tmp_path):
    ranks = run_ranks(_ddp_worker, tmp_path)
    for rank in ranks:
        # default: the Trainer searches for unused parameters and the callback warns; with activation
        # checkpointing or the option set to False, it does not and the callback is silent
        assert rank["warned_and_found"] == [[1, True], [0, False], [0, False]]
        assert rank["find_unused"] is False and rank["steps"] == STEPS and len(rank["decisions"]) == STEPS
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert any(not all(d) for d in ranks[0]["decisions"]), "some steps must drop units"
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # gradients were averaged, skipped units included
