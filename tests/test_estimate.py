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


# ---- a grid of two slots (`run_grid(jobs=2)`, the demo's default on the 2-core reference machine) ----------------

SLOTS = json.loads((Path(__file__).parent / "data" / "demo_grid_timings_2_slots.json").read_text())


def _epochs_by(now: float, record: dict) -> list[float]:
    """The epochs of `record` (a run or the pretraining) that had ended by `now`: what its files showed then."""
    return [s for s, ended in zip(record["epoch_seconds"], record["epoch_ended"]) if ended <= now]


def _third_of_the_grid() -> float:
    """When a third of the grid's runs had finished."""
    return sorted(r["finished"] for r in SLOTS["runs"])[math.ceil(len(SLOTS["runs"]) / 3) - 1]


def _replay_slots(k: int, running_epochs: bool = True) -> tuple[float, float]:
    """At the start of the k-th run to start: the estimate the grid prints (`_eta`: runs finished so far; the epochs
    the running runs and the pretraining had timed, unless `running_epochs` is False; what the slots are doing; the
    rest over two slots) and the truth (the grid's last finish minus now)."""
    runs = sorted(SLOTS["runs"], key=lambda r: r["started"])
    now, end = runs[k]["started"], max(r["finished"] for r in runs)
    estimate = GridEstimate(epoch_cost=epoch_cost)
    for r in sorted((r for r in runs if r["finished"] <= now), key=lambda r: r["finished"]):
        estimate.add(RunTiming.from_run(r["params"], r["epoch_seconds"], r["seconds"]), r["params"])
    running = [r for r in runs[:k] if r["finished"] > now]
    pre = SLOTS["prerequisite"]
    if running_epochs:
        for name, r, params in [(r["run_id"], r, r["params"]) for r in running] + [("prerequisite", pre, pre["cost"])]:
            if seconds := _epochs_by(now, r): estimate.observe(name, params, seconds)
    busy = [(r["params"], now - r["started"]) for r in running]
    if pre["started"] <= now < pre["finished"]: busy.append((pre["cost"], now - pre["started"]))
    waiting = [r["params"] for r in runs[k:]]
    return estimate.remaining(waiting, jobs=SLOTS["jobs"], running=busy), end - now


def test_two_slot_estimate_is_within_25_percent_once_a_third_of_the_grid_has_run():
    runs = SLOTS["runs"]
    assert len(runs) == 16 and SLOTS["jobs"] == 2
    third = _third_of_the_grid()
    starts = sorted(r["started"] for r in runs)
    checked = 0
    for k, start in enumerate(starts):
        if start < third: continue
        predicted, truth = _replay_slots(k)
        assert predicted == pytest.approx(truth, rel=0.25), (k, predicted, truth)
        checked += 1
    assert checked >= 4


def test_two_slot_estimate_needs_what_the_running_work_timed():
    """Without the epochs of work still running (the pretraining's, a running run's), a model's time would come from
    counted FLOPs until a run of it ends: the first estimate after a third of the grid is then further off."""
    starts = sorted(r["started"] for r in SLOTS["runs"])
    k = next(k for k, start in enumerate(starts) if start >= _third_of_the_grid())
    predicted, truth = _replay_slots(k)
    unseen, _ = _replay_slots(k, running_epochs=False)
    assert abs(predicted - truth) < abs(unseen - truth), (predicted, unseen, truth)
