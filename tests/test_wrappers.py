"""Blocks wrapped by PyTorch's scaling recipe: activation checkpointing and per-block torch.compile,
applied before or after ``transform``, in every order; and discovery through the wrappers."""

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import raptr_fx
from raptr_fx import RaPTr, RaptrWarning, find_blocks, transform
from raptr_fx.gates import GatedForward, gate_of
from tests.fixtures.models import GPT, GPTBlock, tokens

UNITS = [f"transformer.h.{i}" for i in range(4)]
STEPS = 6


def model_with_blocks(wrap) -> GPT:
    """The GPT fixture with each block replaced, in its slot, by ``wrap(block)``."""
    torch.manual_seed(0)
    model = GPT(n_layer=4)
    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = wrap(block)
    return model


def train(model: GPT, ctl, steps: int = STEPS) -> tuple[list, list, list]:
    """SGD steps; per step the decisions, which units got gradients, and the loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl.attach(optimizer)
    decisions, ran, losses = [], [], []
    for _ in range(steps):
        decisions.append(ctl.active)
        loss = model(*tokens()).pow(2).mean()
        loss.backward()
        ran.append([any(p.grad is not None for p in model.transformer.h[i].parameters()) for i in range(4)])
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return decisions, ran, losses


def test_discovery_sees_through_checkpoint_and_compile_wrappers_and_names_the_slots():
    for wrap in (checkpoint_wrapper, lambda b: torch.compile(checkpoint_wrapper(b), backend="eager")):
        model = model_with_blocks(wrap)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        blocks = find_blocks(model, tokens())
        assert [b.name for b in blocks if b.droppable] == UNITS
        assert {b.module_type for b in blocks} == {"GPTBlock"}
        assert model.state_dict().keys() == state.keys()  # the wrappers are back in their slots
        assert all(type(m).__name__ in ("CheckpointWrapper", "OptimizedModule") for m in model.transformer.h)


def test_checkpointed_blocks_are_gated_outside_the_checkpoint_and_train_as_gated_blocks():
    """AC before or after transform: the gate sits on the wrapper, a skipped unit never enters the
    checkpoint, and training equals the same run without checkpointing."""
    torch.manual_seed(0)
    plain = GPT(n_layer=4)
    expected = train(plain, transform(plain, RaPTr("2-3-4", total_steps=STEPS), seed=3))
    assert any(not all(d) for d in expected[0])

    before = model_with_blocks(checkpoint_wrapper)
    ctl = transform(before, RaPTr("2-3-4", total_steps=STEPS), seed=3)
    assert all(isinstance(gate_of(m), GatedForward) for m in before.transformer.h)  # on the wrappers
    assert train(before, ctl) == expected

    torch.manual_seed(0)
    after = GPT(n_layer=4)
    ctl = transform(after, RaPTr("2-3-4", total_steps=STEPS), seed=3)
    for i, block in enumerate(after.transformer.h):
        after.transformer.h[i] = checkpoint_wrapper(block)
    assert train(after, ctl) == expected
    assert all(gate_of(m) is not None for m in after.transformer.h)
    assert not any(gate_of(m._checkpoint_wrapped_module) for m in after.transformer.h)
    ctl.remove()
    assert not any(gate_of(m) for m in after.modules())


def test_a_block_wrapped_after_the_controller_looked_is_moved_out_with_a_warning():
    torch.manual_seed(0)
    model = GPT(n_layer=4)
    ctl = transform(model, RaPTr("2-3-4", total_steps=STEPS), seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl.attach(optimizer)  # before wrapping: the first forward finds its gates inside the wrappers
    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = torch.compile(checkpoint_wrapper(block), backend="eager")
    with pytest.warns(RaptrWarning, match="wrapped .*OptimizedModule > CheckpointWrapper > GPTBlock.* ran uncompiled"):
        model(*tokens()).sum().backward()
    assert all(gate_of(m) is not None for m in model.transformer.h)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RaptrWarning)
        model(*tokens()).sum().backward()  # said once: the gates are outside now


def test_replacing_a_unit_with_another_module_is_refused_at_the_next_step():
    torch.manual_seed(0)
    model = GPT(n_layer=4)
    ctl = transform(model, RaPTr("2-3-4", total_steps=STEPS), seed=3)
    model.transformer.h[1] = GPTBlock()
    with pytest.raises(raptr_fx.RaptrError, match=r"transformer.h.1 now holds GPTBlock, which is not the unit"):
        ctl.step()


def test_discovery_leaves_no_trace_in_dynamo_for_blocks_compiled_in_place():
    """A block compiled in place (``block.compile()``) is traced as its own module: dynamo never
    runs during discovery, so a fresh block compiled afterwards compiles as in a fresh process."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    model = model_with_blocks(lambda b: b)
    for block in model.transformer.h:
        block.compile(backend=counter)
    assert [b.name for b in find_blocks(model, tokens()) if b.droppable] == UNITS
    assert counter.frame_count == 0 and all("_compiled_call_impl" in b.__dict__ for b in model.transformer.h)
    fresh = GPTBlock()
    fresh.compile(backend=counter)
    fresh(torch.randn(2, 8, 16))
    assert counter.frame_count == 1


