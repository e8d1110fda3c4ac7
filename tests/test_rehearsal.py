"""The rehearsal of the full profile (`sun-seg study --rehearse`): its report is labelled REHEARSAL on every page with
the caps listed and projects the full study's device-hours; end to end on the CPU (slow) and on CUDA (cuda)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from sun_seg.analysis import build_analysis, load_history
from sun_seg.core import read_json
from sun_seg.report import build_site
from sun_seg.study import REHEARSAL_CAPS, load_study, rehearsal_profile, rehearsal_record
from sun_seg.testing import SimulatedTrainer, simulate_study

from conftest import ROOT


def _pages(site):
    return [p for p in site.rglob("*.html")]


def test_rehearsal_report_is_labelled_on_every_page_and_projects_the_full_study(tmp_path):
    out = tmp_path / "rehearsal"
    simulate_study(out, trainer=SimulatedTrainer())
    study = load_study()
    record = read_json(out / "study.json")
    record["rehearsal"] = rehearsal_record(study, rehearsal_profile(study, "cpu"), "cpu")
    (out / "study.json").write_text(json.dumps(record))
    run = next(r for r in record["runs"] if r["entry"] == "unet-lr1e-4-75ep")
    run_dir = out / "runs" / run["run_id"]
    # what a CPU rehearsal run records: 72 fit and 8 val images, steps of 2 micro-batches of 2 out of a batch of 64
    params = {**read_json(run_dir / "params.json"), "batch_size": 64, "max_train_batches": 1, "max_micro_batches": 2}
    (run_dir / "params.json").write_text(json.dumps(params))
    (run_dir / "data.json").write_text(json.dumps({**read_json(run_dir / "data.json"), "splits_used": {"fit": 72, "val": 8}}))
    (run_dir / "metrics.json").write_text(json.dumps({**read_json(run_dir / "metrics.json"), "micro_batch_size": 2, "world_size": 1}))
    history = load_history(out, run["run_id"])
    site = build_site(out, build_analysis(out, run_figures=False), api=False, notebooks=False)

    pages = _pages(site)
    assert len(pages) > 5
    for page in pages:
        text = page.read_text()
        assert 'id="rehearsal-banner"' in text and "REHEARSAL" in text, page.name
        assert "2 micro-batches of 2 images" in text and "native sizes" in text, page.name
    # T5: projected device-hours = the full budget (75) x (4,756 / train img/s + 529 / val img/s) / 3600
    train_ips = (4 / (4 / history.train_images_per_second)).mean()
    val_ips = (8 / (history.seconds - 4 / history.train_images_per_second)).mean()
    expected = 75 * (4756 / train_ips + 529 / val_ips) / 3600
    t5 = pd.read_csv(out / "tables" / "T5.csv").set_index("entry")
    assert t5.loc["unet-lr1e-4-75ep", "projected_hours"] == pytest.approx(expected, rel=1e-9)
    md = (out / "tables" / "T5.md").read_text()
    assert "Projected device-hours (full study)" in md and "REHEARSAL - projected" in md


def _assert_rehearsed(out, device):
    record = read_json(out / "study.json")
    assert record["rehearsal"]["device"] == device and record["data"]["kind"] == "demo"
    full = load_study()
    assert len(record["runs"]) == len(full.runs) * len(full.seeds)
    for run in record["runs"]:
        metrics = read_json(out / "runs" / run["run_id"] / "metrics.json")
        assert metrics["status"] == "completed", (run["entry"], metrics.get("reason"))
        assert metrics["eval_size"] == "original" and metrics["val"]["images"] == read_json(
            out / "runs" / run["run_id"] / "data.json")["splits_used"]["val"]
        assert metrics["micro_batch_size"] * metrics["accumulation_steps"] == 64  # the study's batch, accumulated
        assert read_json(out / "runs" / run["run_id"] / "data.json")["image_size"] == [480, 640]
    from sun_seg.data import SunRGBD
    from sun_seg.data.formats import SENSOR_SIZES
    test = SunRGBD(record["data"]["root"], "test")
    sizes = {tuple(test[i]["image"].shape[1:]) for i in range(len(test))}
    assert len(test) == 16 and len(sizes) > 1 and sizes <= set(SENSOR_SIZES.values())  # the sensors' native sizes
    tested = [m for m in (read_json(p) for p in (out / "runs").glob("*/metrics.json")) if m.get("test")]
    assert len(tested) >= 2 and all(m["test"]["images"] == 16 and m["test"]["eval_size"] == "original" for m in tested)
    t5 = pd.read_csv(out / "tables" / "T5.csv")
    assert t5.projected_hours.notna().all() and (t5.projected_hours > 0).all()
    for page in (out / "site").rglob("*.html"):
        assert "REHEARSAL" in page.read_text(), page


def _rehearse(out, device):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sun_seg_command = Path(sys.executable).parent / "sun-seg"
    done = subprocess.run([str(sun_seg_command), "study", "--rehearse", "--device", device, "--out", str(out), "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_cpu_rehearsal_end_to_end(tmp_path):
    """Every run and evaluation of the full profile on the CPU with its caps (about 15 minutes on 2 cores)."""
    _rehearse(tmp_path / "rehearsal", "cpu")
    _assert_rehearsed(tmp_path / "rehearsal", "cpu")
    metrics = [read_json(p) for p in (tmp_path / "rehearsal" / "runs").glob("*/metrics.json")]
    assert {(m["micro_batch_size"], m["accumulation_steps"]) for m in metrics} == {(2, 32)}
    assert REHEARSAL_CAPS["cpu"]["max_micro_batches"] == 2


@pytest.mark.cuda
def test_cuda_rehearsal_end_to_end(tmp_path):
    """Full global batches of 64 for a few steps per configuration, with the CUDA-only branches."""
    if not torch.cuda.is_available(): pytest.skip("no CUDA GPU")
    _rehearse(tmp_path / "rehearsal", "cuda")
    _assert_rehearsed(tmp_path / "rehearsal", "cuda")
    for p in (tmp_path / "rehearsal" / "runs").glob("*/params.json"):
        assert read_json(p).get("max_micro_batches", 0) == 0  # whole global batches
    t5 = pd.read_csv(tmp_path / "rehearsal" / "tables" / "T5.csv")
    print("projected device-hours of the full study:", t5.projected_hours.sum(), "on", set(t5.device))
