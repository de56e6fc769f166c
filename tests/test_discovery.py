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
    from tests.fixtures.models import BranchLoopTransformer

    blocks = find_blocks(BranchLoopTransformer(n_layer=2), tokens(), granularity="branch")
    assert [(b.name, b.drop) for b in blocks] == [("attns.0", "zero"), ("mlps.0", "zero"),
                                                  ("attns.1", "zero"), ("mlps.1", "zero")]
    assert all(b.droppable for b in blocks)


def test_branch_granularity_branches_own_the_norm_only_they_read():
    # GPT's pre-norm ln_1 is the layer's, not attn's, but only attn reads it: attn owns it, skipped and frozen with it.
    blocks = find_blocks(GPT(n_layer=2), tokens(), granularity="branch")
    assert [(b.name, b.owned_before, b.droppable) for b in blocks] == [
        (f"transformer.h.{i}.{branch}", (f"transformer.h.{i}.{norm}",), True)
        for i in range(2) for branch, norm in (("attn", "ln_1"), ("mlp", "ln_2"))]


def test_branch_granularity_refuses_branches_spanning_modules():
    from tests.fixtures.models import TinyBert

    blocks = find_blocks(TinyBert(n_layer=1), granularity="branch")
    assert blocks and not any(b.droppable for b in blocks)
    assert ("encoder.layer.0.attention.self owns encoder.layer.0.attention.output.dense (only its branch uses it), "
            "but") in blocks[0].reason


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


@pytest.mark.parametrize("find", [find_blocks, raptr_fx.find_width_groups], ids=["depth", "width"])
def test_discovery_leaves_the_model_and_rng_untouched(find):
    """BatchNorm in training mode included: width's shape pass once counted a batch in every one."""
    model = ResNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    find(model, images())
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


# --- units that return more than the stream (issue 8, part 1) ----------------------------------
@pytest.mark.parametrize("with_inputs", [False, True], ids=["symbolic", "with-inputs"])
def test_tuple_and_dict_outputs(with_inputs):
    from raptr_fx.skipping import OutputSlot
    from tests.fixtures.models import TupleStack

    blocks = {b.name: b for b in find_blocks(TupleStack(), features() if with_inputs else None)}
    assert list(blocks) == ["single.0", "single.1", "weights", "masked.0", "masked.1"]
    single = blocks["single.0"]
    assert single.droppable and single.output_container == "tuple"
    assert single.output_slots == (OutputSlot(0, "stream"),)
    weights = blocks["weights"]
    assert not weights.droppable
    assert weights.reason.startswith("output[1]") and "is computed inside weights from weights." in weights.reason
    assert "a skipped unit cannot produce it" in weights.reason
    masked = blocks["masked.0"]
    assert masked.droppable and masked.output_container == "dict" and masked.stream_name == "x"
    assert masked.output_slots == (OutputSlot("hidden", "stream"), OutputSlot("mask", "input", 1, "mask"),
                                   OutputSlot("cache", "constant"))


def test_nested_or_custom_output_types_are_not_droppable_but_a_plain_branch_inside_is():
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return {"x": x + self.fc(x), "extra": (x,)}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Named()

        def forward(self, x):
            return self.layer(x)["x"]

    discovery = raptr_fx.discover(Net(), features())
    (layer,) = discovery.replaced
    assert layer.name == "layer" and layer.reason.startswith("output['extra'] is a tuple")
    # Its branch is one module holding all its weights: that is the unit instead (issue 21, item 3).
    assert [(b.name, b.drop, b.droppable) for b in discovery.blocks] == [("layer.fc", "zero", True)]


def test_pass_through_ops_keep_the_stream():
    from tests.fixtures.models import PassThroughStack

    for inputs in (None, features()):
        blocks = find_blocks(PassThroughStack(), inputs)
        assert [(b.name, b.drop, b.droppable) for b in blocks] == [
            ("layers.0", "identity", True), ("layers.1", "identity", True), ("layers.2", "identity", True)]


# --- bad example inputs (issue 8, part 5) --------------------------------------------------------
class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")


