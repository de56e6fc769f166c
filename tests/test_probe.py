"""The probe runs on fake tensors: same call counts and FLOPs as a real pass, nothing allocated or changed."""

import pytest
import torch
from torch import nn

import raptr_fx
from raptr_fx.probe import probe
from raptr_fx.tracing import normalize_example_inputs
from tests.fixtures.models import GPT, ZOO, ResNet, images, tokens


@pytest.mark.parametrize("name", list(ZOO))
def test_fake_probe_equals_the_real_probe(name):
    factory, inputs, _, _ = ZOO[name]
    torch.manual_seed(0)
    model = factory().train()
    example = normalize_example_inputs(inputs())
    fake, real = probe(model, example, mode="fake"), probe(model, example, mode="real")
    assert (fake.mode, real.mode) == ("fake", "real")
    assert fake.call_counts == real.call_counts
    assert fake.flops == real.flops and fake.total_flops == real.total_flops > 0
    assert {k: (c.arg_shapes, c.output_shape) for k, c in fake.calls.items()} == {
        k: (c.arg_shapes, c.output_shape) for k, c in real.calls.items()}


def test_fake_probe_changes_nothing_and_allocates_nothing():
    model = ResNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    storages = {k: v.untyped_storage().data_ptr() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert raptr_fx.discover(model, images()).probe == "fake"
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert storages == {k: v.untyped_storage().data_ptr() for k, v in model.state_dict().items()}


class ReadsAValue(nn.Module):
    """``.item()`` needs data: fake tensors cannot follow it, so the probe runs for real."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])

    def forward(self, x):
        scale = x.abs().max().item()  # a Python number: symbolic tracing records it, fake tensors cannot
        for layer in self.layers:
            x = x + layer(x)
        return x / scale


def test_real_probe_only_where_fake_tensors_fail():
    discovery = raptr_fx.discover(ReadsAValue(), (torch.randn(2, 16),))
    assert discovery.probe == "real"
    assert [b.name for b in discovery.droppable] == ["layers.0", "layers.1"]
    assert raptr_fx.discover(GPT(), tokens()).probe == "fake"
    assert raptr_fx.discover(GPT()).probe is None


@pytest.mark.parametrize("with_inputs", [False, True], ids=["symbolic", "with-inputs"])
@pytest.mark.parametrize("name", list(ZOO))
def test_discovery_on_the_meta_device(name, with_inputs):
    factory, inputs, droppable, kept = ZOO[name]
    with torch.device("meta"):
        model = factory()
    blocks = raptr_fx.find_blocks(model, inputs() if with_inputs else None)  # CPU inputs move to meta
    assert [b.name for b in blocks if b.droppable] == droppable
    assert [b.name for b in blocks if not b.droppable] == kept
    if with_inputs and blocks:
        assert all(b.flops_share is not None for b in blocks)


def test_bad_probe_mode():
    with pytest.raises(ValueError, match="probe mode"):
        probe(GPT(), normalize_example_inputs(tokens()), mode="fast")
