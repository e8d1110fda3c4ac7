"""The library is what the notebooks export, and the notebooks are committed clean.

Both checks run nbdev on a copy of the project, so they never touch the working tree. They look at the source
notebooks only (those directly in nbs/ that git does not ignore): JupyterLab's `.ipynb_checkpoints/`, executed run
notebooks (`nbs/runs/`) and papermill outputs (`nbs/out.ipynb`) are not notebooks of the project. A notebook
opened and saved through a real Jupyter server started as `make lab` starts it passes both checks.
"""
import filecmp
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT

BIN = Path(sys.executable).parent


def _copy_project(dest: Path, root: Path = ROOT) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "settings.ini", dest)
    shutil.copytree(root / "nbs", dest / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints", "runs", "_*"))
    shutil.copytree(root / "sun_seg", dest / "sun_seg", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    return _copy_project(tmp_path_factory.mktemp("project"))


def _ignored_by_git(root: Path, names: list[str]) -> set[str]:
    if not names or not (ROOT / ".git").exists(): return set()
    found = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], input="\n".join(names), cwd=ROOT,
                           capture_output=True, text=True)
    return {Path(line).name for line in found.stdout.splitlines()}


def source_notebooks(nbs: Path) -> set[Path]:
    """The notebooks that are the project's source: directly in `nbs`, not scratch (`_`), not ignored by git."""
    names = sorted(p.name for p in nbs.glob("*.ipynb") if not p.name.startswith(("_", ".")))
    ignored = _ignored_by_git(nbs, [f"nbs/{n}" for n in names])
    return {Path(n) for n in names if n not in ignored}


def _different(a: Path, b: Path, names: set[Path]) -> list[str]:
    return sorted(str(n) for n in names
                  if not (a / n).exists() or not (b / n).exists() or not filecmp.cmp(a / n, b / n, shallow=False))


def library_differences(project: Path, copy: Path) -> list[str]:
    """Modules of `project` that differ from what `nbdev_export` writes in `copy` (a copy of `project`)."""
    subprocess.run([BIN / "nbdev_export"], cwd=copy, check=True, capture_output=True)
    names = {p.relative_to(project / "sun_seg") for p in (project / "sun_seg").rglob("*.py")}
    names |= {p.relative_to(copy / "sun_seg") for p in (copy / "sun_seg").rglob("*.py")}
    return _different(project / "sun_seg", copy / "sun_seg", names)


def unclean_notebooks(project: Path, copy: Path) -> list[str]:
    """Source notebooks of `project` that `nbdev_clean` (run in `copy`, a copy of `project`) changes."""
    subprocess.run([BIN / "nbdev_clean"], cwd=copy, check=True, capture_output=True)
    return _different(project / "nbs", copy / "nbs", source_notebooks(project / "nbs"))


def test_library_matches_notebooks(project_copy):
    changed = library_differences(ROOT, project_copy)
    assert not changed, f"run `make export`: these modules differ from what nbs/ exports: {changed}"


def test_notebooks_are_clean(project_copy):
    changed = unclean_notebooks(ROOT, project_copy)
    assert not changed, f"run `make export` (it runs nbdev_clean): these notebooks are not clean: {changed}"


@pytest.mark.parametrize("source", ["nbs/train.ipynb", "reports/study.yaml"])
def test_packaged_templates_match_their_sources(source):
    "A wheel ships sun_seg/templates/ (found when installed outside a checkout): the copies are the sources."
    copy = ROOT / "sun_seg" / "templates" / Path(source).name
    assert copy.is_file() and filecmp.cmp(ROOT / source, copy, shallow=False), \
        f"run `make export` (it copies {source} into sun_seg/templates/): the packaged copy differs"


