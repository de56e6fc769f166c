"""Driving the controller: wrapped optimizers, and the silent mistakes reported once each."""

import warnings

import pytest
import torch

from raptr_fx import FullModel, RaptrWarning, transform
from tests.fixtures.models import GPT, tokens


def setup(n_layer=4, **attach):
    torch.manual_seed(0)
    model = GPT(n_layer=n_layer)
    ctl = transform(model, "2-3-4", total_steps=30, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if attach:
        ctl.attach(optimizer, **attach)
    return model, ctl, optimizer


def train(model, optimizer, steps, accumulate=1, after_step=lambda: None):
    for _ in range(steps):
        for _ in range(accumulate):
            model(*tokens()).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        after_step()


def raptr_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, RaptrWarning)]


def test_correct_use_is_silent_with_gradient_accumulation_and_a_second_optimizer():
    model, ctl, optimizer = setup(step_with_optimizer=True)
    other = torch.optim.SGD(model.lm_head.parameters(), lr=1e-3)  # a second optimizer over the model
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(12):
            for _ in range(4):
                model(*tokens()).sum().backward()
            optimizer.step()
            other.step()
            optimizer.zero_grad()
    assert raptr_warnings(record) == []
    assert ctl.step_count == 12


def test_manual_stepping_is_silent():
    model, ctl, optimizer = setup()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(model, optimizer, 12, accumulate=3, after_step=ctl.step)
    assert raptr_warnings(record) == [] and ctl.step_count == 12


def test_a_controller_never_stepped_is_reported_once():
    model, ctl, optimizer = setup()
    with pytest.warns(RaptrWarning, match=r"stepped 0 times in 3 optimizer steps.*attach\(optimizer\)") as record:
        train(model, optimizer, 30)
    assert len(raptr_warnings(record)) == 1
    assert ctl.step_count == 0


def test_attach_plus_manual_step_is_reported_once():
    model, ctl, optimizer = setup(step_with_optimizer=True)
    with pytest.warns(RaptrWarning, match="schedule runs too fast") as record:
        train(model, optimizer, 20, after_step=ctl.step)
    assert len(raptr_warnings(record)) == 1


def test_stepping_per_micro_batch_is_reported():
    model, ctl, optimizer = setup()

    def micro_batches():
        for _ in range(4):
            model(*tokens()).sum().backward()
            ctl.step()  # wrong: once per micro-batch
        optimizer.step()
        optimizer.zero_grad()

    with pytest.warns(RaptrWarning, match="not per micro-batch"):
        for _ in range(6):
            micro_batches()


def test_training_in_eval_mode_is_reported_and_freezes_nothing():
    model, ctl, optimizer = setup(step_with_optimizer=True)
    model.eval()  # as from_pretrained returns it
    with ctl.force(active=[True, False, True, True]):
        weight = model.transformer.h[1].mlp.c_fc.weight
        before = weight.detach().clone()
        with pytest.warns(RaptrWarning, match=r"eval mode.*model\.train\(\)") as record:
            train(model, optimizer, 5)
        assert len(raptr_warnings(record)) == 1
        assert not torch.equal(before, weight), "the full network ran, so every unit must train"


def test_a_resumed_controller_is_not_misreported():
    model, ctl, optimizer = setup(step_with_optimizer=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(model, optimizer, 2)
        ctl.load_state_dict({**ctl.state_dict(), "step": 20})
        train(model, optimizer, 8)
    assert raptr_warnings(record) == [] and ctl.step_count == 28


def test_attach_finds_the_optimizer_behind_accelerate_and_lightning():
    from accelerate import Accelerator
    from lightning.pytorch.core.optimizer import LightningOptimizer

    for wrap in (lambda opt: Accelerator(cpu=True).prepare(opt), LightningOptimizer):
        model, ctl, optimizer = setup()
        ctl.attach(wrap(optimizer))
        with ctl.force(active=[True, False, True, True]):
            weight = model.transformer.h[1].mlp.c_fc.weight
            model(*tokens()).sum().backward()
            weight.grad = torch.ones_like(weight)  # as DDP or a compiled graph would leave it
            before = weight.detach().clone()
            optimizer.step()
            assert torch.equal(before, weight), "the dropped unit must be frozen through the wrapper"
            assert ctl.step_count == 1


def test_attach_errors_name_what_to_pass():
    model, ctl, optimizer = setup(step_with_optimizer=True)
    with pytest.raises(TypeError, match="attach\\(\\) needs a torch.optim.Optimizer.*got Linear"):
        ctl.attach(model.lm_head)
    second = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="already steps with AdamW.*step_with_optimizer=False"):
        ctl.attach(second)
    ctl.attach(second, step_with_optimizer=False)


def test_remove_stops_the_checks():
    model, ctl, optimizer = setup()
    ctl.remove()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(model, optimizer, 5)
    assert raptr_warnings(record) == []


def test_detach_moves_the_controller_to_a_new_optimizer():
    model, ctl, old = setup(step_with_optimizer=True)
    ctl.detach()
    new = torch.optim.SGD(model.parameters(), lr=1e-3)
    ctl.attach(new)  # no "already steps with" error
    train(model, old, 1)
    assert ctl.step_count == 0
    train(model, new, 2)
    assert ctl.step_count == 2


def test_an_unstepped_full_model_schedule_is_not_reported():
    torch.manual_seed(0)
    model = GPT(n_layer=4)
    transform(model, FullModel())  # every unit every step: stepping changes nothing
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(model, optimizer, 8)
    assert raptr_warnings(record) == []
