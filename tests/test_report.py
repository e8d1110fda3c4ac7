"""Tables, figures and the site, built from run folders this test writes (the simulated trainer: the run-folder
contract with made-up numbers). The report must show exactly the numbers in the run folders, NaN rows with their
status for runs without a result, mean and spread over seeds, escaped strings, and nothing fetched from outside."""
import html
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sun_seg.analysis import build_analysis, load_runs
from sun_seg.core import read_json, stable_hash
from sun_seg.report import build_site, offline_problems
from sun_seg.study import (GridRun, load_study, parse_study, read_yaml, run_grid, study_record, write_study_record,
                           resolve_grid, run_evaluations)
from sun_seg.testing import SimulatedTrainer, simulate_study, simulated_evaluate

from conftest import ROOT

STUDY = ROOT / "reports" / "study.yaml"


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    from sun_seg.data.demo import make_demo_dataset
    base = tmp_path_factory.mktemp("report")
    data_root = make_demo_dataset(base / "data", n_train=12, n_test=4, scale=0.1, progress=False)
    out = base / "demo"
    simulate_study(out, trainer=SimulatedTrainer(diverge=["unet-lr1e-2-20ep"], fail=["convnext-decoder-lr1e-3"]),
                   data_root=data_root)
    result = build_analysis(out)
    site = build_site(out, result)
    return out, result, site


def metrics(out, entry):
    run_id = next(r["run_id"] for r in read_json(out / "study.json")["runs"] if r["entry"] == entry)
    return read_json(out / "runs" / run_id / "metrics.json")


def test_tables_hold_exactly_the_numbers_of_the_run_folders(study_out):
    out, _, _ = study_out
    t1 = pd.read_csv(out / "tables" / "T1.csv").set_index("entry")
    t2 = pd.read_csv(out / "tables" / "T2.csv").set_index("entry")
    t5 = pd.read_csv(out / "tables" / "T5.csv").set_index("entry")
    record = read_json(out / "study.json")
    for entry in [e["name"] for e in record["entries"]]:
        m = metrics(out, entry)
        if m["status"] != "completed": continue
        if entry in t1.index:
            assert t1.loc[entry, "best_val_miou"] == m["best_val_miou"]  # exact: CSV keeps full precision
            assert t1.loc[entry, "val_loss"] == m["val"]["loss"]
            assert t1.loc[entry, "best_epoch"] == m["best_epoch"]
        if entry in t2.index:
            assert t2.loc[entry, "best_val_miou"] == m["best_val_miou"]
            assert t2.loc[entry, "trainable_params"] == m["trainable_params"]
        assert t5.loc[entry, "wall_seconds"] == m["wall_seconds"]
        assert t5.loc[entry, "train_images_per_second"] == m["train_images_per_second"]
        assert t5.loc[entry, "gflops_per_image"] == m["flops_per_image"] / 1e9
    # the study's values beside ours, and the difference
    e = next(x for x in record["entries"] if x["name"] == "unet-lr1e-3-20ep")
    assert t1.loc["unet-lr1e-3-20ep", "study_best_val_miou"] == e["reported"]["T1"]["val_miou"] == 0.131
    assert t1.loc["unet-lr1e-3-20ep", "diff_best_val_miou"] == metrics(out, "unet-lr1e-3-20ep")["best_val_miou"] - 0.131
    t3 = pd.read_csv(out / "tables" / "T3.csv")
    evaluations = read_json(out / "evaluations.json")
    for row in t3.itertuples():
        if row.kind != "model": continue  # the difference row, and the baselines computed from the data
        m = read_json(out / "runs" / evaluations[row.evaluation]["run_ids"][0] / "metrics.json")
        assert row.test_miou == m["test"]["miou"] and row.val_miou == m["best_val_miou"]
    difference = t3[t3.kind == "difference"].iloc[0]
    assert difference.test_miou == t3.iloc[1].test_miou - t3.iloc[0].test_miou
    t4 = pd.read_csv(out / "tables" / "T4.csv")
    first = t4.iloc[0]
    assert first.effect == metrics(out, first.variant_entry)["best_val_miou"] - metrics(out, first.baseline_entry)["best_val_miou"]
    assert first.study_effect == -0.06


