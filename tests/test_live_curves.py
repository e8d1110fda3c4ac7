"""Live curves: every run writes TensorBoard event files in its folder, one record per epoch over all its sessions,
and `sun-seg train` writes the executed notebook into the run folder as it runs."""
import json
import math
import subprocess
import sys
import time

import nbformat
import pytest

from sun_seg.core import CLASS_NAMES
from sun_seg.train import fit, read_history
from sun_seg.runs import EVENTS_PATTERN, epoch_scalars, read_events

from train_fixtures import InterruptAt, param_pairs, tiny_params, write_tiny_release

MAIN_TAGS = ["loss/train", "loss/val", "mIoU/val", "accuracy/val_pixel", "accuracy/val_mean_class", "lr",
             "speed/train_images_per_second", "time/epoch_seconds"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("data"))


def _assert_one_scalar_per_epoch(run_dir, epochs):
    events = read_events(run_dir)
    history = read_history(run_dir / "history.csv")
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    for tag in MAIN_TAGS:
        assert [step for step, _ in events[tag]] == list(range(1, epochs + 1)), tag  # each epoch once: no duplicates
    for row in history:  # the values are the history's (as float32)
        for tag, value in epoch_scalars(row).items():
            (logged,) = [v for step, v in events[tag] if step == row["epoch"]]
            assert math.isclose(logged, value, rel_tol=1e-6, abs_tol=1e-12), (tag, row["epoch"])
    assert any(t.startswith("IoU_val/") for t in events) and set(events) - set(MAIN_TAGS) <= {
        f"IoU_val/{c}" for c in CLASS_NAMES}


def test_events_one_scalar_per_epoch_and_a_resumed_run_continues_them(data, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_params(data, tmp_path), callbacks=[InterruptAt(epoch=2, step=1)], progress=False)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [s for s, _ in read_events(run_dir)["loss/train"]] == [1]  # the committed epoch is logged at once
    fit(tiny_params(data, tmp_path), progress=False)
    assert len(list(run_dir.glob(EVENTS_PATTERN))) == 2  # one file per session
    _assert_one_scalar_per_epoch(run_dir, 3)


@pytest.mark.slow
def test_epochs_a_killed_session_did_not_log_are_logged_on_resume(data, tmp_path):
    """A kill between an epoch's commit and its event record (simulated: the event files removed)."""
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_params(data, tmp_path), callbacks=[InterruptAt(epoch=3, step=1)], progress=False)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for f in run_dir.glob(EVENTS_PATTERN): f.unlink()
    fit(tiny_params(data, tmp_path), progress=False)
    _assert_one_scalar_per_epoch(run_dir, 3)


@pytest.mark.slow
def test_sun_seg_train_writes_the_notebook_into_the_run_folder_as_it_runs(data, tmp_path):
    """The run folder's train.ipynb exists (whole, readable) while the command still runs, before the run completes."""
    params = tiny_params(data, tmp_path / "runs", epochs=1)
    cli = [sys.executable, "-c", "import sys; from sun_seg.cli import main; sys.exit(main())"]
    proc = subprocess.Popen([*cli, "train", *param_pairs(params)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    seen_running, reads = None, 0
    try:
        while proc.poll() is None:
            for nb_path in (tmp_path / "runs").glob("*/train.ipynb"):
                nbformat.read(nb_path, as_version=4)  # never torn: papermill's saves are atomic there
                reads += 1
                metrics = nb_path.parent / "metrics.json"
                if seen_running is None and not (metrics.is_file() and json.loads(metrics.read_text())["status"] == "completed"):
                    seen_running = nb_path
            time.sleep(0.05)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert seen_running is not None and reads > 1, "the run folder had no notebook while the run was training"
    executed = nbformat.read(seen_running, as_version=4)
    assert executed.metadata.papermill["output_path"] == str(seen_running)  # written there from the start, not copied
    assert any(o.get("output_type") == "stream" and "epoch 1/1" in "".join(o.get("text", ""))
               for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert [s for s, _ in read_events(seen_running.parent)["mIoU/val"]] == [1]
