"""What a user sees of a run: one line per event (data, run folder, each epoch, result), nothing they cannot act on.

Runs go through the real launch path (`sun-seg train`: papermill and a Jupyter kernel); their terminal output and
the executed notebook are checked for the noise they used to carry: the kernel's TCP warning, transformers' LOAD
REPORT table, ANSI escape codes, a lone "None", the demo notice twice, progress widgets that reopen dead.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from sun_seg.core import DATA_ENV, DEMO_NOTICE

from train_fixtures import param_pairs, tiny_params, write_tiny_release

SUN_SEG = [sys.executable, "-c", "import sys; from sun_seg.cli import main; sys.exit(main())"]
ANSI = re.compile(r"\x1b\[")


def assert_quiet(text: str, where: str) -> None:
    """None of the noise a user cannot act on."""
    assert not ANSI.search(text), f"ANSI escape codes in {where}"
    assert "Kernel is running over TCP" not in text, f"the kernel's TCP warning in {where}"
    assert "LOAD REPORT" not in text, f"transformers' LOAD REPORT in {where}"
    assert "were not sharded" not in text, f"transformers' tensor-parallel warning in {where}"
    assert "IProgress not found" not in text, f"tqdm's widget warning in {where}"
    assert "None" not in [line.strip() for line in text.splitlines()], f"a lone 'None' in {where}"
    assert "copied to None" not in text, where


def executed_text(path: Path) -> tuple[str, list[str]]:
    """An executed notebook's text outputs (all of them, joined) and the kinds of rich outputs it holds."""
    nb = nbformat.read(path, as_version=4)
    texts, kinds = [], []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            texts.append("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")))
            kinds += list(o.get("data", {}))
    return "\n".join(texts), kinds


def _train(pairs, cwd, env=None):
    done = subprocess.run([*SUN_SEG, "train", *pairs], capture_output=True, text=True, timeout=900, cwd=cwd,
                          env=env or os.environ.copy())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_help_answers_without_importing_torch():
    """`sun-seg --help` lists the commands without importing their modules (torch takes seconds to import)."""
    probe = ("import sys, contextlib, io\nfrom sun_seg.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
             "    try: main(['--help'])\n    except SystemExit: pass\n"
             "assert 'train' in out.getvalue() and 'torch' not in sys.modules, sorted(sys.modules)\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.slow
def test_demo_run_output_is_one_line_per_event(tmp_path):
    """`sun-seg train` on the demo dataset: the data once, the run folder, each epoch, the result; no noise."""
    env = {k: v for k, v in os.environ.items() if k != DATA_ENV}  # no SUN RGB-D: the demo dataset
    params = dict(out_dir=str(tmp_path / "runs"), unet_width=4, epochs=2, max_train_batches=1, max_eval_batches=1,
                  device="cpu", num_workers=0)
    output = _train(param_pairs(params), tmp_path, env)
    assert_quiet(output, "the terminal")
    assert output.count("DEMO DATA") == 1, output  # said once, in the data line
    bar_lines = [line for line in output.split("\n") if "%|" in line]  # a bar refreshes in place (\r), on one line
    assert len(bar_lines) <= 5, bar_lines  # the demo data's, then a training and a validation bar per epoch
    (run_dir,) = (tmp_path / "runs").iterdir()
    for line in (f"data: {DEMO_NOTICE}", f"run folder: {run_dir}", "epoch 1/2: train loss", "epoch 2/2: train loss",
                 f"completed: {run_dir}"):
        assert line in output, (line, output)
    text, kinds = executed_text(run_dir / "train.ipynb")
    assert_quiet(text, "the executed notebook")
    assert "application/vnd.jupyter.widget-view+json" not in kinds  # progress is text, not a widget that reopens dead
    assert "epoch 2/2: train loss" in text
    assert all(t.count("DEMO DATA") <= 1 for t in text.split("\n\n"))


@pytest.mark.slow
def test_upernet_run_says_its_head_replacement_in_one_line(tmp_path):
    """A UPerNet fine-tuned from a 150-class checkpoint: one line names the replaced classifiers, no LOAD REPORT."""
    from transformers import UperNetForSemanticSegmentation
    from sun_seg.models.upernet import upernet_config
    tiny = dict(backbone_config=dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]), hidden_size=16,
                auxiliary_channels=8)
    UperNetForSemanticSegmentation(upernet_config(150, **tiny)).save_pretrained(tmp_path / "ade")
    data = write_tiny_release(tmp_path / "data")
    params = tiny_params(data, tmp_path / "runs", model="upernet", finetune="decoder", pretrained=str(tmp_path / "ade"),
                         unet_width=64, epochs=1, max_train_batches=1)
    output = _train(param_pairs(params), tmp_path)
    assert_quiet(output, "the terminal")
    replaced = [line for line in output.splitlines() if "replaced decode/auxiliary classifiers: 150 -> 37 classes" in line]
    assert len(replaced) == 1, output
    (run_dir,) = (tmp_path / "runs").iterdir()
    text, _ = executed_text(run_dir / "train.ipynb")
    assert_quiet(text, "the executed notebook")
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
