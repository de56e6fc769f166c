import math

import pytest

from raptr_fx import FullModel, LayerDrop, ProgressiveLayerDrop, RaPTr, Stage, StochasticDepth, plan
from raptr_fx.schedules import overall_compute


def test_string_schedule_makes_equal_stages():
    schedule = RaPTr("6-8-10-12", total_steps=100)
    assert [s.steps for s in schedule.resolved] == [25, 25, 25, 25]
    assert [s.active for s in schedule.resolved] == [6, 8, 10, 12]
    assert schedule.stage_bounds() == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert [schedule.stage_index(t) for t in (0, 24, 25, 99, 100, 10_000)] == [0, 0, 1, 3, 3, 3]


def test_remainder_steps_go_to_the_last_stages():
    assert [s.steps for s in RaPTr("6-8-10-12", total_steps=10).resolved] == [2, 2, 3, 3]


def test_keep_probability_uses_the_fixed_set():
    schedule = RaPTr("6-8-10-12", total_steps=100)
    keep = schedule.keep_probabilities(0, 12)
    assert keep[0] == keep[11] == 1.0
    assert keep[1:11] == [pytest.approx(0.4)] * 10  # (6 - 2) / (12 - 2)
    assert schedule.keep_probabilities(99, 12) == [1.0] * 12


def test_custom_fixed_set_and_negative_indices():
    schedule = RaPTr("4-8", total_steps=10, fixed_units=[0, 1, -1])
    assert schedule.fixed(8) == {0, 1, 7}
    assert schedule.keep_probabilities(0, 8)[2] == pytest.approx((4 - 3) / (8 - 3))


def test_paper_compute_saving_for_6_8_10_12():
    rows = plan(RaPTr("6-8-10-12", total_steps=100), 12)
    assert [r.compute for r in rows] == pytest.approx([0.5, 8 / 12, 10 / 12, 1.0])
    assert overall_compute(rows) == pytest.approx(0.75)


def test_compute_is_weighted():
    rows = plan(RaPTr([Stage(10, keep=0.5)], fixed_units=[0]), 3, weights=[2.0, 1.0, 1.0])
    assert rows[0].compute == pytest.approx((2 + 0.5 + 0.5) / 4)


def test_explicit_stages_with_full_model_warmup():
    schedule = RaPTr([Stage(100, keep=1.0), Stage(200, active=6), Stage(300, active=12)], total_steps=600)
    assert schedule.keep_probabilities(0, 12) == [1.0] * 12
    assert schedule.keep_probabilities(150, 12)[5] == pytest.approx(0.4)
    assert schedule.describe() == "RaPTr p1-6-12"


@pytest.mark.parametrize("kwargs, message", [
    (dict(stages="6-8-x", total_steps=10), "not of the form"),
    (dict(stages="6-8", total_steps=None), "needs total_steps"),
    (dict(stages="6-8", total_steps=0), "total_steps must be a positive int, got 0"),
    (dict(stages=[Stage(5, active=2)], total_steps=10), "stages cover 5 steps but total_steps=10"),
    (dict(stages="6-8", total_steps=10, sampling="poisson"), "'poisson'"),
    (dict(stages="6-8", total_steps=10, fixed_units="middle"), "'middle'"),
    (dict(stages=[], total_steps=None), "list of Stage"),
])
def test_bad_schedules_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RaPTr(**kwargs)


@pytest.mark.parametrize("stage, message", [
    (dict(steps=0, active=2), "steps must be a positive int, got 0"),
    (dict(steps=5), "exactly one of"),
    (dict(steps=5, active=2, keep=0.5), "exactly one of"),
    (dict(steps=5, keep=1.5), r"keep must be in \(0, 1\], got 1.5"),
    (dict(steps=5, keep=0.0), r"keep must be in \(0, 1\], got 0.0"),
])
def test_bad_stages(stage, message):
    with pytest.raises(ValueError, match=message):
        Stage(**stage)


