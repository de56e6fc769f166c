"""Width-wise RaPTr: groups found, cuts that really shrink the compute, frozen parts, resume, DDP."""

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode

import raptr_fx
from raptr_fx import RaPTr, RaptrError, Stage, WidthRaPTr, find_width_groups, transform
from tests.distributed import assert_fsdp_width_run_matches, fsdp_width_report, run_ranks
from tests.fixtures.models import (GPT, FusedAttentionStack, GroupedExpandAttention, GroupedFusedAttention,
                                   GroupedRepeatAttention, HeadCountAttention, HeadScaledAttention,
                                   PerHeadFusedAttention, ResNet, SlicedGroupedAttention, ViT, features, images,
                                   tokens)

try:
    import einops
    from einops import rearrange
except ImportError:  # the einops entry of FUSED is skipped
    einops = rearrange = None

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 64


def llama(heads: int = 4, kv_heads: int = 2, layers: int = 2):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=4,
                                      max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def hf_inputs():
    return {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))}


def by_name(groups):
    return {g.name: g for g in groups}


# -- groups found --------------------------------------------------------------------------------
def test_nanogpt_mlp_and_fused_heads_found_with_the_sizes_to_rewrite():
    groups = by_name(find_width_groups(GPT(n_layer=2), tokens()))
    mlp = groups["transformer.h.0.mlp:mlp"]
    assert mlp.droppable and mlp.size == 64 and mlp.parts == 64
    assert mlp.modules == ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj")
    heads = groups["transformer.h.0.attn:heads"]
    assert heads.droppable and heads.size == heads.parts == 2
    assert heads.modules == ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj")
    assert heads.part_widths == (24, 8) and heads.rewrite.segments == (8, 8, 8)  # q, k, v rows per head
    # split(c), the three views to self.heads and the last view(b, t, c)
    assert heads.rewrite.module == "transformer.h.0.attn"
    assert [name for name, _, _ in heads.rewrite.resized] == ["split", "view", "view_1", "view_2", "view_3"]
    assert list(groups) == ["transformer.h.0.attn:heads", "transformer.h.0.mlp:mlp",
                            "transformer.h.1.attn:heads", "transformer.h.1.mlp:mlp"]


def test_llama_gated_mlp_and_grouped_query_heads():
    groups = by_name(find_width_groups(llama(), hf_inputs()))
    mlp = groups["model.layers.0.mlp:mlp"]
    assert mlp.droppable and mlp.size == 32
    assert mlp.modules == tuple(f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    heads = groups["model.layers.0.self_attn:heads"]
    assert heads.droppable and heads.size == 4 and heads.parts == 2  # 2 key/value heads, 2 query heads each
    assert heads.part_widths == (8, 4, 4, 8)
    assert heads.modules == tuple(f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert 0 < heads.flops_share < 1 and 0 < mlp.flops_share < 1


def test_one_key_value_head_is_refused():
    heads = by_name(find_width_groups(llama(heads=2, kv_heads=1), hf_inputs()))["model.layers.0.self_attn:heads"]
    assert not heads.droppable and "one key/value head" in heads.reason


def test_gpt2_conv1d_mlp_bert_across_modules_t5_heads_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
                                                                n_positions=32))
    groups = by_name(find_width_groups(gpt2, hf_inputs()))
    assert groups["transformer.h.0.mlp:mlp"].droppable and groups["transformer.h.0.mlp:mlp"].size == 64
    heads = groups["transformer.h.0.attn:heads"]  # cut without a cache (the gpt2 entry of FUSED below)
    assert not heads.droppable and "GPT2Attention.forward was traced for its heads' cut with cache=None" in heads.reason
    assert "pass cache as in the example in training (use_cache=False" in heads.reason

    bert = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=32))
    groups = by_name(find_width_groups(bert, hf_inputs()))
    assert groups["encoder.layer.0:mlp"].modules == ("encoder.layer.0.intermediate.dense",
                                                     "encoder.layer.0.output.dense")
    assert groups["encoder.layer.0.attention:heads"].droppable and groups["encoder.layer.0.attention:heads"].parts == 2

    t5 = transformers.T5Model(transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                    num_heads=2, decoder_start_token_id=0))
    ids = hf_inputs()["input_ids"]
    groups = find_width_groups(t5, {"input_ids": ids, "decoder_input_ids": ids})
    mlps = [g for g in groups if g.kind == "mlp"]
    assert [g.modules[-1] for g in mlps][:2] == ["encoder.block.0.layer.1.DenseReluDense.wo",
                                                "encoder.block.1.layer.1.DenseReluDense.wo"]
    assert all(g.droppable for g in mlps)
    heads = [g for g in groups if g.kind == "heads"]
    assert heads and not any(g.droppable for g in heads)
    # view(batch, -1, self.n_heads, d) is followed, the position bias (1, heads, q, k) is not
    assert all("fails with this group cut" in g.reason and "cannot follow its heads either: "
               "`scaled_dot_product_attention` at `attn_output = torch.nn.functional.scaled_dot_product_attention(` "
               "combines the heads with contiguous, shaped [1, 2, 8, 8], which has them too" in g.reason for g in heads)