def test_runs_without_a_result_are_nan_rows_with_their_status(study_out):
    out, result, site = study_out
    t2 = result["tables"]["T2"].frame.set_index("entry")
    failed = t2.loc["convnext-decoder-lr1e-3"]
    assert failed.status == "failed" and math.isnan(failed.best_val_miou) and math.isnan(failed.best_epoch)
    assert "simulated failure" in failed.reason
    md = (out / "tables" / "T2.md").read_text()
    row = next(line for line in md.splitlines() if "Decoder + 0.001LR" in line)
    assert "NaN" in row and "failed" in row and " 0.0000 " not in row
    t1 = result["tables"]["T1"].frame.set_index("entry")
    assert t1.loc["unet-lr1e-2-20ep", "status"] == "diverged"
    html = (site / "tables.html").read_text()
    assert "status-failed" in html and "status-diverged" in html


def test_several_seeds_show_mean_and_spread(tmp_path):
    d = read_yaml(STUDY)
    d["seeds"] = [0, 1, 2]
    study = parse_study(d, STUDY)
    out = tmp_path / "seeds"
    simulate_study(out, study)
    runs = load_runs(out)
    assert len(runs) == 48
    frame = build_analysis(out, run_figures=False)["tables"]["T2"].frame.set_index("entry")
    values = runs[runs.entry == "unet-plateau-lr1e-4"].best_val_miou
    assert frame.loc["unet-plateau-lr1e-4", "best_val_miou"] == pytest.approx(values.mean(), abs=0)
    assert frame.loc["unet-plateau-lr1e-4", "best_val_miou_sd"] == pytest.approx(values.std(ddof=1))
    assert frame.loc["unet-plateau-lr1e-4", "n"] == 3
    md = (out / "tables" / "T2.md").read_text()
    assert re.search(r"0\.\d{4} ± 0\.\d{4} \(n=3\)", md)


def test_every_page_says_which_data_and_settings(study_out):
    out, _, site = study_out
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 20
    fingerprint = read_json(out / "study.json")["data"]["fingerprint"][:12]
    for page in pages:
        text = page.read_text()
        assert "DEMO DATA" in text and f"fingerprint {fingerprint}" in text, page
        assert "study profile demo" in text, page
        assert "Content-Security-Policy" in text, page
    assert "pretrained" in (site / "index.html").read_text()


def test_data_overview_comes_from_the_labels(study_out):
    out, result, site = study_out
    drawn = {f["id"]: f for f in result["figures"]}
    assert drawn["F11"]["png"] and drawn["F-imb"]["png"]
    stats = pd.read_csv(out / "data" / "image_statistics.csv")
    assert len(stats) == 16 and stats.void_share.between(0, 1).all()
    html = (site / "data.html").read_text()
    assert 'src="figures/F11.png"' in html and 'src="figures/F-imb.png"' in html and "pixel_share" in html


def test_site_fetches_nothing_from_outside(study_out):
    _, _, site = study_out
    assert offline_problems(site) == []
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert not re.search(r"""<(script|link)[^>]+(src|href)=["']?(https?:)?//""", text, re.I), page


def test_recorded_strings_are_escaped(tmp_path):
    d = read_yaml(STUDY)
    d["runs"][0]["tables"]["T1"] = "<script>alert('row')</script>"
    d["title"] = "<img src=x onerror=alert(1)>"
    study = parse_study(d, STUDY)
    out = tmp_path / "escaped"
    simulate_study(out, study, trainer=SimulatedTrainer(fail=["unet-lr1e-3-20ep"]))
    record = read_json(out / "grid" / f"{read_json(out / 'study.json')['runs'][1]['run_id']}.json")
    record["reason"] = "<b>bold</b> & <script>x()</script>"
    (out / "grid" / f"{record['run_id']}.json").write_text(json.dumps(record))
    site = build_site(out, api=False)
    html = (site / "tables.html").read_text() + (site / "index.html").read_text() + (site / "runs.html").read_text()
    assert "&lt;script&gt;alert(&#39;row&#39;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;script&gt;" in html
    assert "<script" not in "".join(p.read_text() for p in site.rglob("*.html"))


