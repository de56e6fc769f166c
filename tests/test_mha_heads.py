"""Width-wise heads of nn.MultiheadAttention: hand-written blocks, nn.TransformerEncoderLayer and
nn.TransformerDecoderLayer (self- and cross-attention)."""

import copy
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import raptr_fx
from raptr_fx import RaPTr, WidthRaPTr, find_width_groups, transform
from tests.distributed import assert_fsdp_width_run_matches, fsdp_width_report, run_ranks
from tests.fixtures.models import MultiheadStack, TorchSeq2Seq, TorchTransformer, features

MODELS = {  # name -> (model, its attention modules in the first unit)
    "block": (lambda: MultiheadStack(batch_first=True, masks="causal"), ["blocks.0.attn"]),
    "block-seq-first-no-bias-padded": (lambda: MultiheadStack(batch_first=False, bias=False, masks="padded"),
                                       ["blocks.0.attn"]),
    "encoder": (lambda: TorchTransformer(batch_first=True), ["stack.layers.0.self_attn"]),
    "encoder-seq-first-norm-first": (lambda: TorchTransformer(batch_first=False, norm_first=True),
                                     ["stack.layers.0.self_attn"]),
    "encoder-causal-exported": (lambda: TorchTransformer(batch_first=True, causal=True), ["stack.layers.0.self_attn"]),
    "decoder": (lambda: TorchTransformer(decoder=True, batch_first=True),
                ["stack.layers.0.self_attn", "stack.layers.0.multihead_attn"]),
}


@pytest.fixture(params=list(MODELS))
def mha(request):
    make, attentions = MODELS[request.param]
    torch.manual_seed(0)
    return make(), attentions


def by_name(groups):
    return {g.name: g for g in groups}


def _heads_only(model, stages="0.5-1", steps=4):
    return transform(model, WidthRaPTr(stages, total_steps=steps, width_kinds=("heads",)), seed=1,
                     example_inputs=features())


def _calls(model, attention):
    """What ``attention`` receives in one forward of ``model``: (args, kwargs)."""
    seen = []
    handle = model.get_submodule(attention).register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    model(*features())
    handle.remove()
    return seen[0]


def head_rows(attention, heads):
    """The rows of ``heads`` in ``in_proj_weight`` / ``in_proj_bias``: their q, then k, then v rows."""
    e, d = attention.embed_dim, attention.head_dim
    return [s * e + h * d + i for s in range(3) for h in heads for i in range(d)]


def head_columns(attention, heads):
    """The columns of ``heads`` in ``out_proj.weight``."""
    return [h * attention.head_dim + i for h in heads for i in range(attention.head_dim)]


def by_hand(attention, heads, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
            **_):
    """nn.MultiheadAttention restricted to ``heads``, head by head: their rows of in_proj_weight, their
    columns of out_proj; returns the output and the attention weights averaged over ``heads``."""
    d, e = attention.head_dim, attention.embed_dim
    if not attention.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    w, b = attention.in_proj_weight, attention.in_proj_bias
    b = b if b is not None else torch.zeros(3 * e)
    n, s = query.shape[0], key.shape[1]
    out, maps = attention.out_proj.bias if attention.out_proj.bias is not None else 0, []
    for h in heads:
        rows = torch.arange(h * d, (h + 1) * d)
        q, k, v = (x @ w[rows + i * e].T + b[rows + i * e] for i, x in enumerate((query, key, value)))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.unflatten(0, (n, attention.num_heads))[:, h]
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask.view(n, 1, s), float("-inf"))
        maps.append(scores.softmax(-1))
        out = out + (maps[-1] @ v) @ attention.out_proj.weight[:, rows].T
    out = out if attention.batch_first else out.transpose(0, 1)
    return out, torch.stack(maps).mean(0)


