"""Hugging Face transformers 5 models: not symbolically traceable, found and gated through torch.export."""

import copy
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

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
    with ctl.force(active=[True] * 3):
        model.eval(), reference.eval()
        assert torch.equal(output(model(**inputs())), output(reference(**inputs())))
    # one layer off equals the model without that layer
    for m in (model, reference):
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    model.train()
    with ctl.force(active=[True, False, True]):
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


# --- issue 8: tuple-returning T5 blocks, bad inputs, the meta device ----------------------------
def t5(layers=3):
    config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=layers,
                                   num_decoder_layers=layers, num_heads=2, decoder_start_token_id=0,
                                   pad_token_id=0, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(config)


def t5_inputs():
    ids = inputs()["input_ids"]
    return {"input_ids": ids, "decoder_input_ids": ids.flip(1)}


def test_t5_blocks_are_units_and_pass_the_position_bias_on():
    from raptr_fx.skipping import OutputSlot

    blocks = {b.name: b for b in raptr_fx.find_blocks(t5(), t5_inputs())}
    assert list(blocks) == [f"{stack}.block.{i}" for stack in ("encoder", "decoder") for i in range(3)]
    assert [n for n, b in blocks.items() if b.droppable] == [
        "encoder.block.1", "encoder.block.2", "decoder.block.1", "decoder.block.2"]
    for stack in ("encoder", "decoder"):
        reason = blocks[f"{stack}.block.0"].reason
        assert reason == (f"output[1] (shape [1, 2, 8, 8]) is computed inside {stack}.block.0 from "
                          f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight, not passed "
                          "through from its inputs: a skipped unit cannot produce it")
    assert blocks["encoder.block.1"].output_slots == (
        OutputSlot(0, "stream"), OutputSlot(1, "input", 2, "position_bias"), OutputSlot(2, "constant"))
    assert blocks["decoder.block.1"].output_slots == (
        OutputSlot(0, "stream"), OutputSlot(1, "input", 2, "position_bias"),
        OutputSlot(2, "input", 5, "encoder_decoder_position_bias"))


def test_wrong_input_shape_names_the_inputs_not_tracing():
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        bos_token_id=0, eos_token_id=0)
    model = transformers.MistralForCausalLM(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(raptr_fx.errors.ExampleInputsError) as info:
        transform(model, "1-2", total_steps=10, example_inputs={"input_ids": torch.zeros(2, 8, 3, dtype=torch.long)})
    message = str(info.value)
    assert message.startswith("MistralForCausalLM fails on the example inputs model(input_ids=tensor[2, 8, 3] "
                              "int64): RuntimeError: ")
    assert "could not trace" not in message and "pass example inputs (" not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m.__dict__.get("forward"), raptr_fx.gates.GatedForward) for m in model.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_models_on_the_meta_device(name):
    factory, prefix = MODELS[name]
    with torch.device("meta"):
        model = factory()
    discovery = raptr_fx.discover(model, inputs())
    assert discovery.probe == "fake"
    assert [b.name for b in discovery.droppable] == [f"{prefix}.{i}" for i in range(3)]


class SkippedT5Block(torch.nn.Module):
    """A hand-written skip of a T5 block: the stream and the position biases passed on as they came."""

    def forward(self, hidden_states, attention_mask=None, position_bias=None, encoder_hidden_states=None,
                encoder_attention_mask=None, encoder_decoder_position_bias=None, **kwargs):
        return hidden_states, position_bias, encoder_decoder_position_bias


def t5_loss(model):
    return model(**t5_inputs()).logits.float().pow(2).mean()


@pytest.mark.filterwarnings("ignore::raptr_fx.RaptrWarning")  # decisions pinned by hand: no controller steps
def test_t5_eval_and_gradients_are_untouched_and_dropped_blocks_train_like_a_hand_written_skip():
    torch.manual_seed(0)
    model = t5()
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), example_inputs=t5_inputs())
    assert [b.name for b in ctl.blocks] == ["encoder.block.1", "encoder.block.2", "decoder.block.1", "decoder.block.2"]
    # eval, and training with every block on: outputs and gradients exactly those of the plain model
    for train in (False, True):
        model.train(train), reference.train(train)
        t5_loss(model).backward(), t5_loss(reference).backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad), name
        model.zero_grad(), reference.zero_grad()
    # blocks dropped: a few SGD steps match the model with those blocks replaced by a hand-written skip
    with ctl.force(active=[False, True, True, False]):
        dropped_before = model.encoder.block[1].layer[0].SelfAttention.q.weight.clone()
        reference.encoder.block[1] = SkippedT5Block()
        reference.decoder.block[2] = SkippedT5Block()
        model.train(), reference.train()
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
        for _ in range(3):
            losses = [t5_loss(m) for m in (model, reference)]
            assert torch.equal(losses[0], losses[1])
            for loss, optimizer in zip(losses, optimizers):
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        kept = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            if name in kept:
                assert torch.equal(p, kept[name]), name
        assert torch.equal(model.encoder.block[1].layer[0].SelfAttention.q.weight, dropped_before)


