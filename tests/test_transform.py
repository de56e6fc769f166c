"""transform(): gates really skip compute, are exact when on, and leave the model as it was."""

import copy
import io

import pytest
import torch
from torch import nn

import raptr_fx
from raptr_fx import FullModel, RaptrError, Stage, transform
from tests.fixtures.models import GPT, ZOO, BranchLoopTransformer, ResNet, images, tokens


def gpt_pair(n_layer=4):
    torch.manual_seed(0)
    model = GPT(n_layer=n_layer)
    return model, copy.deepcopy(model)


def test_eval_output_is_bitwise_equal_to_the_untransformed_model():
    model, reference = gpt_pair()
    ctl = transform(model, "2-4", total_steps=10)
    with ctl.force(active=[True, False, False, True]):
        model.eval(), reference.eval()
        assert torch.equal(model(*tokens()), reference(*tokens()))


def test_all_active_training_output_equals_the_original():
    model, reference = gpt_pair()
    transform(model, FullModel())
    assert torch.equal(model(*tokens()), reference(*tokens()))


def test_gate_off_equals_block_replaced_by_identity():
    model, reference = gpt_pair()
    ctl = transform(model, FullModel())
    with ctl.force(active=[True, False, True, True]):
        reference.transformer.h[1] = nn.Identity()
        assert torch.equal(model(*tokens()), reference(*tokens()))


def test_zero_unit_off_equals_branch_replaced_by_zero():
    torch.manual_seed(0)
    model = BranchLoopTransformer()
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel())
    assert [b.name for b in ctl.blocks] == ["attns.0", "mlps.0", "attns.1", "mlps.1"]

    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    reference.attns[1] = Zero()
    with ctl.force(active=[True, True, False, True]):
        assert torch.equal(model(*tokens()), reference(*tokens()))


def test_dropped_block_forward_is_never_called():
    model, _ = gpt_pair()
    ctl = transform(model, FullModel())
    with ctl.force(active=[True, False, True, False]):
        calls = []
        for i, block in enumerate(model.transformer.h):
            block.attn.register_forward_hook(lambda *_, i=i: calls.append(i))
        model(*tokens()).sum().backward()
        assert calls == [0, 2]
        assert model.transformer.h[1].attn.c_attn.weight.grad is None
        assert model.transformer.h[0].attn.c_attn.weight.grad is not None


def test_inverse_scaling_formula_identity_units():
    model, reference = gpt_pair(n_layer=3)
    ctl = transform(model, FullModel(), scaling="inverse")
    with ctl.force(active=[True, True, True], scale=[1.0, 2.5, 1.0]):
        x = reference.transformer.wte(tokens()[0]) + reference.transformer.wpe(torch.arange(8))
        h = reference.transformer.h
        x = h[0](x)
        x = x + 2.5 * (h[1](x) - x)  # kept unit: x + (f(x) - x) / p
        x = h[2](x)
        expected = reference.lm_head(reference.transformer.ln_f(x))
        torch.testing.assert_close(model(*tokens()), expected, rtol=0, atol=1e-6)


def test_inverse_scaling_formula_zero_units():
    torch.manual_seed(0)
    model = BranchLoopTransformer(n_layer=1)
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), scaling=lambda p: 1 / p)
    with ctl.force(active=[True, True], scale=[4.0, 1.0]):
        idx = tokens()[0]
        x = reference.embed(idx)
        x = x + 4.0 * reference.attns[0](x)  # kept branch: x + b(x) / p
        x = x + reference.mlps[0](x)
        torch.testing.assert_close(model(idx), reference.head(x), rtol=0, atol=1e-6)


def test_scaling_follows_keep_probability():
    model, _ = gpt_pair()
    ctl = transform(model, raptr_fx.RaPTr("2-3", total_steps=10), scaling="inverse")
    keep_p = ctl.schedule.keep_probabilities(0, 4)
    assert keep_p == [1.0, 0.0, 0.0, 1.0]
    assert raptr_fx.controller._scaling_function("inverse")(0.25) == 4.0
    assert raptr_fx.controller._scaling_function("none")(0.25) == 1.0
    with pytest.raises(ValueError, match="scaling must be"):
        raptr_fx.controller._scaling_function("sqrt")


def test_state_dict_round_trips_between_transformed_and_plain_models():
    model, reference = gpt_pair()
    keys = list(model.state_dict())
    transform(model, "2-4", total_steps=10)
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = GPT(n_layer=4)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    model.load_state_dict(reference.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_model_keeps_its_class_and_methods():
    model, _ = gpt_pair()
    before = type(model)
    ctl = transform(model, "2-4", total_steps=10)
    assert type(model) is before and ctl.model is model
    assert type(model.transformer.h[0]).__name__ == "GPTBlock"


def test_remove_restores_exact_behaviour():
    model, reference = gpt_pair()
    ctl = transform(model, "2-4", total_steps=10)
    with ctl.force(active=[True, False, False, True]):
        assert not torch.equal(model(*tokens()), reference(*tokens()))
    ctl.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(*tokens()), reference(*tokens()))
    transform(model, "2-4", total_steps=10)
    raptr_fx.restore(model)
    assert torch.equal(model(*tokens()), reference(*tokens()))


def test_user_instance_forward_survives_remove():
    model, _ = gpt_pair()
    block = model.transformer.h[0]
    own = block.forward  # bound method stored on the instance
    block.forward = own
    transform(model, "2-4", total_steps=10).remove()
    assert block.__dict__["forward"] is own


def test_include_and_exclude_patterns():
    model, _ = gpt_pair()
    ctl = transform(model, FullModel(), include=["transformer.h.*"], exclude=["transformer.h.3"])
    assert [b.name for b in ctl.blocks] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    ctl.remove()
    with pytest.raises(ValueError, match="'nope' matches no unit"):
        transform(model, FullModel(), include=["nope"])
    with pytest.raises(ValueError, match="cannot be dropped"):
        transform(ResNet(), FullModel(), include=["layer2.0"])


