import copy
import logging

import pytest
import torch

import raptr_fx
from raptr_fx import RaPTr, Stage, transform
from tests.fixtures.models import GPT, tokens


def run(model, ctl, steps, optimizer, accumulate=1):
    losses, decisions = [], []
    for _ in range(steps):
        decisions.append(ctl.active)
        for _ in range(accumulate):
            loss = torch.nn.functional.cross_entropy(model(*tokens()).flatten(0, 1), tokens()[0].flatten())
            (loss / accumulate).backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    return losses, decisions


def make(n_layer=6, seed=0, schedule=None):
    torch.manual_seed(0)
    model = GPT(n_layer=n_layer)
    ctl = transform(model, schedule or RaPTr("2-4-6", total_steps=12), seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    return model, ctl, optimizer


def test_decisions_depend_on_seed_and_step_only():
    _, a, _ = make(seed=3)
    _, b, _ = make(seed=3)
    _, c, _ = make(seed=4)
    seq = lambda ctl: [(ctl.step(), ctl.active)[1] for _ in range(12)]  # noqa: E731
    first, second, other = seq(a), seq(b), seq(c)
    assert first == second and first != other


def test_resume_reproduces_gates_and_losses():
    model, ctl, optimizer = make()
    losses, decisions = run(model, ctl, 10, optimizer)

    model, ctl, optimizer = make()
    first_losses, first_decisions = run(model, ctl, 5, optimizer)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict(), "raptr": ctl.state_dict()})
    model, ctl, optimizer = make(seed=99)  # a fresh process: wrong seed until the checkpoint loads
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["opt"])
    ctl.load_state_dict(checkpoint["raptr"])
    rest_losses, rest_decisions = run(model, ctl, 5, optimizer)
    assert first_decisions + rest_decisions == decisions
    assert first_losses + rest_losses == pytest.approx(losses, rel=1e-5)


def test_checkpoint_from_another_model_is_refused():
    _, ctl, _ = make()
    state = ctl.state_dict()
    state["blocks"] = ["x"]
    with pytest.raises(raptr_fx.RaptrError, match="checkpoint was made for units"):
        ctl.load_state_dict(state)


def test_fixed_units_always_run_and_stage_sizes_match_in_expectation():
    _, ctl, _ = make(schedule=RaPTr("3-5", total_steps=400))
    counts = []
    for _ in range(200):
        assert ctl.active[0] and ctl.active[-1]
        counts.append(sum(ctl.active))
        ctl.step()
    assert sum(counts) / len(counts) == pytest.approx(3, abs=0.25)
    assert ctl.stage == 1 and ctl.plan()[1].active == pytest.approx(5)


def test_exact_sampling_runs_exactly_k_units():
    _, ctl, _ = make(schedule=RaPTr("3-5", total_steps=20, sampling="exact"))
    for step in range(20):
        assert sum(ctl.active) == (3 if step < 10 else 5)
        ctl.step()


def test_dropped_units_are_frozen_under_adamw():
    model, ctl, optimizer = make()
    run(model, ctl, 1, optimizer)  # give AdamW momentum for every unit it touched
    with ctl.force(active=[True, False, True, True, False, True]):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        run(model, ctl, 1, optimizer)
        for name, p in model.named_parameters():
            moved = not torch.equal(before[name], p)
            in_dropped = name.startswith(("transformer.h.1.", "transformer.h.4."))
            assert moved != in_dropped, name


@pytest.mark.parametrize("freeze", [True, False])
def test_zero_gradients_of_dropped_units(freeze):
    # Compiled graphs (torch.cond) and DDP give dropped units zero gradients, not None.
    torch.manual_seed(0)
    model = GPT(n_layer=4)
    ctl = transform(model, "2-4", total_steps=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer, freeze_dropped=freeze)
    with ctl.force(active=[True] * 4):
        run(model, ctl, 1, optimizer)
    with ctl.force(active=[True, False, True, True]):
        weight = model.transformer.h[1].mlp.c_fc.weight
        before = weight.detach().clone()
        model(*tokens()).sum().backward()
        assert weight.grad is None  # eager: the skipped unit never ran
        weight.grad = torch.zeros_like(weight)
        optimizer.step()
        assert torch.equal(before, weight) == freeze


def test_gradient_accumulation_sees_one_subnetwork_per_step():
    model, ctl, optimizer = make()
    seen = []
    model.transformer.h[2].register_forward_pre_hook(lambda *_: seen.append(ctl.step_count))
    run(model, ctl, 4, optimizer, accumulate=3)
    assert ctl.step_count == 4
    assert all(seen.count(step) in (0, 3) for step in range(4))


def test_activation_checkpointing_replays_the_same_decisions():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = GPT(n_layer=4)
    ctl = transform(model, RaPTr([Stage(10, keep=0.5)], fixed_units=[]))
    with ctl.force(active=[True, False, True, False]):
        torch.manual_seed(0)
        reference = GPT(n_layer=4)
        x = tokens()
        out = checkpoint(model, *x, use_reentrant=False)
        out.sum().backward()
    ctl2 = transform(reference, RaPTr([Stage(10, keep=0.5)], fixed_units=[]))
    with ctl2.force(active=[True, False, True, False]):
        reference(*x).sum().backward()
        for a, b in zip(model.parameters(), reference.parameters()):
            assert (a.grad is None) == (b.grad is None)
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad)


def test_stage_transitions_are_logged(caplog):
    _, ctl, _ = make(schedule=RaPTr("2-4-6", total_steps=6))
    with caplog.at_level(logging.INFO, logger="raptr_fx"):
        for _ in range(6):
            ctl.step()
    messages = [r.getMessage() for r in caplog.records if r.name == "raptr_fx"]
    assert messages == [
        "raptr_fx: step 2 enters stage 1: 4.0 of 6 units active, 67% of unit compute",
        "raptr_fx: step 4 enters stage 2: 6.0 of 6 units active, 100% of unit compute",
    ]