def test_api_pages_come_from_the_notebooks(study_out):
    _, _, site = study_out
    api = (site / "api" / "index.html").read_text()
    for module in ("sun_seg.core", "sun_seg.study", "sun_seg.analysis", "sun_seg.report"):
        assert module in api
    assert "run_study" in (site / "api" / "study.html").read_text()  # the package's page (40_study)
    study = (site / "api" / "study.grid.html").read_text()  # one of its modules' (40c_study.grid)
    assert "run_grid" in study and "the study's output folder" in html.unescape(study)  # a docments comment
    # Markdown in docstrings and parameter comments is rendered: backticks become code
    assert "<em>" in study and not re.search(r"<em>[^<]*`[^<]*</em>", study) and re.search(r"<em>[^<]*<code>", study)
    assert list((site.parent / ".cache" / "api").glob("40_study-*.json"))  # highlighted once, reused by later builds


def test_report_rebuilds_from_run_folders_without_redrawing(study_out, capsys):
    from sun_seg.cli import main
    out, _, _ = study_out
    png = out / "figures" / "F6.png"
    stamp = png.stat().st_mtime_ns
    start = time.perf_counter()
    assert main(["report", "--out", str(out), "--no-api"]) == 0
    assert time.perf_counter() - start < 60  # seconds in practice; generous on a busy machine
    assert png.stat().st_mtime_ns == stamp
    assert "report:" in capsys.readouterr().out
    assert (out / "site" / "tables.html").is_file()


def test_missing_study_record_says_what_to_do(tmp_path):
    from sun_seg.core import DataError
    with pytest.raises(DataError, match="run `sun-seg study`"):
        build_site(tmp_path)


# ---- what demo numbers can and cannot show (issue 14) ---------------------------------------------------------------

def _run_id(out, entry):
    return next(r["run_id"] for r in read_json(out / "study.json")["runs"] if r["entry"] == entry)


def test_demo_tables_show_noise_not_deltas_vs_the_study(study_out):
    from sun_seg.metrics import bootstrap_miou_difference, image_counts_path, load_image_counts
    out, result, site = study_out
    for tid in ("T1", "T2", "T3", "T4"):
        md = (out / "tables" / f"{tid}.md").read_text()
        header = md.splitlines()[2]
        assert "Δ" not in header and "95% interval" in header, tid  # no difference to the study on demo data
        assert "Demo data: the study's values are shown for reference" in md
    answers = (out / "tables" / "research_questions.md").read_text()
    assert "direction to the study" not in answers and "the noise of our runs" in answers
    # the interval is a seeded bootstrap over the images of the runs' per-image counts, recomputed here
    t4 = pd.read_csv(out / "tables" / "T4.csv").set_index("effect_name")
    row = t4.loc["U-Net, weighted loss"]
    counts = [load_image_counts(image_counts_path(out / "runs" / _run_id(out, e), "val")) for e in (row.baseline_entry, row.variant_entry)]
    d = bootstrap_miou_difference([(counts[0]["intersection"], counts[0]["union"])], [(counts[1]["intersection"], counts[1]["union"])],
                                  resamples=1000, seed=0)
    assert row.effect_ci == f"[{d['low']:+.3f}, {d['high']:+.3f}]"
    assert row.beyond_noise == ("yes" if d["low"] > 0 or d["high"] < 0 else "no")
    assert d["value"] == pytest.approx(row.effect, abs=1e-4)  # the counts give the recorded mIoUs
    t3 = pd.read_csv(out / "tables" / "T3.csv")
    assert re.match(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]: (beyond|within) the noise of our runs",
                    t3[t3.kind == "difference"].test_ci.iloc[0])
    assert "95% interval" in (site / "tables.html").read_text() and "leave out" in (site / "tables.html").read_text()


