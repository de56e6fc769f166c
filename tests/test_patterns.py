"""Residual patterns of issue 13, through the public API: what is a unit, what is refused and why."""

import copy

import pytest
import torch

import raptr_fx
from raptr_fx import FullModel, find_blocks, transform
from raptr_fx.skipping import OutputSlot
from tests.fixtures import patterns
from tests.fixtures.models import features, tokens

BOTH = pytest.mark.parametrize("with_inputs", [False, True], ids=["symbolic", "with-inputs"])


def inputs_or_none(with_inputs):
    return features() if with_inputs else None


@BOTH
def test_identity_module_shortcut_and_scale_keep_the_stream(with_inputs):
    blocks = find_blocks(patterns.IdentityShortcutStack(), inputs_or_none(with_inputs))
    assert [(b.name, b.drop, b.droppable) for b in blocks] == [
        (f"layers.{i}", "identity", True) for i in range(3)]


# Weights outside a unit that only its branch uses: tests/test_owned.py.


def test_a_branch_owning_its_layer_scale_is_a_zero_unit():
    model = patterns.OwnLayerScaleStack()
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), example_inputs=features())
    assert [(b.name, b.drop) for b in ctl.blocks] == [("branches.0", "zero"), ("branches.1", "zero")]
    with ctl.force(active=[False, True]):
        x = features()[0]
        out = model(x)
        assert torch.equal(out, x + reference.branches[1](x))
        out.sum().backward()
        assert all(p.grad is None for p in model.branches[0].parameters())


@pytest.mark.parametrize("factory", [patterns.UnreadWeightsStack, patterns.DataDependentUnread],
                         ids=["torch.fx", "torch.export"])
def test_unread_attention_weights_are_rebuilt_as_none(factory):
    model = factory()
    discovery = raptr_fx.discover(model, features())
    assert discovery.tracer == ("torch.fx" if factory is patterns.UnreadWeightsStack else "torch.export")
    assert [b.name for b in discovery.droppable] == ["layers.0", "layers.1", "layers.2"]
    assert discovery.blocks[0].output_slots == (OutputSlot(0, "stream"), OutputSlot(1, "unread"))
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), example_inputs=features())
    with ctl.force(active=[True, False, True]):
        x = features()[0]
        assert model.layers[1](x) == (x, None)  # the skipped layer's (stream, None)
        expected = reference.layers[2](reference.layers[0](x)[0])[0]
        assert torch.equal(model(x), expected)


def test_read_attention_weights_still_refuse_the_layer():
    # TupleStack's caller reads the weights: they are computed and used, so the layer stays.
    from tests.fixtures.models import TupleStack

    blocks = {b.name: b for b in find_blocks(TupleStack(), features())}
    assert not blocks["weights"].droppable and "is computed inside weights" in blocks["weights"].reason


def module_state(model):
    """Every module's __dict__ entries by identity, the contents of its dict caches, buffers and hooks."""
    state = {}
    for name, module in model.named_modules():
        entries = {k: id(v) for k, v in vars(module).items()}
        caches = {k: dict(v) for k, v in vars(module).items() if type(v) is dict}
        hooks = [list(module._forward_hooks), list(module._forward_pre_hooks), list(module._backward_hooks)]
        buffers = {k: v.clone() for k, v in module._buffers.items()}
        state[name] = (entries, caches, hooks, buffers)
    return state


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for name in before:
        entries, caches, hooks, buffers = before[name]
        assert after[name][0] == entries, name
        assert after[name][1] == caches, name
        assert after[name][2] == hooks, name
        assert after[name][3].keys() == buffers.keys() and all(
            torch.equal(v, after[name][3][k]) for k, v in buffers.items()), name


def assert_skips(model, with_inputs, skipped, expected):
    """Transformed, eval is the plain model's output bitwise; in training with unit ``skipped`` off,
    the output is ``expected(plain model, x)`` and ``skipped`` gets no gradient; remove() restores."""
    before = module_state(model)
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), example_inputs=inputs_or_none(with_inputs))
    x = features()[0]
    model.eval()
    assert torch.equal(model(x), reference(x))
    model.train()
    names = [b.name for b in ctl.blocks]
    with ctl.force(active=[name != skipped for name in names]):
        out = model(x)
        assert torch.equal(out, expected(reference, x))
        out.sum().backward()
        assert all(p.grad is None for p in model.get_submodule(skipped).parameters())
        model.zero_grad(set_to_none=True)
    ctl.remove()
    assert_same_state(before, module_state(model))


