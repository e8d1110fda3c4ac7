"""Faults in training runs: bad parameters, kills and Ctrl-C at chosen instants, divergence, out of memory, damaged or
foreign checkpoints, escaping output paths. Kills and interrupts are real signals sent to real processes
(`python -m sun_seg.train`, `sun-seg train`, a Jupyter kernel under papermill); where they land is decided by a
fault injector loaded with `sitecustomize` (test-only code, written into a temporary folder put on PYTHONPATH)."""
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sun_seg.core import DataError, ParameterError
from sun_seg.train import (Callback, TrainConfig, fit, load_run_model, plan_run, read_history, repeat_params,
                           RunOutOfMemory)
from sun_seg.train.cli import parameters_from_pairs, parse_value
from sun_seg.train.checkpoint import load_training_state, save_weights, weights_metadata
from sun_seg.runs import read_events

from conftest import ROOT
from train_fixtures import InterruptAt, param_pairs, tiny_params, weights_of, write_tiny_release

TIMING = {"seconds", "train_images_per_second", "wall_seconds", "timeline"}  # the only numbers a resume may change (timeline: wall-clock times of the session)

# --------------------------------------------------------------------------------------------------------------------
# The fault injector: SUN_SEG_FAULT="point@n:action" acts at the n-th event of `point` (see its docstring).
FAULT_INJECTOR = r'''"""Fault injection for sun_seg's fault tests, loaded by every Python started with this folder on PYTHONPATH.

SUN_SEG_FAULT="point@n:action" acts at the n-th event of `point`, in the processes SUN_SEG_FAULT_IN selects ("any",
or "kernel": Jupyter kernels only). Points: step (an optimizer step is about to be taken), eval (an evaluation batch is
about to be scored), forward (a training forward of the U-Net), replace:NAME (a finished temporary file is about to
be renamed onto NAME: written, not yet in place), replaced:NAME (just renamed onto NAME). Actions: kill (SIGKILL to
itself), int (SIGINT to itself: Ctrl-C in a terminal, or Jupyter's interrupt button for a kernel), int-parent (SIGINT
to the parent's process group: a terminal's Ctrl-C reaching `sun-seg train`, whose kernel runs in a session of its
own), oom (raise torch.OutOfMemoryError, as CUDA does), error (raise a RuntimeError). Each firing is appended to
SUN_SEG_FAULT_LOG.
"""
import os, signal, sys

_spec = os.environ.get("SUN_SEG_FAULT", "")
_where = os.environ.get("SUN_SEG_FAULT_IN", "any")
if _spec and (_where == "any" or (_where == "kernel" and any("ipykernel" in a for a in sys.orig_argv))):
    _point, _rest = _spec.split("@", 1)
    _n, _action = _rest.split(":", 1)
    _n, _count = int(_n), [0]

    def _fire(what):
        with open(os.environ["SUN_SEG_FAULT_LOG"], "a") as f: f.write(f"{what}@{_n}:{_action} pid {os.getpid()}\n")
        if _action == "kill": os.kill(os.getpid(), signal.SIGKILL)
        elif _action == "int": os.kill(os.getpid(), signal.SIGINT)
        elif _action == "int-parent": os.killpg(os.getpgid(os.getppid()), signal.SIGINT)
        elif _action == "oom":
            import torch
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated by the fault test)")
        elif _action == "error": raise RuntimeError("a failure inside the run (simulated by the fault test)")
        else: raise ValueError(_action)

    def _tick(what):
        _count[0] += 1
        if _count[0] == _n: _fire(what)

    if _point == "step":
        import torch
        _step = torch.optim.Adam.step
        def step(self, *a, **k):
            _tick("step")
            return _step(self, *a, **k)
        torch.optim.Adam.step = step
    elif _point == "eval":
        import sun_seg.metrics as _metrics  # patched before sun_seg.train.engine imports the name
        _confusion = _metrics.confusion_matrix
        def confusion_matrix(*a, **k):
            _tick("eval")
            return _confusion(*a, **k)
        _metrics.confusion_matrix = confusion_matrix
    elif _point == "forward":
        import sun_seg.models.unet as _unet
        _forward = _unet.UNet.forward
        def forward(self, *a, **k):
            if self.training: _tick("forward")
            return _forward(self, *a, **k)
        _unet.UNet.forward = forward
    elif _point.startswith(("replace:", "replaced:")):
        _when, _name = _point.split(":", 1)
        _replace = os.replace
        def replace(src, dst, *a, **k):
            hit = os.path.basename(os.fspath(dst)) == _name
            if hit and _when == "replace": _tick(_point)
            result = _replace(src, dst, *a, **k)
            if hit and _when == "replaced": _tick(_point)
            return result
        os.replace = replace
    else:
        raise ValueError(_point)
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("tiny_sunrgbd"))


@pytest.fixture(scope="module")
def injector(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fault_injector")
    (folder / "sitecustomize.py").write_text(FAULT_INJECTOR)
    return folder


def _env(injector: Path, fault: str | None = None, log: Path | None = None, where: str = "any") -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(injector), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SUN_SEG_FAULT_IN": where}
    env.pop("SUN_SEG_FAULT", None)
    if fault: env.update(SUN_SEG_FAULT=fault, SUN_SEG_FAULT_LOG=str(log))
    return env


def _train(params: dict, injector: Path, fault: str | None = None, log: Path | None = None, timeout=300,
           **popen) -> subprocess.CompletedProcess:
    """`python -m sun_seg.train -p ...` in a fresh process (one thread, like every run compared with it)."""
    return subprocess.run([sys.executable, "-m", "sun_seg.train", "--quiet", *param_pairs(params)], capture_output=True,
                          text=True, env=_env(injector, fault, log), timeout=timeout, **popen)


SUN_SEG = [sys.executable, "-c", "import sys; from sun_seg.cli import main; sys.exit(main())"]


def _only_run(out_dir: Path) -> Path:
    (run_dir,) = [p for p in out_dir.iterdir() if p.is_dir()]
    return run_dir


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b): return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list): return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _numbers(run_dir: Path) -> tuple[list[dict], dict]:
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in read_history(run_dir / "history.csv")]
    metrics = {k: v for k, v in json.loads((run_dir / "metrics.json").read_text()).items() if k not in TIMING}
    return rows, metrics


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Every recorded number, and both checkpoints, identical to the reference run's (timings aside)."""
    rows, metrics = _numbers(run_dir)
    ref_rows, ref_metrics = _numbers(reference)
    assert len(rows) == len(ref_rows), ([r["epoch"] for r in rows], [r["epoch"] for r in ref_rows])
    for a, b in zip(rows, ref_rows):
        diff = {k: (a[k], b[k]) for k in a if not _same(a[k], b[k])}
        assert not diff, f"epoch {a['epoch']} differs: {diff}"
    diff = {k: (metrics.get(k), ref_metrics.get(k)) for k in metrics.keys() | ref_metrics.keys()
            if not _same(metrics.get(k), ref_metrics.get(k))}
    assert not diff, f"metrics.json differs: {diff}"
    for which in ("best.safetensors", "last.safetensors"):
        wa, wb = weights_of(run_dir / "checkpoints" / which), weights_of(reference / "checkpoints" / which)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), which
        assert weights_metadata(run_dir / "checkpoints" / which) == weights_metadata(reference / "checkpoints" / which)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith((".tmp", ".pending"))]
    leftovers += [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    curves, ref_curves = read_events(run_dir), read_events(reference)  # the live curves: each epoch once, same values
    assert curves.keys() == ref_curves.keys() and all([e for e, _ in curves[t]] == [e for e, _ in ref_curves[t]] for t in curves)
    assert curves["mIoU/val"] == ref_curves["mIoU/val"]


def assert_intact(run_dir: Path) -> None:
    """Whatever a kill left behind: every file there is whole (parses or loads completely)."""
    from safetensors.torch import load_file
    from sun_seg.metrics import load_image_counts
    for path in run_dir.rglob("*"):
        if not path.is_file() or path.name == ".lock": continue
        if path.name.endswith(".tmp"): continue  # an unfinished write under a temporary name, never read
        if path.suffix in (".json", ".ipynb"): json.loads(path.read_text())
        elif path.name == "history.csv": read_history(path)
        elif path.name.endswith((".safetensors", ".safetensors.pending")): load_file(str(path))
        elif path.name == "last_state.pt": load_training_state(path)
        elif path.name.startswith("events.out.tfevents."): read_events(path.parent)  # readers skip a torn last record
        elif path.name.endswith("_per_image.npz"): assert load_image_counts(path) is not None
        else: raise AssertionError(f"unexpected file {path}")


def _params(data, out_dir, **overrides) -> dict:
    # 3 epochs of 3 steps, one validation batch per epoch; the last weights kept, so resumed runs compare them too
    return tiny_params(data, out_dir, **{"keep_last": True, **overrides})


@pytest.fixture(scope="module")
def reference(data, injector, tmp_path_factory):
    """The uninterrupted run every killed run is compared with, trained the same way (a fresh one-thread process)."""
    out = tmp_path_factory.mktemp("reference")
    done = _train(_params(data, out), injector)
    assert done.returncode == 0, done.stderr[-3000:]
    return _only_run(out)


def kill_and_resume(data, injector, tmp_path: Path, fault: str, params: dict | None = None) -> Path:
    """Run with the fault (it must fire and kill), check what is left, re-run the same command until it completes."""
    out, log = tmp_path / "runs", tmp_path / "faults.log"
    params = params or _params(data, out)
    killed = _train(params, injector, fault, log)
    assert log.is_file() and fault in log.read_text(), f"the fault {fault} never fired: {killed.stderr[-2000:]}"
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if out.is_dir() and any(out.iterdir()):
        run_dir = _only_run(out)
        assert_intact(run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else None
        assert metrics is None or metrics["status"] in ("running", "completed")  # a SIGKILL cannot record anything
    again = _train(params, injector)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["status"] == "completed"
    return _only_run(out)


# --------------------------------------------------------------------------------------------------------------------
# Bad parameters: every TrainConfig field, a wrong type and a wrong value each, refused before anything is written.

WRONG_TYPE = {"str": [5, None], "int": [2.5, "3", True, None], "float": ["fast", True, None], "bool": ["yes", 1, None]}
WRONG_TYPE_OVERRIDES = {"image_size": [2.5, True, None, [64, 80]]}  # a whole number is a square size, not a wrong type

# name -> wrong values; a dict is a set of overrides (the wrong value in its context). Where the mistake can only be
# seen later (a folder that is a file, more images than the data has, a model folder that does not exist), the
# stage says when: "plan" (plan_run, before any data is loaded for training) or "fit" (set-up, before any write).
UPERNET = {"model": "upernet", "pretrained": "none", "unet_width": 64}  # (the tiny parameters narrow the U-Net)
WRONG_VALUE = {
    "model": ["resnet", "UNet"],
    "lr": [0, -1e-4, math.nan, math.inf],
    "scheduler": ["cosine", ""],
    "weighted_loss": ["False", 0],
    "augment": ["True", 1],
    "finetune": ["decoder", {**UPERNET, "finetune": "everything"}],
    "epochs": [0, -1],
    "patience": [-1],
    "batch_size": [0, ("fit", 1000)],
    "image_size": ["big", "0x10", "16x16", "64x8000", "64x80x3"],
    "seed": [-1, 2**63],
    "data_dir": [("plan", "/no/such/folder"), ("plan", "FILE")],
    "pretrained": [{**UPERNET, "pretrained": ""}, ("fit", {**UPERNET, "pretrained": "/no/such/model"}),
                   ("fit", {**UPERNET, "pretrained": "nobody/no-such-model"})],
    "out_dir": ["", ("plan", "FILE"), ("plan", "FILE/runs")],
    "precision": ["fp16", "float32"],
    "device": ["tpu", "meta", "cuda:7"],
    "channels_last": ["no"],
    "compile": ["yes"],
    "num_workers": [-2],
    "micro_batch_size": [-1, 3],
    "max_train_batches": [-1],
    "max_eval_batches": [-1],
    "max_micro_batches": [-1],
    "test": ["False"],
    "eval_original_size": ["True", {"eval_original_size": True, "eval_size": "train"}],
    "eval_size": ["full", "Original"],
    "profile": ["fast"],
    "run_name": ["../escape", "a/b", "/abs", "..", ".hidden", "with space"],
    "unet_width": [0, {**UPERNET, "unet_width": 32}],
    "aux_loss_weight": [-0.1, math.nan],
    "plateau_factor": [0, 1.0, 1.5],
    "plateau_patience": [-1],
    "val_method": ["random", "Official"],
    "val_fraction": [0, 1.0, -0.1, math.nan],
    "val_seed": [-1, 2.0],
    "pretrained_revision": ["", "a b"],
    "keep_last": ["True", 1],
}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def test_every_parameter_has_wrong_values():
    """A new TrainConfig field fails here until it gets wrong values above (its wrong types come from its type)."""
    assert set(WRONG_VALUE) == set(FIELDS), set(FIELDS) ^ set(WRONG_VALUE)
    assert {f.type for f in FIELDS.values()} <= set(WRONG_TYPE), "a field of a type without wrong-type cases"


def _cases():
    for name, field in FIELDS.items():
        for value in WRONG_TYPE_OVERRIDES.get(name, WRONG_TYPE[field.type]):
            yield pytest.param(name, "config", {name: value}, id=f"{name}-type-{value!r}")
        for value in WRONG_VALUE[name]:
            stage, value = value if isinstance(value, tuple) else ("config", value)
            overrides = value if isinstance(value, dict) else {name: value}
            yield pytest.param(name, stage, overrides, id=f"{name}-value-{value!r}")


def _materialise(overrides: dict, tmp_path: Path) -> dict:
    """'FILE' stands for a file that exists (where a folder is expected)."""
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    return {k: (v.replace("FILE", str(file)) if isinstance(v, str) and v.startswith("FILE") else v) for k, v in overrides.items()}


def _tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name, stage, overrides", list(_cases()))
def test_bad_parameter_is_refused_before_training(data, tmp_path, name, stage, overrides):
    if overrides.get("device") == "cuda:7" and torch.cuda.device_count() > 7: pytest.skip("this machine has a cuda:7")
    params = {**_params(data, tmp_path / "runs"), **_materialise(overrides, tmp_path)}
    before = _tree(tmp_path)
    expected = f"parameter `{name}`"
    if stage == "config":  # the notebook's first cell, `sun-seg train` and `python -m sun_seg.train` check this first
        with pytest.raises(ParameterError) as info:
            TrainConfig.from_params(params, source="the test's parameters")
        assert info.value.name == name and str(info.value).startswith(f"{expected} (in the test's parameters): ")
    elif stage == "plan":
        config = TrainConfig.from_params(params)
        with pytest.raises(ParameterError) as info:
            plan_run(config, quiet=True, source="the test's parameters")
        assert info.value.name == name and str(info.value).startswith(f"{expected} (in the test's parameters): ")
    with pytest.raises(ParameterError) as info:
        fit(params, progress=False)
    assert info.value.name == name and str(info.value).startswith(expected), str(info.value)
    assert _tree(tmp_path) == before  # nothing written: no run folder, no out_dir


def test_unknown_parameter_is_refused(data, tmp_path):
    for name in ("learning_rate", "lr ", "Model"):
        with pytest.raises(ParameterError, match=f"parameter `{name}` \\(in cli\\): is not a training parameter"):
            TrainConfig.from_params({**_params(data, tmp_path), name: 1}, source="cli")


def _cli_cases():
    """The wrong values as a command line spells them (`-p augment False` is the bool False: not wrong there)."""
    for param in _cases():
        name, stage, overrides = param.values
        if stage == "fit" or len(overrides) != 1: continue  # fit-stage mistakes show in the kernel: see the slow test
        spelt = parse_value(str(overrides[name]))
        if stage == "config":
            try:
                TrainConfig.from_params({name: spelt})
                continue  # a right value once spelt on a command line
            except ParameterError:
                pass
        yield pytest.param(name, stage, {name: spelt}, id=param.id)


@pytest.mark.parametrize("name, stage, overrides", list(_cli_cases()))
def test_sun_seg_train_refuses_bad_parameter(data, tmp_path, capsys, name, stage, overrides):
    """`sun-seg train -p name value`: exit 2, the parameter named, no run folder (checked before a kernel starts)."""
    from sun_seg.cli import main
    overrides = _materialise(overrides, tmp_path)
    params = {**_params(data, tmp_path / "runs"), **overrides}
    if overrides.get("device") == "cuda:7" and torch.cuda.device_count() > 7: pytest.skip("this machine has a cuda:7")
    before = _tree(tmp_path)
    assert main(["train", *param_pairs(params)]) == 2
    err = capsys.readouterr().err
    assert f"sun-seg train: error: parameter `{name}`" in err, err
    assert _tree(tmp_path) == before


def test_sun_seg_train_command_refuses_before_writing(data, tmp_path):
    """The real command, in its own process: exit code 2, the parameter and its source named, nothing written."""
    done = subprocess.run([*SUN_SEG, "train", *param_pairs(_params(data, tmp_path / "runs", lr="fast"))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "parameter `lr` (in command line): got 'fast'" in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name, value", [("lr", "fast"), ("data_dir", 'x"; open(r"MARKER", "w"); "'),
                                         ("run_name", "');import os;os.system('touch MARKER');'")])
def test_notebook_refuses_bad_parameter_in_its_first_cell(data, tmp_path, name, value):
    """papermill train.ipynb -p ...: the cell after the parameters stops, naming the parameter; a value written to
    look like code stays a string (papermill writes a literal) and runs nothing."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError
    marker = tmp_path / "code_ran"
    value = value.replace("MARKER", str(marker))
    template = ROOT / "nbs" / "train.ipynb"
    with pytest.raises(PapermillExecutionError) as info:
        papermill.execute_notebook(str(template), str(tmp_path / "out.ipynb"), progress_bar=False, kernel_name="python3",
                                   parameters={**_params(data, tmp_path / "runs"), name: value}, cwd=str(template.parent))
    assert info.value.ename == "ParameterError"
    assert f"parameter `{name}` (in the notebook's parameters)" in info.value.evalue
    nb = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    failed = [c for c in nb.cells if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.outputs)]
    assert len(failed) == 1 and failed[0].source.startswith("parameters = ")  # the first cell after the parameters
    assert not marker.exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sun_seg_train_refuses_in_the_kernel_what_only_the_data_can_tell(data, tmp_path):
    """A batch larger than the data is seen when the kernel sets the run up: still exit 2, named, nothing written."""
    done = subprocess.run([*SUN_SEG, "train", *param_pairs(_params(data, tmp_path / "runs", batch_size=1000))],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ParameterError: parameter `batch_size`: 1000 is larger than the 27 training images" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_parameters_are_data_never_code(tmp_path):
    """A `-p` value that looks like code stays text; papermill writes it as a string literal (see the slow test)."""
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    assert parameters_from_pairs([["run_name", code]]) == {"run_name": code}
    with pytest.raises(ParameterError, match="run_name"):
        TrainConfig.from_params({"run_name": code})
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------------
# Output paths stay inside out_dir.

@pytest.mark.parametrize("run_name", ["../escape", "../../escape", "a/../../b", "/tmp/abs", "..", ".", "x/y", "~"])
def test_run_name_cannot_leave_out_dir(data, tmp_path, run_name):
    out = tmp_path / "out" / "runs"
    before = _tree(tmp_path)
    with pytest.raises(ParameterError, match="run_name"):
        fit(_params(data, out, run_name=run_name), progress=False)
    assert _tree(tmp_path) == before


def test_symlinked_run_folder_leading_out_is_refused(data, tmp_path):
    out, outside = tmp_path / "runs", tmp_path / "elsewhere"
    out.mkdir(); outside.mkdir()
    (out / "mine").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ParameterError, match="would leave the output folder"):
        fit(_params(data, out, run_name="mine"), progress=False)
    assert not any(outside.iterdir())


def test_run_folder_stays_inside_out_dir(data, tmp_path):
    plan = plan_run(TrainConfig.from_params(_params(data, tmp_path / "a" / ".." / "runs")), quiet=True)
    assert plan.run_dir.parent == (tmp_path / "runs").resolve() and ".." not in plan.run_dir.parts


# --------------------------------------------------------------------------------------------------------------------
# Kills (SIGKILL) at chosen instants: a resumed run ends identical to an uninterrupted one.

DEFAULT_KILLS = [
    "replaced:last_state.pt@2:kill",  # epoch 2 committed, its weights still pending: the resume moves them in place
]
SLOW_KILLS = [
    "replace:last_state.pt@2:kill",  # epoch 2's state written to its temporary file, not renamed: the epoch is redone
    "step@1:kill",  # the first optimizer step: nothing saved yet
    "step@5:kill",  # epoch 2, step 2
    "eval@2:kill",  # during epoch 2's evaluation
    "replace:best.safetensors.pending@1:kill",  # writing epoch 1's best weights
    "replace:last.safetensors.pending@3:kill",  # writing epoch 3's last weights
    "replace:last.safetensors@1:kill",  # epoch 1 committed, its best weights in place, its last weights not
    "replace:history.csv@3:kill",  # epoch 3 (the last) committed and in place, history.csv one epoch behind
    "replace:metrics.json@5:kill",  # everything saved but the final record saying completed
]


@pytest.mark.parametrize("fault", DEFAULT_KILLS)
def test_sigkill_then_resume_is_identical(data, injector, reference, tmp_path, fault):
    assert_same_run(kill_and_resume(data, injector, tmp_path, fault), reference)


@pytest.mark.slow
@pytest.mark.parametrize("fault", SLOW_KILLS)
def test_sigkill_matrix_then_resume_is_identical(data, injector, reference, tmp_path, fault):
    assert_same_run(kill_and_resume(data, injector, tmp_path, fault), reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_seeded_random_points(data, injector, reference, tmp_path, seed):
    """Three kills per run at points drawn with a seed (steps, evaluations, any file's write), one after the other."""
    rng = random.Random(seed)
    points = ([f"step@{n}" for n in range(1, 10)] + [f"eval@{n}" for n in range(1, 4)] +
              [f"{when}:{name}@{n}" for when in ("replace", "replaced") for n in (1, 2) for name in
               ("last_state.pt", "last.safetensors.pending", "last.safetensors", "history.csv", "metrics.json")])
    out, log = tmp_path / "runs", tmp_path / "faults.log"
    params = _params(data, out)
    for attempt, point in enumerate(rng.sample(points, 3)):
        done = _train(params, injector, f"{point}:kill", log)
        assert done.returncode in (0, -signal.SIGKILL), done.stderr[-2000:]
        if attempt == 0: assert done.returncode == -signal.SIGKILL  # a fresh run reaches every point
        if out.is_dir() and any(out.iterdir()): assert_intact(_only_run(out))
    final = _train(params, injector)
    assert final.returncode == 0, final.stderr[-3000:]
    assert_same_run(_only_run(out), reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_seeded_random_times(data, injector, reference, tmp_path, seed):
    """Three kills at wall-clock instants drawn with a seed (wherever the process is then), then a run to the end."""
    rng = random.Random(seed)
    start = time.perf_counter()
    clean = _train(_params(data, tmp_path / "clean"), injector)  # how long a whole run takes here, now
    assert clean.returncode == 0, clean.stderr[-2000:]
    whole = time.perf_counter() - start
    out = tmp_path / "runs"
    params = _params(data, out)
    command = [sys.executable, "-m", "sun_seg.train", "--quiet", *param_pairs(params)]
    kills = 0
    for _ in range(3):
        process = subprocess.Popen(command, env=_env(injector), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            process.wait(timeout=rng.uniform(0.4, 0.95) * whole)  # start-up (imports) is about half of it
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            kills += 1
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode in (0, -signal.SIGKILL), stderr[-2000:]
        if out.is_dir() and any(out.iterdir()): assert_intact(_only_run(out))
    assert kills >= 1
    final = _train(params, injector)
    assert final.returncode == 0, final.stderr[-3000:]
    assert_same_run(_only_run(out), reference)


@pytest.mark.slow
def test_sigkill_after_early_stop_does_not_train_on(data, injector, tmp_path):
    """Killed after saving the epoch that stops the run early: the resume must stop too, not train one more epoch."""
    params = lambda out: _params(data, out, epochs=5, patience=1)
    ref = _train(params(tmp_path / "ref"), injector)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_dir = _only_run(tmp_path / "ref")
    metrics = json.loads((ref_dir / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["epochs_completed"] < 5  # the case this test is about
    stop = metrics["epochs_completed"]
    run_dir = kill_and_resume(data, injector, tmp_path, f"replace:history.csv@{stop}:kill", params(tmp_path / "runs"))
    assert_same_run(run_dir, ref_dir)


@pytest.mark.slow
def test_sigkill_during_test_evaluation(data, injector, tmp_path):
    params = lambda out: _params(data, out, test=True)
    ref = _train(params(tmp_path / "ref"), injector)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run_dir = kill_and_resume(data, injector, tmp_path, "eval@4:kill", params(tmp_path / "runs"))  # 3 val, then test
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["images"] == 6
    assert_same_run(run_dir, _only_run(tmp_path / "ref"))


# --------------------------------------------------------------------------------------------------------------------
# Ctrl-C: a terminal's SIGINT, and a kernel interrupt (Jupyter's stop button): recorded, resumable, identical.

def test_ctrl_c_in_terminal_records_interrupted_and_resumes(data, injector, reference, tmp_path):
    out, log = tmp_path / "runs", tmp_path / "faults.log"
    params = _params(data, out)
    done = _train(params, injector, "step@5:int", log)  # SIGINT during epoch 2
    assert done.returncode == 130, done.stderr[-2000:]
    assert "interrupted; run the same command again to resume" in done.stderr
    run_dir = _only_run(out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["epochs_completed"] == 1
    assert "epoch 2" in metrics["reason"] and "run the same command again to resume" in metrics["reason"]
    assert_intact(run_dir)
    again = _train(params, injector)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_ctrl_c_to_sun_seg_train_interrupts_the_kernel(data, injector, reference, tmp_path):
    """`sun-seg train` (papermill): Ctrl-C reaches the command, which interrupts the kernel; exit 130; resumes."""
    out, log = tmp_path / "runs", tmp_path / "faults.log"
    params = _params(data, out, epochs=3)
    # the kernel sends the terminal's SIGINT to the command's process group at its 4th step (epoch 2)
    env = _env(injector, "step@4:int-parent", log, where="kernel")
    done = subprocess.run([*SUN_SEG, "train", *param_pairs(params)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path, start_new_session=True)
    assert "int-parent" in log.read_text()
    assert done.returncode == 130, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Run the same command again to continue" in done.stderr
    run_dir = _only_run(out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted", metrics
    assert "run the same command again to resume" in metrics["reason"]
    assert (run_dir / "train.ipynb").is_file()  # the executed notebook, up to the interrupt, kept with the run
    assert_intact(run_dir)
    again = subprocess.run([*SUN_SEG, "train", *param_pairs(params)], capture_output=True, text=True, env=_env(injector),
                           timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "resuming after epoch" in again.stdout
    assert_same_run(run_dir, reference)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_kernel_interrupt_in_papermill_records_interrupted_and_resumes(data, injector, reference, tmp_path, monkeypatch):
    """The training notebook under papermill, its kernel interrupted mid-epoch (what Jupyter's stop button sends)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError
    out, log = tmp_path / "runs", tmp_path / "faults.log"
    params = _params(data, out)
    for key, value in _env(injector, "step@5:int", log, where="kernel").items():
        if os.environ.get(key) != value: monkeypatch.setenv(key, value)
    template = ROOT / "nbs" / "train.ipynb"
    with pytest.raises(PapermillExecutionError) as info:
        papermill.execute_notebook(str(template), str(tmp_path / "out.ipynb"), parameters=params, progress_bar=False,
                                   cwd=str(template.parent), kernel_name="python3")
    assert info.value.ename == "KeyboardInterrupt"
    run_dir = _only_run(out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["epochs_completed"] == 1, metrics
    monkeypatch.delenv("SUN_SEG_FAULT")
    papermill.execute_notebook(str(template), str(tmp_path / "again.ipynb"), parameters=params, progress_bar=False,
                               cwd=str(template.parent), kernel_name="python3")
    assert_same_run(run_dir, reference)


# --------------------------------------------------------------------------------------------------------------------
# Divergence, exceptions, out of memory: recorded with status and reason; what was recorded stays.

def test_out_of_memory_is_recorded_with_what_to_do_and_resumes(data, injector, reference, tmp_path):
    out, log = tmp_path / "runs", tmp_path / "faults.log"
    params = _params(data, out)
    done = _train(params, injector, "forward@5:oom", log)  # the 5th training-mode forward (the 1st counts FLOPs): epoch 2
    assert done.returncode == 2, done.stderr[-3000:]
    assert "sun_seg.train: error: out of memory" in done.stderr and "micro_batch_size" in done.stderr
    run_dir = _only_run(out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["epochs_completed"] == 1
    reason = metrics["reason"]
    assert reason.startswith("out of memory on cpu during epoch 2") and "resumes from epoch 2" in reason
    assert "-p micro_batch_size 2" in reason and "image_size" in reason, reason
    assert [r["epoch"] for r in read_history(run_dir / "history.csv")] == [1]  # what was recorded stays
    assert weights_metadata(run_dir / "checkpoints" / "last.safetensors")["epoch"] == "1"
    again = _train(params, injector)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after epoch 1" in again.stdout
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_exception_inside_a_run_is_recorded_and_resumes(data, injector, reference, tmp_path):
    out, log = tmp_path / "runs", tmp_path / "faults.log"
    params = _params(data, out)
    done = _train(params, injector, "eval@2:error", log)  # in epoch 2's evaluation
    assert done.returncode == 1 and "RuntimeError: a failure inside the run" in done.stderr, done.stderr[-3000:]
    run_dir = _only_run(out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["epochs_completed"] == 1
    assert metrics["reason"] == "RuntimeError: a failure inside the run (simulated by the fault test)"
    assert_intact(run_dir)
    again = _train(params, injector)
    assert again.returncode == 0 and "resuming after epoch 1" in again.stdout, again.stderr[-3000:]
    assert_same_run(run_dir, reference)


def test_out_of_memory_in_process_is_a_torch_oom_and_a_sun_seg_error(data, tmp_path, monkeypatch):
    """Callers catching torch's OutOfMemoryError still do; the study records the reason like any SunSegError."""
    import sun_seg.models.unet as unet
    forward, calls = unet.UNet.forward, []
    def running_out(self, *a, **k):
        if self.training:
            calls.append(1)
            if len(calls) == 2: raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, *a, **k)
    monkeypatch.setattr(unet.UNet, "forward", running_out)
    with pytest.raises(torch.OutOfMemoryError) as info:
        fit(_params(data, tmp_path, micro_batch_size=1), progress=False)
    assert isinstance(info.value, RunOutOfMemory) and isinstance(info.value.__cause__, torch.OutOfMemoryError)
    record = json.loads((_only_run(tmp_path) / "metrics.json").read_text())
    assert record["status"] == "failed" and "already 1, the smallest: lower image_size" in record["reason"]
    assert record["epochs_completed"] == 0


class NaNLossAt(Callback):
    """Poison the weights after a step: the next step's loss is NaN (a real divergence, not a faked record)."""
    def __init__(self, epoch, step): self.epoch, self.step = epoch, step
    def after_step(self, trainer, epoch, step):
        if (epoch, step) == (self.epoch, self.step):
            with torch.no_grad():
                for p in trainer.model.parameters(): p.fill_(float("inf"))


@pytest.mark.slow
def test_nan_loss_mid_epoch_is_recorded_as_diverged_and_is_final(data, tmp_path):
    record = fit(_params(data, tmp_path), callbacks=[NaNLossAt(2, 1)], progress=False)
    run_dir = _only_run(tmp_path)
    assert record["status"] == "diverged" and "step 2 of epoch 2" in record["reason"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["best_epoch"] == 1 and metrics["epochs_completed"] == 1
    assert math.isfinite(metrics["best_val_miou"]) and [r["epoch"] for r in read_history(run_dir / "history.csv")] == [1]
    again = fit(_params(data, tmp_path), progress=False)  # diverged is final: reported, not retrained
    assert again["trained"] is False and again["status"] == "diverged"


# --------------------------------------------------------------------------------------------------------------------
# Determinism: a run repeated from its folder alone.

def test_run_is_repeated_from_its_folder_alone(data, tmp_path):
    first = fit(_params(data, tmp_path / "first", precision="auto"), progress=False)
    run_dir = Path(first["run_dir"])
    env = json.loads((run_dir / "environment.json").read_text())
    assert {"python", "torch", "numpy", "sun_seg", "git_commit", "device_type", "precision", "cpu_threads"} <= set(env)
    params = repeat_params(run_dir, out_dir=tmp_path / "again")
    assert params["precision"] in ("fp32", "bf16") and Path(params["data_dir"]).resolve() == data.resolve()
    moved = tmp_path / "moved"
    shutil.move(str(run_dir), moved)  # nothing but the folder is needed: not the command, not the original out_dir
    params = repeat_params(moved, out_dir=tmp_path / "again")
    again = fit(params, progress=False)
    assert again["run_id"] == first["run_id"]
    assert json.loads((Path(again["run_dir"]) / "params.json").read_text())["identity"] == \
        json.loads((moved / "params.json").read_text())["identity"]
    assert_same_run(Path(again["run_dir"]), moved)
    with pytest.raises(DataError, match="not a run folder"):
        repeat_params(tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# Damaged, tampered and foreign checkpoints: a DataError naming the file and what to do; never code run.

@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """A finished run, an interrupted one (after epoch 1) and an interrupted one of another seed (its resume state kept)."""
    root = tmp_path_factory.mktemp("checkpoint_runs")
    done = fit(_params(data, root / "done", epochs=1), progress=False)
    for name, seed in (("stopped", 0), ("other", 1)):
        with pytest.raises(KeyboardInterrupt):
            fit(_params(data, root / name, seed=seed), callbacks=[InterruptAt(2, 1)], progress=False)
    return {"done": Path(done["run_dir"]), "stopped": _only_run(root / "stopped"), "other": _only_run(root / "other")}


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / run_dir.parent.name / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def _resume(data, run_dir: Path, **overrides):
    params = {**_params(data, run_dir.parent), **overrides}
    return fit(params, progress=False)


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncated": path.write_bytes(bytes(raw[: len(raw) * 2 // 3]))
    elif how == "empty": path.write_bytes(b"")
    elif how == "garbage": path.write_bytes(os.urandom(len(raw)))
    elif how == "flipped":  # a few bytes of the weights changed, the header intact: only a checksum can tell
        raw[-40:-36] = bytes(b ^ 0xFF for b in raw[-40:-36])
        path.write_bytes(bytes(raw))
    else: raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "flipped"])
def test_damaged_best_weights_are_refused_naming_the_file(runs, tmp_path, how):
    run_dir = _copy(runs["done"], tmp_path)
    best = run_dir / "checkpoints" / "best.safetensors"
    _damage(best, how)
    with pytest.raises(DataError) as info:
        load_run_model(run_dir)
    assert info.value.path == best and str(best) in str(info.value)
    assert "delete the run folder and run the same command again" in str(info.value)


@pytest.mark.parametrize("which, how", [("last.safetensors", "truncated"), ("last.safetensors", "flipped"),
                                        ("last_state.pt", "truncated"), ("last_state.pt", "garbage"),
                                        ("last_state.pt", "empty")])
def test_damaged_resume_checkpoint_is_refused_and_nothing_changes(data, runs, tmp_path, which, how):
    run_dir = _copy(runs["stopped"], tmp_path)
    path = run_dir / "checkpoints" / which
    _damage(path, how)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(DataError) as info:
        _resume(data, run_dir)
    assert info.value.path == path and "delete the run folder" in str(info.value)
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert not {p.name for p in before.keys() | after.keys() if before.get(p) != after.get(p)}  # nothing touched
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"


def test_planted_pickle_is_not_executed(data, runs, tmp_path):
    """A `last_state.pt` that would run code when unpickled: refused, and the code does not run."""
    marker = tmp_path / "code_ran"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run_dir = _copy(runs["stopped"], tmp_path)
    state = run_dir / "checkpoints" / "last_state.pt"
    torch.save({"epoch": 1, "payload": Planted()}, state)
    with pytest.raises(DataError) as info:
        _resume(data, run_dir)
    assert info.value.path == state and "nothing in it was run" in str(info.value)
    with pytest.raises(DataError):
        load_training_state(state)
    assert not marker.exists()


def test_checkpoints_of_another_run_are_refused(data, runs, tmp_path):
    run_dir, other = _copy(runs["stopped"], tmp_path), runs["other"]
    # the whole resumable state of another run (other seed, same architecture)
    shutil.copy(other / "checkpoints" / "last_state.pt", run_dir / "checkpoints" / "last_state.pt")
    with pytest.raises(DataError, match="belongs to a run with other parameters or data"):
        _resume(data, run_dir)
    # only its weights: their epoch matches, their run does not
    run_dir = _copy(runs["stopped"], tmp_path / "b")
    foreign = weights_of(other / "checkpoints" / "last.safetensors")
    meta = weights_metadata(other / "checkpoints" / "last.safetensors")
    from safetensors.torch import save_file
    save_file(foreign, str(run_dir / "checkpoints" / "last.safetensors"), metadata={**meta, "epoch": "1"})
    with pytest.raises(DataError, match=f"belongs to run '{other.name}'"):
        _resume(data, run_dir)
    # best weights copied from another finished run
    done = _copy(runs["done"], tmp_path / "c")
    shutil.copy(other / "checkpoints" / "best.safetensors", done / "checkpoints" / "best.safetensors")
    with pytest.raises(DataError, match="belongs to run") as info:
        load_run_model(done)
    assert info.value.path == done / "checkpoints" / "best.safetensors"


def test_checkpoint_of_another_architecture_is_refused(data, runs, tmp_path):
    from sun_seg.models import build_model
    run_dir = _copy(runs["done"], tmp_path)
    best = run_dir / "checkpoints" / "best.safetensors"
    wider = build_model("unet", num_classes=37, base_channels=8)  # the run's U-Net is 4 wide
    save_weights(wider, best, epoch=1, run_id=run_dir.name)
    with pytest.raises(DataError, match="does not fit the model") as info:
        load_run_model(run_dir)
    assert info.value.path == best and "another model or width" in str(info.value)


def test_resume_after_kill_leaves_no_temporaries(data, runs, tmp_path):
    """Temporary files of writes a killed process never finished are removed by the next session (under its lock)."""
    run_dir = _copy(runs["stopped"], tmp_path)
    stale = [run_dir / "checkpoints" / ".last_state.pt.abc123.tmp", run_dir / ".metrics.json.def456.tmp"]
    for p in stale: p.write_bytes(b"half a file")
    record = _resume(data, run_dir)
    assert record["status"] == "completed" and not any(p.exists() for p in stale)
