"""Hugging Face transformers 5 models: not symbolically traceable, found and gated through torch.export."""

import copy

import pytest
import torch

import raptr_fx
from raptr_fx import FullModel, RaPTr, Stage, TracingError, transform

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 64


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    return transformers.BertModel(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=3, n_head=2, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config)


MODELS = {
    "bert": (bert, "encoder.layer"),
    "gpt2": (gpt2, "transformer.h"),
    "llama": (llama, "model.layers"),
}


def inputs():
    return {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))}


def output(result):
    return result.last_hidden_state if hasattr(result, "last_hidden_state") else result.logits


@pytest.mark.parametrize("name", list(MODELS))
def test_units_found_through_export(name):
    factory, prefix = MODELS[name]
    discovery = raptr_fx.discover(factory(), inputs())
    assert discovery.tracer == "torch.export"
    assert [b.name for b in discovery.blocks] == [f"{prefix}.{i}" for i in range(3)]
    assert all(b.droppable and b.drop == "identity" and b.stream_name == "hidden_states" for b in discovery.blocks)
    assert all(0 < b.flops_share < 0.5 for b in discovery.blocks)


@pytest.mark.parametrize("name", list(MODELS))
def test_without_inputs_the_error_says_to_pass_them(name):
    factory, _ = MODELS[name]
    with pytest.raises(TracingError, match="pass example inputs"):
        raptr_fx.find_blocks(factory())


@pytest.mark.parametrize("name", list(MODELS))
def test_gated_training_and_exact_eval(name):
    factory, prefix = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    reference = copy.deepcopy(model)
    ctl = transform(model, RaPTr([Stage(3, keep=0.5), Stage(3, keep=1.0)]), example_inputs=inputs())
    model.train(), reference.train()
    model.config.use_cache = reference.config.use_cache = False
    # all-active training equals the original (dropout off)
    ctl._state.set([True] * 3, [1.0] * 3)
    model.eval(), reference.eval()
    assert torch.equal(output(model(**inputs())), output(reference(**inputs())))
    # one layer off equals the model without that layer
    for m in (model, reference):
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    model.train()
    ctl._state.set([True, False, True], [1.0] * 3)
    layers = dict(reference.named_modules())[prefix]
    del layers[1]
    reference.config.num_hidden_layers = 2
    if hasattr(reference.config, "n_layer"):
        reference.config.n_layer = 2
    reference.train()
    torch.testing.assert_close(output(model(**inputs())), output(reference(**inputs())), rtol=0, atol=0)
    # training steps run and keep the HF API
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl.attach(optimizer)
    for _ in range(6):
        output(model(**inputs())).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert ctl.stage == 1
    assert hasattr(model, "save_pretrained")


def test_generate_and_save_pretrained_survive(tmp_path):
    torch.manual_seed(0)
    model = llama()
    ctl = transform(model, RaPTr("2-3", total_steps=10), example_inputs=inputs())
    model.eval()
    generated = model.generate(inputs()["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 11)
    model.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert set(reloaded.state_dict()) == set(model.state_dict())
    ctl.remove()


def test_full_model_schedule_on_gpt2_matches_in_training():
    torch.manual_seed(0)
    model = gpt2()
    reference = copy.deepcopy(model)
    transform(model, FullModel(), example_inputs=inputs())
    for m in (model, reference):
        m.config.use_cache = False
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    assert torch.equal(model(**inputs()).logits, reference(**inputs()).logits)
