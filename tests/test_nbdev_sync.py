"""The library is what the notebooks export, and the notebooks are committed clean.

Both checks run nbdev on a copy of the project, so they never touch the working tree.
"""
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "settings.ini", dest)
    shutil.copytree(ROOT / "nbs", dest / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints", "runs", "_*"))
    shutil.copytree(ROOT / "sun_seg", dest / "sun_seg", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _different(a: Path, b: Path, pattern: str) -> list[str]:
    names = {p.relative_to(a) for p in a.rglob(pattern)} | {p.relative_to(b) for p in b.rglob(pattern)}
    return sorted(str(n) for n in names
                  if not (a / n).exists() or not (b / n).exists() or not filecmp.cmp(a / n, b / n, shallow=False))


def test_library_matches_notebooks(project_copy):
    subprocess.run([BIN / "nbdev_export"], cwd=project_copy, check=True, capture_output=True)
    changed = _different(ROOT / "sun_seg", project_copy / "sun_seg", "*.py")
    assert not changed, f"run `make export`: these modules differ from what nbs/ exports: {changed}"


def test_notebooks_are_clean(project_copy):
    subprocess.run([BIN / "nbdev_clean"], cwd=project_copy, check=True, capture_output=True)
    changed = _different(ROOT / "nbs", project_copy / "nbs", "*.ipynb")
    assert not changed, f"run `make export` (it runs nbdev_clean): these notebooks are not clean: {changed}"


@pytest.mark.parametrize("source", ["nbs/train.ipynb", "reports/study.yaml"])
def test_packaged_templates_match_their_sources(source):
    "A wheel ships sun_seg/templates/ (found when installed outside a checkout): the copies are the sources."
    copy = ROOT / "sun_seg" / "templates" / Path(source).name
    assert copy.is_file() and filecmp.cmp(ROOT / source, copy, shallow=False), \
        f"run `make export` (it copies {source} into sun_seg/templates/): the packaged copy differs"
