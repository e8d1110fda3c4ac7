"""Refactors keep behaviour (GitHub issue 11): a tiny study's run records, as the code before the split wrote them.

`tests/data/tiny_study_records.json` was written by this file's `study_records` on the code before the layers were
split (commit d68436c); the same tiny study (real engine, in this process, one thread; about 10 s) must give the same run ids,
statuses, epochs and numbers. Regenerate it only for a change that is meant to move numbers:
`python tests/test_behaviour_kept.py` (and say why in the commit).
"""
import json
import math
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RECORDS = HERE / "data" / "tiny_study_records.json"
HOME = "/tmp/sun-seg-behaviour-kept"  # SUN_SEG_HOME of this test (its demo data and pretrained weights are cached there)
METRIC_KEYS = ("status", "best_epoch", "best_val_miou", "epochs_completed", "stopped_early", "trainable_params",
               "total_params", "data_fingerprint", "data_label")
SPLIT_KEYS = ("miou", "pixel_accuracy", "mean_class_accuracy", "loss", "pixels", "images")
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_miou", "val_pixel_accuracy", "lr")


def _number(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def study_records(tmp: Path, **how) -> dict:
    """Run the tiny study of tests/test_study.py in this process on one thread and keep what must not move.

    `how`: other `run_study` arguments (e.g. `jobs=2, notebook=False`: runs in processes of their own, one thread each)."""
    import torch
    from sun_seg.study import inprocess_trainer, run_study
    from sun_seg.analysis import save_predictions
    from sun_seg.train import read_history
    from sun_seg.testing import write_tiny_study
    path = write_tiny_study(tmp)
    threads, home = torch.get_num_threads(), os.environ.get("SUN_SEG_HOME")
    torch.set_num_threads(1)
    os.environ["SUN_SEG_HOME"] = HOME  # the pretrained weights' folder enters the fine-tuned runs' ids: one fixed path
    try:
        trainer = None if how else inprocess_trainer("cpu", progress=False)
        result = run_study(path, "demo", tmp / "out", trainer=trainer, device="cpu", log=lambda _: None, **how)
        if any(s["status"] == "selected" for s in result["evaluations"].values()):  # as `sun-seg study` does
            save_predictions(result["out"], "cpu", log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
        if home is None: os.environ.pop("SUN_SEG_HOME")
        else: os.environ["SUN_SEG_HOME"] = home
    out = Path(result["out"])
    runs = {}
    for run in result["runs"]:
        folder = out / "runs" / run.run_id
        metrics = json.loads((folder / "metrics.json").read_text())
        record = {k: _number(metrics.get(k)) for k in METRIC_KEYS}
        for split in ("val", "test"):
            if split in metrics:
                record[split] = {k: _number(metrics[split].get(k)) for k in SPLIT_KEYS}
                record[split]["iou_per_class"] = {c: _number(v) for c, v in metrics[split]["iou_per_class"].items()}
        history = read_history(folder / "history.csv")
        record["history"] = [{k: _number(row[k]) for k in HISTORY_KEYS} for row in history]
        record["entry"], record["seed"] = run.entry, run.seed
        runs[run.run_id] = record
    evaluations = json.loads((out / "evaluations.json").read_text())
    study = json.loads((out / "study.json").read_text())
    return {"runs": runs,
            "evaluations": {k: {"status": v["status"], "run_ids": v.get("run_ids")} for k, v in evaluations.items()},
            "pretrain": {k: v for k, v in study["pretrain"].items() if k in ("num_labels", "saved_with", "images", "epochs")},
            "qualitative": sorted(p.name for p in (out / "qualitative").iterdir()),
            "picks": json.loads((out / "qualitative" / "F8.json").read_text())}


def _close(a, b, path="records"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a: _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)): _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_a_tiny_study_records_the_same_runs_and_numbers(tmp_path):
    """Same run ids, statuses, epochs, parameter counts, val/test numbers and histories as before the refactor."""
    _close(json.loads(RECORDS.read_text()), study_records(tmp_path))


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        RECORDS.write_text(json.dumps(study_records(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORDS}")