def test_vit_multihead_attention_heads_and_mlp_in_sequential_found():
    groups = by_name(find_width_groups(ViT(), images()))
    assert groups["blocks.0.mlp:mlp"].droppable and groups["blocks.0.mlp:mlp"].modules == ("blocks.0.mlp.0", "blocks.0.mlp.2")
    heads = groups["blocks.0.attn:heads"]  # more in tests/test_mha_heads.py
    assert heads.droppable and heads.modules == ("blocks.0.attn", "blocks.0.attn.out_proj") and heads.parts == 2


def test_without_inputs_mlp_groups_are_found_heads_need_inputs():
    groups = by_name(find_width_groups(GPT(n_layer=1)))
    assert groups["transformer.h.0.mlp:mlp"].droppable and groups["transformer.h.0.mlp:mlp"].flops_share is None


# -- the cut ---------------------------------------------------------------------------------------
def _flops(model, inputs) -> dict[str, int]:
    with FlopCounterMode(display=False) as counter:
        model(**inputs).logits.sum().backward()
    return {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}


def test_half_width_halves_the_groups_flops():
    model = llama()
    ctl = transform(model, WidthRaPTr("0.5-1", total_steps=4), example_inputs=hf_inputs())
    assert set(ctl.kept_parts.values()) == {16, 1}  # half of 32 hidden units, 1 of 2 key/value heads
    cut = _flops(model, hf_inputs())
    ctl.remove()
    full = _flops(model, hf_inputs())
    for module in ("mlp", "self_attn"):
        key = f"LlamaForCausalLM.model.layers.0.{module}"
        assert cut[key] == pytest.approx(full[key] / 2, rel=0.02), module


def test_cut_heads_compute_the_smaller_attention():
    """Keeping key/value head 1 (query heads 2 and 3) equals a model built with those heads only."""
    model = llama(layers=1)
    ctl = transform(model, WidthRaPTr([Stage(2, width=0.5), Stage(2, width=1.0)], width_kinds=("heads",)),
                    example_inputs=hf_inputs())
    kept = ctl.kept_indices["model.layers.0.self_attn:heads"]
    small = llama(heads=2, kv_heads=1, layers=1)
    with torch.no_grad():
        for name, p in small.named_parameters():
            full = model.get_parameter(name)
            if p.shape == full.shape:
                p.copy_(full)
        attn, src = small.model.layers[0].self_attn, model.model.layers[0].self_attn
        q_rows = torch.cat([torch.arange(8) + 8 * g for g in kept])
        kv_rows = torch.cat([torch.arange(4) + 4 * g for g in kept])
        attn.q_proj.weight.copy_(src.q_proj.weight[q_rows])
        attn.k_proj.weight.copy_(src.k_proj.weight[kv_rows])
        attn.v_proj.weight.copy_(src.v_proj.weight[kv_rows])
        attn.o_proj.weight.copy_(src.o_proj.weight[:, q_rows])
    model.train(), small.train()
    torch.testing.assert_close(model(**hf_inputs()).logits, small(**hf_inputs()).logits)


def test_inverse_scaling_scales_the_consumer_before_its_bias():
    torch.manual_seed(0)
    model = GPT(n_layer=1)
    mlp = copy.deepcopy(model.transformer.h[0].mlp)
    ctl = transform(model, WidthRaPTr("0.25-1", total_steps=2, width_scaling="inverse", width_kinds=("mlp",)),
                    example_inputs=tokens())
    kept = ctl.kept_indices["transformer.h.0.mlp:mlp"]
    x = torch.randn(2, 8, 16)
    expected = (torch.nn.functional.gelu(x @ mlp.c_fc.weight[kept].T + mlp.c_fc.bias[kept])
                @ mlp.c_proj.weight[:, kept].T) * 4 + mlp.c_proj.bias
    torch.testing.assert_close(model.transformer.h[0].mlp(x), expected)


