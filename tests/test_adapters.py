"""Linear layers with a low-rank adapter (LoRA): part of their linear layer, for units and width alike.

``W x + B(A(x)) * s`` inside one module is one linear map, not a residual add with a projection
shortcut: the units stay the layers a user would name, and a width cut narrows the base weight and
the adapter together (rows of W and B for a producer, columns of W and A for the consumer).
"""

import copy

import pytest
import torch

from raptr_fx import FullModel, RaPTr, RaptrError, Stage, WidthRaPTr, find_blocks, find_width_groups, transform
from tests.fixtures.models import GPT, tokens
from tests.fixtures.patterns import with_lora
from tests.test_patterns import assert_same_state, module_state

LAYERS = [f"transformer.h.{i}" for i in range(4)]


def lora_gpt(own_weight=False):
    torch.manual_seed(0)
    return with_lora(GPT(), own_weight=own_weight)


# -- the hand-written adapter ----------------------------------------------------------------------
@pytest.mark.parametrize("own_weight", [False, True], ids=["base-module", "own-weight"])
@pytest.mark.parametrize("example", [None, tokens()], ids=["symbolic", "with-inputs"])
def test_adapters_leave_the_layers_as_units(own_weight, example):
    # Read as projection shortcuts, every adapted linear was a unit and no layer was left.
    blocks = find_blocks(lora_gpt(own_weight), example)
    assert [b.name for b in blocks] == LAYERS and all(b.droppable and b.drop == "identity" for b in blocks)
    assert [b.name for b in find_blocks(lora_gpt(own_weight), example, granularity="branch")] == [
        f"transformer.h.{i}.{branch}" for i in range(4) for branch in ("attn", "mlp")]


def test_layers_with_adapters_skip_freeze_and_restore():
    model = lora_gpt()
    before = module_state(model)
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), example_inputs=tokens())
    x = tokens()[0]
    model.eval(), reference.eval()
    assert torch.equal(model(x), reference(x))
    model.train(), reference.train()
    with ctl.force(active=[True, False, True, True]):
        out = model(x)
        h = reference.transformer
        expected = h.drop(h.wte(x) + h.wpe(torch.arange(x.shape[1])))
        for i in (0, 2, 3):
            expected = h.h[i](expected)
        assert torch.equal(out, reference.lm_head(h.ln_f(expected)))
        out.sum().backward()
        skipped = model.transformer.h[1]
        assert all(p.grad is None for p in skipped.parameters())
        assert skipped.mlp.c_fc.lora_b.weight.grad is None
        model.zero_grad(set_to_none=True)
    ctl.remove()
    assert_same_state(before, module_state(model))


