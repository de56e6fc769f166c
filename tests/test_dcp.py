"""Distributed checkpoints (DCP) with real FSDP2: 2 CPU processes over gloo.

A run saved mid-stage with ``torch.distributed.checkpoint`` and resumed into a fresh model and
optimizer equals the uninterrupted run bit for bit, and saving never moves the controller.
"""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import fully_shard

from raptr_fx import RaPTr, transform
from tests.distributed import run_ranks
from tests.fixtures.models import GPT
from tests.test_fsdp import _full, batch

STEPS, SAVE_AT = 8, 2
# Stage 0 runs the fixed ends only: units 1 and 2 have never run (nor have optimizer state) at the save.
SCHEDULE = RaPTr("2-3-4", total_steps=STEPS)


def _adam(params):
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)


def _sgd(params):  # no momentum: no optimizer state, so DCP initialises it with a step at every save
    return torch.optim.SGD(params, lr=0.1)


def _build(make_optimizer):
    torch.manual_seed(0)
    model = GPT(n_layer=4)
    ctl = transform(model, SCHEDULE, seed=7)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    optimizer = make_optimizer(model.parameters())
    ctl.attach(optimizer)
    return model, optimizer, ctl


def _train(model, optimizer, ctl, rank: int, stop: int) -> list:
    decisions = []
    while ctl.step_count < stop:
        decisions.append(ctl.active)
        idx = batch(rank, ctl.step_count)
        torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return decisions


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _worker(rank: int, out_dir: str) -> dict:
    path = f"{out_dir}/checkpoint"
    result = {}
    model, optimizer, ctl = _build(_adam)
    result["uninterrupted"] = _train(model, optimizer, ctl, rank, STEPS)
    uninterrupted = [_full(p) for p in model.parameters()]

    model, optimizer, ctl = _build(_adam)
    saved = _train(model, optimizer, ctl, rank, SAVE_AT)
    result["never_ran"] = [i for i in range(4) if not any(d[i] for d in saved)]
    for _ in range(3):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd, "raptr": ctl}, checkpoint_id=path)
    result["step_after_saves"] = ctl.step_count
    result["saver"] = saved + _train(model, optimizer, ctl, rank, STEPS)
    result["saver_equal"] = _same([_full(p) for p in model.parameters()], uninterrupted)

    model, optimizer, ctl = _build(_adam)  # fresh model, optimizer and controller
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd, "raptr": ctl}, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    result["step_after_load"] = ctl.step_count
    result["resumed"] = saved + _train(model, optimizer, ctl, rank, STEPS)
    resumed = [_full(p) for p in model.parameters()]
    result["resumed_equal"] = _same(resumed, uninterrupted)
    result["max_difference"] = max((a - b).abs().max().item() for a, b in zip(resumed, uninterrupted))

    # An optimizer without state: DCP's get_state_dict steps it (zero learning rate) at every save.
    model, optimizer, ctl = _build(_sgd)
    _train(model, optimizer, ctl, rank, SAVE_AT)
    before = [_full(p) for p in model.parameters()]
    for _ in range(3):
        get_state_dict(model, optimizer)
    result["sgd_step_after_saves"] = ctl.step_count
    result["sgd_unchanged"] = _same([_full(p) for p in model.parameters()], before)
    return result


@pytest.mark.slow
def test_dcp_save_mid_stage_and_resume_equals_the_uninterrupted_run(tmp_path):
    for rank in run_ranks(_worker, tmp_path):
        assert rank["never_ran"], "the save must come while some unit has never run"
        assert rank["step_after_saves"] == rank["sgd_step_after_saves"] == SAVE_AT, "a save moved the controller"
        assert rank["sgd_unchanged"], "a save moved the parameters"
        assert rank["saver"] == rank["uninterrupted"] and rank["saver_equal"], "saving disturbed the run"
        assert rank["step_after_load"] == SAVE_AT
        assert rank["resumed"] == rank["uninterrupted"]
        assert rank["resumed_equal"], f"resumed parameters differ by up to {rank['max_difference']}"


def _resume_in_one_process(make_optimizer, path: str) -> dict:
    """The same save and resume as _worker, without a process group (DCP runs single-process)."""
    def build():
        torch.manual_seed(0)
        model = GPT(n_layer=4)
        ctl = transform(model, SCHEDULE, seed=7)
        optimizer = make_optimizer(model.parameters())
        ctl.attach(optimizer)
        return model, optimizer, ctl

    model, optimizer, ctl = build()
    uninterrupted = _train(model, optimizer, ctl, 0, STEPS)
    want = [p.detach().clone() for p in model.parameters()]
    model, optimizer, ctl = build()
    saved = _train(model, optimizer, ctl, 0, SAVE_AT)
    for _ in range(2):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd, "raptr": ctl}, checkpoint_id=path)
    saves_moved = ctl.step_count - SAVE_AT
    model, optimizer, ctl = build()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd, "raptr": ctl}, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    resumed = saved + _train(model, optimizer, ctl, 0, STEPS)
    return dict(never_ran=[i for i in range(4) if not any(d[i] for d in saved)], saves_moved=saves_moved,
                stateful=isinstance(ctl, Stateful),
                decisions_equal=resumed == uninterrupted, parameters_equal=_same(list(model.parameters()), want))


@pytest.mark.filterwarnings("ignore::UserWarning")  # DCP without a process group says it runs single-process
@pytest.mark.parametrize("make_optimizer", [
    _adam,
    # Zero momentum is not the fresh state here (the first step copies the gradient, undamped), so the
    # zero state given to never-run units at the save must be forgotten after loading.
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5),
], ids=["adamw", "sgd-dampening"])
def test_dcp_resume_in_one_process_is_bitwise(tmp_path, make_optimizer):
    result = _resume_in_one_process(make_optimizer, str(tmp_path / "checkpoint"))
    assert result["stateful"] and result["never_ran"] and result["saves_moved"] == 0
    assert result["decisions_equal"] and result["parameters_equal"]
