"""Habits of papermill users: `sun-seg train --help` lists the notebook's parameters, `-f params.yaml` reads them from
a file, and `papermill --inject-paths train.ipynb ...` runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import papermill
import pytest

from sun_seg.cli import main as sun_seg_main
from sun_seg.core import DATA_ENV
from sun_seg.train import TrainConfig
from sun_seg.train.cli import main as train_main

from conftest import ROOT
from train_fixtures import param_pairs, tiny_params, write_tiny_release

TEMPLATE = ROOT / "nbs" / "train.ipynb"


def test_train_help_lists_every_parameter_with_its_default_and_comment(capsys):
    inferred = papermill.inspect_notebook(str(TEMPLATE))
    assert list(inferred) == [f for f in TrainConfig().to_dict()]
    for main, argv in ((sun_seg_main, ["train", "--help"]), (train_main, ["-h"])):  # sun-seg train, python -m sun_seg.train
        with pytest.raises(SystemExit) as done:
            main(argv)
        shown = capsys.readouterr().out
        assert done.value.code == 0 and "-f FILE, --parameters_file FILE" in shown
        for name, p in inferred.items():
            assert f"  {name} ({p['inferred_type_name']}, default {p['default']}): {p['help']}" in shown, name


def test_parameters_file_as_papermill_reads_it_and_p_wins(tmp_path, monkeypatch):
    data = write_tiny_release(tmp_path / "data")
    params = tiny_params(data, tmp_path / "runs", epochs=1, max_train_batches=1, run_name="from-file")
    (tmp_path / "params.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in params.items()))
    monkeypatch.chdir(tmp_path)
    assert sun_seg_main(["train", "--no-notebook", "-f", "params.yaml", "-p", "lr", "0.02"]) == 0
    recorded = json.loads((tmp_path / "runs" / "from-file" / "params.json").read_text())
    assert recorded["lr"] == 0.02 and recorded["unet_width"] == 4 and recorded["image_size"] == "32x32"


@pytest.mark.parametrize("content, told", [("model: resnet\n", "parameter `model` (in {f}"),
                                           ("- lr\n- 0.1\n", "{f}: must be a mapping of parameter names"),
                                           ("lr: [0.1\n", "{f}: is not YAML")])
def test_bad_parameters_file_is_refused_naming_it(tmp_path, monkeypatch, capsys, content, told):
    f = tmp_path / "params.yaml"
    f.write_text(content)
    monkeypatch.chdir(tmp_path)
    for main, argv in ((sun_seg_main, ["train", "-f", str(f)]), (train_main, ["-f", str(f)])):
        assert main(argv) == 2
        assert told.format(f=f) in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_papermill_inject_paths_runs_the_template(tmp_path):
    """`papermill --inject-paths train.ipynb out.ipynb -p lr 0.0001`: the injected PAPERMILL_* names are not parameters."""
    env = {k: v for k, v in os.environ.items() if k != DATA_ENV}
    pairs = param_pairs(dict(out_dir=str(tmp_path / "runs"), unet_width=4, image_size="32x40", batch_size=4, epochs=1,
                             max_train_batches=1, max_eval_batches=1, device="cpu", num_workers=0))
    out = tmp_path / "out.ipynb"
    done = subprocess.run([str(Path(sys.executable).parent / "papermill"), "--inject-paths", TEMPLATE.name, str(out),
                           "-p", "lr", "0.0001", *pairs, "--no-progress-bar"], cwd=TEMPLATE.parent, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    recorded = json.loads((run_dir / "params.json").read_text())
    assert recorded["lr"] == 0.0001 and not any(k.startswith("PAPERMILL_") for k in recorded)
    assert (run_dir / "train.ipynb").is_file()  # the notebook found its papermill output and kept it with the run