def test_eval_and_full_width_are_bitwise_the_untransformed_model():
    model = llama()
    reference = copy.deepcopy(model)
    ctl = transform(model, WidthRaPTr("0.5-1", total_steps=2), example_inputs=hf_inputs())
    model.eval(), reference.eval()
    assert torch.equal(model(**hf_inputs()).logits, reference(**hf_inputs()).logits)
    ctl.step()  # stage 2: full width
    model.train(), reference.train()
    assert torch.equal(model(**hf_inputs()).logits, reference(**hf_inputs()).logits)
    assert list(model.state_dict()) == list(reference.state_dict())
    ctl.remove()
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_parts_not_kept_are_bitwise_unchanged_after_adamw():
    model = llama()
    ctl = transform(model, WidthRaPTr("0.5-0.75-1", total_steps=6), example_inputs=hf_inputs())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    mlp = model.model.layers[0].mlp
    for _ in range(4):
        kept = ctl.kept_indices["model.layers.0.mlp:mlp"]  # (groups are in unit order: heads, mlp)
        assert ctl.width_groups[1].name == "model.layers.0.mlp:mlp"
        dropped = sorted(set(range(32)) - set(kept))
        state = lambda: [t.clone() for t in optimizer.state[mlp.up_proj.weight].values()  # noqa: E731
                         if torch.is_tensor(t) and t.dim() == 2] if optimizer.state else []
        before = [mlp.gate_proj.weight[dropped].clone(), mlp.up_proj.weight[dropped].clone(),
                  mlp.down_proj.weight[:, dropped].clone()]
        kept_before = mlp.up_proj.weight[kept].clone()
        moments = state()
        model(**hf_inputs()).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        after = [mlp.gate_proj.weight[dropped], mlp.up_proj.weight[dropped], mlp.down_proj.weight[:, dropped]]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        for old, new in zip(moments, state()):
            assert torch.equal(old[dropped], new[dropped])
        assert not torch.equal(kept_before, mlp.up_proj.weight[kept])  # the kept parts did train


def test_without_freezing_parts_not_kept_would_move():
    """The control for the test above: AdamW's weight decay moves zero-gradient rows."""
    model = llama()
    ctl = transform(model, WidthRaPTr("0.5-1", total_steps=4), example_inputs=hf_inputs())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer, freeze_dropped=False)
    dropped = sorted(set(range(32)) - set(ctl.kept_indices["model.layers.0.mlp:mlp"]))
    before = model.model.layers[0].mlp.up_proj.weight[dropped].clone()
    model(**hf_inputs()).logits.pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight[dropped])


def test_closure_optimizer_keeps_parts_not_kept_with_attach_alone():
    """step(closure) runs the backward inside the step: the freeze must not depend on gradients."""
    model = GPT(n_layer=1)
    ctl = transform(model, WidthRaPTr("0.5-1", total_steps=4, width_kinds=("mlp",)), example_inputs=tokens())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ctl.attach(optimizer)
    for _ in range(2):
        dropped = sorted(set(range(64)) - set(ctl.kept_indices["transformer.h.0.mlp:mlp"]))
        weight = model.transformer.h[0].mlp.c_fc.weight
        before = weight[dropped].clone()

        def closure():
            optimizer.zero_grad()
            loss = model(*tokens()).pow(2).mean()
            loss.backward()
            return loss

        optimizer.step(closure)
        assert torch.equal(before, weight[dropped])


