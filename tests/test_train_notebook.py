"""The training notebook `nbs/train.ipynb` run by papermill with tiny parameters, asserting on what it recorded."""
import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
from papermill.exceptions import PapermillExecutionError

from sun_seg.core import DATA_ENV, DEMO_NOTICE
from sun_seg.train import HISTORY_COLUMNS, TrainConfig, read_history

from conftest import ROOT
from train_fixtures import param_pairs, tiny_params, write_tiny_release

TEMPLATE = ROOT / "nbs" / "train.ipynb"


def _tiny(out_dir, **overrides):
    params = dict(out_dir=str(out_dir), unet_width=4, image_size="32x40", batch_size=4, epochs=2, max_train_batches=2,
                  max_eval_batches=1, device="cpu", num_workers=0, lr=0.001)
    params.update(overrides)
    return params


def _outputs_text(nb, stream="stdout"):
    return ["".join(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "stream" and o.get("name") == stream]


def test_parameters_cell_is_train_config():
    """Every `TrainConfig` field is a documented parameter of the notebook, with the same default and type."""
    inferred = papermill.inspect_notebook(str(TEMPLATE))
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert list(inferred) == list(fields)
    for name, p in inferred.items():
        assert ast.literal_eval(p["default"]) == fields[name].default, name
        assert p["inferred_type_name"] == fields[name].type, name
        assert p["help"], f"{name} has no comment: papermill --help-notebook would not document it"
    nb = nbformat.read(TEMPLATE, as_version=4)
    assert [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "the template keeps no outputs"


def test_tiny_run_on_demo_data(tmp_path):
    """`papermill train.ipynb out.ipynb -p ...` from nbs/, as a user runs it, without SUN RGB-D configured."""
    env = {k: v for k, v in os.environ.items() if k != DATA_ENV}  # no SUN RGB-D: the demo dataset
    out = tmp_path / "out.ipynb"
    pairs = param_pairs(_tiny(tmp_path / "runs", test=True))
    done = subprocess.run([str(Path(sys.executable).parent / "papermill"), TEMPLATE.name, str(out), *pairs,
                           "--no-progress-bar"], cwd=TEMPLATE.parent, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    nb = nbformat.read(out, as_version=4)
    assert _outputs_text(nb)[0].splitlines()[0].startswith(f"data: {DEMO_NOTICE}")  # said at the top of the output
    (run_dir,) = (tmp_path / "runs").iterdir()
    # papermill's terminal shows only the kernel's stderr: the notebook told it the data, the run folder, the result
    for line in (f"data: {DEMO_NOTICE}", f"run folder: {run_dir}", f"completed: {run_dir}"):
        assert line in done.stderr, (line, done.stderr[-3000:])
    assert f"run folder: {run_dir}" not in "".join(_outputs_text(nb, "stderr"))  # not copied into the notebook
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["data_kind"] == "demo"
    assert metrics["data_label"].startswith(DEMO_NOTICE) and metrics["epochs_completed"] == 2
    assert metrics["test"]["split"] == "test" and 0 <= metrics["test"]["miou"] <= 1
    params = json.loads((run_dir / "params.json").read_text())
    assert params["profile_applied"] == "demo" and params["data_kind"] == "demo" and params["lr"] == 0.001
    assert json.loads((run_dir / "data.json").read_text())["kind"] == "demo"
    assert json.loads((run_dir / "environment.json").read_text())["data_kind"] == "demo"
    rows = read_history(run_dir / "history.csv")
    assert len(rows) == 2 and all(r["data_kind"] == "demo" for r in rows) and list(rows[0]) == HISTORY_COLUMNS
    # the executed notebook went into the run folder, with the training's output and the live plot's final figure
    copy = nbformat.read(run_dir / "train.ipynb", as_version=4)
    fit_cell = next(c for c in copy.cells if c.cell_type == "code" and c.source.startswith("result = fit("))
    assert any("image/png" in o.get("data", {}) for o in fit_cell.outputs)
    assert any("epoch 2/2" in t for t in _outputs_text(copy))
    # the results tables were shown
    assert any("per_class_table" in c.source and c.outputs for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name, value", [("model", "resnet"), ("finetune", "decoder"), ("learning_rate", 0.1)])
def test_bad_parameters_stop_the_notebook_early(tmp_path, name, value):
    out = tmp_path / "out.ipynb"
    with pytest.raises(PapermillExecutionError) as info:
        papermill.execute_notebook(str(TEMPLATE), str(out), parameters={**_tiny(tmp_path / "runs"), name: value},
                                   cwd=str(TEMPLATE.parent), progress_bar=False, kernel_name="python3")
    assert info.value.ename == "ParameterError" and f"parameter `{name}`" in info.value.evalue
    nb = nbformat.read(out, as_version=4)
    failed = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and any(
        o.get("output_type") == "error" for o in c.get("outputs", [])))
    assert "plan_run(TrainConfig.from_params" in nb.cells[failed].source  # the first cell after the parameters
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_sun_seg_train_command(tmp_path):
    """`sun-seg train` runs the notebook through papermill and keeps the executed notebook in the run folder."""
    data = write_tiny_release(tmp_path / "data")
    params = tiny_params(data, tmp_path / "runs", epochs=1)
    pairs = param_pairs(params)
    cli = [sys.executable, "-c", "import sys; from sun_seg.cli import main; sys.exit(main())"]
    done = subprocess.run([*cli, "train", *pairs, "--output", str(tmp_path / "copy.ipynb")], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    executed = nbformat.read(run_dir / "train.ipynb", as_version=4)
    assert any("notebook copied" in t or "epoch 1/1" in t for t in _outputs_text(executed))
    assert (tmp_path / "copy.ipynb").is_file()
    again = subprocess.run([*cli, "train", *pairs], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and "already completed" in again.stdout  # reported, not retrained
    bad = subprocess.run([*cli, "train", "-p", "model", "resnet"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "parameter `model`" in bad.stderr
