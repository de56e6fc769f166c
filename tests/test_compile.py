"""torch.compile: no recompilation across gate patterns and stages (about 30 s per test on 2 CPU cores)."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from raptr_fx import FullModel, RaPTr, transform
from tests.fixtures.models import GPT, tokens

pytestmark = pytest.mark.compile


@pytest.mark.parametrize("compile_mode", ["regional", "cond"])
def test_multi_stage_run_never_recompiles_and_matches_eager(compile_mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(n_layer=4)
    counter = CompileCounterWithBackend("inductor")
    ctl = transform(model, RaPTr("2-3-4", total_steps=9), scaling="inverse", seed=1,
                    compile_mode=compile_mode, compile_options={"backend": counter})
    compiled = torch.compile(model, backend=counter)
    patterns, frames, all_run = set(), [], []
    for step in [*range(9), 0, 1, 7, 8]:  # the whole run, then back to random and to all-on again
        ctl.load_state_dict({**ctl.state_dict(), "step": step})
        patterns.add(tuple(ctl.active))
        all_run.append(all(ctl.active))
        compiled_loss = compiled(*tokens()).pow(2).mean()
        compiled_loss.backward()
        frames.append(counter.frame_count)
        compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        eager_loss = model(*tokens()).pow(2).mean()
        eager_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
        for i, keep in enumerate(ctl.active):
            weight = f"transformer.h.{i}.mlp.c_fc.weight"
            if keep:
                torch.testing.assert_close(compiled_grads[weight], model.get_parameter(weight).grad,
                                           rtol=1e-3, atol=1e-5)
            else:  # skipped: never ran (regional: no gradient; cond: zero gradient)
                assert weight not in compiled_grads or torch.count_nonzero(compiled_grads[weight]) == 0
        model.zero_grad(set_to_none=True)
    assert len(patterns) >= 3 and True in all_run and False in all_run
    # The random-pattern graph(s) of the first step, plus one whole-model graph the first time every
    # unit runs; nothing after that, whatever the stage or pattern.
    first_all_run = all_run.index(True)
    assert frames[first_all_run] - frames[first_all_run - 1] == 1 and frames[-1] == frames[first_all_run], frames
    assert frames[first_all_run - 1] == frames[0], "a random gate pattern recompiled"
    if compile_mode == "cond":
        assert frames[-1] == 2  # the whole model is one graph, per kind of step
    else:
        gates = [block.forward for block in model.transformer.h]
        assert all(g.compiled_forward is not None for g in gates)  # every unit ran compiled


@pytest.mark.parametrize("compile_mode", ["regional", "cond"])
def test_full_model_steps_compile_to_the_untransformed_graph(compile_mode):
    """Every unit on: no graph break at the gates, the same ops as the untransformed model."""
    def compiled_ops(transformed: bool) -> tuple[int, int]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(n_layer=4)
        counter = CompileCounterWithBackend("eager")
        if transformed:
            transform(model, FullModel(), compile_mode=compile_mode, compile_options={"backend": counter})
        torch.compile(model, backend=counter)(*tokens()).sum().backward()
        return counter.frame_count, counter.op_count

    assert compiled_ops(True) == compiled_ops(False) == (1, compiled_ops(False)[1])


@pytest.mark.parametrize("depth", [False, True], ids=["width", "depth-x-width"])
def test_width_run_compiles_once_per_kept_size_and_matches_eager(depth):
    """Every unit shares one compiled graph per kept size: a per-unit guard would recompile per unit
    (and past dynamo's cache limit, fall back to eager without a word)."""
    from raptr_fx import WidthRaPTr

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(n_layer=4)
    counter = CompileCounterWithBackend("inductor")
    schedule = (RaPTr("2-3-4", total_steps=9, width="0.5-0.75-1") if depth
                else WidthRaPTr("0.5-0.75-1", total_steps=9))
    ctl = transform(model, schedule, seed=1, example_inputs=tokens(), compile_options={"backend": counter})
    # The heads of the fused c_attn are cut too: their rewritten attention graphs compile per kept size as well.
    assert {g.kind for g in ctl.width_groups} == {"mlp", "heads"} and all(g.rewrite for g in ctl.width_groups
                                                                          if g.kind == "heads")
    compiled = torch.compile(model, backend=counter)
    frames_per_stage = []
    for step in range(9):
        compiled_loss = compiled(*tokens()).pow(2).mean()
        compiled_loss.backward()
        grad = model.transformer.h[0].mlp.c_fc.weight.grad.clone()
        model.zero_grad(set_to_none=True)
        eager_loss = model(*tokens()).pow(2).mean()
        eager_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, model.transformer.h[0].mlp.c_fc.weight.grad, rtol=1e-3, atol=1e-5)
        model.zero_grad(set_to_none=True)
        if step % 3 == 2:
            frames_per_stage.append(counter.frame_count)
        ctl.step()
    # One graph for all units per distinct kept size (32, 48, all): two more after the first stage.
    assert frames_per_stage[0] <= 2 and frames_per_stage[-1] - frames_per_stage[0] <= 2, frames_per_stage


def test_regional_units_lower_their_backward_at_forward_and_leave_the_setting_as_it_was():
    """The gate turns on ``force_non_lazy_backward_lowering`` around each regional unit (a lazy
    lowering inside DDP's backward was seen to hang) and puts the user's value back after it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(n_layer=3)
    ctl = transform(model, RaPTr("2-3", total_steps=4), seed=0, compile_options={"backend": "eager"})
    seen = []
    for gate in (block.forward for block in model.transformer.h):
        def recorder(*args, _original=gate.original, **kwargs):
            seen.append(torch._functorch.config.force_non_lazy_backward_lowering)
            return _original(*args, **kwargs)
        gate.compiled_forward = recorder
    with ctl.force(active=[True, False, True]):  # a random pattern: the gates leave the graph
        for user_setting in (False, True):
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=user_setting):
                torch.compile(model, backend="eager")(*tokens()).sum().backward()
                assert torch._functorch.config.force_non_lazy_backward_lowering is user_setting
        assert seen == [True] * 4  # two kept units, two steps
