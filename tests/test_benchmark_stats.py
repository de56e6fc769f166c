"""The speed benchmarks' statistics: ratios within rotated rounds, their intervals and verdicts."""

import pytest

from benchmarks import common
from benchmarks.common import Estimate, Interleaved, ratio_of_sums, trimmed_mean


def test_trimmed_mean_drops_the_bursts_at_both_ends():
    assert trimmed_mean([1.0] * 8 + [5.0, -3.0]) == 1.0
    assert trimmed_mean([1.0, 2.0, 3.0, 4.0]) == 2.5  # too few values to trim any


@pytest.mark.parametrize(("low", "high", "verdict"), [
    (0.99, 1.005, "met"), (1.02, 1.05, "MISSED"),
    (1.0, 1.02, "unresolved (point meets)"),
])
def test_a_target_is_judged_only_when_the_interval_is_on_one_side(low, high, verdict):
    assert Estimate(1.005, low, high, rounds=20).verdict(1.01) == verdict
    assert Estimate(1.005, 0.99, 1.005, rounds=4).verdict(1.01) == "no verdict (4 rounds)"


def test_interleaved_rotates_the_order_and_takes_each_ratio_within_its_round(monkeypatch):
    calls, clock = [], [0.0]  # a fake clock: step "a" takes 2 s, "b" 1 s
    durations = {"a": 2.0, "b": 1.0}

    def step(name):
        def run():
            calls.append(name)
            clock[0] += durations[name]
        return run

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    timing = Interleaved({"a": step("a"), "b": step("b")}, "cpu", before={"b": lambda: calls.append("pin")})
    timing.run(rounds=3, steps=1)
    assert calls == ["a", "pin", "b", "pin", "b", "a", "a", "pin", "b"]
    estimate = timing.ratio(lambda r: r["a"] / r["b"])
    assert (estimate.value, estimate.low, estimate.high) == (2.0, 2.0, 2.0)


def test_ratio_of_sums_is_paired():
    estimate = ratio_of_sums([(1.0, 2.0), (3.0, 6.0), (2.0, 4.0)] * 4)
    assert estimate.value == pytest.approx(0.5) and estimate.low == pytest.approx(0.5) == estimate.high