# -- groups found --------------------------------------------------------------------------------
def test_groups_found_and_discovery_leaves_the_model_as_it_was(mha):
    model, attentions = mha
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = by_name(find_width_groups(model, features()))
    for name in attentions:
        group = groups[f"{name}:heads"]
        assert group.droppable, group.reason
        assert group.modules == (name, f"{name}.out_proj") and group.size == group.parts == 4
        assert group.part_widths == (12, 4)  # q, k and v rows of a head; its out_proj columns
        assert group.params == sum(p.numel() for p in model.get_submodule(name).parameters())
        with FlopCounterMode(display=False) as counter:
            model(*features())
        counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        assert group.flops_share == pytest.approx(counts[f"{type(model).__name__}.{name}"] / counts["Global"])
    assert any(g.kind == "mlp" and g.droppable for g in groups.values())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_torch_transformer_layers_are_units():
    """torch.fx traces through torch's transformer stacks and layers; with a mask, torch.export does."""
    for model, tracer in [(TorchTransformer(decoder=True, norm_first=True), "torch.fx"),
                          (TorchTransformer(causal=True), "torch.export")]:
        found = raptr_fx.discover(model, features())
        assert found.tracer == tracer
        assert [b.name for b in found.blocks] == ["stack.layers.0", "stack.layers.1"]
        assert all(b.droppable for b in found.blocks)


def test_nn_transformer_heads_are_cut_through_torch_export():
    model = TorchSeq2Seq()
    inputs = (features()[0], features()[0][:, :4])
    groups = by_name(find_width_groups(model, inputs))
    heads = [name for name, g in groups.items() if g.kind == "heads" and g.droppable]
    assert heads == [f"transformer.encoder.layers.{i}.self_attn:heads" for i in range(2)] + [
        f"transformer.decoder.layers.{i}.{attention}:heads" for i in range(2)
        for attention in ("self_attn", "multihead_attn")]
    reference = copy.deepcopy(model)
    ctl = transform(model, WidthRaPTr("0.5-1", total_steps=4, width_kinds=("heads",)), example_inputs=inputs)
    assert set(ctl.kept_parts.values()) == {2}
    out = model(*inputs)
    assert out.shape == reference(*inputs).shape and not torch.equal(out, reference(*inputs))
    out.pow(2).mean().backward()
    in_proj = model.transformer.decoder.layers[0].multihead_attn.in_proj_weight
    assert (in_proj.grad.abs().sum(dim=1) != 0).sum() == 3 * 2 * 4  # q, k and v rows of the 2 kept heads


def test_unbatched_input_is_cut_like_a_batch_of_one():
    model = MultiheadStack(batch_first=True, masks="causal")
    _heads_only(model)
    attention = model.blocks[0].attn
    x = features()[0][0]  # (tokens, D)
    out, weights = attention(x, x, x, attn_mask=model.blocks[0].attn_mask)
    batched, batched_weights = attention(x[None], x[None], x[None], attn_mask=model.blocks[0].attn_mask)
    assert out.shape == x.shape and weights.shape == (5, 5)
    torch.testing.assert_close(out, batched[0])
    torch.testing.assert_close(weights, batched_weights[0])


@pytest.mark.parametrize("options, reason", [
    ({"kdim": 8, "vdim": 8}, "its key and value sizes (kdim=8, vdim=8) differ from embed_dim=16"),
    ({"add_bias_kv": True}, "add_bias_kv=True"),
    ({"add_zero_attn": True}, "add_zero_attn=True"),
    ({"heads": 1}, "it has one head"),
    ({"per_head_weights": True}, "average_attn_weights=False returns one attention map per head"),
])
def test_what_cannot_be_cut_is_refused_with_the_reason(options, reason):
    groups = by_name(find_width_groups(MultiheadStack(batch_first=True, **options), features()))
    heads = groups["blocks.0.attn:heads"]
    assert not heads.droppable and reason in heads.reason
    assert groups["blocks.0.mlp:mlp"].droppable


# -- the cut ---------------------------------------------------------------------------------------
def test_cut_computes_exactly_the_kept_heads(mha):
    """The cut attention equals the kept heads written out by hand, head by head: their q, k and v
    rows of in_proj_weight and in_proj_bias, their columns of out_proj."""
    model, attentions = mha
    ctl = _heads_only(model)
    for name in attentions:
        g = [group.name for group in ctl.width_groups].index(f"{name}:heads")
        kept = ctl.kept_indices[ctl.width_groups[g].name]
        assert len(kept) == 2
        attention = model.get_submodule(name)
        args, kwargs = _calls(model, name)
        out, weights = attention(*args, **kwargs)
        expected, expected_weights = by_hand(attention, kept, *args, **kwargs)
        torch.testing.assert_close(out, expected)
        if kwargs.get("need_weights", True):  # averaged over the kept heads
            torch.testing.assert_close(weights, expected_weights)
        else:
            assert weights is None


