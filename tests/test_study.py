"""The study file and the grid runner: validation before any training, skip / resume / failure / shards, and one
tiny study end to end with the real engine (slow).

The grid tests use `SimulatedTrainer`, which writes run folders in the contract's form in milliseconds; the
slow test trains real (tiny) models through papermill.
"""
import json
import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sun_seg.core import ParameterError, DataError, read_json
from sun_seg.study import (GridRun, RunLock, load_study, parse_study, read_yaml, resolve_grid, run_grid, run_state,
                           run_study, select_runs)
from sun_seg.testing import TINY_STUDY, SimulatedTrainer, simulate_study
from sun_seg.core import stable_hash

from conftest import ROOT
from lock_fixtures import hold_in_another_process, stop

STUDY = ROOT / "reports" / "study.yaml"


def toy_runs(n=6, epochs=3):
    return [GridRun(f"entry{k}", 0, {"model": "unet", "lr": 10.0 ** -(k % 4 + 2), "epochs": epochs},
                    f"unet-toy{k}-{k:012x}", {"T1": f"row {k}"}, {}) for k in range(n)]


def never_train(run, runs_dir):
    raise AssertionError(f"{run.entry} was trained although the study should have been refused")


# ---- the study file ---------------------------------------------------------------------------------------------

def test_repository_study_file_declares_the_study():
    study = load_study(STUDY)
    assert [e.name for e in study.runs if "T1" in e.tables] == [
        "unet-lr1e-2-20ep", "unet-lr1e-3-20ep", "unet-lr1e-4-20ep", "unet-lr1e-5-20ep", "unet-lr1e-4-75ep",
        "unet-lr1e-4-75ep-plateau"]
    t1 = [(e.params["lr"], e.params["epochs"], e.params.get("scheduler", "none")) for e in study.runs if "T1" in e.tables]
    assert t1 == [(0.01, 20, "none"), (0.001, 20, "none"), (0.0001, 20, "none"), (0.00001, 20, "none"),
                  (0.0001, 75, "none"), (0.0001, 75, "plateau")]
    t2 = [e for e in study.runs if "T2" in e.tables]
    assert len(t2) == 10
    # the study's reported values (deliverables.md, T2) are in the file, as data
    assert [e.reported["T2"]["val_miou"] for e in t2] == [0.2835, 0.2207, 0.1634, 0.4476, 0.4464, 0.4430, 0.4482,
                                                           0.4394, 0.4041, 0.4272]
    assert [e.reported["T2"]["trainable_params"] for e in t2][3:] == [28490, 28490, 32334154, 32334154, 32334154,
                                                                       32334154, 60155626]
    assert {e.name: e.reported["test_miou"] for e in study.evaluations} == {"best-unet": 0.278, "best-convnext": 0.430}
    assert [e.reported for e in study.effects] == [-0.06, -0.01, -0.12, -0.04]
    assert set(study.figures) >= {"F11", "F-imb", "Fa", "Fb", "F-top", "F3", "F4", "F5", "F13", "F6", "F7", "F8",
                                  "F9", "F16", "F17"}
    assert study.profiles["demo"].pretrained == {"ade20k": "pretrain"}
    assert study.profiles["full"].pretrained == {"ade20k": "openmmlab/upernet-convnext-tiny"}


def test_demo_profile_resolves_to_sixteen_distinct_runs():
    study = load_study(STUDY)
    runs = resolve_grid(study, "demo", lambda p: stable_hash(p), data_dir="/data", pretrain_dir="/weights")
    assert len(runs) == 16 and len({r.run_id for r in runs}) == 16
    by = {r.entry: r.params for r in runs}
    assert by["unet-lr1e-3-20ep"]["epochs"] == study.profiles["demo"].epochs[20]
    assert by["convnext-decoder-lr1e-4"]["pretrained"] == "/weights"
    assert by["convnext-decoder-lr1e-4"]["finetune"] == "decoder" and by["unet-plateau-lr1e-4"]["scheduler"] == "plateau"
    full = resolve_grid(study, "full", lambda p: stable_hash(p), data_dir="/data")
    assert {r.params["epochs"] for r in full} == {20, 75, 100}
    assert {r.params.get("pretrained") for r in full if r.params["model"] == "upernet"} == {"openmmlab/upernet-convnext-tiny"}