@pytest.mark.parametrize("example", [None, features()], ids=["torch.fx", "with-inputs"])
def test_discovery_and_transform_leave_a_caching_model_as_it_was(example):
    from raptr_fx.probe import probe
    from raptr_fx.tracing import normalize_example_inputs

    model = patterns.CachingStack()
    model.layers[0].register_forward_hook(lambda *_: None)
    if example is not None:
        model(*example)  # caches filled by a real call, as after a first training step
    before = module_state(model)
    for _ in range(2):  # a second discovery would fail on proxies or fakes left by the first
        blocks = find_blocks(model, example)
        assert [b.name for b in blocks if b.droppable] == ["layers.0", "layers.1", "layers.2"]
        assert_same_state(before, module_state(model))
        raptr_fx.find_width_groups(model, example)  # width's shape pass and proof run the modules too
        assert_same_state(before, module_state(model))
    if example is not None:  # the real pass (the probe's fallback) leaves nothing either
        assert probe(model, normalize_example_inputs(example), mode="real").mode == "real"
        assert_same_state(before, module_state(model))
    ctl = transform(model, FullModel(), example_inputs=example)
    ctl.remove()
    assert_same_state(before, module_state(model))


def test_an_instance_forward_wrapper_is_looked_through():
    # torch.export and the probe call the instance forward; under its bf16 autocast the
    # stream is cast inside each layer, and no layer looks residual.
    model = patterns.wrap_forward(patterns.ShapeBranchGPT())
    wrapper = model.forward
    discovery = raptr_fx.discover(model, features())
    assert discovery.tracer == "torch.export"
    assert [b.name for b in discovery.droppable] == ["blocks.0", "blocks.1"]
    assert model.forward is wrapper  # put back

    # A forward override that does not declare it wraps the class's is the model's own: traced as is.
    model = patterns.ShapeBranchGPT()
    model.forward = lambda x: x * 2
    assert find_blocks(model, features()) == []


def test_no_blocks_error_names_the_refused_units():
    from raptr_fx.discovery import no_blocks_error

    message = str(no_blocks_error(raptr_fx.discover(patterns.ViewLayerScale(), features())))
    assert message.startswith("ViewLayerScale has no droppable residual blocks: all 2 residual units found "
                              "were refused (traced with torch.fx):\n  - mlps.0: the branch also runs weights "
                              "outside mlps.0 that other parts of the model read too (gamma)")
    assert "concatenation skips" not in message  # it has residuals; they were refused


def test_tracing_error_says_why_on_its_first_line():
    class ReadsNumpy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x):
            if x.detach().numpy().sum() > 0:  # leaves torch: no tracer can follow it
                x = x + self.fc(x)
            return x

    with pytest.raises(raptr_fx.TracingError) as info:
        find_blocks(ReadsNumpy(), features())
    first = str(info.value).splitlines()[0]
    assert first.startswith("could not trace ReadsNumpy: torch.export (non-strict): ")
    assert first.endswith("at test_patterns.py:" + str(ReadsNumpy.forward.__code__.co_firstlineno + 1)
                          + " (if x.detach().numpy().sum() > 0:  # leaves torch: no tracer can follow it)")


def test_a_default_attention_mask_skipped_while_traced_is_added():
    model = patterns.DefaultMaskLM()
    ids = tokens()[0]
    discovery = raptr_fx.discover(model, {"input_ids": ids})
    assert discovery.tracer == "torch.export"
    assert [b.name for b in discovery.droppable] == ["layers.0", "layers.1"]
    assert discovery.traced.notes == [
        "attention_mask of ones added (the model's default, not built while traced)"]
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), example_inputs={"input_ids": ids})
    with ctl.force(active=[False, True]):
        keep = torch.ones(*ids.shape, 1)
        assert torch.equal(model(ids), reference.head(reference.layers[1](reference.embed(ids), keep)))