def test_at_half_width_the_attention_flops_halve(mha):
    model, attentions = mha

    def flops():
        with FlopCounterMode(display=False) as counter:
            model(*features()).pow(2).mean().backward()
        counts = counter.get_flop_counts()
        return [sum(counts[f"{type(model).__name__}.{name}"].values()) for name in attentions]

    ctl = _heads_only(model)
    cut = flops()
    ctl.remove()
    assert cut == pytest.approx([full / 2 for full in flops()], rel=0.02)


def test_eval_full_width_and_remove_run_the_original_forward(mha):
    model, attentions = mha
    reference = copy.deepcopy(model)
    parameters = [(n, p.shape) for n, p in model.named_parameters()]
    ctl = _heads_only(model, steps=2)
    assert [(n, p.shape) for n, p in model.named_parameters()] == parameters
    assert list(model.state_dict()) == list(reference.state_dict())
    for name in attentions:
        assert model.get_submodule(name).__dict__["forward"].__func__ is raptr_fx.cutting._heads_forward
    model.train(), reference.train()
    assert not torch.equal(model(*features()), reference(*features()))  # half the heads
    model.eval(), reference.eval()
    with torch.no_grad():  # the fast path where torch takes it (encoder layers, MHA)
        assert torch.equal(model(*features()), reference(*features()))
    assert torch.equal(model(*features()), reference(*features()))
    ctl.step()  # stage 2: every head
    model.train(), reference.train()
    assert torch.equal(model(*features()), reference(*features()))
    ctl.remove()
    assert not any("forward" in m.__dict__ or "_raptr_heads" in m.__dict__ for m in model.modules())
    assert torch.equal(model(*features()), reference(*features()))


def test_heads_not_kept_are_bitwise_unchanged_after_adamw(mha):
    model, attentions = mha
    ctl = _heads_only(model, "0.5-1", steps=6)  # 3 steps at half the heads
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    name = attentions[-1]
    attention = model.get_submodule(name)
    g = [group.name for group in ctl.width_groups].index(f"{name}:heads")

    def rows(heads):
        return head_rows(attention, heads)

    def columns(heads):
        return head_columns(attention, heads)

    def frozen(dropped):
        values = [attention.in_proj_weight[rows(dropped)], attention.out_proj.weight[:, columns(dropped)]]
        if attention.in_proj_bias is not None:
            values.append(attention.in_proj_bias[rows(dropped)])
        state = optimizer.state.get(attention.in_proj_weight, {})
        values += [state[k][rows(dropped)] for k in ("exp_avg", "exp_avg_sq") if k in state]
        return [v.clone() for v in values]

    for step in range(3):
        kept = ctl.kept_indices[ctl.width_groups[g].name]
        dropped = sorted(set(range(4)) - set(kept))
        before, kept_before = frozen(dropped), attention.in_proj_weight[rows(kept)].clone()
        model(*features()).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        after = frozen(dropped)
        assert len(after) == len(before) + (2 if step == 0 else 0)  # the moments exist after the first step
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        if step == 0:
            assert all(torch.count_nonzero(m) == 0 for m in after[len(before):])  # state made this step: zero
        assert not torch.equal(kept_before, attention.in_proj_weight[rows(kept)])  # the kept heads did train