def test_meta_device_init_and_assign_loading_are_followed():
    with torch.device("meta"):
        model = GPT(n_layer=2)
    ctl = transform(model, WidthRaPTr("0.5-1", total_steps=4, width_kinds=("mlp",)), example_inputs=tokens())
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    fresh = GPT(n_layer=2).state_dict()
    model.load_state_dict(fresh, assign=True)  # new parameter objects again (sharing fresh's storage)
    fresh = {k: v.clone() for k, v in fresh.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    dropped = sorted(set(range(64)) - set(ctl.kept_indices["transformer.h.0.mlp:mlp"]))
    model(*tokens()).pow(2).mean().backward()
    optimizer.step()
    weight = model.transformer.h[0].mlp.c_fc.weight
    assert weight is model.get_parameter("transformer.h.0.mlp.c_fc.weight") and weight.grad is not None
    assert torch.equal(weight[dropped], fresh["transformer.h.0.mlp.c_fc.weight"][dropped])
    assert not torch.equal(weight, fresh["transformer.h.0.mlp.c_fc.weight"])


# -- fused q, k, v: heads cut through a rewrite of the attention module's graph ------------------------
FUSED = {  # name -> (model, inputs, its first attention module, the projections' names in it)
    "nanogpt": (lambda: GPT(n_layer=2), tokens, "transformer.h.0.attn", ("c_attn", "c_proj")),
    "timm": (lambda: FusedAttentionStack(), features, "blocks.0.attn", ("qkv", "proj")),
    "neox": (lambda: FusedAttentionStack(PerHeadFusedAttention), features, "blocks.0.attn", ("query_key_value", "dense")),
    # 4 query heads over 2 key/value heads: sdpa's enable_gqa, Llama's repeat_kv (expand), repeat_interleave
    "grouped": (lambda: FusedAttentionStack(GroupedFusedAttention), features, "blocks.0.attn", ("qkv", "proj")),
    "grouped_expand": (lambda: FusedAttentionStack(GroupedExpandAttention), features, "blocks.0.attn", ("qkv", "proj")),
    "grouped_repeat": (lambda: FusedAttentionStack(GroupedRepeatAttention), features, "blocks.0.attn", ("qkv", "proj")),
    # separate q, k and v projections viewed to self.n_head: the rewrite starts at each of them
    "n_head": (lambda: FusedAttentionStack(HeadCountAttention), features, "blocks.0.attn", ("q", "o")),
    # einops: rearrange(qkv, 'b n (three h d) -> three b h n d', three=3, h=self.heads), read from its pattern
    "einops": (lambda: FusedAttentionStack(EinopsAttention), features, "blocks.0.attn", ("to_qkv", "to_out")),
    # Hugging Face GPT-2: Conv1D c_attn split by self.split_size, the attention through its sdpa interface
    "gpt2": (lambda: Logits(gpt2()), tokens, "model.transformer.h.0.attn", ("c_attn", "c_proj")),
}


class EinopsAttention(nn.Module):
    """lucidrains' style: one projection rearranged by einops to q, k and v of self.heads heads."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.heads, self.to_qkv, self.to_out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.to_out(rearrange(y, "b h n d -> b n (h d)"))


class ModuleEinopsAttention(EinopsAttention):
    """The same, calling einops.rearrange through the module: a call torch.fx cannot trace."""

    def forward(self, x):
        q, k, v = einops.rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.to_out(einops.rearrange(y, "b h n d -> b n (h d)"))


def gpt2(**config):
    """A tiny Hugging Face GPT-2 without dropout (train-mode outputs compare bitwise) or a cache."""
    config = {"vocab_size": VOCAB, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32, "use_cache": False,
              "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **config}
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))


class Logits(nn.Module):
    """A Hugging Face model called on token ids, returning its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(input_ids=idx).logits


def _fused_rows(group, parts):
    """The fused projection's rows of ``parts``: in each of its segments (q, k and v one after
    another, a segment's rows per part in ``rewrite.segments``), or each part's block of rows."""
    segments = group.rewrite.segments
    if segments:
        offsets = itertools.accumulate((group.parts * w for w in segments[:-1]), initial=0)
        return [offset + p * w + i for offset, w in zip(offsets, segments) for p in parts for i in range(w)]
    width = group.part_widths[0]
    return [p * width + i for p in parts for i in range(width)]


def _out_columns(group, parts):
    width = group.part_widths[-1]
    return [p * width + i for p in parts for i in range(width)]


def _rows(module, index):
    """Output rows ``index`` of a projection's weight (a Conv1D keeps them as columns)."""
    return module.weight[:, index] if type(module).__name__ == "Conv1D" else module.weight[index]


def _columns(module, index):
    return module.weight[index] if type(module).__name__ == "Conv1D" else module.weight[:, index]


def _as_linear(module, weight):
    """A slice of a projection's weight as F.linear takes it ([out, in])."""
    return weight.T if type(module).__name__ == "Conv1D" else weight


@pytest.fixture(params=list(FUSED))
def fused(request):
    if request.param == "einops" and einops is None:
        pytest.skip("einops is not installed")
    make, inputs, attention, projections = FUSED[request.param]
    torch.manual_seed(0)
    return make(), inputs(), attention, projections


def _heads_only(model, inputs, stages="0.5-1", steps=4):
    return transform(model, WidthRaPTr(stages, total_steps=steps, width_kinds=("heads",)), seed=1,
                     example_inputs=inputs)


def _embedded(model, inputs, attention):
    """What the attention module receives (its arguments, recorded by a hook)."""
    seen = []
    handle = model.get_submodule(attention).register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    model(*inputs)
    handle.remove()
    return seen[0]


def test_fused_heads_compute_exactly_the_kept_heads(fused):
    """The rewritten attention equals the attention of the kept heads written out by hand: rows of
    each of q, k and v, the columns of the output projection."""
    model, inputs, attention, (fused_name, out_name) = fused
    ctl = _heads_only(model, inputs)
    group = by_name(ctl.width_groups)[f"{attention}:heads"]
    kept = ctl.kept_indices[group.name]
    assert group.droppable and len(kept) == group.parts // 2
    module = model.get_submodule(attention)
    qkv, out = getattr(module, fused_name), getattr(module, out_name)
    head_dim = group.part_widths[-1] // (group.size // group.parts)
    args, kwargs = _embedded(model, inputs, attention)
    x = args[0].detach()
    b, t, _ = x.shape
    rows, columns = _fused_rows(group, kept), _out_columns(group, kept)
    projected = torch.nn.functional.linear(x, _as_linear(qkv, _rows(qkv, rows)), qkv.bias[rows])
    if len(group.modules) == 4:  # separate q, k and v projections, each with the kept heads' rows
        q, k, v = (torch.nn.functional.linear(x, p.weight[rows], p.bias[rows]).view(b, t, -1, head_dim).transpose(1, 2)
                   for p in (module.q, module.k, module.v))
    elif group.rewrite.segments:  # q, k, v one after another
        q, k, v = (part.view(b, t, -1, head_dim).transpose(1, 2)
                   for part in projected.split([len(kept) * w for w in group.rewrite.segments], dim=-1))
    else:  # each head's q, k, v together
        q, k, v = projected.view(b, t, len(kept), 3 * head_dim).transpose(1, 2).chunk(3, dim=-1)
    if hasattr(module, "q_norm"):  # timm: q/k norms, softmax(q k^T scale) v
        y = ((module.q_norm(q) * module.scale) @ module.k_norm(k).transpose(-2, -1)).softmax(-1) @ v
    elif isinstance(module, GroupedFusedAttention):  # query heads 2g, 2g + 1 on key/value head g
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    else:  # nanoGPT, NeoX: causal scaled_dot_product_attention
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = torch.nn.functional.linear(y.transpose(1, 2).reshape(b, t, -1), _as_linear(out, _columns(out, columns)),
                                          out.bias)
    got = module(x, *args[1:], **kwargs)
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, expected)  # GPT-2's: (output, weights)