def test_transform_refuses_wrapped_or_transformed_models():
    model, _ = gpt_pair()
    with pytest.raises(RaptrError, match="transform.* first, then torch.compile"):
        transform(torch.compile(model), FullModel())
    with pytest.raises(RaptrError, match="wrapped by DataParallel: transform the bare model first"):
        transform(nn.DataParallel(model), FullModel())
    with pytest.raises(ValueError, match="compile_mode must be 'regional' or 'cond', got 'graph'"):
        transform(model, FullModel(), compile_mode="graph")
    transform(model, FullModel())
    with pytest.raises(RaptrError, match="already transformed"):
        transform(model, FullModel())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        transform("model.py", FullModel())


@pytest.mark.parametrize("bad, error, message", [
    (dict(seed="x"), TypeError, "seed must be an int, got 'x'"),
    (dict(seed=True), TypeError, "seed must be an int, got True"),
    (dict(scaling="sqrt"), ValueError, "scaling must be 'inverse', 'none' or a callable"),
    (dict(compile_options=["fullgraph"]), TypeError, "compile_options must be a dict"),
    (dict(include=[3]), TypeError, r"include must be unit names or glob patterns \(strings\), got \[3\]"),
    (dict(exclude=["nothing.*"]), ValueError, "exclude pattern 'nothing.*' matches no unit"),
    (dict(exclude="transformer.h.*"), ValueError, r"exclude=\['transformer.h.\*'\] left no unit to gate"),
], ids=lambda v: str(v)[:30])
def test_bad_arguments_leave_the_model_untouched(bad, error, message):
    model, reference = gpt_pair()
    with pytest.raises(error, match=message):
        transform(model, "2-4", total_steps=10, **bad)
    assert not any(isinstance(m.__dict__.get("forward"), raptr_fx.gates.GatedForward) for m in model.modules())
    transform(model, "2-4", total_steps=10)  # nothing was left behind


def test_a_failure_while_installing_rolls_back_every_gate(monkeypatch):
    model, _ = gpt_pair()
    installed = raptr_fx.gates.install_gate

    def fail_on_third(module, block, index, *args, **kwargs):
        if index == 2:
            raise RuntimeError("boom")
        return installed(module, block, index, *args, **kwargs)

    monkeypatch.setattr(raptr_fx.controller, "install_gate", fail_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        transform(model, "2-4", total_steps=10)
    assert not any(isinstance(m.__dict__.get("forward"), raptr_fx.gates.GatedForward) for m in model.modules())


def test_gates_follow_parameters_replaced_after_transform():
    """load_state_dict(assign=True) and dtype changes replace parameter objects: the gates must follow."""
    model, _ = gpt_pair()
    ctl = transform(model, "2-4", total_steps=10)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    model.double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    with ctl.force(active=[True, False, True, True]):
        weight = model.transformer.h[1].mlp.c_fc.weight
        model(*tokens()).sum().backward()
        weight.grad = torch.ones_like(weight)  # as DDP or a compiled graph would leave it
        before = weight.detach().clone()
        optimizer.step()
        assert torch.equal(before, weight)
        assert {id(p) for gate in ctl._gates for p in gate.parameters()} <= {id(p) for p in model.parameters()}


def test_transform_errors_for_models_without_blocks():
    from tests.fixtures.models import UNet

    with pytest.raises(RaptrError, match="no droppable residual blocks"):
        transform(UNet(), FullModel())
    with pytest.raises(ValueError, match="needs total_steps"):
        transform(GPT(), "6-8-10-12")
    with pytest.raises(ValueError, match=r"active=6 is outside \[2, 4\]"):
        transform(GPT(), "6-8", total_steps=10)
    with pytest.raises(ValueError, match="schedule must be"):
        transform(GPT(), 3)


@pytest.mark.parametrize("name", [n for n, (_, _, drop, _) in ZOO.items() if drop])
def test_every_zoo_model_trains_with_gates(name):
    factory, inputs, droppable, _ = ZOO[name]
    torch.manual_seed(0)
    model = factory()
    reference = copy.deepcopy(model)
    example = inputs()
    ctl = transform(model, raptr_fx.RaPTr([Stage(2, keep=0.5), Stage(2, keep=1.0)]), example_inputs=example)
    assert [b.name for b in ctl.blocks] == droppable
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ctl.attach(optimizer)
    for _ in range(4):
        model(*example).float().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert ctl.step_count == 4 and ctl.stage == 1
    model.eval(), reference.eval()
    ctl.remove()
    reference.load_state_dict(model.state_dict())
    assert torch.equal(model(*example), reference(*example))


def test_eager_skip_path_uses_no_torch_cond(monkeypatch):
    model, _ = gpt_pair()
    ctl = transform(model, FullModel())

    def fail(*args, **kwargs):
        raise AssertionError("torch.cond called in eager mode")

    monkeypatch.setattr(torch, "cond", fail)
    with ctl.force(active=[True, False, True, False]):
        model(*tokens()).sum().backward()
    # the backward went through the eager gates: kept units have gradients, skipped units none
    grads = [block.mlp.c_fc.weight.grad is not None for block in model.transformer.h]
    assert grads == [True, False, True, False]


def test_resnet_blocks_drop_to_identity():
    torch.manual_seed(0)
    model = ResNet()
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel())
    with ctl.force(active=[False, True, False]):
        reference.layer1[0] = nn.Identity()
        reference.layer2[1] = nn.Identity()
        assert torch.equal(model(*images()), reference(*images()))
