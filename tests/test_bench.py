"""`sun-seg bench` end to end on tiny settings: the record's schema, the report, the equal-results checks.

Correctness only: no timing is asserted here (speed is measured by the benchmark itself, never by tests).
"""
import json
import math

import pytest
import torch

from sun_seg import bench
from sun_seg.bench import (RECORD_FIELDS, SCHEMA, SECTIONS, TARGETS, bench_eval, check_record, engine_iou,
                           per_class_loop_iou, render_markdown, run_bench, torchmetrics_iou)
from sun_seg.bench.eval_cases import _eval_batches, _same_scores
from sun_seg.models import UNet

NARROW_UNET_PARAMS = sum(p.numel() for p in UNet(base_channels=8).parameters())  # what unet_width=8 should build
TINY = dict(matmul_size=128, conv_shape=[2, 16, 16, 16], eval_images=2, eval_size=[24, 32], eval_batch=2,
            data_images=4, data_wait_steps=2, repeats=1, steps_per_timing=1)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A small demo dataset in the raw release form and its prepared cache."""
    from sun_seg.data.demo import make_demo_dataset
    from sun_seg.data.prepare import prepare
    root = tmp_path_factory.mktemp("bench_data")
    raw = make_demo_dataset(root / "raw", n_train=12, n_test=2, scale=0.25, progress=False)
    return raw, prepare(raw, root / "cache", workers=0, progress=False)


@pytest.fixture(scope="module")
def tiny_run(small_data):
    # the full profile (every configuration), with tiny sizes and without torch.compile (minutes on a CPU)
    # (without the per-run overhead section: it launches a papermill kernel; `test_overhead_section` covers it)
    return run_bench(("unet",), (32, 32), 2, "cpu", data=small_data, quiet=True,
                     sections=tuple(s for s in SECTIONS if s != "overhead"),
                     model_options={"unet": {"unet_width": 8}}, overrides={**TINY, "compile": False})


def test_record_has_the_documented_schema(tiny_run):
    check_record(tiny_run)
    # every section ran but the CUDA one and the peer (it fine-tunes the UPerNet; this run measures the U-Net only)
    assert set(tiny_run) == set(RECORD_FIELDS) - {"cuda", "peer", "overhead"}
    assert tiny_run["schema"] == SCHEMA and not tiny_run["errors"], tiny_run["errors"]
    assert set(tiny_run["skipped"]) == {"compile", "batch", "peer"}
    from sun_seg.core import to_json
    assert set(json.loads(to_json(tiny_run))) == set(tiny_run)  # JSON-able as written
    with pytest.raises(ValueError, match="unknown keys \\['extra'\\]"):
        check_record({**tiny_run, "extra": 1})


def test_train_rows_come_from_the_engine(tiny_run):
    rows = tiny_run["train"]["rows"]
    assert [r["config"] for r in rows] == ["fp32 NCHW", "fp32 channels_last", "bf16 NCHW", "bf16 channels_last"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["trainable_params"] == NARROW_UNET_PARAMS  # the narrow U-Net the engine built from unet_width=8
        assert r["images_per_second"] > 0 and r["flops_per_image"] > 0 and r["peak_memory_bytes"] >= r["state_bytes"] > 0
        assert 0 < r["fraction_of_ceiling"] and r["ceiling"].endswith(f"{r['precision']} {r['layout']}")
    assert rows[0]["speedup_vs_fp32_nchw"] == 1.0
    assert tiny_run["train"]["engine_default"] in [r["config"] for r in rows]
    assert tiny_run["train"]["precision"]["auto_without_native_bf16"] == "fp32"
    assert tiny_run["train"]["precision_choice_correct"] is True
    loop = tiny_run["loop"]
    assert loop["config"] == tiny_run["train"]["engine_default"] and math.isfinite(loop["overhead"])
    profiled = [r for r in rows if r.get("profile")]  # the engine default's step only
    assert [r["config"] for r in profiled] == [tiny_run["train"]["engine_default"]]
    shares = [o["share"] for o in profiled[0]["profile"]["ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert any("conv" in o["op"] for o in profiled[0]["profile"]["ops"])  # a U-Net step is mostly convolutions


def test_data_and_eval_sections(tiny_run):
    data = tiny_run["data"]
    assert data["dataset"] == "demo" and data["raw_form"] == "preprocessed" and data["wait"]["form"] == "cache"
    assert set(data["images_per_second"]) == {"raw_load", "cache_load", "raw_pipeline", "cache_pipeline"}
    assert 0 <= data["wait_share"] < 1
    ev = tiny_run["eval"]
    assert ev["equal"] and ev["mismatch"] is None
    assert ev["miou"]["confusion_matrix"] == ev["miou"]["per_class_loop"]


def test_targets_and_report(tiny_run):
    verdicts = {t["id"]: t["verdict"] for t in tiny_run["targets"]}
    assert set(verdicts) == {t.id for t in TARGETS}
    assert verdicts["eval_equal"] == "PASS" and verdicts["precision_choice"] == "PASS"
    # GPU-only targets and the peer's (no UPerNet in this run) are not measured; every other one is judged
    not_measured = {"gpu_unet_throughput", "gpu_upernet_throughput", "train_ceiling", "peer_train", "peer_data", "peer_miou"}
    assert {k for k, v in verdicts.items() if v == "NOT MEASURED"} == not_measured
    assert all(v in ("PASS", "FAIL") for k, v in verdicts.items() if k not in not_measured)
    md = render_markdown(tiny_run)
    assert tiny_run["command"] in md and "native bf16" in md and "unet (unet_width=8" in md
    assert "Not measured (compile): torch.compile was not measured" in md
    assert f"Where the unet {tiny_run['train']['engine_default']} step's time goes" in md


def test_failed_section_is_recorded_not_raised(small_data):
    raw, _ = small_data
    result = run_bench(("unet",), (32, 32), 2, "cpu", quick=True, sections=("data",), data=(raw, raw / "no_cache"),
                       quiet=True, overrides=TINY)  # no data at the cache's path: the data section fails, the run does not
    assert "no_cache" in result["errors"]["data"] and "data" not in result
    check_record(result)
    assert {t["id"]: t["verdict"] for t in result["targets"]}["data_cache_speedup"] == "NOT MEASURED"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_three_miou_implementations_agree(seed):
    batches = _eval_batches(3, (20, 28), 2, torch.device("cpu"), seed=seed)
    results = {"confusion_matrix": engine_iou(batches), "per_class_loop": per_class_loop_iou(batches),
               "torchmetrics": torchmetrics_iou(batches)}
    assert _same_scores(results) == (True, None)
    iou, value = results["confusion_matrix"]
    assert _same_scores({**results, "per_class_loop": (iou, value + 1e-9)})[0] is False  # the check can fail
    assert bench_eval(torch.device("cpu"), 2, (20, 28), 2, warmup=0, repeats=1)["equal"]


def test_command_line_writes_json_and_markdown(tmp_path, capsys):
    import argparse
    parser = argparse.ArgumentParser(prog="sun-seg")
    bench.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--sections", "eval", "--device", "cpu",
                              "--json", str(tmp_path / "b.json")])
    assert args.func(args) == 0
    record = json.loads((tmp_path / "b.json").read_text())
    check_record(record)
    assert record["command"] == "sun-seg bench --quick --sections eval --device cpu"
    assert (tmp_path / "b.md").read_text() in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_upernet_folder(tmp_path_factory):
    """A tiny UperNet saved with save_pretrained: the peer comparison's model without a download."""
    from sun_seg.models.upernet import build_upernet
    folder = tmp_path_factory.mktemp("tiny_upernet")
    build_upernet(None, backbone_config=dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]), hidden_size=16,
                  auxiliary_channels=8).net.save_pretrained(folder)
    return folder