def test_fused_heads_at_half_width_halve_the_attention_flops(fused):
    model, inputs, attention, _ = fused

    def flops():
        with FlopCounterMode(display=False) as counter:
            model(*inputs).pow(2).mean().backward()
        return sum(counter.get_flop_counts()[f"{type(model).__name__}.{attention}"].values())

    ctl = _heads_only(model, inputs)
    cut = flops()
    ctl.remove()
    assert cut == pytest.approx(flops() / 2, rel=0.02)


def test_fused_heads_eval_full_width_and_remove_run_the_original_forward(fused):
    model, inputs, attention, _ = fused
    reference = copy.deepcopy(model)
    ctl = _heads_only(model, inputs, steps=2)
    assert model.get_submodule(attention).__dict__["forward"].__func__ is raptr_fx.cutting._heads_forward
    model.train()
    assert model(*inputs).shape == reference(*inputs).shape
    assert not torch.equal(model(*inputs), reference(*inputs))  # half the heads
    model.eval(), reference.eval()
    assert torch.equal(model(*inputs), reference(*inputs))
    ctl.step()  # stage 2: every head
    model.train(), reference.train()
    assert torch.equal(model(*inputs), reference(*inputs))
    assert list(model.state_dict()) == list(reference.state_dict())
    ctl.remove()
    assert not any("forward" in m.__dict__ or "_raptr_heads" in m.__dict__ for m in model.modules())


def test_fused_heads_not_kept_are_bitwise_unchanged_after_adamw(fused):
    model, inputs, attention, (fused_name, out_name) = fused
    ctl = _heads_only(model, inputs, "0.5-1", steps=6)  # 3 steps at half the heads
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    module = model.get_submodule(attention)
    qkv, out = getattr(module, fused_name), getattr(module, out_name)
    g = [grp.name for grp in ctl.width_groups].index(f"{attention}:heads")
    group = ctl.width_groups[g]
    for _ in range(3):
        kept = ctl.kept_indices[group.name]
        dropped = sorted(set(range(group.parts)) - set(kept))
        rows, columns = _fused_rows(group, dropped), _out_columns(group, dropped)
        before = [_rows(qkv, rows).clone(), qkv.bias[rows].clone(), _columns(out, columns).clone()]
        kept_before = _rows(qkv, _fused_rows(group, kept)).clone()
        moment = lambda: (optimizer.state[qkv.weight]["exp_avg"][:, rows] if type(qkv).__name__ == "Conv1D"  # noqa: E731, B023
                          else optimizer.state[qkv.weight]["exp_avg"][rows]).clone()  # noqa: B023 (called in this iteration)
        moment_before = moment() if optimizer.state else torch.zeros_like(before[0])
        model(*inputs).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        after = [_rows(qkv, rows), qkv.bias[rows], _columns(out, columns)]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert torch.equal(moment(), moment_before)
        assert not torch.equal(kept_before, _rows(qkv, _fused_rows(group, kept)))  # the kept heads did train