def test_expected_compute_and_active_blocks():
    _, ctl, _ = make(schedule=RaPTr("2-4-6", total_steps=30))
    assert ctl.expected_compute == pytest.approx(2 / 3, abs=0.01)
    assert ctl.active_blocks[0] == "transformer.h.0" and len(ctl.active_blocks) == sum(ctl.active)


# -- force(): pinned decisions ------------------------------------------------------------------
def test_force_pins_units_by_list_name_or_index_and_restores_the_draw():
    model, ctl, optimizer = make()
    drawn = ctl.active
    calls = []
    for i, block in enumerate(model.transformer.h):
        block.attn.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    with ctl.force(active=[True, False, True, True, False, True]) as pinned:
        assert pinned is ctl and ctl.active == [True, False, True, True, False, True]
        model(*tokens())
        assert calls == [0, 2, 3, 5]  # the pinned-off units did not run
    assert ctl.active == drawn
    with ctl.force(active={"transformer.h.2": False, 1: True, -1: False}):
        assert ctl.active[1:3] == [True, False] and not ctl.active[-1]
        assert ctl.active[0] == drawn[0]  # units not named keep their draw
    assert ctl.active == drawn


def test_force_holds_across_steps_and_nests():
    model, ctl, optimizer = make()
    with ctl.force(active=[False] + [True] * 5):
        run(model, ctl, 3, optimizer)
        assert ctl.step_count == 3 and ctl.active == [False] + [True] * 5  # the schedule advanced, the pin held
        with ctl.force(active={0: True, 5: False}):
            assert ctl.active == [True] * 5 + [False]
        assert ctl.active == [False] + [True] * 5
    _, fresh, _ = make()
    for _ in range(3):
        fresh.step()
    assert ctl.active == fresh.active  # back to the draw of step 3


def test_force_scale_and_width():
    torch.manual_seed(0)
    model = GPT(n_layer=2)
    ctl = transform(model, RaPTr("2-2", total_steps=4, width="0.5-1"), example_inputs=tokens())
    drawn = ctl.kept_indices
    assert drawn["transformer.h.0.mlp:mlp"] is not None and len(drawn["transformer.h.0.mlp:mlp"]) == 32
    with ctl.force(width={"transformer.h.0.mlp:mlp": [3, 1], 3: None, "transformer.h.1.attn:heads": 1.0}):
        kept = ctl.kept_indices
        assert kept["transformer.h.0.mlp:mlp"] == [1, 3] and kept["transformer.h.1.mlp:mlp"] is None
        assert ctl.kept_parts["transformer.h.1.attn:heads"] == 2
        assert kept["transformer.h.0.attn:heads"] == drawn["transformer.h.0.attn:heads"]  # not pinned
        mlp = model.transformer.h[0].mlp
        x = torch.randn(2, 8, 16)
        expected = torch.nn.functional.gelu(x @ mlp.c_fc.weight[[1, 3]].T + mlp.c_fc.bias[[1, 3]]) @ \
            mlp.c_proj.weight[:, [1, 3]].T + mlp.c_proj.bias
        torch.testing.assert_close(mlp(x), expected)
    assert ctl.kept_indices == drawn
    with ctl.force(width=0.25):
        assert set(ctl.kept_parts.values()) == {16, 1}  # a quarter of 64 hidden units; 1 of 2 heads
    with ctl.force(active=[True, True], scale={1: 2.0}):
        assert ctl.active == [True, True]
        with ctl.force(active={0: False}):
            assert ctl.active == [False, True]
    assert ctl.kept_indices == drawn


@pytest.mark.parametrize("pins, message", [
    (dict(active=[True, False]), "active has 2 values, the controller has 6 units"),
    (dict(active={"transformer.h.9": False}), r"active names 'transformer.h.9', which is no unit"),
    (dict(active={6: False}), "active names 6, which is no unit"),
    (dict(active=[1, 0, 1, 1, 1, 1]), "active for unit transformer.h.0 must be True or False, got 1"),
    (dict(active="transformer.h.1"), "active must be a list with one value per unit or a dict"),
    (dict(scale={0: 0.0}), "scale for unit transformer.h.0 must be a positive number, got 0.0"),
    (dict(width=0.5), r"width=0.5: this controller cuts no width"),
])
def test_force_names_the_bad_value(pins, message):
    _, ctl, _ = make()
    drawn = ctl.active
    with pytest.raises(ValueError, match=message):
        with ctl.force(**pins):
            pass
    assert ctl.active == drawn


@pytest.mark.parametrize("width, message", [
    (1.5, "must be a kept fraction in \\(0, 1\\], got 1.5"),
    ({"transformer.h.0.mlp:mlp": [0, 0]}, r"distinct part indices in 0..63 \(at least one\), got \[0, 0\]"),
    ({"transformer.h.0.mlp:mlp": [64]}, r"got \[64\]"),
    ({"transformer.h.0.mlp:mlp": "all"}, "must be a fraction, a list of part indices or None, got 'all'"),
    ({"mlp": 0.5}, "width names 'mlp', which is no width group"),
])
def test_force_width_names_the_bad_value(width, message):
    ctl = transform(GPT(n_layer=2), raptr_fx.WidthRaPTr("0.5-1", total_steps=4), example_inputs=tokens())
    with pytest.raises(ValueError, match=message):
        with ctl.force(width=width):
            pass
    with pytest.raises(ValueError, match="cuts width only and gates no unit"):
        with ctl.force(active=[True, True]):
            pass