def test_peer_section_compares_engine_and_trainer(small_data, tiny_upernet_folder):
    """`--sections peer` times the engine and transformers' Trainer on the same fine-tuning and judges three targets."""
    run = run_bench(("upernet",), (32, 32), 2, "cpu", sections=("peer",), data=small_data, quiet=True,
                    model_options={"upernet": {"pretrained": str(tiny_upernet_folder)}},
                    overrides={**TINY, "peer_steps": 2, "peer_data_steps": 2, "peer_eval_images": 2})
    check_record(run)
    peer = run["peer"]
    assert peer["engine_images_per_second"] > 0 and peer["trainer_images_per_second"] > 0
    assert peer["data_speedup"] == pytest.approx(peer["engine_data_images_per_second"] / peer["trainer_data_images_per_second"])
    verdicts = {t["id"]: t["verdict"] for t in run["targets"]}
    assert {verdicts[k] for k in ("peer_train", "peer_data", "peer_miou")} <= {"PASS", "FAIL"}
    # where the time goes: each path's step in phases that add up to it, each data pipeline's parts, two verdicts
    for phases in (peer["engine_step_phases"], peer["trainer_step_phases"]):
        assert sum(phases[k] for k in ("data", "to_device", "forward_backward", "clip", "optimizer", "rest")) == pytest.approx(phases["step"])
    assert peer["engine_data_parts_ms"]["total"] > 0 and peer["trainer_data_parts_ms"]["total"] > 0
    assert peer["same_ops_data_speedup"] > 0 and peer["step_verdict"] and peer["data_verdict"]
    markdown = render_markdown(run)
    assert "Against transformers' Trainer" in markdown and "Where a training step's time goes" in markdown


def test_peer_is_skipped_without_upernet(small_data):
    run = run_bench(("unet",), (32, 32), 2, "cpu", sections=("peer",), data=small_data, quiet=True,
                    model_options={"unet": {"unet_width": 8}}, overrides=TINY)
    assert "peer" not in run and "upernet" in run["skipped"]["peer"]


@pytest.mark.slow
def test_overhead_section_splits_a_launched_run(tmp_path):
    """A demo run launched through papermill: fixed cost before the first step and after the last epoch, and one epoch."""
    run = run_bench(("unet",), (32, 32), 2, "cpu", sections=("overhead",), quiet=True, overrides=TINY)
    check_record(run)
    o = run["overhead"]
    assert o["epochs"] == 2 and o["epoch_seconds"] > 0
    assert o["before_first_step_seconds"] > 0 and o["after_last_epoch_seconds"] >= 0
    assert o["fixed_seconds"] + 2 * o["epoch_seconds"] == pytest.approx(o["total_seconds"], rel=0.25)
    assert "Per-run overhead" in render_markdown(run)
