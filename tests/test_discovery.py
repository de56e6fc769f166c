import pytest
import torch
from torch import nn

import raptr_fx
from raptr_fx import RaptrError, TracingError, discover, find_blocks
from tests.fixtures.models import GPT, ZOO, GPTBlock, ResNet, features, images, tokens


@pytest.mark.parametrize("with_inputs", [False, True], ids=["symbolic", "with-inputs"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_units(name, with_inputs):
    factory, inputs, droppable, kept = ZOO[name]
    blocks = find_blocks(factory(), inputs() if with_inputs else None)
    assert [b.name for b in blocks if b.droppable] == droppable
    assert [b.name for b in blocks if not b.droppable] == kept
    assert [b.index for b in blocks] == list(range(len(blocks)))
    for block in blocks:
        assert block.droppable == (block.reason is None)


def test_units_are_in_stream_order_and_carry_counts():
    model = GPT(n_layer=3)
    blocks = find_blocks(model, tokens())
    block_params = sum(p.numel() for p in model.transformer.h[0].parameters())
    assert [b.params for b in blocks] == [block_params] * 3
    assert [b.module_type for b in blocks] == ["GPTBlock"] * 3
    assert all(b.drop == "identity" and b.stream_position == 0 and b.stream_name == "x" for b in blocks)
    shares = [b.flops_share for b in blocks]
    assert all(0.2 < s < 1 / 3 for s in shares) and shares[0] == pytest.approx(shares[2])


def test_flops_share_needs_example_inputs():
    assert all(b.flops_share is None for b in find_blocks(GPT()))


def test_projection_block_reports_shape_change():
    blocks = {b.name: b for b in find_blocks(ResNet(), images())}
    reason = blocks["layer2.0"].reason
    assert "projection (layer2.0.downsample.0, layer2.0.downsample.1)" in reason
    assert "from [2, 8, 16, 16] to [2, 16, 8, 8]" in reason


def test_branch_granularity_lists_each_branch():
    blocks = find_blocks(GPT(n_layer=2), tokens(), granularity="branch")
    assert [(b.name, b.drop) for b in blocks] == [
        ("transformer.h.0.attn", "zero"), ("transformer.h.0.mlp", "zero"),
        ("transformer.h.1.attn", "zero"), ("transformer.h.1.mlp", "zero"),
    ]
    assert all(b.droppable for b in blocks)


def test_branch_granularity_refuses_branches_spanning_modules():
    from tests.fixtures.models import TinyBert

    blocks = find_blocks(TinyBert(n_layer=1), granularity="branch")
    assert blocks and not any(b.droppable for b in blocks)
    assert "also runs weights outside" in blocks[0].reason


def test_shared_module_is_reported_not_dropped():
    from tests.fixtures.models import SharedLayers

    (block,) = find_blocks(SharedLayers(), features())
    assert not block.droppable and "called 3 times per forward" in block.reason


class DataDependent(nn.Module):
    """Python control flow on a shape: symbolic tracing fails, torch.export specialises it."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([GPTBlock() for _ in range(2)])

    def forward(self, x):
        if x.size(0) > 0:
            for block in self.blocks:
                x = block(x)
        return x


def test_falls_back_to_export_with_example_inputs():
    discovery = discover(DataDependent(), features())
    assert discovery.tracer == "torch.export"
    assert [b.name for b in discovery.droppable] == ["blocks.0", "blocks.1"]


def test_every_tracer_failing_gives_one_clear_error():
    with pytest.raises(TracingError) as info:
        find_blocks(DataDependent())
    message = str(info.value)
    assert "could not trace DataDependent" in message
    assert "torch.fx symbolic_trace:" in message
    assert "torch.export (non-strict): skipped, needs example inputs" in message
    assert "pass example inputs" in message and "leaf_modules" in message


def test_unknown_tracer_option_is_a_value_error():
    with pytest.raises(ValueError, match="unknown tracer option"):
        find_blocks(GPT(), leaf_module=[nn.Linear])


def test_leaf_module_hides_its_insides():
    # Marking the blocks as leaves hides their residual adds: nothing left to drop.
    assert find_blocks(GPT(), leaf_modules=[GPTBlock]) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="granularity"):
        find_blocks(GPT(), granularity="head")
    with pytest.raises(ValueError, match="torch.nn.Module"):
        find_blocks(lambda x: x)


def test_discovery_leaves_the_model_and_rng_untouched():
    model = ResNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    find_blocks(model, images())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


def test_discovery_of_48_layers_is_fast_enough_to_be_benchmarked():
    # The < 2 s target is checked by benchmarks/discovery_speed.py, not here.
    assert len(find_blocks(GPT(n_layer=48))) == 48


def test_no_blocks_error_is_clear():
    from raptr_fx.discovery import no_blocks_error
    from tests.fixtures.models import UNet

    error = no_blocks_error(discover(UNet()))
    assert isinstance(error, RaptrError)
    assert "UNet has no droppable residual blocks" in str(error) and "concatenation skips" in str(error)


def test_public_api_is_small():
    assert set(raptr_fx.__all__) >= {"find_blocks", "transform", "restore", "Block", "RaPTr"}
