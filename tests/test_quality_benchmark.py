"""The quality benchmark's own machinery: equal-compute variants, LR re-warm-up, resumable results."""

import argparse
import json

import pytest

from benchmarks import quality


def mean_keep(method: str, steps: int) -> float:
    schedule, _ = quality.schedule_for(method, steps)
    return sum(sum(schedule.keep_probabilities(t, 12)) for t in range(steps)) / (steps * 12)


@pytest.mark.parametrize("method", ["raptr", *quality.DEFAULTS_VARIANTS])
@pytest.mark.parametrize("steps", [1200, 6000])
def test_every_defaults_variant_has_raptr_compute(method, steps):
    # The search compares variants with raptr and full-short directly: only fair at equal compute.
    assert mean_keep(method, steps) == pytest.approx(0.75, abs=0.002)


def test_recommended_pld_is_not_equal_compute():
    assert mean_keep("pld", 1200) > 0.85  # why pld-equal exists


def test_rewarm_ramps_after_each_transition_only():
    schedule, _ = quality.schedule_for("raptr-rewarm", 1200)  # stages start at 0, 300, 600, 900
    factors = [quality.rewarm_factor(t, schedule) for t in range(1200)]
    assert factors[:300] == [1.0] * 300  # the first stage has the LR schedule's own warm-up
    assert factors[300] == pytest.approx(1 / quality.REWARM_STEPS)
    assert factors[300 + quality.REWARM_STEPS - 1] == 1.0 and factors[300 + quality.REWARM_STEPS] == 1.0
    assert factors[899] == 1.0 and factors[900] < 0.1


def test_results_file_resumes(tmp_path):
    results = tmp_path / "runs.jsonl"
    args = argparse.Namespace(results=str(results), jobs=1, threads=1, verbose=False)
    run = quality.Run("tiny", "raptr", width=32, steps=8, lr=2e-3, init="gpt2", seed=0,
                      batch=4, seq=16, eval_every=4, eval_batches=1)
    first = quality.execute([run], args)
    lines = results.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["run"] == first[0]["run"]
    assert first[0]["steps_run"] == 8 and 0 < first[0]["block_compute"] <= 1

    again = quality.execute([run], args)  # already recorded: skipped, nothing appended
    assert results.read_text().splitlines() == lines
    assert again[0]["final_val"] == first[0]["final_val"]
