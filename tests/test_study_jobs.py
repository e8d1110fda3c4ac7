"""Several runs at once (GitHub issue 13): `run_study(jobs=2)` / `sun-seg study --jobs 2`.

Each run is `sun-seg train` in a process of its own with one thread (on two CPUs), the demo's pretraining takes a slot of
its own while the U-Net runs train, and the fine-tuned runs wait for it. Nothing about a run may depend on how many ran
beside it: the tiny study in two slots must record the same run ids and numbers as the same study run one at a time
(`tests/data/tiny_study_records.json`, written in one process on one thread).
"""
import json
import os
import shutil
from pathlib import Path

import pytest

from test_behaviour_kept import HOME, RECORDS, _close, study_records

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs a CPU affinity mask (Linux)")


@linux_only
def test_two_slots_record_the_same_runs_and_numbers_as_one(tmp_path):
    affinity = os.sched_getaffinity(0)
    if len(affinity) < 2: pytest.skip("needs two CPUs")
    os.sched_setaffinity(0, set(sorted(affinity)[:2]))  # two CPUs: two slots of one thread each (children inherit it)
    shutil.rmtree(Path(HOME) / "pretrained", ignore_errors=True)  # the pretraining must run, in a slot of its own
    try:
        records = study_records(tmp_path, jobs=2, notebook=False)
    finally:
        os.sched_setaffinity(0, affinity)
    _close(json.loads(RECORDS.read_text()), records)
    grid = tmp_path / "out" / "grid"
    assert (grid / "pretraining.log").is_file()
    for run_id in records["runs"]:
        assert (grid / f"{run_id}.log").is_file()  # each run's output, instead of the terminal
        assert json.loads((tmp_path / "out" / "runs" / run_id / "environment.json").read_text())["cpu_threads"] == 1
    assert json.loads((tmp_path / "out" / "study.json").read_text())["pretrain"]["num_labels"] == 150
