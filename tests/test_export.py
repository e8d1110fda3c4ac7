"""`sun-seg export`: trained runs as Hugging Face folders that plain transformers / huggingface_hub load, with the same
logits as sun_seg; bad run folders named."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from sun_seg.cli import main
from sun_seg.core import CLASS_NAMES, normalize_images
from sun_seg.export import export_run
from sun_seg.models import UNet, build_upernet
from sun_seg.train import fit, load_run_model
from train_fixtures import tiny_params, write_tiny_release

TINY_UPERNET = dict(backbone_config=dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]), hidden_size=16,
                    auxiliary_channels=8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny U-Net run and a tiny UPerNet run (fine-tuned from a tiny 'pretrained' folder), both finished."""
    root = tmp_path_factory.mktemp("export")
    data = write_tiny_release(root / "data")
    build_upernet(None, **TINY_UPERNET).net.save_pretrained(root / "pretrained")
    out = root / "study" / "runs"
    unet = fit(tiny_params(data, out, epochs=1), progress=False)
    upernet = fit(tiny_params(data, out, epochs=1, model="upernet", pretrained=str(root / "pretrained"),
                              finetune="decoder", unet_width=64), progress=False)
    return {"unet": unet["run_dir"], "upernet": upernet["run_dir"], "root": root}


def _images(n=2, size=(32, 32)):
    torch.manual_seed(0)
    return normalize_images(torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8))


def test_upernet_export_loads_in_plain_transformers_with_our_logits(runs, tmp_path):
    from transformers import UperNetForSemanticSegmentation
    out = export_run(runs["upernet"], tmp_path / "hf")
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    hf = UperNetForSemanticSegmentation.from_pretrained(out).eval()
    ours = load_run_model(runs["upernet"])
    for size in [(32, 32), (37, 45)]:  # the training size and another one
        x = _images(size=size)
        with torch.no_grad():
            assert torch.allclose(hf(pixel_values=x).logits, ours(x), atol=1e-6)
    assert [hf.config.id2label[i] for i in range(37)] == list(CLASS_NAMES)


def test_unet_export_loads_with_from_pretrained(runs, tmp_path):
    out = export_run(runs["unet"], tmp_path / "hf")
    loaded = UNet.from_pretrained(out).eval()
    x = _images()
    with torch.no_grad():
        assert torch.allclose(loaded(x), load_run_model(runs["unet"])(x))
    config = json.loads((out / "config.json").read_text())
    assert config["base_channels"] == 4 and config["id2label"]["36"] == CLASS_NAMES[36]


def test_model_card_has_data_metrics_run_study_and_parameters(runs, tmp_path):
    run_dir = Path(runs["unet"])
    run_id = json.loads((run_dir / "params.json").read_text())["run_id"]
    study_dir = runs["root"] / "study"
    (study_dir / "study.json").write_text(json.dumps({
        "study": {"name": "tiny-study", "title": "A tiny study", "source": "a test"}, "profile": {"name": "full"},
        "runs": [{"entry": "unet-tiny", "seed": 0, "run_id": run_id}]}))
    try:
        card = (export_run(run_dir, tmp_path / "hf") / "README.md").read_text()
    finally:
        (study_dir / "study.json").unlink()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    data = json.loads((run_dir / "data.json").read_text())
    for text in (run_id, data["fingerprint"], "tiny-study", "unet-tiny", "## Training parameters", "`lr`",
                 f"{metrics['val']['miou']:.4f}", "pipeline_tag: image-segmentation", CLASS_NAMES[36]):
        assert text in card, text
    assert "DEMO DATA" not in card  # SUN RGB-D-form data; the demo's card is checked in nbs/70_export


def _broken(runs, tmp_path, model, fault):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[model], run_dir)
    ckpt = run_dir / "checkpoints"
    if fault == "no best": (ckpt / "best.safetensors").unlink(); return run_dir, "best.safetensors: no such checkpoint"
    if fault == "damaged best":
        (ckpt / "best.safetensors").write_bytes(b"\0" * 64); return run_dir, "best.safetensors: not a readable safetensors"
    if fault == "modified best":
        data = bytearray((ckpt / "best.safetensors").read_bytes()); data[-5] ^= 0xFF
        (ckpt / "best.safetensors").write_bytes(bytes(data)); return run_dir, "do not match the SHA-256"
    if fault == "no model config":
        (ckpt / "model_config.json").unlink(); return run_dir, "model_config.json: missing"
    if fault == "running":
        m = json.loads((run_dir / "metrics.json").read_text()); m["status"] = "running"
        (run_dir / "metrics.json").write_text(json.dumps(m)); return run_dir, "metrics.json: the run is not finished"
    if fault == "no params": (run_dir / "params.json").unlink(); return run_dir, "params.json"
    if fault == "bad metrics": (run_dir / "metrics.json").write_text("{"); return run_dir, "metrics.json: not valid JSON"
    raise ValueError(fault)


@pytest.mark.parametrize("model, fault", [("unet", "no best"), ("unet", "damaged best"), ("unet", "modified best"),
                                          ("upernet", "no model config"), ("unet", "running"), ("unet", "no params"),
                                          ("unet", "bad metrics")])
def test_bad_run_folder_is_named(runs, tmp_path, capsys, model, fault):
    run_dir, expected = _broken(runs, tmp_path, model, fault)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sun-seg export: error: ") and expected in err, err
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_unfinished_run_exports_when_allowed_and_other_folders_are_kept(runs, tmp_path, capsys):
    run_dir, _ = _broken(runs, tmp_path, "unet", "running")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "hf"), "--allow-unfinished"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    (tmp_path / "mine").mkdir(); (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export", str(runs["unet"]), "--out", str(tmp_path / "mine")]) == 2
    assert "not an earlier sun_seg export" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