def test_t5_scaling_rescales_only_the_stream():
    torch.manual_seed(0)
    model = t5(layers=2)
    ctl = transform(model, FullModel(), scaling="inverse", example_inputs=t5_inputs())
    gate = model.encoder.block[1].forward
    with ctl.force(active=[True, True], scale=[2.0, 1.0]):
        model.train()
        x, bias = torch.randn(2, 8, 16), torch.randn(1, 2, 8, 8)
        out = gate.original(x, None, bias)
        scaled = gate.gated((x, None, bias), {}, gate.original)
        assert torch.equal(scaled[0], x + (out[0] - x) * 2.0)  # the stream's update is scaled ...
        assert scaled[1] is bias and scaled[2] is None  # ... the passed-on bias is not


@pytest.mark.parametrize("name", list(MODELS))
def test_fake_probe_equals_real_probe_on_hf_models(name):
    from raptr_fx.probe import probe
    from raptr_fx.tracing import normalize_example_inputs

    factory, _ = MODELS[name]
    model = factory()
    example = normalize_example_inputs(inputs())
    fake, real = probe(model, example, mode="fake"), probe(model, example, mode="real")
    assert fake.call_counts == real.call_counts
    assert fake.flops == real.flops and fake.total_flops == real.total_flops > 0


# --- issue 15: every unit on compiles to the untransformed model's graph --------------------------
@pytest.mark.compile
@pytest.mark.parametrize("compile_mode", ["regional", "cond"])
def test_llama_with_every_unit_on_compiles_to_the_untransformed_graph(compile_mode):
    """The last stage of a schedule on a transformers Llama: one graph, the same ops, no break at the gates."""
    def compiled_graphs(transformed: bool) -> tuple[int, int]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = llama()
        model.config.use_cache = False
        if transformed:
            ctl = transform(model, RaPTr("2-3", total_steps=2, sampling="exact"), example_inputs=inputs(),
                            compile_mode=compile_mode)
            ctl.load_state_dict({**ctl.state_dict(), "step": 1})  # the last stage: every unit on
        counter = CompileCounterWithBackend("eager")
        torch.compile(model, backend=counter)(**inputs(), labels=inputs()["input_ids"]).loss.backward()
        return counter.frame_count, counter.op_count

    untransformed = compiled_graphs(False)
    assert untransformed[0] == 1
    assert compiled_graphs(True) == untransformed


@pytest.mark.compile
@pytest.mark.parametrize("use_cache", [True, False])
def test_regional_units_that_compile_one_graph_each_are_warned_of(use_cache):
    """With the KV cache on, dynamo guards each Llama layer on the cache's per-layer state."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, use_cache=use_cache)
    model = transformers.LlamaForCausalLM(config)
    units = CompileCounterWithBackend("eager")
    transform(model, RaPTr("5-6", total_steps=2, sampling="exact"), example_inputs=inputs(),
              compile_options={"backend": units})
    with pytest.warns(raptr_fx.RaptrWarning, match="use_cache") if use_cache else warnings.catch_warnings():
        if not use_cache:
            warnings.simplefilter("error", raptr_fx.RaptrWarning)
        torch.compile(model, backend="eager")(**inputs(), labels=inputs()["input_ids"]).loss.backward()
    assert (units.frame_count >= 4) is use_cache  # what the warning says: a graph per kept layer


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_enabled_before_transform_keeps_the_layers(use_reentrant):
    """A reentrant checkpoint runs the layer under no_grad, where no residual add is recorded: discovery
    looks at the layers with their checkpointing off, and training checkpoints as the user asked."""
    torch.manual_seed(0)
    model = llama()
    if hasattr(model, "activation_checkpointing_enable"):  # gradient_checkpointing_enable's new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    ctl = transform(model, RaPTr("2-3", total_steps=4), example_inputs=inputs(), seed=1)
    assert [b.name for b in ctl.blocks] == [f"model.layers.{i}" for i in range(3)]
    assert all(layer.gradient_checkpointing for layer in model.model.layers)  # left as the user set it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl.attach(optimizer)
    for _ in range(2):
        kept = ctl.active
        model(**inputs(), labels=inputs()["input_ids"]).loss.backward()
        ran = [layer.mlp.down_proj.weight.grad is not None for layer in model.model.layers]
        assert ran == kept
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
