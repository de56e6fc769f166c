"""A unit owns the weights outside it that only its branch uses (issue 21): a parent's pre-norm,
layer scale or post-norm is skipped, frozen and counted with the unit; shared weights keep the refusal."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import raptr_fx
from raptr_fx import FullModel, RaPTr, find_blocks, transform
from tests.fixtures import patterns
from tests.fixtures.models import features
from tests.test_patterns import BOTH, assert_same_state, inputs_or_none, module_state

# factory -> {unit: (owned parameters, modules owned before it, modules owned after it)}
OWNING = {
    "pre-norm list": (patterns.NormListLoop, {
        "attns.0": (("norms.0.bias", "norms.0.weight"), ("norms.0",), ()),
        "mlps.0": (("norms.1.bias", "norms.1.weight"), ("norms.1",), ()),
        "attns.1": (("norms.2.bias", "norms.2.weight"), ("norms.2",), ()),
        "mlps.1": (("norms.3.bias", "norms.3.weight"), ("norms.3",), ())}),
    "parent norm": (patterns.ParentNorm, {
        "mlps.0": (("norms.0.bias", "norms.0.weight"), ("norms.0",), ()),
        "mlps.1": (("norms.1.bias", "norms.1.weight"), ("norms.1",), ())}),
    "parent layer scale": (patterns.ParentLayerScale, {
        "mlps.0": (("gammas.0",), (), ()),
        "mlps.1": (("gammas.1",), (), ())}),
    "parent post-norm": (patterns.ParentPostNorm, {
        "mlps.0": (("post_norms.0.bias", "post_norms.0.weight"), (), ("post_norms.0",)),
        "mlps.1": (("post_norms.1.bias", "post_norms.1.weight"), (), ("post_norms.1",))}),
}
OWNING_IDS = list(OWNING)


class LayerNormCount(TorchDispatchMode):
    """Counts the layer norms that really compute (a forward hook would fire on a gated module too)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.startswith("native_layer_norm")
        return func(*args, **(kwargs or {}))


def zeroed(model, names):
    """``model`` with the outputs of modules ``names`` replaced by zeros: the reference for a skip."""
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    return model


@BOTH
@pytest.mark.parametrize("pattern", OWNING_IDS)
def test_units_own_the_weights_only_their_branch_uses(pattern, with_inputs):
    factory, owned = OWNING[pattern]
    model = factory()
    blocks = find_blocks(model, inputs_or_none(with_inputs))
    assert {b.name: (b.owned, b.owned_before, b.owned_after) for b in blocks} == owned
    assert all(b.droppable and b.drop == "zero" for b in blocks)
    for b in blocks:  # counted with the unit
        inside = sum(p.numel() for p in model.get_submodule(b.name).parameters())
        assert b.params == inside + sum(model.get_parameter(p).numel() for p in b.owned)


@BOTH
@pytest.mark.parametrize("pattern", OWNING_IDS)
def test_a_dropped_unit_skips_what_it_owns_and_eval_is_the_plain_model(pattern, with_inputs):
    factory, owned = OWNING[pattern]
    model = factory()
    before = module_state(model)
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), example_inputs=inputs_or_none(with_inputs))
    x = features()[0]
    with LayerNormCount() as full:
        expected = reference(x)
    assert torch.equal(model(x), expected)  # every unit on: the plain model, bitwise
    model.eval()
    assert torch.equal(model(x), reference.eval()(x))
    model.train()
    reference.train()
    dropped = ctl.blocks[0].name
    with ctl.force(active=[b.name != dropped for b in ctl.blocks]):
        with LayerNormCount() as counted:
            out = model(x)
        _, before_modules, after_modules = owned[dropped]
        assert counted.count == full.count - len(before_modules) - len(after_modules)  # the owned norms did not run
        assert torch.equal(out, zeroed(copy.deepcopy(reference), [dropped, *after_modules])(x))
        out.sum().backward()
        owned_params = [model.get_parameter(p) for p in owned[dropped][0]]
        assert all(p.grad is None for p in model.get_submodule(dropped).parameters())
        assert all(p.grad is None or not p.grad.any() for p in owned_params)  # a layer scale times zeros: zeros
    ctl.remove()
    assert_same_state(before, module_state(model))
    assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("pattern", OWNING_IDS)