@pytest.mark.parametrize("attention, op", [
    (SlicedGroupedAttention, "`getitem` at `q, k, v = qkv[..., :q_rows], qkv[..., q_rows:-kv_rows], qkv[..., -kv_rows:]` "
                             "reads the fused projection's query, key and value segments (of different sizes) at once"),
    (HeadScaledAttention, "`mul` at `attn = ((q @ k.transpose(-2, -1)) * self.head_scale).softmax(dim=-1)` "
                          "combines the heads with head_scale"),
])
def test_fused_heads_the_rewrite_cannot_follow_are_refused_with_the_op(attention, op):
    groups = by_name(find_width_groups(FusedAttentionStack(attention), features()))
    heads = groups["blocks.0.attn:heads"]
    assert not heads.droppable and heads.rewrite is None
    assert "fused projection (blocks.0.attn.qkv); its heads cannot be cut" in heads.reason and op in heads.reason
    assert groups["blocks.0.mlp:mlp"].droppable


def test_einops_rearrange_called_through_its_module_is_refused_with_its_line():
    """``einops.rearrange`` (not a name the module's code imports) is traced into, and einops
    knows no torch.fx proxy: the refusal quotes the call."""
    pytest.importorskip("einops")
    heads = by_name(find_width_groups(FusedAttentionStack(ModuleEinopsAttention), features()))["blocks.0.attn:heads"]
    assert not heads.droppable and "fused projection (blocks.0.attn.to_qkv)" in heads.reason
    assert ("torch.fx cannot trace ModuleEinopsAttention.forward at `q, k, v = einops.rearrange(self.to_qkv(x), "
            "\"b n (three h d) -> three b h n d\", three=3, h=self.heads)` (RuntimeError: Tensor type unknown to "
            "einops") in heads.reason


# -- schedules, controller ---------------------------------------------------------------------------
def test_resume_replays_identical_width_decisions():
    def run(resume_at=None):
        model = GPT(n_layer=2)
        ctl = transform(model, RaPTr("1-2", total_steps=8, width="0.5-0.75", fixed_units=[0]), seed=3,
                        example_inputs=tokens())
        seen = []
        for step in range(8):
            if step == resume_at:
                state = ctl.state_dict()
                ctl.remove()
                ctl = transform(model, RaPTr("1-2", total_steps=8, width="0.5-0.75", fixed_units=[0]),
                                example_inputs=tokens())
                ctl.load_state_dict(state)
            seen.append((ctl.active, list(map(tuple, (k or () for k in ctl.kept_indices.values())))))
            ctl.step()
        return seen

    assert run() == run(resume_at=5)


def test_adding_width_leaves_depth_decisions_as_they_were():
    def decisions(schedule):
        ctl = transform(GPT(n_layer=4), schedule, seed=5, example_inputs=tokens())
        out = []
        for _ in range(8):
            out.append(ctl.active)
            ctl.step()
        return out

    assert decisions(RaPTr("2-3-4", total_steps=8)) == decisions(RaPTr("2-3-4", total_steps=8, width="0.5-0.67-1"))


def test_plan_counts_width_and_depth():
    ctl = transform(GPT(n_layer=2), WidthRaPTr("0.5-1", total_steps=4), example_inputs=tokens())
    rows = ctl.plan()
    share = sum(g.flops_share for g in ctl.width_groups) / sum(b.flops_share for b in ctl.blocks)
    assert rows[0].compute == pytest.approx(1 - 0.5 * share) and rows[1].compute == 1.0
    assert rows[0].width == 0.5 and ctl.expected_compute == pytest.approx(1 - 0.25 * share)
    assert not any(isinstance(b.forward, raptr_fx.gates.GatedForward) for b in GPT(n_layer=1).modules())


def test_width_only_installs_no_depth_gate():
    model = GPT(n_layer=2)
    transform(model, WidthRaPTr("0.5-1", total_steps=4), example_inputs=tokens())
    assert not any(isinstance(m.__dict__.get("forward"), raptr_fx.gates.GatedForward) for m in model.modules())


