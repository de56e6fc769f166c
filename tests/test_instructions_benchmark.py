"""benchmarks/instructions.py: how one valgrind process counts its variants in turn (no counts asserted)."""

from benchmarks.instructions import Rotation, Variant, warmed_step


def calls_as_the_timer_makes_them(rotation: Rotation, number: int, repeats: int) -> None:
    """Timer.collect_callgrind's script: min(number, 10) warm-up calls, then one block of ``number`` per repeat."""
    for _ in range(min(number, 10) + number * repeats):
        rotation()


def test_each_counted_block_runs_one_variant_and_the_warm_up_runs_the_first():
    ran = []
    steps = [lambda name=name: ran.append(name) for name in "abc"]
    calls_as_the_timer_makes_them(Rotation(steps, number=4), number=4, repeats=3)
    assert ran == ["a"] * 4 + ["a"] * 4 + ["b"] * 4 + ["c"] * 4


def test_the_warm_up_is_at_most_ten_calls():
    ran = []
    steps = [lambda name=name: ran.append(name) for name in "ab"]
    calls_as_the_timer_makes_them(Rotation(steps, number=12), number=12, repeats=2)
    assert ran == ["a"] * 10 + ["a"] * 12 + ["b"] * 12


def test_every_variant_builds_and_steps():
    tiny = dict(width=8, depth=4, batch=2)
    for variant in [Variant("untransformed", **tiny), Variant("gates", **tiny), Variant("all-on", **tiny),
                    Variant("k-of-L", units=2, **tiny), Variant("built", units=2, **tiny),
                    Variant("width", fraction=0.5, **tiny), Variant("width-unfrozen", fraction=0.5, **tiny),
                    Variant("built", fraction=0.5, **tiny), Variant("width", fraction=0.5, heads=2, **tiny),
                    Variant("built", fraction=0.5, heads=2, **tiny)]:
        warmed_step(variant)()


def test_the_heads_case_cuts_the_forward_flops_to_the_model_built_with_half_the_heads():
    """What the heads ratio compares: at f = 0.5 the cut runs the FLOPs of the model built with half the
    heads (so the instruction gap is the cut's own work, not extra arithmetic)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import raptr_fx
    from benchmarks.instructions import FOREVER, HEAD_DIM, HEADS, HEADS_BATCH, HEADS_DEPTH, SEQ, AttentionStack

    def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
        with FlopCounterMode(display=False) as counter:
            model(x)
        return counter.get_total_flops()

    torch.manual_seed(0)
    x = torch.randn(HEADS_BATCH, SEQ, HEADS * HEAD_DIM)
    full = AttentionStack(HEADS * HEAD_DIM, HEADS_DEPTH, HEADS, HEAD_DIM)
    built = AttentionStack(HEADS * HEAD_DIM, HEADS_DEPTH, HEADS // 2, HEAD_DIM)
    untransformed = forward_flops(full, x)
    schedule = raptr_fx.WidthRaPTr([raptr_fx.Stage(FOREVER, width=0.5)], width_kinds=("heads",))
    ctl = raptr_fx.transform(full, schedule, example_inputs=(x,))
    assert len(ctl.width_groups) == HEADS_DEPTH
    assert forward_flops(full, x) == forward_flops(built, x) < untransformed