@pytest.mark.compile
def test_compiled_cut_recompiles_only_when_the_kept_count_changes():
    """The kept heads are a tensor read per step: a new draw of the same count reuses the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TorchTransformer(batch_first=True)
    ctl = _heads_only(model, "0.5-1", steps=6)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    frames, draws = [], set()
    for _ in range(6):
        draws.add(tuple(list(ctl.kept_indices.values())[0] or ()))
        compiled_loss = compiled(*features()).pow(2).mean()
        compiled_loss.backward()
        torch.testing.assert_close(compiled_loss, model(*features()).pow(2).mean())
        frames.append(counter.frame_count)
        ctl.step()
    assert len(draws) > 2  # several draws of 2 heads, then every head
    assert frames[0] == frames[2] and frames[3] == frames[5] and frames[3] - frames[2] <= 1, frames


# -- distributed: 2 gloo processes on the CPU (tests/distributed.py), as tests/test_width.py's GPT ----------
def _dropped_heads(attention, kept, full=lambda p: p.detach()):
    """The values of the heads not in ``kept``: their rows of in_proj_weight and in_proj_bias, their
    columns of out_proj.weight (``full`` gathers an FSDP2 parameter)."""
    dropped = sorted(set(range(attention.num_heads)) - set(kept))
    rows, columns = head_rows(attention, dropped), head_columns(attention, dropped)
    return [full(attention.in_proj_weight)[rows].clone(), full(attention.in_proj_bias)[rows].clone(),
            full(attention.out_proj.weight)[:, columns].clone()]


def _ddp_worker(rank: int, out_dir: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = TorchTransformer(batch_first=True, depth=3)
    ctl = transform(model, RaPTr("2-3", total_steps=4, width="0.5-0.75"), seed=2, example_inputs=features())
    ddp = DDP(model)  # no find_unused_parameters: in_proj_weight is read through the replaced forward
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ctl.attach(optimizer)
    generator = torch.Generator().manual_seed(100 + rank)
    decisions, frozen = [], []
    for _ in range(4):
        decisions.append([ctl.active, ctl.kept_indices])
        cut = [(model.get_submodule(g.modules[0]), k)  # the attentions whose heads are cut this step
               for g, k in zip(ctl.width_groups, ctl.kept_indices.values()) if k and g.kind == "heads"]
        before = [_dropped_heads(attention, k) for attention, k in cut]
        x = torch.randn(2, 5, 16, generator=generator)
        ddp(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        frozen.append(all(torch.equal(b, a) for (attention, k), values in zip(cut, before)
                          for b, a in zip(values, _dropped_heads(attention, k))))
    return {"decisions": decisions, "frozen": frozen,
            "checksum": [float(p.detach().double().sum()) for p in model.parameters()]}


@pytest.mark.slow
def test_ddp_ranks_agree_on_multihead_attention_head_cuts(tmp_path):
    ranks = run_ranks(_ddp_worker, tmp_path)
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    heads = [kept for _, step in ranks[0]["decisions"] for name, kept in step.items()
             if name.endswith(":heads") and kept is not None]
    assert sorted({len(k) for k in heads}) == [2, 3], "heads cut to 0.5, then 0.75"
    assert all(ranks[0]["frozen"]) and all(ranks[1]["frozen"]), "heads not kept moved under DDP"
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


def _mha_train(model, ctl, inputs) -> tuple[list, list]:
    """6 SGD steps (Adam would amplify reduction-order noise, as in test_fsdp); layer 0's kept heads
    per step, and whether its heads not kept stayed bitwise unchanged."""
    from torch.distributed.tensor import DTensor

    full = lambda p: (p.full_tensor() if isinstance(p, DTensor) else p).detach()  # noqa: E731
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ctl.attach(optimizer)
    attention = model.stack.layers[0].self_attn
    kept, frozen = [], []
    for step in range(6):
        heads = ctl.kept_indices["stack.layers.0.self_attn:heads"]
        kept.append(heads)
        before = _dropped_heads(attention, heads or range(4), full)
        model(inputs(step)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        frozen.append(all(torch.equal(b, a) for b, a in zip(before, _dropped_heads(attention, heads or range(4), full))))
    return kept, frozen


def _mha_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1000 * rank + step))


def _mha_fsdp_reference() -> tuple[TorchTransformer, raptr_fx.Controller]:
    torch.manual_seed(0)
    model = TorchTransformer(batch_first=True)
    return model, transform(model, WidthRaPTr("0.5-0.75-1", total_steps=6), seed=4, example_inputs=features())


def _fsdp_worker(rank: int, out_dir: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    model, ctl = _mha_fsdp_reference()
    for layer in model.stack.layers:
        fully_shard(layer)
    fully_shard(model)
    kept, frozen = _mha_train(model, ctl, lambda step: _mha_batch(rank, step))
    return fsdp_width_report(model, kept, frozen)


@pytest.mark.slow
def test_fsdp2_multihead_attention_head_cuts_match_a_single_process_run(tmp_path):
    ranks = run_ranks(_fsdp_worker, tmp_path)
    model, ctl = _mha_fsdp_reference()
    kept, frozen = _mha_train(model, ctl, lambda step: torch.cat([_mha_batch(r, step) for r in range(2)]))
    assert [None if k is None else len(k) for k in kept] == [2, 2, 3, 3, None, None]
    assert_fsdp_width_run_matches(ranks, model, kept, frozen, "heads")