@pytest.mark.compile
@pytest.mark.parametrize("compile_mode", ["regional", "cond"])
@pytest.mark.parametrize("order", ["transform-ac-compile", "ac-transform-compile", "ac-compile-transform",
                                   "compile-in-place-transform"])
def test_per_block_compile_under_checkpointing_compiles_like_the_untransformed_stack(order, compile_mode):
    """Every order of transform, activation checkpointing and per-block compile: the same graphs as
    the untransformed stack (one for every block), no recompile across stages, dropped units skipped,
    and the losses of the eager transformed run."""
    def build(transformed: bool):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        model = model_with_blocks(lambda b: b)
        ctl = None
        schedule = dict(schedule=RaPTr("2-3-4", total_steps=STEPS), seed=3, compile_mode=compile_mode)
        if order == "ac-transform-compile":
            for i, block in enumerate(model.transformer.h):
                model.transformer.h[i] = checkpoint_wrapper(block)
        if transformed and order in ("transform-ac-compile", "ac-transform-compile"):
            ctl = transform(model, **schedule)
        for i, block in enumerate(model.transformer.h):
            if order == "compile-in-place-transform":
                block.compile(backend=counter, fullgraph=True)
            else:
                wrapped = block if order == "ac-transform-compile" else checkpoint_wrapper(block)
                model.transformer.h[i] = torch.compile(wrapped, backend=counter, fullgraph=True)
        if transformed and ctl is None:
            ctl = transform(model, example_inputs=tokens(), **schedule)
        return model, ctl, counter

    model, ctl, counter = build(transformed=True)
    decisions, ran, losses = train(model, ctl)
    assert any(not all(d) for d in decisions) and all(decisions[-1])
    assert ran == decisions  # a dropped unit ran nothing: no gradient
    transformed_graphs = counter.frame_count

    torch.manual_seed(0)
    eager = GPT(n_layer=4)
    assert train(eager, transform(eager, RaPTr("2-3-4", total_steps=STEPS), seed=3))[2] == pytest.approx(losses, rel=1e-5)

    untransformed, _, counter = build(transformed=False)
    untransformed(*tokens()).sum().backward()
    assert transformed_graphs == counter.frame_count == 1


def test_fullgraph_with_regional_gates_names_the_modes_that_work():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(n_layer=4)
    transform(model, RaPTr("2-3-4", total_steps=STEPS), seed=3)
    with pytest.raises(Exception, match=r"compile_mode='cond'.*torch.compile each block after transform"):
        torch.compile(model, backend="eager", fullgraph=True)(*tokens())


class CheckpointInForwardGPT(GPT):
    """Activation checkpointing written into the model's forward, not applied to its blocks."""

    def forward(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return self.lm_head(self.transformer.ln_f(x))


def compile_whole_and_train(model: GPT, steps: int = 2) -> None:
    """Transform, compile the whole model (aot_eager) and take SGD steps."""
    torch._dynamo.reset()
    ctl = transform(model, RaPTr("2-3-4", total_steps=STEPS), seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl.attach(optimizer)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(steps):
        compiled(*tokens()).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.compile
def test_checkpoint_in_forward_under_whole_model_compile_warns_that_it_ran_uncompiled():
    # Dynamo cannot break the graph at a gate inside checkpoint's higher-order op: it runs the
    # model's loop uncompiled. Nothing in torch says so; the controller's step does.
    torch.manual_seed(0)
    with pytest.warns(RaptrWarning, match="ran a frame of your model uncompiled.*checkpoint_wrapper"):
        compile_whole_and_train(CheckpointInForwardGPT(n_layer=4))


@pytest.mark.compile
def test_regional_gates_under_whole_model_compile_do_not_warn_of_checkpoint():
    # Regional gates break the graph in the model's loop too, but there dynamo can break it.
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ran a frame of your model uncompiled", category=RaptrWarning)
        compile_whole_and_train(GPT(n_layer=4))