def test_width_cuts_the_base_weight_and_the_adapter_together():
    model = lora_gpt()
    groups = {g.name: g for g in find_width_groups(model, tokens())}
    mlp = groups["transformer.h.0.mlp:mlp"]
    assert mlp.droppable and mlp.modules == ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj")
    assert mlp.targets == (("transformer.h.0.mlp.c_fc.base_layer", "transformer.h.0.mlp.c_fc.lora_b"),
                           ("transformer.h.0.mlp.c_proj.base_layer", "transformer.h.0.mlp.c_proj.lora_a"))
    assert mlp.size == mlp.parts == 64
    # No adapter is taken for an MLP of its own (A -> B once made a group per adapted linear).
    assert not any("lora" in g.name for g in groups.values())
    assert sorted(groups) == [f"transformer.h.{i}.{kind}" for i in range(4) for kind in ("attn:heads", "mlp:mlp")]

    reference = copy.deepcopy(model.transformer.h[0].mlp)
    ctl = transform(model, WidthRaPTr("0.25-1", total_steps=2), example_inputs=tokens())
    kept = ctl.kept_indices[mlp.name]
    assert len(kept) == 16
    x = torch.randn(2, 8, 16)
    fc, proj = reference.c_fc, reference.c_proj
    hidden = torch.nn.functional.gelu(x @ fc.base_layer.weight[kept].T + fc.base_layer.bias[kept]
                                      + (x @ fc.lora_a.weight.T @ fc.lora_b.weight[kept].T) * fc.scaling)
    expected = (hidden @ proj.base_layer.weight[:, kept].T + proj.base_layer.bias
                + (hidden @ proj.lora_a.weight[:, kept].T @ proj.lora_b.weight.T) * proj.scaling)
    torch.testing.assert_close(model.transformer.h[0].mlp(x), expected)
    model.eval()
    assert torch.equal(model.transformer.h[0].mlp(x), reference(x))
    ctl.remove()
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_an_adapter_on_a_raw_weight_refuses_the_group_naming_it():
    groups = {g.name: g for g in find_width_groups(lora_gpt(own_weight=True), tokens())}
    mlp = groups["transformer.h.0.mlp:mlp"]
    assert not mlp.droppable
    assert mlp.reason.startswith("transformer.h.0.mlp.c_fc is a linear layer with an adapter, and it runs weights "
                                 "that are no nn.Linear or Conv1D projection (transformer.h.0.mlp.c_fc.bias, "
                                 "transformer.h.0.mlp.c_fc.weight)")
    assert not any("lora" in g.name for g in groups.values())


@pytest.mark.parametrize("own_weight", [False, True], ids=["base-module", "own-weight"])
def test_width_discovery_leaves_a_model_with_adapters_as_it_was(own_weight):
    model = lora_gpt(own_weight)
    before = module_state(model)
    for _ in range(2):  # once left instance forwards on the adapters, and a second call failed on them
        find_width_groups(model, tokens())
        assert_same_state(before, module_state(model))
    if own_weight:  # every MLP refused (the adapter), every attention refused (fused query, key, value)
        with pytest.raises(RaptrError, match="c_fc is a linear layer with an adapter"):
            transform(model, WidthRaPTr("0.5-1", total_steps=2), example_inputs=tokens())
    else:
        transform(model, WidthRaPTr("0.5-1", total_steps=2), example_inputs=tokens()).remove()
    assert_same_state(before, module_state(model))


def test_a_projection_in_two_width_groups_is_refused_not_cut_twice():
    # A second cut on one projection called the first as its forward, which called itself.
    from raptr_fx.cutting import CutState, install_cuts

    model = GPT(n_layer=1)
    group = next(g for g in find_width_groups(model, tokens()) if g.kind == "mlp")
    with pytest.raises(RaptrError, match=r"transformer\.h\.0\.mlp\.c_fc of width group .* is already cut"):
        install_cuts(model, [group, group], CutState([group, group]), scaled=False)
    assert not any("forward" in m.__dict__ for m in model.modules())


# -- a transformers Llama with adapters from the real peft -------------------------------------------
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

VOCAB = 64
PREFIX = "base_model.model.model.layers"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_llama(layers=3):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                      max_position_embeddings=32, bos_token_id=0, eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    # Random B (LoRA starts it at zero): the adapters change every output, so a lost adapter would show.
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    return model.eval()  # the mode the tests end in: every module's state compares as it was


def hf_inputs():
    return {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))}


def test_peft_llama_units_are_its_decoder_layers():
    blocks = find_blocks(peft_llama(), hf_inputs())
    assert [b.name for b in blocks] == [f"{PREFIX}.{i}" for i in range(3)]
    assert all(b.droppable and b.drop == "identity" and b.stream_name == "hidden_states" for b in blocks)