def test_a_none_mask_the_forward_cannot_take_is_reported_not_added():
    class NoMaskArgument(patterns.DefaultMaskLM):
        def forward(self, input_ids):  # nothing to add: the error is the model's None read
            return super().forward(input_ids)

    with pytest.raises(raptr_fx.TracingError) as info:
        find_blocks(NoMaskArgument(), {"input_ids": tokens()[0]})
    first = str(info.value).splitlines()[0]
    assert "TypeError: 'NoneType' object is not subscriptable at patterns.py:" in first
    assert first.endswith("(keep = attention_mask[:, :, None].float()  # a None here fails the trace)")


def test_a_data_dependent_branch_is_traced_as_the_example_takes_it():
    model = patterns.GlobalTokenStack()
    ids = tokens()[0]
    is_global = (ids < 8).float()
    assert is_global.any()  # the example takes the global branch
    discovery = raptr_fx.discover(model, (ids,))
    assert discovery.tracer == "torch.export"
    assert discovery.traced.notes == [
        "data-dependent branches resolved with the example inputs' values (torch.export.draft_export)"]
    assert [b.name for b in discovery.droppable] == ["layers.0", "layers.1"]
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), example_inputs=(ids,))
    model.eval()
    assert torch.equal(model(ids), reference(ids))
    model.train()
    with ctl.force(active=[False, True]):
        out = model(ids)
        assert torch.equal(out, reference.layers[1](reference.embed(ids), is_global))
        out.sum().backward()
        assert all(p.grad is None for p in model.layers[0].parameters())


def test_layers_run_again_after_no_grad_calls_are_refused_as_shared():
    # HrmText: the traced adds are the layers' second call (layers.0@1); once a KeyError.
    model = patterns.RecurrentRefinement()
    blocks = find_blocks(model, features())
    assert sorted(b.name for b in blocks) == ["layers.0", "layers.1"]
    assert [b.reason for b in blocks] == [
        "called 2 times per forward (shared weights): one gate cannot tell the calls apart"] * 2
    with pytest.raises(raptr_fx.RaptrError, match="layers.0: called 2 times per forward"):
        transform(model, FullModel(), example_inputs=features())



@BOTH
def test_a_constant_scaled_shortcut_layer_gives_way_to_its_branch(with_inputs):
    # Refused as a layer (skipped, it would have to return 0.5 * x), its MLP branch is the unit instead.
    discovery = raptr_fx.discover(patterns.ScaledShortcutStack(), inputs_or_none(with_inputs))
    assert [(b.name, b.drop, b.droppable) for b in discovery.blocks] == [
        ("layers.0.mlp", "zero", True), ("layers.1.mlp", "zero", True)]
    assert [b.name for b in discovery.replaced] == ["layers.0", "layers.1"]
    assert discovery.replaced[0].reason == (
        "its shortcut scales the stream (0.5 * x + f(x)), not the identity: skipped, it "
        "would have to return 0.5 * x, and returning x would change the stream")
    # The branch skipped, layer 0 returns 0.5 * x exactly.
    assert_skips(patterns.ScaledShortcutStack(), with_inputs, "layers.0.mlp", lambda ref, x: ref.layers[1](x * 0.5))


@BOTH
def test_scaled_shortcut_branches_are_zero_units(with_inputs):
    # Skipped as a branch, the MLP returns zeros and the parent still scales: 0.5 * x, exactly.
    model = patterns.ScaledShortcutStack()
    blocks = find_blocks(model, inputs_or_none(with_inputs), granularity="branch")
    assert [(b.name, b.drop, b.droppable) for b in blocks] == [
        ("layers.0.mlp", "zero", True), ("layers.1.mlp", "zero", True)]


@BOTH
def test_a_rotary_scale_inside_a_layer_is_no_shortcut(with_inputs):
    blocks = find_blocks(patterns.RotaryStack(), inputs_or_none(with_inputs))
    assert [(b.name, b.drop, b.droppable) for b in blocks] == [
        ("layers.0", "identity", True), ("layers.1", "identity", True)]


@BOTH
def test_a_bias_expanded_as_the_stream_is_no_shortcut(with_inputs):
    blocks = find_blocks(patterns.ExpandedBiasStack(), inputs_or_none(with_inputs))
    assert [(b.name, b.drop, b.droppable) for b in blocks] == [
        ("layers.0", "identity", True), ("layers.1", "identity", True)]


@BOTH
@pytest.mark.parametrize("factory", [patterns.FourierStack, patterns.KernelFreeAttentionStack],
                         ids=["parameter-free mixing", "bias-only update"])