def test_validate_against_the_model():
    with pytest.raises(ValueError, match=r"active=13 is outside \[2, 12\]"):
        RaPTr("6-13", total_steps=10).validate(12)
    with pytest.raises(ValueError, match="fixed unit 12 is outside the model's 12 units"):
        RaPTr("6-8", total_steps=10, fixed_units=[0, 12]).validate(12)


def test_progressive_layer_drop():
    pld = ProgressiveLayerDrop(theta_bar=0.5, gamma=0.001)
    assert pld.keep_probabilities(0, 4) == [1.0] * 4
    theta = 0.5 * math.exp(-1.0) + 0.5
    keep = pld.keep_probabilities(1000, 4)
    assert keep[0] == 1.0 and keep[2] == pytest.approx(1 - 2 / 4 * (1 - theta))
    assert keep == sorted(keep, reverse=True) and pld.scaling == "inverse"
    with pytest.raises(ValueError, match="theta_bar"):
        ProgressiveLayerDrop(theta_bar=0)


def test_stochastic_depth_layerdrop_full():
    assert StochasticDepth(0.2).keep_probabilities(0, 3) == pytest.approx([1.0, 0.9, 0.8])
    assert LayerDrop(0.25).keep_probabilities(7, 3) == [0.75] * 3 and LayerDrop().scaling == "none"
    assert FullModel().keep_probabilities(0, 3) == [1.0] * 3
    with pytest.raises(ValueError, match="got 1.0"):
        LayerDrop(1.0)
    with pytest.raises(ValueError, match="got -0.1"):
        StochasticDepth(-0.1)


# --- issue 8: schedules that shrink, arguments of the wrong type --------------------------------
@pytest.mark.parametrize("stages, message", [
    ("12-6", r"RaPTr stages 12-6 shrink \(active units 12 then 6\): RaPTr grows its subnetwork"),
    ([Stage(5, keep=0.5), Stage(5, keep=0.25)], r"stages p0.5-p0.25 shrink \(keep probability 0.5 then 0.25\)"),
])
def test_shrinking_raptr_points_at_progressive_layer_drop(stages, message):
    with pytest.raises(ValueError, match=message) as info:
        RaPTr(stages, total_steps=10 if isinstance(stages, str) else None)
    assert "use ProgressiveLayerDrop" in str(info.value)


def test_full_model_warmup_before_a_smaller_stage_is_not_shrinking():
    schedule = RaPTr([Stage(5, keep=1.0), Stage(5, active=6), Stage(5, active=12)])  # accepted
    schedule.validate(12)
    assert schedule.keep_probabilities(0, 12) == [1.0] * 12  # the warm-up runs every unit
    assert sum(schedule.keep_probabilities(5, 12)) == pytest.approx(6)  # then 6 of 12


def test_shrinking_first_stage_says_how_to_write_a_warmup():
    with pytest.raises(ValueError, match=r"warm-up stage first is written Stage\(steps, keep=1.0\)"):
        RaPTr("12-4-8-12", total_steps=40)  # "12" is not known to be every unit until the model is
    with pytest.raises(ValueError) as later:
        RaPTr("4-8-6", total_steps=30)
    assert "warm-up" not in str(later.value)


@pytest.mark.parametrize("make, message", [
    (lambda: RaPTr(12, total_steps=10), "stages must be a string"),
    (lambda: RaPTr("2-4", total_steps=10, fixed_units=[0, "last"]), "fixed_units must be 'ends' or a list"),
    (lambda: Stage(5, active="6"), "Stage.active must be a number, got '6'"),
    (lambda: ProgressiveLayerDrop(theta_bar="0.5"), "theta_bar must be a number"),
    (lambda: StochasticDepth(drop_rate=None), "drop_rate must be a number, got None"),
    (lambda: LayerDrop(p="x"), "LayerDrop p must be a number"),
    (lambda: plan(FullModel(), 3, [1.0, 2.0]), None),
])
def test_wrong_types_raise_type_or_value_errors_naming_the_value(make, message):
    with pytest.raises((TypeError, ValueError), match=message or "weights has 2 entries for 3 units"):
        make()
