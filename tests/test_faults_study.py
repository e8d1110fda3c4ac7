"""Faults of the study and its report, injected for real.

- A bad study file or command-line option is refused before any training starts, naming the parameter and the file.
- Study files are data: YAML tags that would run code are refused (and nothing runs); papermill gets literals only.
- A study interrupted mid-grid (Ctrl-C, SIGTERM; SIGKILL of `sun-seg study` and its kernel, slow) continues where it
  stopped: finished runs are not trained again, the interrupted one resumes from its last checkpoint, and the final
  tables equal those of an uninterrupted study.
- A run that diverges or fails (an exception, out of memory) is recorded with its status and reason; the grid goes
  on; tables and site show the run as a NaN row with its status, never as zeros; the next invocation retries it.
- The report site is offline and inert: no page refers outside the site or carries code, whatever the recorded
  strings and executed notebooks contain. Output paths never leave the output folder.
- Figures: titles and legends fit inside the figure and do not overlap.

Faults inside runs are injected through the engine's own callback hook (`sun_seg.train.Callback`) into real
trainings (a 4-channel U-Net on the generated demo data, in this process); the slow tests run `sun-seg study`
through papermill in a subprocess and kill it.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import sun_seg.study as study_module
from sun_seg.cli import main
from sun_seg.core import DataError, ParameterError, read_json
from sun_seg.study import GridRun, load_study, parse_study, read_yaml, run_state
from sun_seg.testing import SimulatedTrainer, simulate_study
from sun_seg.train import Callback, TrainConfig, fit, read_history

from conftest import ROOT
from lock_fixtures import held_locks

SUN_SEG = str(Path(sys.executable).parent / "sun-seg")
TIMING = {"seconds", "train_images_per_second"}  # history columns that measure the machine, not the training
TIMING_METRICS = {"wall_seconds", "train_images_per_second", "timeline"}

# Four U-Net runs of a few seconds each on the generated demo data (16 training images at 32x32, 2 epochs).
FAULT_STUDY = """
study: faults
title: A tiny study for the fault tests
seeds: [0]
defaults: {model: unet, batch_size: 4, epochs: 2, patience: 4, scheduler: none, image_size: 32, unet_width: 4, lr: 0.003}
profiles:
  demo:
    data: demo
    demo_data: {n_train: 16, n_test: 6, scale: 0.1}
    params: {}
tables:
  T1: {title: U-Net learning-rate sweep, columns: [epoch, val_loss, val_miou]}
  T2: {title: Training results, columns: [trainable_params, best_epoch, val_miou]}
runs:
  - {name: unet-lr1e-2, params: {lr: 0.01}, tables: {T1: "0.01"}, reported: {T1: {epoch: .nan, val_loss: .nan, val_miou: 0.008}}}
  - {name: unet-lr1e-3, params: {lr: 0.001}, tables: {T1: "0.001", T2: "0.001LR"}}
  - {name: unet-oom, params: {lr: 0.001, augment: false}, tables: {T2: "0.001LR + woAugment"}}
  - {name: unet-crash, params: {lr: 0.0003}, tables: {T2: "0.0003LR"}}
evaluations:
  - {name: best-unet, label: U-Net (best by val mIoU), among: {table: T2, model: unet}}
effects:
  - {name: augmentation off, baseline: unet-lr1e-3, variant: unet-oom}
figures:
  Fa: {kind: curves, runs: [unet-lr1e-2, unet-lr1e-3], title: training curves with a diverged run}
  F3: {kind: class_iou, split: val, runs: [unet-lr1e-3, unet-oom], title: IoU per class with a failed run}
