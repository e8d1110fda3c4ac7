"""The package tells the truth: a wheel built from this checkout, installed outside it, trains a demo run with
`sun-seg train` and lists the study with `sun-seg study --list` (the template and study file ship inside it)."""
import configparser
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sun_seg.core import DATA_ENV

from conftest import ROOT

BIN = Path(sys.executable).parent
DEV_ONLY = {"lab.py"}  # sun_seg.lab: `make lab`'s save hook for the project's own notebooks (nbdev, a dev tool, inside it)


def _settings() -> configparser.SectionProxy:
    config = configparser.ConfigParser(delimiters=["="])
    config.read(ROOT / "settings.ini", encoding="utf-8")
    return config["DEFAULT"]


def _names(requirements: str) -> set[str]:
    import re
    return {re.split(r"[<>=!~;\[ ]", r)[0].lower().replace("_", "-") for r in shlex.split(requirements)}


def test_development_tools_are_not_runtime_requirements():
    runtime, dev = _names(_settings()["requirements"]), _names(_settings()["dev_requirements"])
    assert not {"nbdev", "execnb", "ghapi", "pytest", "jupyterlab", "bleach"} & runtime
    assert {"nbdev", "execnb", "ghapi", "pytest"} <= dev
    library = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "sun_seg").rglob("*.py")
                        if p.name != "_modidx.py" and p.name not in DEV_ONLY)
    for tool in ("nbdev", "execnb", "ghapi", "bleach"):  # never imported by the library at run time
        assert f"import {tool}" not in library and f"from {tool}" not in library, tool


def test_every_imported_library_is_declared():
    import ast
    import sys as _sys
    declared = _names(_settings()["requirements"])
    aliases = {"yaml": "pyyaml", "PIL": "pillow", "IPython": "ipython", "tensorboardX": "tensorboardx", "zmq": "pyzmq"}
    imported = set()
    for path in (ROOT / "sun_seg").rglob("*.py"):
        if path.name in DEV_ONLY: continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import): imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module: imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in _sys.stdlib_module_names and m not in ("sun_seg", "__future__")}
    missing = {m for m in third_party if aliases.get(m, m).lower().replace("_", "-") not in declared}
    assert not missing, f"imported by sun_seg but not in settings.ini's requirements: {sorted(missing)}"


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_trains_and_lists_the_study(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside setup.py
    source.mkdir()
    for name in ("setup.py", "settings.ini", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "sun_seg", source / "sun_seg", ignore=shutil.ignore_patterns("__pycache__"))
    import importlib.util  # setuptools is there (Python 3.11's venvs have it): no download; else pip fetches it
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("sun_seg-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"sun_seg/templates/train.ipynb", "sun_seg/templates/study.yaml"} <= names
    assert {"sun_seg/report/templates/base.html.j2", "sun_seg/report/templates/site.css"} <= names  # the report site's package data
    runtime = [l for l in metadata.splitlines() if l.startswith("Requires-Dist:") and "extra ==" not in l]
    assert "Requires-Python: >=3.11" in metadata and runtime and not [l for l in runtime if "nbdev" in l]
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"  # no checkout here: no nbs/, no reports/
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != DATA_ENV}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1")  # the installed copy, not the checkout (or the editable one)
    where = subprocess.run([sys.executable, "-c", "import sun_seg; print(sun_seg.__file__)"], env=env, cwd=elsewhere,
                           capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    sun_seg = str(site / "bin" / "sun-seg")
    tiny = ["-p", "out_dir", "runs", "-p", "epochs", "1", "-p", "max_train_batches", "1", "-p", "max_eval_batches", "1",
            "-p", "unet_width", "4", "-p", "image_size", "32x40", "-p", "batch_size", "4", "-p", "device", "cpu",
            "-p", "num_workers", "0"]
    trained = subprocess.run([sun_seg, "train", *tiny], env=env, cwd=elsewhere, capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    (run_dir,) = (elsewhere / "runs").iterdir()
    import json
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    import nbformat
    executed = nbformat.read(run_dir / "train.ipynb", as_version=4)
    assert Path(executed.metadata.papermill["input_path"]).is_relative_to(site / "sun_seg" / "templates")
    assert json.loads((run_dir / "environment.json").read_text())["git_commit"] is None  # the kernel ran the wheel's code
    listed = subprocess.run([sun_seg, "study", "--list", "--demo"], env=env, cwd=elsewhere, capture_output=True,
                            text=True, timeout=900)
    assert listed.returncode == 0, listed.stdout[-3000:] + listed.stderr[-3000:]
    assert "runs in this selection" in listed.stdout and "unet-lr1e-4-20ep" in listed.stdout  # the packaged study file
