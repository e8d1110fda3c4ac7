"""Untrusted files read defensively: study files limited before parsing, damaged run records named per run.

- A study file larger than `MAX_STUDY_BYTES` (1 MiB) or nested deeper than `MAX_STUDY_DEPTH` (32) is refused before
  YAML reads it, naming the file and the limit; deep nesting never gives a raw `RecursionError`.
- A run folder's `metrics.json` or `history.csv` that is not UTF-8, not a JSON object, lacks fields or columns, holds
  text where numbers belong, or disagrees with the other (more epochs in the history than `metrics.json` completed)
  is a `RunRecordError` naming the file and the fault; the study records the run as damaged, skips it in the tables
  and the site shows it as "damaged: <reason>" - never a raw traceback, never shown as if true.
"""
import time

import pytest

from sun_seg.cli import main
from sun_seg.core import DataError
from sun_seg.study import MAX_STUDY_BYTES, MAX_STUDY_DEPTH, read_yaml

GOOD_HEAD = "study: limits\nseeds: [0]\n"


def test_large_study_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "study.yaml"
    # valid YAML (a long comment): without a size limit it is parsed and accepted
    path.write_text(GOOD_HEAD + "# " + "x" * (MAX_STUDY_BYTES + 10) + "\n")
    start = time.monotonic()
    with pytest.raises(DataError, match="1 MiB") as e:
        read_yaml(path)
    assert str(path) in str(e.value) and f"{MAX_STUDY_BYTES:,}" in str(e.value)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("nested", [
    "runs: " + "[" * 40 + "]" * 40 + "\n",  # flow brackets, within Python's recursion limit: parsed today
    "runs: " + "{a: " * 40 + "1" + "}" * 40 + "\n",
    "runs:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 40)) + " " * 40 + "v: 1\n",  # block indentation
    "runs:\n" + "".join("  " * i + "-\n" for i in range(1, 40)) + "  " * 40 + "- 1\n",  # nested block lists
])
def test_deeply_nested_study_file_is_refused_naming_the_limit(tmp_path, nested):
    path = tmp_path / "study.yaml"
    path.write_text(GOOD_HEAD + nested)
    with pytest.raises(DataError, match=f"deeper than {MAX_STUDY_DEPTH} levels") as e:
        read_yaml(path)
    assert str(path) in str(e.value)


