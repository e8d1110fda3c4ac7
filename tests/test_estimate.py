"""The grid's remaining-time estimate against the timings a real demo grid recorded (issue 13).

`tests/data/demo_grid_timings.json` holds, for each of the 16 runs of a `make demo` grid in grid order, the run's
parameters, its epochs' seconds (history.csv) and its seconds as the grid measured it (grid/<run_id>.json).
"""
import json
import math
from pathlib import Path

import pytest

from sun_seg.estimate import GridEstimate, RunTiming
from sun_seg.study import epoch_cost

RECORDED = json.loads((Path(__file__).parent / "data" / "demo_grid_timings.json").read_text())["runs"]


def _replay(done: int) -> tuple[float, float, float]:
    """The estimate after the first `done` runs, the truth, and the old estimate (mean run time x runs left)."""
    estimate = GridEstimate(epoch_cost=epoch_cost)
    for r in RECORDED[:done]:
        estimate.add(RunTiming.from_run(r["params"], r["epoch_seconds"], r["seconds"]), r["params"])
    truth = sum(r["seconds"] for r in RECORDED[done:])
    naive = sum(r["seconds"] for r in RECORDED[:done]) / done * (len(RECORDED) - done)
    return estimate.remaining([r["params"] for r in RECORDED[done:]]), truth, naive


def test_estimate_is_within_25_percent_once_a_third_of_the_demo_grid_has_run():
    assert len(RECORDED) == 16 and {r["params"]["model"] for r in RECORDED} == {"unet", "upernet"}
    for done in range(math.ceil(len(RECORDED) / 3), len(RECORDED)):
        predicted, truth, naive = _replay(done)
        assert predicted == pytest.approx(truth, rel=0.25), (done, predicted, truth)
    predicted, truth, naive = _replay(math.ceil(len(RECORDED) / 3))
    assert abs(predicted - truth) < abs(naive - truth)  # the old estimate (spent / trained x left) was further off


def test_estimate_uses_early_stopping_seen_and_the_overhead():
    estimate = GridEstimate(epoch_cost=epoch_cost)
    for r in RECORDED[:6]:
        estimate.add(RunTiming.from_run(r["params"], r["epoch_seconds"], r["seconds"]), r["params"])
    fixed_budget = {**RECORDED[0]["params"], "patience": 0}  # a T1 row: trains its whole budget
    assert estimate.expected_epochs(fixed_budget) == fixed_budget["epochs"]
    one_epoch = estimate.run_seconds({**fixed_budget, "epochs": 1})
    two_epochs = estimate.run_seconds({**fixed_budget, "epochs": 2})
    assert one_epoch > two_epochs - one_epoch > 0  # a run costs its overhead once, plus its epochs