def test_a_layer_starting_with_a_stream_update_that_is_no_unit_is_a_layer(factory, with_inputs):
    # FNet adds fft(x), weightless; MRA's attention without its CUDA kernel adds dense(zeros), its bias.
    model = factory()
    blocks = find_blocks(model, inputs_or_none(with_inputs))
    assert [(b.name, b.drop, b.droppable) for b in blocks] == [
        ("layers.0", "identity", True), ("layers.1", "identity", True)]
    # Layer 0 skipped whole: the update and the norms too.
    assert_skips(model, with_inputs, "layers.0", lambda ref, x: ref.layers[1](x))


def test_a_mask_retry_that_fails_too_is_in_the_error():
    class FailsAnyway(patterns.DefaultMaskLM):
        def forward(self, input_ids, attention_mask=None):
            if attention_mask is not None and attention_mask.detach().numpy().all():  # leaves torch
                attention_mask = attention_mask * 1
            return super().forward(input_ids, attention_mask)

    with pytest.raises(raptr_fx.TracingError) as info:
        find_blocks(FailsAnyway(), {"input_ids": tokens()[0]})
    lines = str(info.value).splitlines()
    assert "'NoneType' object is not subscriptable" in lines[0]  # the first failure: the None read
    assert any(line.strip().startswith("retried with attention_mask of ones added: ") and "numpy" in line
               for line in lines[1:])


@pytest.mark.parametrize("granularity", ["layer", "branch"])
def test_a_refused_branch_says_what_to_do_at_each_granularity(granularity):
    # At layer granularity the modules around the add were tried as layers: asking for it would not
    # help, so branch granularity does not suggest it either (it did, issue 21 item 10).
    fix = "no module around it is a layer (one taking the stream as an input and returning it once)"
    blocks = find_blocks(patterns.ViewLayerScale(), features(), granularity=granularity)
    assert [(b.name, b.droppable) for b in blocks] == [("mlps.0", False), ("mlps.1", False)]
    assert blocks[0].reason == ("the branch also runs weights outside mlps.0 that other parts of the model read too "
                                f"(gamma): frozen with it, they would stop training for those too; {fix}")


@BOTH
def test_layers_called_through_forward_are_layers(with_inputs):
    # SqueezeBERT: the encoder calls layer.forward(...), which bypasses nn.Module.__call__.
    model = patterns.DirectForwardStack()
    before = module_state(model)
    blocks = find_blocks(model, inputs_or_none(with_inputs))
    assert [(b.name, b.drop, b.droppable) for b in blocks] == [
        (f"layers.{i}", "identity", True) for i in range(3)]
    assert_same_state(before, module_state(model))  # no forward left behind
    # The direct call reaches the gate: layer 1 is skipped.
    assert_skips(model, with_inputs, "layers.1", lambda ref, x: ref.layers[2](ref.layers[0](x, 0.5), 0.5))


def test_a_layer_with_hooks_called_through_forward_is_not_redirected():
    # Through __call__ its hook would run during discovery, which the real direct call never does.
    model = patterns.DirectForwardStack()
    model.layers[1].register_forward_hook(lambda *_: None)
    blocks = find_blocks(model, features())
    assert [b.name for b in blocks if b.droppable] == ["layers.0", "layers.2"]


@BOTH
def test_a_time_mix_is_no_projection_shortcut(with_inputs):
    model = patterns.TimeMixStack()
    blocks = find_blocks(model, inputs_or_none(with_inputs))
    assert [(b.name, b.drop, b.droppable) for b in blocks][-2:] == [
        ("layers.1", "identity", True), ("layers.2", "identity", True)]
    assert_skips(model, with_inputs, "layers.1", lambda ref, x: ref.layers[2](ref.layers[0](x)))


@BOTH
def test_a_layer_normalizing_its_stream_first_is_refused_for_that(with_inputs):
    # RWKV's block 0: skipped, it would return x, not pre_norm(x), so it is no layer.
    blocks = find_blocks(patterns.TimeMixStack(), inputs_or_none(with_inputs))
    refused = [b for b in blocks if not b.droppable]
    assert [b.name for b in refused] == ["layers.0.fc2"]
    assert refused[0].reason.startswith("the branch also runs weights outside layers.0.fc2 that only it uses, on "
                                        "data outside any module (layers.0.mix)")
    assert refused[0].reason.endswith(
        "; layers.0 is no layer: it runs layers.0.pre_norm on the stream before its first residual add "
        "(skipped, it would return its input, not their output)")