def test_baselines_are_computed_from_the_data_and_shown_beside_the_models(study_out):
    from sun_seg.data.analysis import pixel_baselines
    out, _, _ = study_out
    root = read_json(out / "study.json")["data"]["root"]
    fresh = pixel_baselines(root)
    t2 = pd.read_csv(out / "tables" / "T2.csv").set_index("entry")
    t3 = pd.read_csv(out / "tables" / "T3.csv").set_index("evaluation")
    for name in ("majority", "colour"):
        assert t2.loc[f"baseline-{name}", "best_val_miou"] == fresh["val"][name]["miou"]
        assert t3.loc[f"baseline-{name}", "test_miou"] == fresh["test"][name]["miou"]
        assert t2.loc[f"baseline-{name}", "model"] == "Baseline"
    assert (out / "data" / "baselines.json").is_file()  # cached with the data's fingerprint
    md = (out / "tables" / "T2.md").read_text()
    row = next(line for line in md.splitlines() if "colour only" in line)
    assert "NaN" not in row and "computed from the data" in row
    assert "What needs no learning" in (out / "site" / "data.html").read_text()


@pytest.fixture(scope="module")
def full_out(tmp_path_factory):
    """A simulated SUN RGB-D study: one run whose loss explodes while it 'completes', one recorded on an unnamed CPU."""
    out = tmp_path_factory.mktemp("full") / "sunrgbd"
    simulate_study(out, trainer=SimulatedTrainer(data_kind="sunrgbd"), profile="demo")
    run_dir = out / "runs" / _run_id(out, "unet-lr1e-2-20ep")
    history = pd.read_csv(run_dir / "history.csv")
    history.loc[history.index[-1], "val_loss"] = 962.8
    history.to_csv(run_dir / "history.csv", index=False)
    env = read_json(run_dir / "environment.json")
    (run_dir / "environment.json").write_text(json.dumps({**env, "device_name": "x86_64"}))
    result = build_analysis(out, run_figures=False)
    site = build_site(out, result, api=False, notebooks=False)
    return out, result, site


def test_sunrgbd_tables_keep_the_deltas_and_add_the_intervals(full_out):
    out, result, _ = full_out
    for tid in ("T1", "T2", "T3", "T4"):
        header = (out / "tables" / f"{tid}.md").read_text().splitlines()[2]
        assert "Δ" in header and "95% interval" in header, tid
    answers = (out / "tables" / "research_questions.md").read_text()
    assert "direction as the study" in answers or "direction to the study" in answers
    assert "Baselines not shown: the study's data is not on this machine" in " ".join(result["tables"]["T2"].notes)


def test_flags_for_exploded_losses_idle_schedulers_and_not_evaluated(full_out):
    out, result, site = full_out
    t1 = result["tables"]["T1"].frame.set_index("entry")
    assert t1.loc["unet-lr1e-2-20ep", "status"] == "completed"
    assert t1.loc["unet-lr1e-2-20ep", "flags"].startswith("loss exploded (val loss 962.8 at epoch 2")
    assert "scheduler never fired" in t1.loc["unet-lr1e-4-75ep-plateau", "flags"]  # the simulated lr never changes
    assert "never reduced the learning rate" in " ".join(result["answers"][0]["answer"])
    t5 = (out / "tables" / "T5.md").read_text()
    untested = next(line for line in t5.splitlines() if "| 0.001 |" in line)
    assert "not evaluated" in untested and "NaN" not in untested
    runs_html = (site / "runs.html").read_text()
    assert "not evaluated" in runs_html and "loss exploded" in runs_html
    assert not re.search(r'<td class="[^"]*nan[^"]*">not evaluated', runs_html)  # not shown as a failure


