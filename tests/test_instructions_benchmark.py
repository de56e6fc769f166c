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