@pytest.mark.skipif(not hasattr(torch.fx.experimental._config, "soft_pending_unbacked_not_found_error"),
                    reason="torch before 2.11 cannot let an unbound size pass")
def test_expert_routing_by_torch_where_is_traced():
    # LongCat-Flash: draft_export stopped with PendingUnbackedSymbolNotFound at torch.where(mask).
    model = patterns.RoutedStack()
    discovery = raptr_fx.discover(model, features())
    assert discovery.tracer == "torch.export"
    assert discovery.traced.notes == [
        "data-dependent branches resolved with the example inputs' values (torch.export.draft_export)"]
    assert [(b.name, b.droppable) for b in discovery.blocks] == [("layers.0", True), ("layers.1", True)]
    assert_skips(model, True, "layers.0", lambda ref, x: ref.layers[1](x))


def test_a_module_embedding_ids_is_not_called_a_layer_that_normalizes_first():
    # Its first "weights on the stream" are the embedding of ids: no stream comes in to skip to.
    discovery = raptr_fx.discover(patterns.EmbeddedRootResiduals(), tokens())
    assert discovery.tracer == "torch.export"
    blocks = discovery.blocks
    # No layer: the branches are the units, each owning the fc1 only it reads (tests/test_owned.py).
    assert [(b.name, b.drop, b.droppable, b.owned_before) for b in blocks] == [
        ("model.fc2.0", "zero", True, ("model.fc1.0",)), ("model.fc2.1", "zero", True, ("model.fc1.1",))]


# --- issue 21: stacks, refused layers' branches, streams from a token, sibling sublayers -----------
def assert_units_run_as_drawn(model, inputs, units):
    """Transformed with a schedule that needs every unit (half of them, then all): eval is the plain
    model's output bitwise; in training each step runs exactly the units drawn (a forward hook on the
    first module with weights inside each unit counts its runs) and dropped units get no gradient;
    remove() leaves the model as it was."""
    before = module_state(model)
    reference = copy.deepcopy(model)
    ctl = transform(model, raptr_fx.RaPTr(f"{len(units) // 2}-{len(units)}", total_steps=6), example_inputs=inputs)
    assert [b.name for b in ctl.blocks] == units
    x = inputs[0]
    model.eval()
    assert torch.equal(model(x), reference(x))
    model.train()
    ran = []
    hooks = []
    for unit in units:
        first = next(m for m in model.get_submodule(unit).modules() if list(m.parameters(recurse=False)))
        hooks.append(first.register_forward_hook(lambda *_, unit=unit: ran.append(unit)))
    dropped_any = False
    for _ in range(4):
        ctl.step()
        ran.clear()
        model(x).sum().backward()
        assert ran == ctl.active_blocks
        dropped_any = dropped_any or len(ran) < len(units)
        for unit, kept in zip(units, ctl.active):
            assert kept or all(p.grad is None for p in model.get_submodule(unit).parameters())
        model.zero_grad(set_to_none=True)
    assert dropped_any  # stage 0 (seeded draws) dropped some unit
    for hook in hooks:
        hook.remove()
    ctl.remove()
    assert_same_state(before, module_state(model))


@BOTH
def test_a_stack_looping_over_attention_and_feed_forward_pairs_is_no_layer(with_inputs):
    # for attn, ff in self.layers: x = attn(x) + x; x = ff(x) + x, then self.norm(x): the stack was one
    # identity unit (skipping it skipped the final norm too) and "2-4-6" failed with "outside [1, 1]".
    blocks = find_blocks(patterns.PairedViT(), inputs_or_none(with_inputs))
    units = [f"transformer.layers.{i}.{j}" for i in range(3) for j in range(2)]
    assert [(b.name, b.drop, b.droppable) for b in blocks] == [(u, "zero", True) for u in units]
    model = patterns.PairedViT()
    transform(model, "2-4-6", total_steps=6, example_inputs=inputs_or_none(with_inputs)).remove()
    assert_units_run_as_drawn(patterns.PairedViT(), features(), units)


