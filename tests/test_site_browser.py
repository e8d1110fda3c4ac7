"""The report site in a real browser: headless Chromium (Debian's `chromium`) opens the pages of a site built from a
small simulated grid, with the network switched off, and the tables and figures must be there; a screenshot of
the figures page must not be blank. Skips when /usr/bin/chromium is absent (`apt-get install chromium`)."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sun_seg.report import build_site
from sun_seg.testing import SimulatedTrainer, simulate_study

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")]


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions",
               "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: a remote request could only fail
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from sun_seg.data.demo import make_demo_dataset
    base = tmp_path_factory.mktemp("browser")
    out = base / "demo"
    simulate_study(out, trainer=SimulatedTrainer(fail=["convnext-decoder-lr1e-3"]),
                   data_root=make_demo_dataset(base / "data", n_train=12, n_test=4, scale=0.1, progress=False))
    return build_site(out, api=False)


def test_tables_are_in_the_rendered_page(site, tmp_path):
    result = chromium(tmp_path / "profile", "--dump-dom", (site / "tables.html").as_uri())
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    for table in ("T1", "T2", "T3", "T4", "T5"):
        assert f'id="table-{table}"' in dom
    assert dom.count("<tr>") > 30 and "Study: val mIoU" in dom and "status-failed" in dom
    assert "DEMO DATA" in dom


def test_figures_are_shown_and_not_blank(site, tmp_path):
    dom = chromium(tmp_path / "profile", "--dump-dom", (site / "figures.html").as_uri()).stdout
    drawn = [p.stem for p in (site / "figures").glob("*.png")]
    assert len(drawn) >= 5
    for figure in drawn:
        assert f'src="figures/{figure}.png"' in dom
    shot = tmp_path / "figures.png"
    result = chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2400", (site / "figures.html").as_uri())
    assert shot.is_file(), result.stderr[-2000:]
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    colours = np.unique(pixels[:: 7], axis=0)
    assert pixels.std() > 20 and len(colours) > 200  # text, tables and plotted figures, not an empty page


def test_run_page_and_overview_render(site, tmp_path):
    run_page = next((site / "runs").glob("*.html"))
    dom = chromium(tmp_path / "profile", "--dump-dom", run_page.as_uri()).stdout
    assert "Parameters" in dom and "IoU per class" in dom
    dom = chromium(tmp_path / "profile", "--dump-dom", (site / "index.html").as_uri()).stdout
    assert "Research questions" in dom and "RQ3" in dom
