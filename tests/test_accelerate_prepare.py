"""transform after Accelerate's prepare(mixed_precision="bf16"): its autocast forward wrapper is looked through."""

import pytest
import torch

import raptr_fx

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")


@pytest.fixture
def accelerator():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # a Trainer test run before may have set it up without bf16
    GradientState._reset_state()
    yield accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, use_cache=False)
    return transformers.LlamaForCausalLM(config)


def test_transform_after_prepare_with_bf16(accelerator):
    torch.manual_seed(0)
    model = accelerator.prepare(llama())
    wrapper = model.forward
    assert "forward" in model.__dict__ and hasattr(model, "_original_forward")
    inputs = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}
    ctl = raptr_fx.transform(model, "2-3", total_steps=10, example_inputs=inputs)
    assert [b.name for b in ctl.blocks] == [f"model.layers.{i}" for i in range(3)]
    assert model.forward is wrapper  # Accelerate's wrapper still runs the model
    model.train()
    model(**inputs).logits.float().mean().backward()  # a gated step under autocast
    ctl.remove()