def test_peft_llama_trains_with_dropped_layers_and_their_adapters_frozen():
    model = peft_llama()
    before = module_state(model)
    reference = copy.deepcopy(model)
    ctl = transform(model, RaPTr([Stage(3, keep=0.5), Stage(3, keep=1.0)]), example_inputs=hf_inputs())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    layers = model.base_model.model.model.layers
    model.train()
    drops = 0
    for _ in range(3):
        active = list(ctl.active_blocks)
        dropped = [i for i in range(3) if f"{PREFIX}.{i}" not in active]
        drops += len(dropped)
        adapters = {i: [p.clone() for n, p in layers[i].named_parameters() if "lora_" in n] for i in range(3)}
        model(**hf_inputs()).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        for i in range(3):
            after = [p for n, p in layers[i].named_parameters() if "lora_" in n]
            same = all(torch.equal(a, b) for a, b in zip(adapters[i], after))
            assert same == (i in dropped), (i, dropped)
    assert drops  # the draw (seeded) dropped a layer at least once
    model.eval(), reference.eval()
    reference.load_state_dict(model.state_dict())  # the trained weights, in the untransformed model
    assert torch.equal(model(**hf_inputs()).logits, reference(**hf_inputs()).logits)
    ctl.remove()
    assert_same_state(before, module_state(model))


def test_peft_llama_eval_is_bitwise_and_remove_restores():
    model = peft_llama()
    before = module_state(model)
    reference = copy.deepcopy(model)
    ctl = transform(model, RaPTr([Stage(3, keep=0.5), Stage(3, keep=1.0)]), example_inputs=hf_inputs())
    model.eval(), reference.eval()
    assert torch.equal(model(**hf_inputs()).logits, reference(**hf_inputs()).logits)
    ctl.remove()
    assert_same_state(before, module_state(model))


def test_peft_llama_width_groups_cut_base_and_adapter_together():
    model = peft_llama(layers=2)
    before = module_state(model)
    groups = find_width_groups(model, hf_inputs())
    assert_same_state(before, module_state(model))  # no cut forward left on an adapter
    assert [(g.name, g.droppable) for g in groups] == [
        (f"{PREFIX}.{i}.{kind}", True) for i in range(2) for kind in ("self_attn:heads", "mlp:mlp")]
    mlp = groups[1]
    assert mlp.modules == tuple(f"{PREFIX}.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    assert mlp.targets == tuple((f"{PREFIX}.0.mlp.{p}.base_layer", f"{PREFIX}.0.mlp.{p}.{adapter}.default")
                                for p, adapter in (("gate_proj", "lora_B"), ("up_proj", "lora_B"),
                                                   ("down_proj", "lora_A")))
    heads = groups[0]
    assert heads.parts == 2 and heads.targets[3] == (f"{PREFIX}.0.self_attn.o_proj.base_layer",
                                                     f"{PREFIX}.0.self_attn.o_proj.lora_A.default")

    reference = copy.deepcopy(model)
    ctl = transform(model, WidthRaPTr("0.5-1", total_steps=6), example_inputs=hf_inputs())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    down = model.base_model.model.model.layers[0].mlp.down_proj
    up = model.base_model.model.model.layers[0].mlp.up_proj
    model.train()
    for _ in range(2):
        kept = ctl.kept_indices[ctl.width_groups[1].name]
        dropped = sorted(set(range(32)) - set(kept))
        frozen = [up.lora_B.default.weight[dropped].clone(), down.lora_A.default.weight[:, dropped].clone()]
        trained = up.lora_B.default.weight[kept].clone()
        model(**hf_inputs()).logits.pow(2).mean().backward()  # a RecursionError here once
        optimizer.step()
        optimizer.zero_grad()
        assert torch.equal(frozen[0], up.lora_B.default.weight[dropped])
        assert torch.equal(frozen[1], down.lora_A.default.weight[:, dropped])
        assert not torch.equal(trained, up.lora_B.default.weight[kept])
    model.eval(), reference.eval()
    reference.load_state_dict(model.state_dict())
    assert torch.equal(model(**hf_inputs()).logits, reference(**hf_inputs()).logits)
    ctl.remove()
    assert not any("forward" in m.__dict__ for m in model.modules())