def test_owned_weights_are_frozen_with_their_unit(pattern):
    factory, owned = OWNING[pattern]
    torch.manual_seed(0)
    model = factory()
    ctl = transform(model, RaPTr("1-2", total_steps=8, fixed_units=[], sampling="exact"), seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    steps = {name: 0 for name in owned}
    dropped_seen = 0
    for step in range(8):
        active = dict(zip([b.name for b in ctl.blocks], ctl.active))
        values = {name: [model.get_parameter(p).detach().clone() for p in owned[name][0]] for name in owned}
        model(features(batch=2 + step % 2)[0]).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        for name, kept in active.items():
            params = [model.get_parameter(p) for p in owned[name][0]]
            same = all(torch.equal(a, b) for a, b in zip(values[name], params))
            assert same != kept, f"step {step}: {name} {'ran' if kept else 'was dropped'}, its owned weights " \
                                 f"{'did not move' if same else 'moved'}"
            steps[name] += kept
            dropped_seen += not kept
        for name in owned:  # no optimizer state either: AdamW counted only the steps the unit ran
            for p in owned[name][0]:
                state = optimizer.state.get(model.get_parameter(p), {})
                assert int(state.get("step", 0)) == steps[name]
    assert dropped_seen


@BOTH
@pytest.mark.parametrize("factory, weights", [
    (patterns.ViewLayerScale, "gamma"),
    (patterns.ParentStandardizedWeight, "weights"),
], ids=["layer scale rows of one parameter", "rows of one standardized weight"])
def test_weights_other_units_read_too_keep_the_refusal(factory, weights, with_inputs):
    blocks = find_blocks(factory(), inputs_or_none(with_inputs))
    assert blocks and not any(b.droppable for b in blocks)
    assert all(b.owned == () for b in blocks)
    assert blocks[0].reason.startswith(f"the branch also runs weights outside {blocks[0].name} that other parts "
                                       f"of the model read too ({weights}): frozen with it, they would stop "
                                       "training for those too; ")
    with pytest.raises(raptr_fx.RaptrError, match="no droppable"):
        transform(factory(), FullModel(), example_inputs=inputs_or_none(with_inputs))


@BOTH
def test_weights_after_the_unit_that_do_not_keep_zeros_keep_the_refusal(with_inputs):
    blocks = find_blocks(patterns.ParentShift(), inputs_or_none(with_inputs))
    assert [(b.name, b.droppable) for b in blocks] == [("mlps.0", False), ("mlps.1", False)]
    assert blocks[0].reason.startswith("the branch runs weights outside mlps.0 on its result (shifts.0) through add, "
                                       "which does not keep zeros zero: skipped, the branch would not add zeros; ")


def test_an_owned_module_must_keep_its_input_shape():
    # Without example inputs, an nn.Linear's shapes are unknown; with them, fc1 (16 -> 16) keeps its input's.
    blocks = find_blocks(patterns.RootResiduals())
    assert blocks[0].reason.startswith("fc2.0 owns fc1.0 (only its branch uses it), but fc1.0 may change its input's "
                                       "shape (pass example inputs to check): skipped with fc2.0, it could not "
                                       "return zeros shaped like its output; ")
    model = patterns.RootResiduals()
    blocks = find_blocks(model, features())
    assert [(b.name, b.owned_before) for b in blocks if b.droppable] == [("fc2.0", ("fc1.0",)), ("fc2.1", ("fc1.1",))]
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), example_inputs=features())
    with ctl.force(active=[False, True]):
        x = features()[0]
        assert torch.equal(model(x), zeroed(reference, ["fc2.0"])(x))
    # TinyBert's intermediate (16 -> 64) cannot return zeros in place of its output.
    from tests.fixtures.models import TinyBert

    blocks = find_blocks(TinyBert(n_layer=1), granularity="branch")
    assert "owns encoder.layer.0.intermediate" in blocks[1].reason


def test_inspect_lists_what_units_own(capsys):
    from rich.console import Console

    from cli.render import discovery_table

    discovery = raptr_fx.discover(patterns.ParentPostNorm(), features())
    discovery_table(discovery, Console(width=200, force_terminal=False))
    out = capsys.readouterr().out
    assert "mlps.0 also owns post_norms.0 (after it): skipped and frozen with it" in out


@pytest.mark.compile
@pytest.mark.parametrize("compile_mode", ["regional", "cond"])
def test_compiled_gates_skip_what_units_own(compile_mode):
    torch._dynamo.reset()
    model = patterns.ParentPostNorm()
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), compile_mode=compile_mode, compile_options=dict(backend="aot_eager"))
    compiled = torch.compile(model, backend="aot_eager")
    x = features()[0]
    with ctl.force(active=[False, True]):
        torch.testing.assert_close(compiled(x), zeroed(copy.deepcopy(reference), ["mlps.0", "post_norms.0"])(x))
    with ctl.force(active=[True, True]):
        torch.testing.assert_close(compiled(x), reference(x))