def _write(tmp_path, d, name="study.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.mark.parametrize("change, key", [
    (lambda d: d["runs"][3].update(prams={}), "runs[3] (unet-lr1e-5-20ep).prams"),
    (lambda d: d["profiles"]["demo"].update(epoch={}), "profiles.demo.epoch"),
    (lambda d: d["figures"]["F6"].update(split="train"), "figures.F6.split"),
    (lambda d: d["evaluations"][0]["among"].update(table="T9"), "evaluations[0].among"),
    (lambda d: d.update(seed=[1]), "parameter `seed`"),
])
def test_unknown_keys_are_refused_before_any_training(tmp_path, change, key):
    d = read_yaml(STUDY)
    change(d)
    path = _write(tmp_path, d)
    with pytest.raises(ParameterError) as e:
        run_study(path, "demo", tmp_path / "out", trainer=never_train)
    assert key in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_study_file_is_data_never_code(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.yaml"
    path.write_text(f"study: !!python/object/apply:os.system ['touch {marker}']\nseeds: [0]\n")
    with pytest.raises(DataError, match="evil.yaml"):
        load_study(path)
    assert not marker.exists()
    path.write_text("study: a\nseeds: [0]\nstudy: b\n")
    with pytest.raises(DataError, match="appears twice"):
        load_study(path)


def test_duplicate_runs_are_refused(tmp_path):
    d = read_yaml(STUDY)
    twin = dict(d["runs"][1], name="unet-lr1e-3-again", tables={"T1": "again"})
    twin.pop("reported")
    d["runs"].append(twin)
    with pytest.raises(ParameterError, match=r"runs\[16\] \(unet-lr1e-3-again\).*same run as 'unet-lr1e-3-20ep'"):
        resolve_grid(parse_study(d, tmp_path / "s.yaml"), "demo", lambda p: stable_hash(p), pretrain_dir="/w")
    d["runs"][-1]["name"] = "unet-lr1e-3-20ep"
    with pytest.raises(ParameterError, match="names two run entries"):
        parse_study(d, tmp_path / "s.yaml")


def test_unsafe_names_cannot_leave_the_output_folder(tmp_path):
    d = read_yaml(STUDY)
    d["runs"][0]["name"] = "../../etc"
    with pytest.raises(ParameterError, match="not a safe folder name"):
        parse_study(d, tmp_path / "s.yaml")
    bad = GridRun("x", 0, {}, "../escape", {"T1": "x"}, {})
    with pytest.raises(ParameterError, match="not a safe folder name"):
        run_grid([bad], tmp_path, SimulatedTrainer(), log=lambda s: None)


# ---- the grid runner --------------------------------------------------------------------------------------------

def test_skip_resume_failure(tmp_path):
    lines = []
    trainer = SimulatedTrainer(fail=["entry1"], diverge=["entry2"], interrupt={"entry3": 2})
    with pytest.raises(KeyboardInterrupt):
        run_grid(toy_runs(), tmp_path, trainer, log=lines.append)
    assert [run_state(tmp_path, r.run_id)[0] for r in toy_runs()] == [
        "completed", "failed", "diverged", "interrupted", "absent", "absent"]
    assert any("failed" in line and "simulated failure of entry1" in line for line in lines)  # the grid went on

    outcomes = run_grid(toy_runs(), tmp_path, trainer, log=lines.append)
    assert [o["action"] for o in outcomes] == ["skipped", "retried", "skipped", "resumed", "started", "started"]
    assert trainer.calls[-4:] == [("entry1", 0, 1), ("entry3", 0, 3), ("entry4", 0, 1), ("entry5", 0, 1)]
    # the resumed run ends exactly as an uninterrupted one would
    resumed = pd.read_csv(tmp_path / "runs" / toy_runs()[3].run_id / "history.csv")
    fresh_dir = tmp_path / "fresh"
    run_grid([toy_runs()[3]], fresh_dir, SimulatedTrainer(), log=lines.append)
    pd.testing.assert_frame_equal(resumed, pd.read_csv(fresh_dir / "runs" / toy_runs()[3].run_id / "history.csv"))

    before = len(trainer.calls)
    outcomes = run_grid(toy_runs(), tmp_path, trainer, log=lines.append)
    assert [o["action"] for o in outcomes] == ["skipped", "retried", "skipped", "skipped", "skipped", "skipped"]
    assert len(trainer.calls) == before + 1  # only the failed run was tried again
    record = read_json(tmp_path / "grid" / f"{toy_runs()[1].run_id}.json")
    assert record["attempts"] == 3 and record["status"] == "failed" and "Traceback" in record["traceback"]


def test_a_locked_run_is_left_to_its_owner(tmp_path):
    """A run held by another live process (the engine's own lock, runs/<id>/.lock) is skipped, saying by whom."""
    run = toy_runs(1)[0]
    holder = hold_in_another_process(tmp_path / "runs" / run.run_id / ".lock")
    try:
        lines = []
        outcomes = run_grid([run], tmp_path, SimulatedTrainer(), log=lines.append)
        assert outcomes[0]["action"] == "locked" and f"held by process {holder.pid} on " in lines[0]
        assert outcomes[0]["status"] == "running" and not (tmp_path / "runs" / run.run_id / "metrics.json").exists()
    finally:
        stop(holder)
    assert run_grid([run], tmp_path, SimulatedTrainer(), log=lines.append)[0]["status"] == "completed"


def test_shards_split_the_grid_and_merge(tmp_path):
    runs = toy_runs(7)
    slices = [select_runs(runs, shard=(i, 3)) for i in (1, 2, 3)]
    ids = [r.run_id for s in slices for r in s]
    assert sorted(ids) == sorted(r.run_id for r in runs) and len(ids) == len(set(ids))
    # three machines writing into one shared folder at the same time
    shared = tmp_path / "shared"
    threads = [threading.Thread(target=run_grid, args=(s, shared, SimulatedTrainer()), kwargs={"log": lambda s: None})
               for s in slices]
    for t in threads: t.start()
    for t in threads: t.join()
    assert all(run_state(shared, r.run_id)[0] == "completed" for r in runs)
    # or three separate folders, copied together afterwards: the same run folders
    for i, s in enumerate(slices):
        run_grid(s, tmp_path / f"machine{i}", SimulatedTrainer(), log=lambda s: None)
    merged = tmp_path / "merged"
    for i in range(3):
        shutil.copytree(tmp_path / f"machine{i}" / "runs", merged / "runs", dirs_exist_ok=True)
    for r in runs:
        assert (merged / "runs" / r.run_id / "metrics.json").read_text() == (shared / "runs" / r.run_id / "metrics.json").read_text()


def test_shards_of_a_study_merge_into_one_report(tmp_path):
    from sun_seg.analysis import load_runs, table_t2
    study = load_study(STUDY)
    whole = tmp_path / "whole"
    simulate_study(whole, study)
    sharded = tmp_path / "sharded"
    record = simulate_study(sharded, study, evaluate=False, trainer=SimulatedTrainer(fail=[e.name for e in study.runs]))
    # the record is written; now the three slices train into the same folder
    runs = [GridRun(**r) for r in record["runs"]]
    for i in (1, 2, 3):
        run_grid(select_runs(runs, shard=(i, 3)), sharded, SimulatedTrainer(), log=lambda s: None)
    a, b = load_runs(whole), load_runs(sharded)
    assert list(a.status) == list(b.status) == ["completed"] * 16
    pd.testing.assert_frame_equal(table_t2(whole).frame.drop(columns=["reason"]), table_t2(sharded).frame.drop(columns=["reason"]))


def test_only_selects_entries_tables_and_evaluations():
    runs = resolve_grid(load_study(STUDY), "demo", lambda p: stable_hash(p), pretrain_dir="/w")
    assert len(select_runs(runs, ["T1"])) == 6
    assert [r.entry for r in select_runs(runs, ["convnext-decoder-*"])] == [
        "convnext-decoder-lr1e-3", "convnext-decoder-lr1e-4", "convnext-decoder-lr1e-4-noaug", "convnext-decoder-lr1e-4-weighted"]
    assert select_runs(runs, ["T3"], other_names=["T3", "best-unet"]) == []
    with pytest.raises(ParameterError, match="matches no run"):
        select_runs(runs, ["T7"])


# ---- the real engine ----------------------------------------------------------------------------------------------

TINY = TINY_STUDY  # the tiny study file, shared with tests/test_behaviour_kept.py and the notebooks


def test_engine_and_study_agree_on_run_ids(tmp_path):
    """The study's run ids are the engine's: `sun-seg train` with the same parameters finds the same folder."""
    from sun_seg.study import engine_identify
    from sun_seg.train import TrainConfig, plan_run
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    study = load_study(path)
    data_dir = str(__import__("sun_seg.data.demo", fromlist=["demo_root"]).demo_root(n_train=16, n_test=6, scale=0.1, progress=False))
    runs = resolve_grid(study, "demo", engine_identify(tmp_path / "runs"), data_dir=data_dir, pretrain_dir=str(tmp_path))
    for r in runs[:2]:
        assert plan_run(TrainConfig.from_params({**r.params, "out_dir": str(tmp_path / "runs")}), quiet=True).run_dir == tmp_path / "runs" / r.run_id
    bad = TINY.replace("params: {lr: 0.001}", "params: {lr: 0.001, learning_rate: 0.1}")
    path.write_text(bad)
    with pytest.raises(ParameterError, match=r"runs\[0\] \(unet-a\)\.params\.learning_rate.*tiny.yaml"):
        run_study(path, "demo", tmp_path / "out", trainer=never_train)


@pytest.mark.slow
def test_tiny_study_end_to_end_through_papermill(tmp_path):
    """`sun-seg study` on a tiny grid: papermill runs, test evaluations, predictions, report; a rerun trains nothing."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "sun-seg"), "study", "--study", str(path), "--profile", "demo", "--out", str(out), "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = json.loads((out / "study.json").read_text())["runs"]
    for r in runs:
        metrics = read_json(out / "runs" / r["run_id"] / "metrics.json")
        assert metrics["status"] == "completed"
        assert (out / "runs" / r["run_id"] / "train.ipynb").is_file()  # the executed notebook is kept
    evaluations = read_json(out / "evaluations.json")
    for name in ("best-unet", "best-convnext"):
        assert evaluations[name]["status"] == "selected"
        assert "test" in read_metrics_of(out, evaluations[name]["run_ids"][0])
    assert (out / "qualitative" / "F8.npz").is_file() and (out / "figures" / "F8.png").is_file()
    assert (out / "site" / "index.html").is_file() and (out / "tables" / "T3.csv").is_file()
    pretrained = json.loads((out / "study.json").read_text())["pretrain"]
    assert pretrained["num_labels"] == 150 and pretrained["saved_with"] == "save_pretrained"
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0
    assert second.stdout.count("earlier, skipped") == len(runs) and "starting" not in second.stdout


def read_metrics_of(out, run_id):
    return read_json(out / "runs" / run_id / "metrics.json")


# ---- the method card (GitHub issue 10) --------------------------------------------------------------------------

def test_method_card_is_what_the_code_does():
    """Every `ours` value of reports/study.yaml's method card equals sun_seg.train.method_values under the full profile
    (the parameters and the engine's fixed choices), and every such choice is declared: the card cannot drift."""
    from sun_seg.study import check_method_card, method_values_of
    study = load_study(STUDY)
    check_method_card(study)
    declared = {k for e in study.method.values() for k in e["ours"]}
    assert declared == set(method_values_of(study, "full"))
    assert {"validation_split", "augmentation", "loss", "class_weights", "optimizer", "scheduler", "early_stopping",
            "image_size", "evaluation", "precision", "pretrained"} <= set(study.method)
    for name, entry in study.method.items():
        assert entry["study"] and entry["why"], name
    d = read_yaml(STUDY)
    d["method"]["optimizer"]["ours"]["weight_decay"] = 0.01
    with pytest.raises(ParameterError, match=r"method\.optimizer\.ours\.weight_decay.*the code uses 0\.0"):
        check_method_card(parse_study(d, STUDY))


def test_method_card_quotes_are_the_studys_words():
    """Every quoted phrase in a card's `study` field is in the study's text (or the field says "not stated")."""
    import re
    texts = sorted(Path("/work/shared/study").glob("000_*.txt")) if Path("/work/shared/study").is_dir() else []
    if not texts: pytest.skip("the study's text is not on this machine")
    text = re.sub(r"[*\s]+", " ", texts[0].read_text())
    for name, entry in load_study(STUDY).method.items():
        quotes = re.findall(r'"([^"]+)"', entry["study"])
        assert quotes or entry["study"].startswith("not stated"), name
        for q in quotes:
            if entry["study"].startswith("not stated"): continue
            assert re.sub(r"\s+", " ", q) in text, (name, q)


def test_t1_sweep_trains_its_whole_budget_under_every_profile():
    """The T1 rows run without early stopping (patience 0) as the study ran them, in the full and the demo profile."""
    from sun_seg.study import resolve_params
    study = load_study(STUDY)
    for profile in ("full", "demo"):
        for e in study.runs:
            params = resolve_params(study, study.profiles[profile], e, 0, pretrain_dir="/x")
            assert (params["patience"] == 0) == ("T1" in e.tables), (profile, e.name)


def test_study_list_prints_the_method_card(tmp_path):
    lines = []
    run_study(STUDY, "demo", tmp_path / "out", trainer=never_train, list_only=True, log=lines.append)
    text = "\n".join(lines)
    assert "Method card" in text and "validation split: val_method=seeded" in text
    assert "row unet-lr1e-2-20ep: patience=0, epochs=2" in text and "profile demo: image_size=64x80" in text