@pytest.mark.parametrize("bad, message", [
    (dict(stages="0.5-0.4-1"), "width stages shrink"),
    (dict(stages="0.5-x"), "keep fractions per stage"),
    (dict(stages="0.5-1", width_kinds=("ffn",)), "width_kinds must name"),
    (dict(stages="0.5-1", width_scaling="sqrt"), "width_scaling must be"),
    (dict(stages="0.5-1", width="0.5-1"), "is for RaPTr"),
])
def test_bad_width_schedules(bad, message):
    with pytest.raises(ValueError, match=message):
        WidthRaPTr(total_steps=4, **bad)


def test_width_stage_count_must_match():
    with pytest.raises(ValueError, match="has 2 stages, the schedule has 3"):
        RaPTr("2-3-4", total_steps=9, width="0.5-1")
    with pytest.raises(ValueError, match="Stage.width must be in"):
        Stage(3, width=1.5)


def test_model_without_groups_gets_a_clear_error():
    with pytest.raises(RaptrError, match="no cuttable group"):
        transform(ResNet(), WidthRaPTr("0.5-1", total_steps=4), example_inputs=images())


# -- DDP -----------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, out_dir: str) -> dict:
    torch.manual_seed(0)
    model = GPT(n_layer=3)
    ctl = transform(model, RaPTr("2-3", total_steps=4, width="0.5-0.75"), seed=2, example_inputs=tokens())
    ddp = DDP(model)  # no find_unused_parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    generator = torch.Generator().manual_seed(100 + rank)
    decisions, frozen = [], []
    for _ in range(4):
        decisions.append([ctl.active, list(ctl.kept_indices.values())])
        fc = [(g.unit, model.get_submodule(g.unit).mlp.c_fc.weight, k)  # heads are cut too: skip them here
              for g, k in zip(ctl.width_groups, ctl.kept_indices.values()) if k and g.kind == "mlp"]
        before = [(w.detach().clone(), sorted(set(range(64)) - set(k))) for _, w, k in fc]
        idx = torch.randint(0, 64, (2, 8), generator=generator)
        torch.nn.functional.cross_entropy(ddp(idx).flatten(0, 1), idx.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        frozen.append(all(torch.equal(b[d], w[d]) for (b, d), (_, w, _) in zip(before, fc)))
    return {"decisions": decisions, "frozen": frozen,
            "checksum": [float(p.detach().double().sum()) for p in model.parameters()]}


@pytest.mark.slow
def test_ddp_ranks_agree_on_width_cuts(tmp_path):
    ranks = run_ranks(_ddp_worker, tmp_path)
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert all(ranks[0]["frozen"])
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


# -- FSDP2 ---------------------------------------------------------------------------------------------
def _width_train(model, ctl, inputs) -> tuple[list, list]:
    """6 SGD steps (as in test_fsdp: Adam would amplify reduction-order noise); the kept parts of layer
    0's MLP per step, and whether its parts not kept stayed bitwise unchanged."""
    from torch.distributed.tensor import DTensor

    full = lambda p: (p.full_tensor() if isinstance(p, DTensor) else p).detach()  # noqa: E731
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ctl.attach(optimizer)
    kept, frozen = [], []
    mlp = model.transformer.h[0].mlp
    for step in range(6):
        parts = ctl.kept_indices["transformer.h.0.mlp:mlp"]  # heads are cut too
        kept.append(parts)
        dropped = [] if parts is None else sorted(set(range(64)) - set(parts))
        before = (full(mlp.c_fc.weight)[dropped].clone(), full(mlp.c_proj.weight)[:, dropped].clone())
        idx = inputs(step)
        torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        frozen.append(torch.equal(before[0], full(mlp.c_fc.weight)[dropped])
                      and torch.equal(before[1], full(mlp.c_proj.weight)[:, dropped]))
    return kept, frozen


def _width_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1000 * rank + step))