@pytest.mark.parametrize("inputs, shown, error", [
    ((torch.zeros(2, 8),), "model(tensor[2, 8] float32)", "RuntimeError: Expected tensor for argument #1 'indices'"),
    ("hello", "model(str 'hello')", "AttributeError: 'str' object has no attribute 'size'"),
    ({"x": torch.zeros(2, 8, dtype=torch.long)}, "model(x=tensor[2, 8] int64)",
     "TypeError: GPT.forward() got an unexpected keyword argument 'x'"),
    # the real pass's error: fake tensors word it differently, and are only a first try
    ((torch.zeros(2, 8, 3, dtype=torch.long),), "model(tensor[2, 8, 3] int64)",
     "RuntimeError: The size of tensor a (3) must match the size of tensor b (8)"),
    # an input whose repr raises (a flex-attention BlockMask on the meta device): named by its type
    ((torch.zeros(2, 8, dtype=torch.long), Unprintable()), "model(tensor[2, 8] int64, Unprintable)",
     "TypeError: GPT.forward() takes 2 positional arguments but 3 were given"),
], ids=["float ids", "string", "dict for a tensor", "extra dimension", "unprintable input"])
def test_bad_example_inputs_give_one_error(inputs, shown, error):
    from raptr_fx.errors import ExampleInputsError
    from raptr_fx.gates import GatedForward

    model = GPT()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: find_blocks(model, inputs),
                 lambda: raptr_fx.transform(model, "2-4", total_steps=10, example_inputs=inputs)):
        with pytest.raises(ExampleInputsError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"GPT fails on the example inputs {shown}: {error}")
        assert "could not trace" not in message and "pass example inputs (" not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m.__dict__.get("forward"), GatedForward) for m in model.modules())


class ReadsValues(nn.Module):
    """Branches on a value computed outside torch: fake tensors cannot follow it, and no tracer
    can capture it (a branch on a tensor value alone, draft_export resolves)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([GPTBlock() for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            if x.detach().abs().sum().numpy() > 0:
                x = block(x)
        return x


def test_untraceable_with_inputs_does_not_ask_for_inputs():
    with pytest.raises(TracingError) as info:
        find_blocks(ReadsValues(), features())
    message = str(info.value)
    assert "could not trace ReadsValues" in message and "pass example inputs" not in message
    assert "leaf_modules" in message


class AttentionBranches(nn.Module):
    """``x + attn(x, x, x)[0]``: nn.MultiheadAttention is the whole branch."""

    def __init__(self):
        super().__init__()
        self.attns = nn.ModuleList([nn.MultiheadAttention(16, 2, batch_first=True) for _ in range(2)])

    def forward(self, x):
        for attn in self.attns:
            x = x + attn(x, x, x, need_weights=False)[0]
        return x


def test_leaf_module_returning_a_tuple():
    from raptr_fx.skipping import OutputSlot

    # nn.MultiheadAttention is a leaf: torch.fx sees one opaque value that the parent indexes ([0]).
    blocks = {b.name: b for b in find_blocks(AttentionBranches())}
    assert not blocks["attns.0"].droppable
    assert "pass example inputs to see what it holds" in blocks["attns.0"].reason
    # With example inputs the probe sees (attn_output, None): a zero unit returning (zeros, None).
    attn = {b.name: b for b in find_blocks(AttentionBranches(), features())}["attns.0"]
    assert attn.droppable and attn.drop == "zero"
    assert attn.output_slots == (OutputSlot(0, "stream"), OutputSlot(1, "constant"))


class ExportOnly(nn.Module):
    """Python control flow on a shape around any model: forces the torch.export path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.size(0) > 0:
            return self.inner(x)
        return x


def test_tuple_rule_and_pass_through_ops_through_torch_export():
    from tests.fixtures.models import PassThroughStack, TupleStack

    discovery = discover(ExportOnly(TupleStack()), features())
    assert discovery.tracer == "torch.export"
    assert [b.name for b in discovery.droppable] == ["inner.single.0", "inner.single.1", "inner.masked.0",
                                                     "inner.masked.1"]
    (kept,) = [b for b in discovery.blocks if not b.droppable]
    assert kept.reason.startswith("output[1] (shape [2, 5, 5]) is computed inside inner.weights")
    discovery = discover(ExportOnly(PassThroughStack()), features())
    assert [b.name for b in discovery.droppable] == [f"inner.layers.{i}" for i in range(3)]


class DictBatch(nn.Module):
    """Takes one dict argument, as many training loops do: ``model(batch)``."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([GPTBlock() for _ in range(2)])

    def forward(self, batch):
        x = batch["x"]
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # torch's own warning on tensor["x"]
def test_a_tensor_where_a_dict_is_expected():
    from raptr_fx.errors import ExampleInputsError

    x = features()[0]
    assert [b.name for b in find_blocks(DictBatch(), ({"x": x},)) if b.droppable] == ["layers.0", "layers.1"]
    with pytest.raises(ExampleInputsError) as info:
        find_blocks(DictBatch(), x)
    assert str(info.value).startswith("DictBatch fails on the example inputs model(tensor[2, 5, 16] float32): ")
