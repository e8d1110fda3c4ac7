"""Every notebook in nbs/ runs top to bottom (one pytest item each), as `nbdev_test` would.

Cells flagged `#| slow` or `#| cuda` (settings.ini `tst_flags`) are skipped unless SUN_SEG_TEST_SLOW=1.
Papermill templates (`train.ipynb`, `report*.ipynb`) have their own tests with tiny parameters.
"""
import os

import pytest

from conftest import ROOT

TEMPLATES = {"train.ipynb"}
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb")
                   if not p.name.startswith("_") and p.name not in TEMPLATES and not p.name.startswith("report"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(notebook, capsys):
    from nbdev.test import test_nb
    skip = [] if os.environ.get("SUN_SEG_TEST_SLOW") == "1" else ["slow", "cuda"]
    if not __import__("torch").cuda.is_available(): skip = sorted(set(skip) | {"cuda"})
    ok, seconds = test_nb(notebook, skip_flags=skip, showerr=True)
    assert ok, f"{notebook.name} failed; the traceback is in the captured stderr above"