def _fsdp_worker(rank: int, out_dir: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = GPT(n_layer=2)
    ctl = transform(model, WidthRaPTr("0.5-0.75-1", total_steps=6), seed=4, example_inputs=tokens())
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    kept, frozen = _width_train(model, ctl, lambda step: _width_batch(rank, step))
    return fsdp_width_report(model, kept, frozen)


@pytest.mark.slow
def test_fsdp2_width_cuts_match_a_single_process_run(tmp_path):
    ranks = run_ranks(_fsdp_worker, tmp_path)
    torch.manual_seed(0)
    model = GPT(n_layer=2)
    ctl = transform(model, WidthRaPTr("0.5-0.75-1", total_steps=6), seed=4, example_inputs=tokens())
    kept, frozen = _width_train(model, ctl, lambda step: torch.cat([_width_batch(r, step) for r in range(2)]))
    assert kept[0] is not None
    assert_fsdp_width_run_matches(ranks, model, kept, frozen, "parts")


def test_moe_experts_refused_with_a_reason_shared_expert_and_heads_cut():
    config = transformers.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    groups = by_name(find_width_groups(transformers.Qwen2MoeForCausalLM(config), hf_inputs()))
    experts = groups["model.layers.0.mlp.experts:mlp"]
    assert not experts.droppable and "3-D parameter (model.layers.0.mlp.experts.gate_up_proj)" in experts.reason
    assert groups["model.layers.0.self_attn:heads"].droppable and groups["model.layers.0.self_attn:heads"].parts == 2
    shared = groups["model.layers.0.mlp.shared_expert:mlp"]
    assert shared.droppable and shared.modules[-1] == "model.layers.0.mlp.shared_expert.down_proj"


def test_a_per_head_scale_is_no_expert_weight():
    """A 3-D parameter with a matrix per entry is an expert weight; a [heads, 1, 1] logit scale is not."""
    class ScaledAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = nn.Parameter(torch.ones(2, 1, 1))
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            b, t, c = x.shape
            heads = x.view(b, t, 2, c // 2).transpose(1, 2) * self.logit_scale
            return self.proj(heads.transpose(1, 2).reshape(b, t, c))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc, self.out = ScaledAttention(), nn.Linear(16, 64), nn.Linear(64, 16)

        def forward(self, x):
            x = x + self.attn(x)
            return x + self.out(torch.relu(self.fc(x)))

    model = nn.Sequential(Block(), Block())
    groups = raptr_fx.find_width_groups(model, torch.randn(2, 4, 16))
    assert not any("3-D parameter" in (g.reason or "") for g in groups), [g.reason for g in groups]
    assert [g.name for g in groups if g.droppable] == ["0:mlp", "1:mlp"]


def test_attention_projected_by_1x1_convolutions_is_refused_with_a_reason_and_its_mlp_found():
    class ConvAttention(nn.Module):
        def __init__(self, c: int = 16, heads: int = 2):
            super().__init__()
            self.q, self.kv, self.out, self.heads = nn.Conv2d(c, c, 1), nn.Conv2d(c, 2 * c, 1), nn.Conv2d(c, c, 1), heads

        def forward(self, x):
            b, c, h, w = x.shape
            q = self.q(x).reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2)
            k, v = self.kv(x).reshape(b, 2, self.heads, c // self.heads, h * w).unbind(1)
            y = (torch.softmax(q @ k, dim=-1) @ v.transpose(-1, -2)).transpose(-1, -2).reshape(b, c, h, w)
            return self.out(y)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc, self.proj = ConvAttention(), nn.Linear(16, 64), nn.Linear(64, 16)

        def forward(self, x):
            x = x + self.attn(x)
            return x + self.proj(torch.relu(self.fc(x.transpose(1, 3)))).transpose(1, 3)

    groups = raptr_fx.find_width_groups(nn.Sequential(Block(), Block()), torch.randn(2, 16, 4, 4))
    heads = [g for g in groups if g.kind == "heads"]
    assert heads and all(not g.droppable and "no nn.Linear or Conv1D projection" in g.reason for g in heads)
    assert "come from 0.attn.q (Conv2d), 0.attn.kv (Conv2d), no nn.Linear" in heads[0].reason
    assert [g.name for g in groups if g.droppable] == ["0:mlp", "1:mlp"]


@pytest.mark.parametrize("name", ["ViewLayerScale"])
def test_width_only_schedules_cut_the_groups_find_width_groups_reports_in_refused_units(name):
    """A width-only schedule drops no unit, so a unit refused for depth still has its groups cut."""
    from tests.fixtures import patterns

    model = getattr(patterns, name)()
    x = torch.randn(2, 8, 16)
    reported = [g.name for g in raptr_fx.find_width_groups(model, (x,)) if g.droppable]
    assert reported and not any(b.droppable for b in raptr_fx.find_blocks(model, (x,)))
    with pytest.raises(raptr_fx.RaptrError, match="no droppable residual blocks"):
        transform(model, RaPTr("1-2", total_steps=4), example_inputs=(x,))  # depth still needs droppable units
    reference = copy.deepcopy(model)
    ctl = transform(model, WidthRaPTr("0.5-1", total_steps=4), example_inputs=(x,))
    assert list(ctl.kept_parts) == reported and all(k == 32 for k in ctl.kept_parts.values())
    model(x).sum().backward()
    model.eval()
    assert torch.equal(model(x), reference(x))
