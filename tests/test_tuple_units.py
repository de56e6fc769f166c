"""Units that return a tuple or dict (issue 8): skipped, they return the same structure."""

import copy

import pytest
import torch
from torch import nn

import raptr_fx
from raptr_fx import FullModel, transform
from tests.fixtures import patterns
from tests.fixtures.models import TupleStack, features


class SkipTuple(nn.Module):
    def forward(self, x):
        return (x,)


class SkipMasked(nn.Module):
    def forward(self, x, mask):
        return {"hidden": x, "mask": mask, "cache": None}


def pair():
    torch.manual_seed(0)
    model = TupleStack()
    return model, copy.deepcopy(model)


def test_skipped_tuple_and_dict_units_match_a_hand_written_skip():
    model, reference = pair()
    ctl = transform(model, FullModel(), example_inputs=features())
    assert [b.name for b in ctl.blocks] == ["single.0", "single.1", "masked.0", "masked.1"]
    with ctl.force(active=[False, True, True, False]):
        reference.single[0] = SkipTuple()
        reference.masked[1] = SkipMasked()
        out, expected = model(*features()), reference(*features())
        assert torch.equal(out, expected)
        out.sum().backward(), expected.sum().backward()
        grads = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            if name in grads:
                assert torch.equal(p.grad, grads[name].grad), name
            else:
                assert p.grad is None, name  # a skipped unit did not run


def test_inverse_scaling_rescales_only_the_stream_element():
    model, reference = pair()
    ctl = transform(model, FullModel(), scaling="inverse", example_inputs=features())
    with ctl.force(active=[True, True, True, True], scale=[1.0, 1.0, 1.0, 3.0]):
        x, mask = torch.randn(2, 5, 16), torch.ones(2, 5, 1)
        gate = model.masked[1].forward
        out = gate(x, mask)
        plain = reference.masked[1](x, mask)
        assert torch.allclose(out["hidden"], x + (plain["hidden"] - x) * 3.0)
        assert out["mask"] is mask and out["cache"] is None


@pytest.mark.compile
@pytest.mark.parametrize("compile_mode", ["regional", "cond"])
def test_compiled_tuple_units_match_eager(compile_mode):
    torch._dynamo.reset()
    model, _ = pair()
    ctl = transform(model, FullModel(), example_inputs=features(), compile_mode=compile_mode,
                    compile_options={"backend": "eager"})
    compiled = torch.compile(model, backend="eager")
    for keep in ([True] * 4, [False, True, True, False], [True, False, False, True]):
        with ctl.force(active=keep):
            torch.testing.assert_close(compiled(*features()), model(*features()), rtol=0, atol=0)


def test_an_element_recomputed_equal_to_its_input_is_passed_through():
    # Issue 21, item 5: (x, thw) with thw recomputed from a shape a stride-1 layer keeps; the probe
    # sees it equal to the thw passed in, so a skipped layer returns that input.
    torch.manual_seed(0)
    model = patterns.ShapeTupleStack()
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), example_inputs=features())
    assert [b.name for b in ctl.blocks] == ["layers.0", "layers.1", "layers.2"]
    assert [s.role for s in ctl.blocks[0].output_slots] == ["stream", "input"]
    model.train()
    with ctl.force(active=[True, False, True]):
        out = model(*features())
        x = features()[0]
        thw = (x.shape[1], 1)
        for i in (0, 2):
            x, thw = reference.layers[i](x, thw)
        assert torch.equal(out, x * thw[1])


def test_an_element_recomputed_unequal_to_its_input_is_still_refused():
    class Halving(patterns.ShapeTupleLayer):
        def forward(self, x, thw):
            x = x + self.mlp(x)
            return x, (thw[0], thw[1] + 1)

    class Stack(patterns.ShapeTupleStack):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Halving() for _ in range(2)])

    # The layer is refused, and gives way to its plain branch (issue 21 item 3).
    discovery = raptr_fx.discover(Stack(), features())
    assert [b.name for b in discovery.replaced] == ["layers.0", "layers.1"]
    assert discovery.replaced[0].reason.startswith("output[1]")
    assert [b.name for b in discovery.blocks] == ["layers.0.mlp", "layers.1.mlp"]