"""


def write_study(folder: Path, text: str = FAULT_STUDY, name: str = "study.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def engine_trainer(faults: dict | None = None):
    """A grid trainer calling the real engine in this process, with fault callbacks per entry."""
    faults = faults or {}
    def train(run, runs_dir):
        fit(TrainConfig.from_params({**run.params, "out_dir": str(runs_dir)}), callbacks=faults.get(run.entry, ()),
            progress=False)
    return train


def use_trainer(monkeypatch, trainer):
    """`sun-seg study` (the command, in this process) trains with `trainer` instead of starting papermill kernels."""
    # the command leaves the trainer to `run_study`, which builds it for the profile's slots
    monkeypatch.setattr(study_module, "_default_trainer", lambda *args, **kwargs: trainer)


def never_trains(run, runs_dir):
    raise AssertionError(f"{run.entry} was trained although the study should have been refused")


class PoisonWeights(Callback):
    """A weight becomes NaN after the first step, so the next loss is NaN: how a too-high learning rate ends."""
    def after_step(self, trainer, epoch, step):
        if (epoch, step) == (1, 1):
            with torch.no_grad(): next(trainer.model.parameters()).fill_(float("nan"))


class Raise(Callback):
    """Raise `error` after a given step of a given epoch (epoch 2: the run has a checkpoint of epoch 1)."""
    def __init__(self, error, epoch=2, step=1): self.error, self.epoch, self.step = error, epoch, step
    def after_step(self, trainer, epoch, step):
        if (epoch, step) == (self.epoch, self.step): raise self.error


class Signal(Callback):
    """Send `signum` to this process after a given step, as a terminal's Ctrl-C or a cluster's stop would."""
    def __init__(self, signum, epoch=2, step=1): self.signum, self.epoch, self.step = signum, epoch, step
    def after_step(self, trainer, epoch, step):
        if (epoch, step) == (self.epoch, self.step): os.kill(os.getpid(), self.signum)


def run_ids(out: Path) -> dict:
    return {r["entry"]: r["run_id"] for r in read_json(out / "study.json")["runs"]}


def history_numbers(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_history(run_dir / "history.csv")]


def same_numbers(a, b) -> bool:
    """Equal, NaN equal to NaN, recursively (the JSON records)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_numbers(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_numbers(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b): return True
    return a == b


def metrics_numbers(run_dir: Path) -> dict:
    return {k: v for k, v in read_json(run_dir / "metrics.json").items() if k not in TIMING_METRICS}


def files_state(folder: Path) -> dict:
    """{relative path: (mtime_ns, size)} of every file under `folder`."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()}


def tables(out: Path, ids=("T1", "T2", "T3", "T4")) -> dict:
    return {t: pd.read_csv(out / "tables" / f"{t}.csv") for t in ids}


def assert_same_tables(a: Path, b: Path):
    for t, frame in tables(a).items():
        pd.testing.assert_frame_equal(frame, tables(b)[t], obj=t)


# ---- bad study files and options: refused before any training, naming the parameter and the file ----------------

def study_case(tmp_path, change) -> Path:
    d = yaml.safe_load(FAULT_STUDY)
    change(d)
    return write_study(tmp_path, yaml.safe_dump(d, sort_keys=False))


BAD_STUDIES = {  # id: (change to the study file, what the message names)
    "unknown top-level key": (lambda d: d.update(seed=[1]), "parameter `seed`"),
    "unknown key of an entry": (lambda d: d["runs"][1].update(prams={}), "runs[1] (unet-lr1e-3).prams"),
    "unknown training parameter": (lambda d: d["runs"][2]["params"].update(learning_rate=0.1),
                                   "runs[2] (unet-oom).params.learning_rate"),
    "unknown parameter in the profile": (lambda d: d["profiles"]["demo"]["params"].update(epoch=3),
                                         "profiles.demo.params.epoch"),
    "unknown parameter in the defaults": (lambda d: d["defaults"].update(batchsize=3), "defaults.batchsize"),
    "unknown key of a profile": (lambda d: d["profiles"]["demo"].update(pretrained_weights={}),
                                 "profiles.demo.pretrained_weights"),
    "unknown demo data argument": (lambda d: d["profiles"]["demo"]["demo_data"].update(images=3), "profiles.demo.demo_data"),
    "epochs as text": (lambda d: d["runs"][0]["params"].update(epochs="ten"), "runs[0] (unet-lr1e-2).params.epochs"),
    "learning rate as text": (lambda d: d["runs"][1]["params"].update(lr="fast"), "runs[1] (unet-lr1e-3).params.lr"),
    "negative batch size": (lambda d: d["defaults"].update(batch_size=-4), "defaults.batch_size"),
    "yes/no as text": (lambda d: d["runs"][2]["params"].update(augment="no"), "runs[2] (unet-oom).params.augment"),
    "unknown model": (lambda d: d["runs"][3]["params"].update(model="resnet"), "runs[3] (unet-crash).params.model"),
    "seeds as text": (lambda d: d.update(seeds="0, 1"), "parameter `seeds`"),
    "a seed twice": (lambda d: d.update(seeds=[0, 0]), "parameter `seeds`"),
    "runs as a mapping": (lambda d: d.update(runs={"a": 1}), "parameter `runs`"),
    "parameters as a list": (lambda d: d["runs"][0].update(params=[0.01]), "runs[0] (unet-lr1e-2).params"),
    "table label as a number": (lambda d: d["runs"][1]["tables"].update(T1=0.001), "runs[1] (unet-lr1e-3).tables.T1"),
    "reported value as text": (lambda d: d["runs"][0]["reported"]["T1"].update(val_miou="low"),
                               "runs[0] (unet-lr1e-2).reported.T1.val_miou"),
    "profile on unknown data": (lambda d: d["profiles"]["demo"].update(data="imagenet"), "profiles.demo.data"),
    "figure of an unknown run": (lambda d: d["figures"]["Fa"].update(runs=["unet-lr1e-4"]), "figures.Fa.runs"),
    "duplicate entry name": (lambda d: d["runs"].append(dict(d["runs"][1])), "runs[4].name"),
    "duplicate run": (lambda d: d["runs"].append({"name": "unet-lr1e-3-again", "params": {"lr": 0.001},
                                                  "tables": {"T2": "again"}}),
                      "runs[4] (unet-lr1e-3-again)` (in {path}): resolves to the same run as 'unet-lr1e-3'"),
}


@pytest.mark.parametrize("case", list(BAD_STUDIES))
def test_bad_study_file_is_refused_before_any_training(tmp_path, monkeypatch, capsys, case):
    change, named = BAD_STUDIES[case]
    path = study_case(tmp_path, change)
    use_trainer(monkeypatch, never_trains)
    out = tmp_path / "out"
    assert main(["study", "--study", str(path), "--profile", "demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert named.format(path=path) in err and str(path) in err, err
    assert "Traceback" not in err and not out.exists()  # refused before anything was written


@pytest.mark.parametrize("content, named", [
    (b"", "is empty"),
    (b"study: faults\nseeds: [0]\nstudy: again\n", "key 'study' appears twice"),
    (b"study: \xff\xfe faults\n", "not a text file in UTF-8"),
    (b"- a list\n- not a study\n", "expected a mapping"),
    (b"study: [unclosed\n", "not a valid study file"),
    (b"a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nstudy: *e\n", "anchors and aliases"),  # a "billion laughs"
], ids=["empty", "duplicate key", "binary", "a list", "broken YAML", "alias bomb"])
def test_unreadable_study_file_is_refused_naming_it(tmp_path, capsys, content, named):
    path = tmp_path / "study.yaml"
    path.write_bytes(content)
    assert main(["study", "--study", str(path), "--profile", "demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert named in err and str(path) in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, named", [
    (["--profile", "nope"], "parameter `profile`: got 'nope'; {path} defines demo"),
    (["--shard", "0/2"], "parameter `shard`: got '0/2'"),
    (["--shard", "3/2"], "parameter `shard`: got '3/2'"),
    (["--shard", "1/0"], "parameter `shard`: got '1/0'; n, the number of slices, must be at least 1"),
    (["--shard", "half"], "parameter `shard`: got 'half'; write i/n"),
    (["--shard", "1/2/3"], "parameter `shard`: got '1/2/3'"),
    (["--only", "unet-lr9*"], "parameter `only`: 'unet-lr9*' matches no run, table or evaluation; known:"),
    (["--data", "/somewhere"], "parameter `data`: profile 'demo' runs on the demo dataset"),
    (["--study", "{tmp}"], "{tmp}: is a folder"),
    (["--study", "{tmp}/missing.yaml"], "{tmp}/missing.yaml: study file not found"),
    (["--out", "{tmp}/a-file"], "parameter `out`: '{tmp}/a-file' cannot be the study's output folder"),
    (["--out", "{tmp}/a-file/below"], "parameter `out`: '{tmp}/a-file/below' cannot be the study's output folder"),
])
def test_bad_options_exit_2_naming_the_option(tmp_path, monkeypatch, capsys, options, named):
    path = write_study(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    use_trainer(monkeypatch, never_trains)
    options = [o.format(tmp=tmp_path) for o in options]
    args = ["study", "--study", str(path), "--profile", "demo", "--out", str(tmp_path / "out")]
    assert main(args + options) == 2
    err = capsys.readouterr().err
    assert named.format(path=path, tmp=tmp_path) in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_an_option_argparse_cannot_read_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", "--study", str(write_study(tmp_path)), "--shard"])
    assert e.value.code == 2 and "--shard" in capsys.readouterr().err


# ---- study files and parameters are data, never executed ---------------------------------------------------------

@pytest.mark.parametrize("tagged", [
    "study: !!python/object/apply:os.system ['touch {marker}']",
    "study: faults\nseeds: !!python/object/new:os.system ['touch {marker}']",
    "study: faults\nseeds: [0]\ntitle: !!python/name:os.system",
    "study: faults\nseeds: [0]\ndefaults: !!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
    "study: faults\nseeds: [0]\nruns:\n  - name: x\n    params: {{lr: !!python/object/apply:os.system ['touch {marker}']}}",
    "study: faults\nseeds: [0]\ntitle: !!binary aGVsbG8=\nsource: !!python/module:os",
])
def test_study_file_is_data_never_code(tmp_path, capsys, tagged):
    marker = tmp_path / "code-ran"
    path = tmp_path / "study.yaml"
    path.write_text(tagged.format(marker=marker) + "\n")
    assert main(["study", "--study", str(path), "--profile", "demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and ("could not determine a constructor" in err or "parameter `" in err), err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_parameters_reach_papermill_as_literals_only(tmp_path):
    """What papermill injects into the training notebook is assignments of constants, whatever the strings hold."""
    import ast
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    hostile = {"pretrained": 'x"\nimport os\nos.system("touch /tmp/pwned")\n"', "data_dir": "'''; __import__('os') #",
               "run_name": "a\\", "device": "cpu\n__import__('os').system('id')", "precision": "\u2028bf16\x00"}
    study = load_study(write_study(tmp_path))
    from sun_seg.study import resolve_grid
    runs = resolve_grid(study, "demo", lambda p: json.dumps(p, sort_keys=True), data_dir=str(tmp_path))
    for params in [{**r.params, **hostile, "out_dir": str(tmp_path / "runs")} for r in runs]:
        cell = next(c for c in parameterize_notebook(load_notebook_node(str(ROOT / "nbs" / "train.ipynb")), params).cells
                    if "injected-parameters" in c.metadata.get("tags", []))
        values = {}
        for node in ast.parse(cell.source).body:
            assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            v = node.value  # a literal, or float('nan') / float('inf') for non-finite numbers
            if isinstance(v, ast.Call):
                assert ast.unparse(v.func) == "float" and len(v.args) == 1 and isinstance(v.args[0], ast.Constant)
                values[node.targets[0].id] = float(v.args[0].value)
            else:
                values[node.targets[0].id] = ast.literal_eval(v)
        assert values == params


# ---- interruptions (in this process: Ctrl-C and SIGTERM reach the grid as they would from a terminal) -------------

INTERRUPT_STUDY = FAULT_STUDY.split("runs:")[0] + """runs:
  - {name: unet-a, params: {lr: 0.001, epochs: 1}, tables: {T1: "0.001", T2: "a"}}
  - {name: unet-b, params: {lr: 0.003, epochs: 3}, tables: {T1: "0.003", T2: "b"}}
  - {name: unet-c, params: {lr: 0.01, epochs: 1}, tables: {T2: "c"}}
"""


def test_ctrl_c_stops_the_study_and_it_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path, INTERRUPT_STUDY)
    out = tmp_path / "out"
    args = ["study", "--study", str(path), "--profile", "demo", "--out", str(out), "--quiet", "--no-report"]
    use_trainer(monkeypatch, engine_trainer({"unet-b": [Signal(signal.SIGINT, epoch=2, step=1)]}))
    assert main(args) == 130
    captured = capsys.readouterr()
    assert "interrupted" in captured.err and "Run the same command again to continue" in captured.err
    ids = run_ids(out)
    a_dir, b_dir = out / "runs" / ids["unet-a"], out / "runs" / ids["unet-b"]
    assert run_state(out, ids["unet-a"])[0] == "completed"
    status, reason = run_state(out, ids["unet-b"])
    assert status == "interrupted" and "again" in reason
    assert read_json(out / "grid" / f"{ids['unet-b']}.json")["status"] == "interrupted"
    assert read_json(b_dir / "metrics.json")["status"] == "interrupted"
    assert run_state(out, ids["unet-c"])[0] == "absent"  # the grid stopped: nothing after the interrupted run ran
    assert not held_locks(out)  # no lock left held to block the next invocation
    kept_a, first_epoch = files_state(a_dir), read_history(b_dir / "history.csv")
    assert len(first_epoch) == 1

    use_trainer(monkeypatch, engine_trainer())
    assert main(args) == 0
    lines = capsys.readouterr().out
    assert f"unet-a (seed 0, run {ids['unet-a']}): completed earlier, skipped" in lines
    assert f"unet-b (seed 0, run {ids['unet-b']}): resuming" in lines and f"unet-c (seed 0, run {ids['unet-c']}): starting" in lines
    assert files_state(a_dir) == kept_a  # not trained again: every file as it was
    resumed = read_history(b_dir / "history.csv")
    assert same_numbers(resumed[0], first_epoch[0])  # epoch 1 (its timing too) comes from the checkpoint: it was not recomputed
    assert read_json(b_dir / "environment.json")["resumed"] is True

    assert [r["epoch"] for r in resumed] == [1, 2, 3] and run_state(out, ids["unet-b"])[0] == "completed"


def test_sigterm_stops_the_study_like_ctrl_c(tmp_path, monkeypatch, capsys):
    """A cluster stopping the job (SIGTERM) leaves the run interrupted and resumable, and the handler is put back."""
    path = write_study(tmp_path, re.sub(r"  - \{name: unet-a,.*\n", "", INTERRUPT_STUDY))  # one run: the one stopped
    out = tmp_path / "out"
    use_trainer(monkeypatch, engine_trainer({"unet-b": [Signal(signal.SIGTERM, epoch=2, step=1)]}))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["study", "--study", str(path), "--profile", "demo", "--out", str(out), "--quiet", "--no-report"]) == 130
    assert "Run the same command again to continue" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    run_id = run_ids(out)["unet-b"]
    status, reason = run_state(out, run_id)
    assert status == "interrupted" and "after 1 finished epoch(s); run the same command again to resume it" in reason
    assert read_json(out / "runs" / run_id / "metrics.json")["status"] == "interrupted"
    assert len(read_history(out / "runs" / run_id / "history.csv")) == 1


# ---- divergence and failure: recorded, the grid goes on, NaN rows in tables and site -------------------------------

@pytest.fixture(scope="module")
def faulty_study(tmp_path_factory):
    """The fault study run once with a diverging run, an out-of-memory run and a crashing run, then its report."""
    tmp = tmp_path_factory.mktemp("faulty")
    path = write_study(tmp)
    out = tmp / "out"
    faults = {"unet-lr1e-2": [PoisonWeights()],
              "unet-oom": [Raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"))],
              "unet-crash": [Raise(RuntimeError("simulated crash <b>inside</b> a run"), epoch=1, step=2)]}
    mp = pytest.MonkeyPatch()
    use_trainer(mp, engine_trainer(faults))
    import contextlib, io
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["study", "--study", str(path), "--profile", "demo", "--out", str(out), "--quiet", "--no-report"])
        report_rc = main(["report", "--out", str(out), "--no-api"])
    mp.undo()
    return dict(path=path, out=out, rc=rc, report_rc=report_rc, stdout=stdout.getvalue(), stderr=stderr.getvalue(),
                ids=run_ids(out), site=out / "site")


def test_divergence_and_failures_are_recorded_and_the_grid_goes_on(faulty_study):
    out, ids = faulty_study["out"], faulty_study["ids"]
    assert faulty_study["rc"] == 1  # some runs are not finished: the command says so
    assert {e: run_state(out, i)[0] for e, i in ids.items()} == {
        "unet-lr1e-2": "diverged", "unet-lr1e-3": "completed", "unet-oom": "failed", "unet-crash": "failed"}
    assert read_json(out / "grid" / f"{ids['unet-crash']}.json")["attempts"] == 1  # trained after the failure before it
    diverged = read_json(out / "runs" / ids["unet-lr1e-2"] / "metrics.json")
    assert diverged["status"] == "diverged" and "nan" in diverged["reason"].lower()
    assert diverged["best_epoch"] is None and math.isnan(diverged["best_val_miou"])
    oom = read_json(out / "runs" / ids["unet-oom"] / "metrics.json")
    assert oom["status"] == "failed" and "memory" in oom["reason"].lower() and oom["epochs_completed"] == 1
    record = read_json(out / "grid" / f"{ids['unet-oom']}.json")
    assert record["status"] == "failed" and "memory" in record["reason"].lower() and "OutOfMemoryError" in record["traceback"]
    crash = read_json(out / "grid" / f"{ids['unet-crash']}.json")
    assert crash["status"] == "failed" and "simulated crash <b>inside</b> a run" in crash["reason"]
    # the summary of the command lists them with status and reason
    summary = faulty_study["stdout"]
    for entry, why in (("unet-lr1e-2", "nan"), ("unet-oom", "memory"), ("unet-crash", "simulated crash")):
        line = next(l for l in summary.splitlines() if l.strip().startswith(entry + " "))
        assert run_state(out, ids[entry])[0] in line and why in line.lower(), line
    assert "2 not finished (unet-oom: failed, unet-crash: failed; the same command again retries them)" in summary
    # the test evaluation chose among the completed runs only
    evaluations = read_json(out / "evaluations.json")
    assert evaluations["best-unet"]["status"] == "selected" and evaluations["best-unet"]["entry"] == "unet-lr1e-3"


def test_tables_show_nan_rows_with_status_never_zeros(faulty_study):
    out = faulty_study["out"]
    assert faulty_study["report_rc"] == 0
    t1, t2 = (pd.read_csv(out / "tables" / f"{t}.csv").set_index("entry") for t in ("T1", "T2"))
    for frame, entry, status in ((t1, "unet-lr1e-2", "diverged"), (t2, "unet-oom", "failed"), (t2, "unet-crash", "failed")):
        row = frame.loc[entry]
        assert row.status == status and isinstance(row.reason, str) and row.reason
        for column in ("best_epoch", "best_val_miou"):
            assert math.isnan(row[column]), (entry, column, row[column])
    assert math.isnan(t1.loc["unet-lr1e-2", "val_loss"])
    assert t1.loc["unet-lr1e-3", "status"] == "completed" and not math.isnan(t1.loc["unet-lr1e-3", "best_val_miou"])
    t4 = pd.read_csv(out / "tables" / "T4.csv")
    assert math.isnan(t4.effect[0]) and "failed" in t4.status[0]  # an effect of a failed run is unknown, not 0
    for table, label in (("T1", "| 0.01 |"), ("T2", "| 0.001LR + woAugment |"), ("T2", "| 0.0003LR |")):
        row = next(l for l in (out / "tables" / f"{table}.md").read_text().splitlines() if label in l)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells.count("NaN") >= 3 and ("failed" in cells or "diverged" in cells), row
        assert not any(re.fullmatch(r"[+-]?0(\.0+)?", c) for c in cells), row  # never shown as zero


class Cells(HTMLParser):
    """The rows of the HTML tables of a page: [[(text, class), ...], ...]."""
    def __init__(self):
        super().__init__()
        self.rows, self._cell = [], None
    def handle_starttag(self, tag, attrs):
        if tag == "tr": self.rows.append([])
        if tag == "td": self._cell = ["", dict(attrs).get("class") or ""]
    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None: self.rows[-1].append(tuple(self._cell)); self._cell = None
    def handle_data(self, data):
        if self._cell is not None: self._cell[0] += data


def page_rows(page: Path) -> list:
    parser = Cells()
    parser.feed(page.read_text())
    return [r for r in parser.rows if r]


def test_site_shows_failed_and_diverged_runs_as_nan_rows(faulty_study):
    out, site, ids = faulty_study["out"], faulty_study["site"], faulty_study["ids"]
    rows = page_rows(site / "tables.html")
    for label, status in (("0.01", "diverged"), ("0.001LR + woAugment", "failed"), ("0.0003LR", "failed")):
        row = next(r for r in rows if any(text == label for text, _ in r))
        texts = [t for t, _ in row]
        assert status in texts and texts.count("NaN") >= 3, row
        assert any(f"status-{status}" in cls for _, cls in row) and any("nan" in cls.split() for _, cls in row)
        assert not any(re.fullmatch(r"[+-]?0(\.0+)?", t) for t in texts), row
    runs = site / "runs.html"
    text = runs.read_text()
    assert "simulated crash &lt;b&gt;inside&lt;/b&gt; a run" in text  # the reason, as text
    assert "<b>inside</b>" not in text
    for entry in ("unet-lr1e-2", "unet-oom", "unet-crash"):
        page = (site / "runs" / f"{ids[entry]}.html").read_text()
        assert f"status-{run_state(out, ids[entry])[0]}" in page and (run_state(out, ids[entry])[1] or "")[:20].replace("<", "&lt;") in page
    figures = {f["id"]: f for f in read_json(out / "analysis.json")["figures"]}
    assert figures["Fa"]["png"] and figures["F3"]["png"]  # drawn with the runs that have numbers...
    assert "U-Net: 0.01 (diverged: " in figures["Fa"]["caption"]  # ...and the others named with their status
    assert "U-Net: 0.001LR + woAugment (failed: " in figures["F3"]["caption"]
    assert "<!-- U-Net: 0.001LR + woAugment (no result) -->" in (out / "figures" / "F3.svg").read_text()  # no zero bars
    shown = page_text(site / "figures.html")
    assert "U-Net: 0.01 (diverged: " in shown and "U-Net: 0.001LR + woAugment (failed: " in shown


def test_the_next_invocation_retries_the_failed_runs_only(faulty_study, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(faulty_study["out"], out)
    ids = faulty_study["ids"]
    before = {e: files_state(out / "runs" / i) for e, i in ids.items()}
    oom_epoch1 = read_history(out / "runs" / ids["unet-oom"] / "history.csv")
    use_trainer(monkeypatch, engine_trainer())  # the fault is gone (more memory, the bug fixed)
    assert main(["study", "--study", str(faulty_study["path"]), "--profile", "demo", "--out", str(out), "--quiet",
                 "--no-report"]) == 0
    lines = capsys.readouterr().out
    for entry in ("unet-oom", "unet-crash"):
        assert f"{entry} (seed 0, run {ids[entry]}): retrying (it failed before)" in lines
        assert run_state(out, ids[entry])[0] == "completed"
    for entry in ("unet-lr1e-2", "unet-lr1e-3"):  # diverged is a result: not retried
        assert f"{entry} (seed 0, run {ids[entry]}): {run_state(out, ids[entry])[0]} earlier, skipped" in lines
        assert {k: v for k, v in files_state(out / "runs" / ids[entry]).items() if k != "metrics.json"} == \
               {k: v for k, v in before[entry].items() if k != "metrics.json"}
    assert same_numbers(read_history(out / "runs" / ids["unet-oom"] / "history.csv")[0], oom_epoch1[0])  # resumed from its epoch 1
    assert main(["report", "--out", str(out), "--no-api"]) == 0
    t2 = pd.read_csv(out / "tables" / "T2.csv").set_index("entry")
    t2 = t2[t2.kind == "model"]  # not the baselines computed from the data
    assert (t2.status == "completed").all() and t2.best_val_miou.notna().all()


# ---- the report site: offline, inert, every recorded string shown as text ------------------------------------------

HOSTILE = ('<script>alert("x")</script><img src=x onerror="alert(1)">"><svg onload=alert(2)>'
           '<a href="javascript:alert(3)">j</a><iframe src="https://evil.example/"></iframe>'
           '<link rel="stylesheet" href="//evil.example/s.css"><style>@import url(https://evil.example/s.css)</style>')
EVIL_HTML_OUTPUT = (HOSTILE + '<img src="http://evil.example/x.png"><a href="https://evil.example/page">outside</a>'
                    '<object data="http://evil.example/o"></object><embed src="http://evil.example/e"><base href="http://evil.example/">'
                    '<form action="http://evil.example/f"><input formaction="http://evil.example/g"></form>'
                    '<div style="background:url(//evil.example/d.png)">styled</div><meta http-equiv="refresh" content="0;url=http://evil.example/">'
                    '<SCRIPT SRC=//evil.example/x.js></SCRIPT><scr<script>ipt>alert(5)</script><a href=" jav&#x09;ascript:alert(6)">k</a>')
FETCHING = {"src", "href", "xlink:href", "srcset", "action", "formaction", "poster", "data", "background", "content"}
ACTIVE_TAGS = {"script", "iframe", "frame", "frameset", "object", "embed", "applet", "base", "form", "portal", "meta"}


def hostile_notebook(path: Path):
    """An executed notebook whose outputs carry HTML, JavaScript and SVG with scripts and remote references."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
    nb = new_notebook(cells=[
        new_markdown_cell("# notes " + EVIL_HTML_OUTPUT + " [a link](https://evil.example/md) ![img](http://evil.example/i.png)"),
        new_code_cell("print('<script>alert(7)</script>')", execution_count=1, outputs=[
            new_output("stream", name="stdout", text="<script>alert(8)</script>\n"),
            new_output("display_data", data={"text/html": EVIL_HTML_OUTPUT, "text/plain": "html"}),
            new_output("display_data", data={"application/javascript": "alert(9)", "text/plain": "js"}),
            new_output("display_data", data={"image/svg+xml": '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(10)'
                                              '</script><image href="http://evil.example/i.png"/></svg>', "text/plain": "svg"}),
            new_output("display_data", data={"text/markdown": "[x](https://evil.example) <script>alert(11)</script>",
                                             "text/plain": "md"}),
            new_output("error", ename="ValueError", evalue="<script>alert(12)</script>", traceback=["<b>alert(13)</b>"])])])
    nbformat.write(nb, str(path))


def hostile_library_notebook(path: Path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
    code = (f'def f(x:int=1, # the x {HOSTILE}\n      ):\n    "Doc {HOSTILE}"\n    return x\n'
            f'LIMIT = 3  # at most {HOSTILE}')
    nbformat.write(new_notebook(cells=[
        new_markdown_cell(f"# Hostile\n> subtitle {HOSTILE}"), new_code_cell("#| default_exp hostile"),
        new_markdown_cell(f"Text {EVIL_HTML_OUTPUT} [outside](https://evil.example/doc) <https://evil.example/auto>"),
        new_code_cell("#| export\n" + code)]), str(path))


class Inspector(HTMLParser):
    """Every tag a browser would act on, independently of `sun_seg.report.offline_problems`."""
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.problems, self._style = [], False
    def handle_starttag(self, tag, attrs):
        if tag in ACTIVE_TAGS and not (tag == "meta" and {k for k, _ in attrs} <= {"charset", "http-equiv", "content", "name"}
                                       and dict(attrs).get("http-equiv", "").lower() != "refresh"):
            self.problems.append(f"<{tag}>")
        self._style = tag == "style"
        for name, value in attrs:
            if name.startswith("on"): self.problems.append(f"<{tag} {name}>")
            if value is None: continue
            if name in FETCHING and name != "content" and not local_reference(value):
                self.problems.append(f"<{tag} {name}={value!r}>")
            if name == "style": self.problems += [f"<{tag} style {u}>" for u in css_references(value) if not local_reference(u)]
    handle_startendtag = handle_starttag
    def handle_data(self, data):
        if self._style: self.problems += [f"<style> {u}" for u in css_references(data) if not local_reference(u)]
    def handle_endtag(self, tag): self._style = False


def css_references(css: str) -> list[str]:
    return re.findall(r"""url\(\s*['"]?([^'")]*)""", css, re.I) + re.findall(r"""@import\s+['"]([^'"]*)""", css, re.I)


def local_reference(value: str) -> bool:
    """A reference inside the site: a relative path or fragment, or an inline raster image; no scheme, no host."""
    from urllib.parse import urlsplit
    value = re.sub(r"[\x00-\x20]", "", value)
    if re.match(r"data:image/(png|jpeg|gif|webp);base64,", value, re.I): return True
    parts = urlsplit(value)
    return not parts.scheme and not parts.netloc and not value.startswith("//")


def site_problems(site: Path) -> list[str]:
    problems = []
    files = [p for p in site.rglob("*") if p.suffix in (".html", ".svg", ".css")]
    assert files
    for path in files:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".css":
            found = [u for u in css_references(text) if not local_reference(u)]
        else:
            inspector = Inspector()
            inspector.feed(text)
            found = inspector.problems
        problems += [f"{path.relative_to(site)}: {f}" for f in found]
    return problems


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory):
    """A study (simulated runs) whose every recorded string is hostile HTML, with a hostile executed notebook."""
    tmp = tmp_path_factory.mktemp("hostile")
    d = yaml.safe_load(FAULT_STUDY)
    d["title"] = "Title " + HOSTILE
    d["source"] = "Source " + HOSTILE
    d["tables"]["T1"]["title"] = "Sweep " + HOSTILE
    d["runs"][1]["tables"]["T1"] = "Row " + HOSTILE
    d["runs"][1]["note"] = "Note " + HOSTILE
    d["evaluations"][0]["label"] = "Label " + HOSTILE
    d["evaluations"][0]["reported"] = {"study_choice": "Choice " + HOSTILE}
    d["effects"][0]["name"] = "Effect " + HOSTILE
    d["figures"]["Fa"]["title"] = "Figure " + HOSTILE
    d["profiles"]["demo"]["description"] = "Profile " + HOSTILE
    study = parse_study(d, tmp / "study.yaml")
    out = tmp / "out"
    simulate_study(out, study, trainer=SimulatedTrainer(fail=["unet-oom"], diverge=["unet-lr1e-2"]))
    ids = run_ids(out)
    grid = out / "grid" / f"{ids['unet-oom']}.json"
    grid.write_text(json.dumps({**read_json(grid), "reason": "Reason " + HOSTILE, "host": "Host " + HOSTILE}))
    run_dir = out / "runs" / ids["unet-lr1e-3"]
    for name, key in (("data.json", "root"), ("environment.json", "hostname"), ("metrics.json", "device")):
        (run_dir / name).write_text(json.dumps({**read_json(run_dir / name), key: f"{key} " + HOSTILE}))
    metrics = read_json(run_dir / "metrics.json")
    metrics["val"]["iou_per_class"]["<script>alert('class')</script>"] = 0.5  # a class name no study has
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    hostile_notebook(run_dir / "train.ipynb")
    nbs = tmp / "nbs"  # a library notebook whose markdown, docstrings and comments carry the same strings
    nbs.mkdir()
    hostile_library_notebook(nbs / "00_hostile.ipynb")
    site = __import__("sun_seg.report", fromlist=["build_site"]).build_site(out, api=True, nbs=nbs)
    return out, site, ids


def test_no_page_of_the_site_refers_outside_it_or_runs_code(hostile_site):
    from sun_seg.report import offline_problems
    out, site, ids = hostile_site
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 12 and (site / "api" / "hostile.html").is_file()  # overview, tables, runs, notebooks, API...
    assert (site / "runs" / f"{ids['unet-lr1e-3']}.notebook.html").is_file()  # the hostile notebook is rendered
    assert offline_problems(site) == []
    assert site_problems(site) == []  # checked again here, by a parser of its own


class Text(HTMLParser):
    """The text a reader sees on a page (character references decoded), without the tags."""
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []
    def handle_data(self, data): self.parts.append(data)


def page_text(page: Path) -> str:
    parser = Text()
    parser.feed(page.read_text())
    return "".join(parser.parts)


def test_recorded_strings_show_as_text(hostile_site):
    """Each hostile string is on its page as text, character for character (and, above, never as a tag)."""
    out, site, ids = hostile_site
    where = {"index.html": ["Title ", "Profile "], "tables.html": ["Row ", "Sweep ", "Label ", "Choice ", "Effect "],
             "figures.html": ["Figure "], "runs.html": ["Reason "],
             f"runs/{ids['unet-oom']}.html": ["Reason ", "Host "],
             f"runs/{ids['unet-lr1e-3']}.html": ["root ", "hostname ", "device "],
             "api/hostile.html": ["subtitle ", "the x ", "Doc ", "at most "]}
    for page, prefixes in where.items():
        text = page_text(site / page)
        for prefix in prefixes:
            assert prefix + HOSTILE in text, (page, prefix)
    api = page_text(site / "api" / "hostile.html")
    assert "outside" in api and "evil.example/doc" not in (site / "api" / "hostile.html").read_text()  # text, not link
    notebook_page = site / "runs" / f"{ids['unet-lr1e-3']}.notebook.html"
    notebook = page_text(notebook_page)
    assert "<script>alert(8)</script>" in notebook  # printed text stays text
    assert "alert(9)" not in notebook_page.read_text()  # a JavaScript output is dropped, not shown or run
    assert "outside" in notebook and "a link" in notebook  # an outside link keeps its text, not its target
    assert "evil.example/page" not in notebook_page.read_text()
    run_page = (site / "runs" / f"{ids['unet-lr1e-3']}.html").read_text()
    assert "alert('class')" not in page_text(site / "runs" / f"{ids['unet-lr1e-3']}.html")  # not one of the 37 classes


@pytest.mark.parametrize("name", ["../escape", "a/b", "/etc", "..", ".hidden", "a b", "<script>x</script>", "x\\y", ""])
def test_names_that_could_leave_the_output_folder_are_refused(tmp_path, name):
    for change, key in ((lambda d: d["runs"][0].update(name=name), "runs[0]"),
                        (lambda d: d["evaluations"][0].update(name=name), "evaluations[0].name"),
                        (lambda d: d["figures"].update({name: d["figures"].pop("Fa")}), "figures."),
                        (lambda d: d["runs"][0]["params"].update(run_name=name), "run_name")):
        if key == "run_name" and name == "": continue  # an empty run_name means "none": the run id is the hash
        d = yaml.safe_load(FAULT_STUDY)
        change(d)
        with pytest.raises(ParameterError) as e:
            study = parse_study(d, tmp_path / "study.yaml")
            from sun_seg.study import engine_identify, resolve_grid
            from sun_seg.data.demo import demo_root
            resolve_grid(study, "demo", engine_identify(tmp_path / "runs"), data_dir=str(demo_root(n_train=16, n_test=6, scale=0.1, progress=False)))
        assert key in str(e.value) and ("safe folder name" in str(e.value) or "non-empty" in str(e.value)), str(e.value)
    assert list(tmp_path.iterdir()) == []


def tree(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("tamper, named", [
    (lambda r: r["runs"][0].update(run_id="../../escaped"), "run_id"),
    (lambda r: r["runs"][0].update(run_id="/tmp/escaped"), "run_id"),
    (lambda r: r["figures"][0].update(id="../../escaped"), "figure"),
], ids=["run id with ..", "absolute run id", "figure id with .."])
def test_report_never_writes_outside_its_folder(tmp_path, capsys, tamper, named):
    """A study.json edited by hand (or copied from elsewhere) cannot make `sun-seg report` write outside --out."""
    out = tmp_path / "work" / "out"
    simulate_study(out, load_study(write_study(tmp_path)))
    record = read_json(out / "study.json")
    tamper(record)
    (out / "study.json").write_text(json.dumps(record))
    outside = lambda: {p for p in tree(tmp_path) if not p.startswith("work/out/")}
    before = outside()
    assert main(["report", "--out", str(out), "--no-api"]) == 2
    err = capsys.readouterr().err
    assert f"parameter `{named}" in err and "not a safe folder name" in err and "Traceback" not in err, err
    assert outside() == before
    assert not (Path("/tmp/escaped").exists() and Path("/tmp/escaped").stat().st_mtime > time.time() - 60)


def test_a_run_folder_linking_outside_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    simulate_study(out, load_study(write_study(tmp_path)))
    run_id = read_json(out / "study.json")["runs"][1]["run_id"]
    elsewhere = tmp_path / "elsewhere"
    (out / "runs" / run_id).rename(elsewhere)
    (out / "runs" / run_id).symlink_to(elsewhere, target_is_directory=True)
    before = tree(elsewhere)
    assert main(["report", "--out", str(out), "--no-api"]) == 2
    assert "would leave the output folder" in capsys.readouterr().err
    assert tree(elsewhere) == before


def test_study_writes_only_inside_its_output_folder(tmp_path, monkeypatch):
    """`--out a/../b` (relative): everything the study writes is under b; nothing lands beside it."""
    work = tmp_path / "work"
    work.mkdir()
    path = write_study(tmp_path, FAULT_STUDY.split("runs:")[0] + 'runs:\n  - {name: unet-a, params: {epochs: 1}, tables: {T2: "a"}}\n')
    monkeypatch.chdir(work)
    use_trainer(monkeypatch, engine_trainer())
    assert main(["study", "--study", str(path), "--profile", "demo", "--out", "a/../b", "--quiet", "--no-report"]) == 0
    assert main(["report", "--out", "a/../b", "--no-api"]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["b"]
    assert {"study.json", "runs", "grid", "tables", "figures", "site"} <= {p.name for p in (work / "b").iterdir()}


# ---- figures: titles and legends fit and do not overlap --------------------------------------------------------------

def drawn(fig):
    """Lay the figure out and draw it as the PNG is drawn (110 dpi); returns the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    fig.set_dpi(110)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def assert_laid_out(fig, overlap_free):
    """Every visible text and legend lies inside the figure; the boxes in `overlap_free` do not intersect."""
    renderer = drawn(fig)
    inside = fig.bbox.padded(1)
    artists = [t for t in fig.texts + [fig._suptitle] if t is not None and t.get_text()] + fig.legends
    for ax in fig.axes:
        artists += [t for t in (ax.title, ax._left_title, ax._right_title) if t.get_text()]
        if ax.get_legend(): artists.append(ax.get_legend())
    boxes = [(a, a.get_window_extent(renderer)) for a in artists]
    boxes += [(ax, ax.get_tightbbox(renderer)) for ax in fig.axes]  # what the axes draw: tick labels, axis labels too
    for a, box in boxes:
        assert inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1), \
            f"{type(a).__name__} {getattr(a, 'get_text', lambda: '')()!r} {box} is cut off (figure {fig.bbox})"
    boxes = [(name, a.get_window_extent(renderer)) for name, a in overlap_free]
    for i, (na, a) in enumerate(boxes):
        for nb, b in boxes[i + 1:]:
            assert not a.overlaps(b), f"{na} {a} overlaps {nb} {b}"


LONG = "U-Net (best by val mIoU): Plateau + 0.0001LR + woAugment + Weighted"


def test_prediction_figures_fit_all_classes_and_long_labels(tmp_path):
    from sun_seg.analysis import plot_predictions, save_figure
    rng = np.random.default_rng(0)
    target = rng.integers(0, 37, (48, 64)).astype(np.uint8)  # every class, so the legend has 38 entries
    target[:4] = 255
    fig = plot_predictions({"image": rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "target": target,
                            "predictions": {LONG: target[::-1].copy(), "ConvNeXt (best by val mIoU): Decoder + 0.001LR": target}},
                           "F8: Classification of a general scene, with a title long enough to need the whole width")
    save_figure(fig, tmp_path, "F8", "DEMO DATA - synthetic scenes; numbers are not comparable with the study's " * 3)
    assert len(fig.legends[0].get_texts()) == 38
    axes = fig.axes
    assert_laid_out(fig, [("legend", fig.legends[0])] + [(f"title {i}", ax.title) for i, ax in enumerate(axes)]
                    + [(f"axes {i}", ax) for i, ax in enumerate(axes)] + [("suptitle", fig._suptitle)])


def test_bar_curve_and_data_figures_keep_titles_and_legends_clear(tmp_path):
    from sun_seg.analysis import plot_class_epochs, plot_class_frequency, plot_class_iou, plot_curves, save_figure
    from sun_seg.core import CLASS_NAMES
    rng = np.random.default_rng(1)
    iou = pd.DataFrame({LONG: rng.random(37), "ConvNeXt (best by val mIoU): Decoder + 0.001LR": rng.random(37)}, index=CLASS_NAMES)
    iou.iloc[5] = np.nan
    fig = plot_class_iou(iou, "F6: IoU per class on the test set, U-Net vs ConvNeXt, with a long title to wrap around")
    save_figure(fig, tmp_path, "F6", "a footer")
    ax = fig.axes[0]
    assert_laid_out(fig, [("title", ax._left_title), ("legend", ax.get_legend()), ("axes", ax)])

    rows = [dict(label=label, run_id=label, epoch=e, train_loss=2 - e / 10, val_loss=2.1 - e / 10, val_miou=e / 20)
            for label in (LONG, "U-Net: 0.001LR", "U-Net: diverged") for e in (1, 2, 3)]
    rows[-1].update(train_loss=math.nan, val_loss=math.nan, val_miou=math.nan)
    fig = plot_curves(pd.DataFrame(rows), "Fa: U-Net training curves of three runs, one of which diverged")
    save_figure(fig, tmp_path, "Fa", "a footer")
    assert_laid_out(fig, [("legend", fig.legends[0]), ("suptitle", fig._suptitle)] + [(f"axes {i}", a) for i, a in enumerate(fig.axes)])

    epochs = pd.DataFrame({c: rng.random(5) for c in CLASS_NAMES[:8]}, index=range(1, 6))
    fig = plot_class_epochs(epochs, "F7: U-Net validation IoU of selected classes over epochs")
    save_figure(fig, tmp_path, "F7", "a footer")
    assert_laid_out(fig, [("legend", fig.axes[0].get_legend()), ("axes", fig.axes[0])])

    share = np.sort(rng.random(37))[::-1] / 10
    classes = pd.DataFrame({"pixel_share": share, "image_share": np.minimum(1, share * 8 + 0.02)}, index=pd.Index(CLASS_NAMES, name="class"))
    fig = plot_class_frequency(classes, "F-imb: Class frequency over the 37 classes (imbalance)")
    save_figure(fig, tmp_path, "F-imb", "a footer")
    ax = fig.axes[0]
    assert ax._left_title.get_text() == "F-imb: Class frequency over the 37 classes (imbalance)" and not ax.title.get_text()
    assert_laid_out(fig, [("title", ax._left_title), ("legend", ax.get_legend()), ("axes", ax)])
    assert ax.yaxis.get_major_formatter()(1.0, 0) == "100%"


# ---- slow: `sun-seg study` through papermill, killed and interrupted for real -----------------------------------------

# Three U-Net runs; the second trains 8 epochs so that it can be stopped between two of them. The first has so low a
# learning rate that it is never the best (its metrics.json gets no test result: all its files stay as they are).
KILL_STUDY = """
study: kill
title: A study killed in the middle
seeds: [0]
defaults: {model: unet, batch_size: 4, epochs: 2, patience: 8, scheduler: none, image_size: 48, unet_width: 8, lr: 0.01}
profiles:
  demo:
    data: demo
    demo_data: {n_train: 32, n_test: 6, scale: 0.15}
    params: {}
tables:
  T1: {title: sweep, columns: [epoch, val_loss, val_miou]}
  T2: {title: results, columns: [trainable_params, best_epoch, val_miou]}
runs:
  - {name: unet-a, params: {lr: 0.00001}, tables: {T1: "0.00001", T2: "a"}}
  - {name: unet-b, params: {lr: 0.003, epochs: 8}, tables: {T1: "0.003", T2: "b"}}
  - {name: unet-c, params: {augment: false}, tables: {T2: "woAugment"}}
evaluations:
  - {name: best-unet, among: {table: T2, model: unet}}
effects:
  - {name: augmentation off, baseline: unet-a, variant: unet-c}
figures:
  Fb: {kind: curves, runs: [unet-b]}
  F6: {kind: class_iou, split: test, runs: [best-unet]}
"""


def study_command(path: Path, out: Path) -> list[str]:
    return [SUN_SEG, "study", "--study", str(path), "--profile", "demo", "--out", str(out), "--quiet", "--no-report"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The kill study run once without interruption: what every interrupted one must end as."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    path = write_study(tmp, KILL_STUDY)
    out = tmp / "out"
    done = subprocess.run(study_command(path, out), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert main(["report", "--out", str(out), "--no-api"]) == 0
    return out


def start_study(path: Path, out: Path, log: Path) -> subprocess.Popen:
    """`sun-seg study` in a session of its own (its process group), as a terminal would run it."""
    with open(log, "w") as f:
        return subprocess.Popen(study_command(path, out), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_epochs(process: subprocess.Popen, out: Path, entry: str, epochs: int, timeout: float = 600) -> Path:
    """Wait until `entry`'s run has `epochs` finished epochs recorded; returns its run folder."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the study ended before it could be stopped"
        if (out / "study.json").is_file():
            run_dir = out / "runs" / run_ids(out)[entry]
            try:
                if len(read_history(run_dir / "history.csv")) >= epochs: return run_dir
            except (OSError, ValueError, DataError):
                pass  # not written yet
        time.sleep(0.02)
    raise AssertionError(f"{entry} did not reach epoch {epochs} in {timeout} s")


def kernels_of(process: subprocess.Popen) -> list:
    import psutil
    return psutil.Process(process.pid).children(recursive=True)


def assert_gone(processes, timeout: float = 30):
    import psutil
    gone, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"left running: {alive}"


def assert_ends_like(out: Path, reference: Path):
    """Every run and every table as in the uninterrupted study (timings aside)."""
    assert main(["report", "--out", str(out), "--no-api"]) == 0
    ids, ref_ids = run_ids(out), run_ids(reference)
    assert ids == ref_ids
    for entry, run_id in ids.items():
        assert same_numbers(history_numbers(out / "runs" / run_id), history_numbers(reference / "runs" / run_id)), entry
        assert same_numbers(metrics_numbers(out / "runs" / run_id), metrics_numbers(reference / "runs" / run_id)), entry
    assert_same_tables(out, reference)


@pytest.mark.slow
def test_a_killed_study_continues_where_it_stopped(tmp_path, uninterrupted):
    """SIGKILL to `sun-seg study` and its notebook kernel in the middle of the second run (a machine that dies)."""
    path = write_study(tmp_path, KILL_STUDY)
    out = tmp_path / "out"
    process = start_study(path, out, tmp_path / "first.log")
    try:
        b_dir = wait_for_epochs(process, out, "unet-b", 2)
        kernels = kernels_of(process)
        os.killpg(process.pid, signal.SIGKILL)  # the command and everything in its process group...
        for kernel in kernels:  # ...and the kernel, which jupyter starts in a session of its own
            kernel.kill()
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert_gone(kernels)
    ids = run_ids(out)
    a_dir = out / "runs" / ids["unet-a"]
    assert read_json(a_dir / "metrics.json")["status"] == "completed"
    assert read_json(b_dir / "metrics.json")["status"] == "running"  # killed in the middle: nothing could record it
    saved = torch.load(b_dir / "checkpoints" / "last_state.pt", weights_only=True)["epoch"]
    assert 2 <= saved < 8
    kept_a, kept_b = files_state(a_dir), read_history(b_dir / "history.csv")[:saved]

    second = subprocess.run(study_command(path, out), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"unet-a (seed 0, run {ids['unet-a']}): completed earlier, skipped" in second.stdout
    assert f"unet-b (seed 0, run {ids['unet-b']}): resuming" in second.stdout
    assert f"unet-c (seed 0, run {ids['unet-c']}): starting" in second.stdout
    assert files_state(a_dir) == kept_a  # the finished run: not one file touched
    assert same_numbers(read_history(b_dir / "history.csv")[:saved], kept_b)  # its saved epochs kept, timings too
    assert f"resuming after epoch {saved}" in (b_dir / "train.ipynb").read_text()  # the engine resumed from the checkpoint
    assert_ends_like(out, uninterrupted)


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_the_study_cleanly(tmp_path, uninterrupted):
    """SIGINT to the terminal's process group of `sun-seg study`: exit 130, a message to rerun, a resumable run."""
    path = write_study(tmp_path, KILL_STUDY)
    out = tmp_path / "out"
    log = tmp_path / "first.log"
    process = start_study(path, out, log)
    try:
        b_dir = wait_for_epochs(process, out, "unet-b", 1)
        kernels = kernels_of(process)
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None: os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text()
    assert process.returncode == 130, text[-3000:]
    assert "interrupted; what was finished is kept. Run the same command again to continue." in text
    assert_gone(kernels)  # no kernel left training in the background
    ids = run_ids(out)
    status, reason = run_state(out, ids["unet-b"])
    assert status == "interrupted" and "run the same command again" in reason
    assert read_json(b_dir / "metrics.json")["status"] == "interrupted"  # the engine itself recorded the stop
    assert run_state(out, ids["unet-c"])[0] == "absent"
    assert not held_locks(out)

    second = subprocess.run(study_command(path, out), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"unet-b (seed 0, run {ids['unet-b']}): resuming" in second.stdout
    assert_ends_like(out, uninterrupted)