def test_very_deep_nesting_is_a_named_error_not_a_recursion_error(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(GOOD_HEAD + "runs: " + "[" * 20000 + "]" * 20000 + "\n")  # a raw RecursionError in YAML today
    assert main(["study", "--study", str(path), "--profile", "demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"deeper than {MAX_STUDY_DEPTH} levels" in err and str(path) in err
    assert "Traceback" not in err and "RecursionError" not in err, err
    assert not (tmp_path / "out").exists()


def test_ordinary_study_files_pass_the_limits():
    from sun_seg.study import default_study_path, load_study
    assert load_study(default_study_path()).runs  # the repository's study file: far below both limits


# ---------------------------------------------------------------- damaged run records
import json
import shutil
from pathlib import Path

import pandas as pd

from sun_seg.runs import RunRecordError
from sun_seg.core import read_json
from sun_seg.study import load_study, read_study_record, record_runs, run_grid, run_state
from sun_seg.testing import SimulatedTrainer, simulate_study

STUDY = Path(__file__).resolve().parents[1] / "reports" / "study.yaml"


def _bytes(text): return lambda p: p.write_bytes(text)


def _edit_metrics(**changes):
    def edit(path):
        m = read_json(path)
        for k, v in changes.items():
            if v is ...: m.pop(k, None)
            else: m[k] = v
        path.write_text(json.dumps(m))
    return edit


def _edit_history(change):
    def edit(path):
        frame = pd.read_csv(path)
        change(frame).to_csv(path, index=False)
    return edit


def _text_in(frame):
    frame["val_loss"] = frame["val_loss"].astype(object)
    frame.loc[1, "val_loss"] = "lots"
    return frame


DAMAGES = {  # name: (file, damage(path), words of the fault)
    "metrics not UTF-8": ("metrics.json", _bytes(b'{"status": "completed\xff\xfe"}'), "is not UTF-8 text"),
    "metrics not JSON": ("metrics.json", _bytes(b'{"status": "compl'), "is not valid JSON"),
    "metrics a list": ("metrics.json", _bytes(b'[1, 2, 3]'), "holds a JSON list, not the object"),
    "metrics without status": ("metrics.json", _edit_metrics(status=...), "has status None"),
    "metrics text for a number": ("metrics.json", _edit_metrics(best_val_miou="high"), "best_val_miou 'high'; expected a number"),
    "metrics epochs not whole": ("metrics.json", _edit_metrics(epochs_completed=2.5), "epochs_completed 2.5"),
    "history not UTF-8": ("history.csv", lambda p: p.write_bytes(p.read_bytes() + b"\xff\xff\n"), "history.csv is not UTF-8 text"),
    "history text for a number": ("history.csv", _edit_history(_text_in), "val_loss is 'lots', not a number"),
    "history without a column": ("history.csv", _edit_history(lambda f: f.drop(columns=["val_miou"])), "lacks the column(s) val_miou"),
    "history an extra epoch": ("history.csv", _edit_history(lambda f: pd.concat([f, f.tail(1).assign(epoch=len(f) + 1)])),
                               "epochs but metrics.json says"),
    "history epochs out of order": ("history.csv", _edit_history(lambda f: f.iloc[::-1]), "where epoch 1 belongs"),
}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "out"
    simulate_study(out, load_study(STUDY))
    return out


def _completed_run(out: Path, k: int = 0):
    runs = [r for r in record_runs(read_study_record(out)) if run_state(out, r.run_id)[0] == "completed"]
    return runs[k]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_record_is_a_named_error_for_that_run(simulated, tmp_path, damage):
    from sun_seg.train import read_history, read_metrics
    out = tmp_path / "out"
    shutil.copytree(simulated, out)
    run = _completed_run(out)
    run_dir = out / "runs" / run.run_id
    name, hurt, words = DAMAGES[damage]
    hurt(run_dir / name)
    with pytest.raises(RunRecordError) as e:
        read_history(run_dir / "history.csv", read_metrics(run_dir))  # the training package's readers
    assert str(run_dir / name) in str(e.value) and words in str(e.value), str(e.value)
    status, reason = run_state(out, run.run_id)  # the study's
    assert status == "damaged" and reason.startswith("damaged: ") and words in reason and str(run_dir / name) in reason


def test_damaged_runs_are_recorded_shown_and_skipped(simulated, tmp_path, capsys):
    from sun_seg.analysis import build_tables, load_runs
    from sun_seg.report import build_site
    out = tmp_path / "out"
    shutil.copytree(simulated, out)
    damaged = {}
    for k, damage in enumerate(("metrics not UTF-8", "history text for a number", "history an extra epoch")):
        run = _completed_run(out, k)
        name, hurt, words = DAMAGES[damage]
        hurt(out / "runs" / run.run_id / name)
        damaged[run.run_id] = words
    # the grid again: the damaged runs are neither trained over nor counted, the others stay finished
    trainer = SimulatedTrainer()
    runs = record_runs(read_study_record(out))
    outcomes = {o["run_id"]: o for o in run_grid(runs, out, trainer, log=print)}
    assert trainer.calls == []  # every other run was finished
    for run_id, words in damaged.items():
        assert outcomes[run_id]["status"] == "damaged" and words in outcomes[run_id]["reason"]
        assert read_json(out / "grid" / f"{run_id}.json")["status"] == "damaged"
    assert "damaged: metrics.json is not UTF-8 text" in capsys.readouterr().out
    # tables: the damaged runs show their status and reason, and none of their numbers
    frame = load_runs(out).set_index("run_id")
    for run_id, words in damaged.items():
        assert frame.loc[run_id, "status"] == "damaged" and words in frame.loc[run_id, "reason"]
        assert pd.isna(frame.loc[run_id, "best_val_miou"]) and pd.isna(frame.loc[run_id, "epochs_completed"])
    build_tables(out)
    # the site: built without a traceback; each damaged run is a row and a page saying "damaged: <reason>"
    site = build_site(out, api=False, notebooks=False)
    listing = (site / "runs.html").read_text()
    for run_id, words in damaged.items():
        assert run_id in listing and "status-damaged" in listing
        page = (site / "runs" / f"{run_id}.html").read_text()
        assert "status-damaged" in page and "damaged: " in page and words.replace("'", "&#39;") in page