@BOTH
def test_a_layer_of_sublayers_of_different_classes_in_one_module_list_stays_a_layer(with_inputs):
    # self.sublayers = ModuleList([attention, feed-forward]) looped over: one layer, not a stack.
    blocks = find_blocks(patterns.SublayerBlockStack(), inputs_or_none(with_inputs))
    assert [(b.name, b.drop, b.droppable) for b in blocks] == [
        ("layers.0", "identity", True), ("layers.1", "identity", True)]


@BOTH
@pytest.mark.parametrize("factory, reason", [
    (patterns.StateDictStack, "cannot tell which argument of forward carries the stream"),
    (patterns.ProjectedFirstStack, "its shortcut is a projection (layers.0.proj), not the identity"),
], ids=["stream in a dict", "projection shortcut in one sublayer"])
def test_a_refused_layer_gives_way_to_its_plain_branches(factory, reason, with_inputs):
    discovery = raptr_fx.discover(factory(), inputs_or_none(with_inputs))
    units = [f"layers.{i}.{branch}" for i in range(2) for branch in ("attn", "ff")]
    assert [(b.name, b.drop, b.droppable) for b in discovery.blocks] == [(u, "zero", True) for u in units]
    assert [b.name for b in discovery.replaced] == ["layers.0", "layers.1"]
    assert discovery.replaced[0].reason.startswith(reason)
    assert_units_run_as_drawn(factory(), features(), units)


@BOTH
def test_a_stream_starting_from_a_learned_token_is_a_unit(with_inputs):
    # cls = cls_token.expand(...); cls = attn(cls, context=x) + cls: the first add was no residual.
    blocks = find_blocks(patterns.ClassAttentionHead(), inputs_or_none(with_inputs))
    cls_units = [f"cls_layers.{i}.{j}" for i in range(2) for j in range(2)]
    assert [(b.name, b.drop, b.droppable) for b in blocks] == [
        ("body.0", "identity", True), ("body.1", "identity", True), *[(u, "zero", True) for u in cls_units]]
    assert_units_run_as_drawn(patterns.ClassAttentionHead(), features(), ["body.0", "body.1", *cls_units])


def test_a_skipped_branch_on_a_learned_token_leaves_the_token():
    model = patterns.AttentionPooling()
    reference = copy.deepcopy(model)
    ctl = transform(model, FullModel(), example_inputs=features())
    assert [(b.name, b.drop) for b in ctl.blocks] == [("body.0", "identity"), ("body.1", "identity"),
                                                       ("pool", "zero")]
    with ctl.force(active=[True, True, False]):
        x = features()[0]
        assert torch.equal(model(x), reference.head(reference.query.expand(2, -1, -1)[:, 0]))
    ctl.remove()


@BOTH
def test_sibling_modules_of_one_sublayer_are_gated_at_their_block(with_inputs):
    # ModuleList([norm, block, residual_fn]) per sublayer, x = residual_fn(block(norm(x)), x), and a
    # stack returning (x, intermediates): nothing was offered. The block is the unit; skipped, it
    # returns zeros and residual_fn passes the stream through.
    units = [f"attn_layers.layers.{i}.1" for i in range(4)]
    for granularity in ("layer", "branch"):
        blocks = find_blocks(patterns.SiblingSublayersLM(norm=False), inputs_or_none(with_inputs),
                             granularity=granularity)
        assert [(b.name, b.drop, b.droppable) for b in blocks] == [(u, "zero", True) for u in units]
    assert_units_run_as_drawn(patterns.SiblingSublayersLM(norm=False), features(), units)


@pytest.mark.parametrize("granularity", ["layer", "branch"])
def test_sibling_sublayers_with_their_norm_apart_own_the_norm(granularity):
    # The norm is a sibling of the block, outside it, and only the block reads it: the unit owns it
    # (skipped and frozen with it), the one decision shared by the sublayer's sibling modules.
    blocks = find_blocks(patterns.SiblingSublayersLM(), features(), granularity=granularity)
    assert [(b.name, b.droppable, b.owned_before) for b in blocks] == [
        (f"attn_layers.layers.{i}.1", True, (f"attn_layers.layers.{i}.0",)) for i in range(4)]
    if granularity == "layer":
        assert_units_run_as_drawn(patterns.SiblingSublayersLM(), features(),
                                  [f"attn_layers.layers.{i}.1" for i in range(4)])