def test_checks_ignore_what_is_not_a_source_notebook(tmp_path):
    project = _copy_project(tmp_path / "project")
    nbs = project / "nbs"
    (nbs / ".ipynb_checkpoints").mkdir()
    (nbs / ".ipynb_checkpoints" / "train-checkpoint.ipynb").write_text('{"cells": [], "metadata": {"x": 1}}')
    (nbs / "runs" / "r1").mkdir(parents=True)
    (nbs / "runs" / "r1" / "train.ipynb").write_text('{"cells": [], "metadata": {"x": 1}}')
    (nbs / "out.ipynb").write_text('{"cells": [], "metadata": {"x": 1}, "nbformat": 4, "nbformat_minor": 5}')
    names = source_notebooks(nbs)
    assert Path("train.ipynb") in names and Path("out.ipynb") not in names
    assert not any(".ipynb_checkpoints" in str(n) or "runs" in n.parts for n in names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_options() -> list[str]:
    """The `--ContentsManager...` options `make lab` gives JupyterLab (read from the Makefile's lab recipe)."""
    recipe = re.search(r"^lab:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    return [o for o in recipe.split() if o.startswith("--ContentsManager")]


def _api(url: str, token: str, method: str = "GET", body: dict | None = None) -> dict:
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"{}")


@pytest.fixture
def jupyter_server(tmp_path):
    """A real Jupyter server on a free localhost port, with a token, on a copy of the project, as `make lab` starts it."""
    project = _copy_project(tmp_path / "project")
    port, token = _free_port(), "sun-seg-test-token"
    options = _lab_options()
    assert "--ContentsManager.pre_save_hook=sun_seg.lab.clean_on_save" in options, options
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    server = subprocess.Popen([sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}",
                               "--ip=127.0.0.1", f"--IdentityProvider.token={token}", "--allow-root",
                               f"--ServerApp.root_dir={project / 'nbs'}", *options],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=project, env=env)
    base = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                _api(f"{base}/status", token); break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the Jupyter server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        yield project, base, token
    finally:
        server.terminate()
        try: server.wait(timeout=30)
        except subprocess.TimeoutExpired: server.kill()


def test_a_notebook_opened_and_saved_in_lab_stays_clean(jupyter_server, tmp_path):
    """Open `train.ipynb` and save it as JupyterLab does (a checkpoint, then the model with Lab's metadata)."""
    project, base, token = jupyter_server
    before = (project / "nbs" / "train.ipynb").read_bytes()
    model = _api(f"{base}/contents/train.ipynb?content=1", token)
    assert model["content"]["metadata"]["kernelspec"]["name"] == "sun_seg"  # opens on the project's kernel
    _api(f"{base}/contents/train.ipynb/checkpoints", token, "POST")  # Lab makes one on opening
    assert (project / "nbs" / ".ipynb_checkpoints").is_dir()
    content = model["content"]
    content["metadata"]["kernelspec"]["display_name"] = "Python (sun_seg)"  # what Lab writes back
    content["metadata"]["language_info"] = {"codemirror_mode": {"name": "ipython", "version": 3}, "name": "python",
                                            "version": sys.version.split()[0], "mimetype": "text/x-python"}
    content["cells"][1]["execution_count"] = 1
    saved = _api(f"{base}/contents/train.ipynb", token, "PUT", {"type": "notebook", "format": "json", "content": content})
    assert saved["name"] == "train.ipynb"
    assert (project / "nbs" / "train.ipynb").read_bytes() == before  # saved exactly as committed
    assert not unclean_notebooks(project, _copy_project(tmp_path / "clean", project))
    assert not library_differences(project, _copy_project(tmp_path / "export", project))


def test_a_notebook_saved_by_another_jupyter_is_cleaned_by_the_command_the_check_names(tmp_path):
    """A Jupyter without `make lab`'s hook saves Lab's metadata; the check names it, and `make export`'s clean fixes it."""
    import nbformat
    project = _copy_project(tmp_path / "project")
    path = project / "nbs" / "train.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.metadata.kernelspec.display_name = "Python (sun_seg)"
    nb.metadata.language_info = {"name": "python", "version": sys.version.split()[0]}
    nbformat.write(nb, path)  # how a Jupyter server writes a notebook
    assert unclean_notebooks(project, _copy_project(tmp_path / "check", project)) == ["train.ipynb"]
    recipe = re.search(r"^export:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert "nbdev_clean" in recipe  # the command the check's message names runs it
    subprocess.run([BIN / "nbdev_clean"], cwd=project, check=True, capture_output=True)
    assert not unclean_notebooks(project, _copy_project(tmp_path / "again", project))
    assert path.read_bytes() == (ROOT / "nbs" / "train.ipynb").read_bytes()