def test_rq3_states_its_units_and_the_devices_name(full_out):
    import platform
    import torch
    from sun_seg.core import cpu_model_name
    from sun_seg.train.checkpoint import environment_info
    out, result, _ = full_out
    rq3 = " ".join(result["answers"][2]["answer"])
    assert "mIoU points" in rq3 and "mIoU per extra device-hour" not in rq3
    t5 = result["tables"]["T5"].frame.set_index("entry")
    assert t5.loc["unet-lr1e-2-20ep", "device"] == "CPU (model not recorded: x86_64)"
    assert environment_info(torch.device("cpu"))["device_name"] == cpu_model_name()
    if "model name" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False:
        assert cpu_model_name() != platform.machine()


def test_settings_data_and_api_pages_are_readable(study_out):
    out, _, site = study_out
    index, data = (site / "index.html").read_text(), (site / "data.html").read_text()
    settings = index[index.index("Settings of this study"):]
    assert "{&#39;" not in settings and "[" not in settings.split("Reproduce")[0]  # no Python reprs of dicts or lists
    assert "pretraining: num_labels" not in settings or "150 labels (ADE20K)" in settings
    assert "{&#39;" not in data and "images per sensor" in data
    run_page = next((site / "runs").glob("*.html")).read_text()
    assert "{&#39;" not in run_page


def test_site_readme_and_notebooks_cite_the_study_not_files_outside_the_repository(study_out):
    import json as _json
    _, _, site = study_out
    # the project's own shared/ folder (the study's slides, samples, notes) is not part of the repository
    outside = re.compile(r"(^|[^\w/.])(\.\./)*shared/(study|samples|performance|style|sunrgbd-format|hooks|README)")
    for page in site.rglob("*.html"):
        assert not outside.search(page.read_text()), page
    assert "Baranski" in (site / "index.html").read_text()
    assert not outside.search((ROOT / "README.md").read_text())
    assert not outside.search((ROOT / "reports" / "study.yaml").read_text())
    for nb in (ROOT / "nbs").glob("*.ipynb"):
        cells = _json.loads(nb.read_text())["cells"]
        assert not any(outside.search("".join(c["source"])) for c in cells if c["cell_type"] == "markdown"), nb
def test_method_card_page_linked_from_the_tables(study_out):
    """The method card has its own page, linked from every table and from the navigation (GitHub issue 10)."""
    out, _, site = study_out
    page = (site / "method.html").read_text()
    for name in ("validation split", "augmentation", "class weights", "early stopping", "pretrained"):
        assert name in page, name
    assert "not stated" in page and "<code>pretrained_revision</code>" in page
    early = page[page.index('<tr id="early_stopping">'):].split("</tr>")[0]
    assert re.search(r"<em>unet-lr1e-2-20ep:</em>[^<]*(<code>\w+</code> = \w+, )*<code>patience</code> = 0", early)
    tables = (site / "tables.html").read_text()
    assert tables.count('href="method.html">the method card</a>') == 5
    assert 'href="../method.html"' in (next((site / "runs").glob("*.html"))).read_text()


def test_t1_shows_what_the_diverged_run_recorded(study_out):
    """The 0.01 row: our run's status and last finite values beside the study's 0.008, and a note on what that is."""
    out, result, _ = study_out
    t1 = result["tables"]["T1"]
    row = t1.frame.set_index("entry").loc["unet-lr1e-2-20ep"]
    assert row.status == "diverged" and row.recorded.startswith("diverged; last finite: epoch ")
    assert row.study_best_val_miou == 0.008
    assert all(r == "" for e, r in zip(t1.frame.entry, t1.frame.recorded) if e != "unet-lr1e-2-20ep")
    md = (out / "tables" / "T1.md").read_text()
    assert "diverged; last finite: epoch" in md and "collapsed model" in md and "patience 0" in md
