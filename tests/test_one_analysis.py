"""One analysis, two readers: discovery traces and probes the model once, and width-group finding
reads what it kept (graph, module regions, probe record, example inputs) instead of doing it again."""

import sys

import pytest
import torch

import raptr_fx
from raptr_fx import RaPTr, WidthRaPTr, find_width_groups, transform
from raptr_fx.cutting import is_cut
from raptr_fx.width import width_groups
from tests.fixtures.models import GPT, tokens


def _count_calls(monkeypatch, module, name):
    """Record the calls of ``module.name`` from every raptr_fx module that imported it by name: for
    each, whether the model (the first argument) had width cuts installed at the time."""
    original = getattr(module, name)
    calls = []

    def counting(*args, **kwargs):
        calls.append(any(is_cut(m) for m in args[0].modules()))
        return original(*args, **kwargs)

    for loaded in list(sys.modules.values()):
        if getattr(loaded, "__name__", "").startswith("raptr_fx") and getattr(loaded, name, None) is original:
            monkeypatch.setattr(loaded, name, counting)
    return calls


@pytest.fixture
def counted(monkeypatch):
    """(traces, probes of the model as it is): the width proof's runs with trial cuts are not probes of it."""
    traces = _count_calls(monkeypatch, raptr_fx.tracing, "trace")
    probes = _count_calls(monkeypatch, raptr_fx.probe, "probe")
    yield traces, probes
    assert any(probes), "the width proof ran no trial: the counts would prove nothing"


def _uncut(probes):
    return [cut for cut in probes if not cut]


def test_find_width_groups_traces_once_and_probes_once(counted):
    traces, probes = counted
    groups = find_width_groups(GPT(n_layer=2), tokens())
    assert [g.name for g in groups if g.droppable] == ["transformer.h.0.attn:heads", "transformer.h.0.mlp:mlp",
                                                       "transformer.h.1.attn:heads", "transformer.h.1.mlp:mlp"]
    assert len(traces) == 1
    assert len(_uncut(probes)) == 1


def test_transform_with_depth_and_width_traces_once_and_probes_once(counted):
    traces, probes = counted
    model = GPT(n_layer=4)
    ctl = transform(model, RaPTr("3-4", total_steps=4, width="0.5-1"), example_inputs=tokens())
    assert len(ctl.blocks) == 4 and len(ctl.width_groups) == 8
    assert len(traces) == 1
    assert len(_uncut(probes)) == 1
    ctl.remove()


def test_transform_of_a_transformers_model_traces_once_and_probes_once(counted):
    """torch.export's path: the shapes come with the graph, the call counts from the probe."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                      max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    traces, probes = counted
    ctl = transform(model, WidthRaPTr("0.5-1", total_steps=4),
                    example_inputs={"input_ids": torch.zeros(2, 8, dtype=torch.long)})
    assert {g.kind for g in ctl.width_groups} == {"mlp", "heads"}
    assert len(traces) == 1
    assert len(_uncut(probes)) == 1
    ctl.remove()


def test_discovery_keeps_what_width_reads(counted):
    traces, probes = counted
    model = GPT(n_layer=2)
    discovery = raptr_fx.discover(model, tokens())
    assert isinstance(discovery.inputs, tuple) and len(discovery.inputs[0]) == 1  # (args, kwargs)
    assert discovery.measured is not None and discovery.measured.mode == discovery.probe == "fake"
    assert discovery.module_graph.traced is discovery.traced
    assert "transformer.h.0" in discovery.module_graph.regions
    assert (len(traces), len(_uncut(probes))) == (1, 1)
    groups = width_groups(model, discovery)
    assert (len(traces), len(_uncut(probes))) == (1, 1)  # read, not done again
    assert groups == find_width_groups(GPT(n_layer=2), tokens())
