"""`sun-seg predict` and `sun_seg.predict`: label maps (0..36) and overlays at each image's own size; bad images named and
skipped, or refused with --strict."""
import json
import warnings

import numpy as np
import pytest
from PIL import Image

import sun_seg
from sun_seg.cli import main
from sun_seg.core import colorize
from sun_seg.train import fit
from train_fixtures import tiny_params, write_tiny_release


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return fit(tiny_params(write_tiny_release(root / "data"), root / "runs", epochs=1), progress=False)["run_dir"]


def _photos(folder, rng=np.random.default_rng(0)):
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8)).save(folder / "sub" / "b.png")
    return {"a": (45, 61), "sub/b": (30, 70)}


def test_labels_and_overlays_at_each_image_size(run_dir, tmp_path, capsys):
    sizes = _photos(tmp_path / "photos")
    assert main(["predict", str(run_dir), str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--batch-size", "1", "--quiet"]) == 0
    assert "2 images predicted" in capsys.readouterr().out
    for stem, size in sizes.items():
        labels = np.array(Image.open(tmp_path / "out" / f"{stem}_labels.png"))
        overlay = np.array(Image.open(tmp_path / "out" / f"{stem}_overlay.png"))
        assert labels.shape == size and labels.dtype == np.uint8 and labels.max() <= 36
        photo = np.array(Image.open(tmp_path / "photos" / (stem + (".jpg" if stem == "a" else ".png"))).convert("RGB"))
        expected = (photo.astype(np.float32) * 0.5 + colorize(labels).astype(np.float32) * 0.5).round().astype(np.uint8)
        assert overlay.shape == (*size, 3) and np.array_equal(overlay, expected)
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(record["written"]) == 2 and record["skipped"] == [] and "0..36" in record["labels"]


def test_python_api_gives_the_files_maps(run_dir, tmp_path):
    _photos(tmp_path / "photos")
    main(["predict", str(run_dir), str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--quiet"])
    result = sun_seg.predict(run_dir, tmp_path / "photos", batch_size=2, progress=False)  # batched differently, no files
    for entry in result["written"]:
        stem = "a" if entry["image"].endswith("a.jpg") else "sub/b"
        assert np.array_equal(entry["labels"], np.array(Image.open(tmp_path / "out" / f"{stem}_labels.png")))


def _bad_images(folder):
    """Good, converted and bad images: the data's policy (README, Guarantees)."""
    folder.mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(folder / "good.png")
    Image.fromarray(np.full((20, 24), 90, np.uint8)).save(folder / "grey.png")  # greyscale: becomes RGB
    Image.new("CMYK", (24, 20), (10, 20, 30, 0)).save(folder / "cmyk.jpg")  # CMYK: becomes RGB
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "text.png").write_text("not an image at all")
    Image.fromarray(np.full((20, 24), 3000, np.uint16)).save(folder / "depth16.png")  # a 16-bit depth map
    return ["good", "grey", "cmyk"], ["corrupt.jpg", "depth16.png", "text.png"]


def test_bad_images_are_named_and_skipped(run_dir, tmp_path, capsys):
    good, bad = _bad_images(tmp_path / "photos")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["predict", str(run_dir), str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    for name in bad:
        assert f"photos/{name}:" in out and any(name in str(w.message) for w in caught), name
    assert sorted(p.name for p in (tmp_path / "out").glob("*_labels.png")) == sorted(f"{g}_labels.png" for g in good)
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(p.rsplit("/", 1)[1] for p, _ in record["skipped"]) == bad


def test_strict_refuses_the_first_bad_image(run_dir, tmp_path, capsys):
    _bad_images(tmp_path / "photos")
    assert main(["predict", str(run_dir), str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--strict",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sun-seg predict: error: ") and "photos/corrupt.jpg: corrupt or truncated image" in err, err


@pytest.mark.parametrize("args, expected", [
    (["{run}", "{tmp}/none", "--out", "{tmp}/out"], "none: no such image or folder"),
    (["{tmp}", "{photos}", "--out", "{tmp}/out"], "params.json"),
    (["{run}", "{photos}", "--out", "{tmp}/out", "--batch-size", "0"], "parameter `batch_size`"),
])
def test_bad_arguments_are_named(run_dir, tmp_path, capsys, args, expected):
    _photos(tmp_path / "photos")
    argv = [a.format(run=run_dir, tmp=tmp_path, photos=tmp_path / "photos") for a in args]
    assert main(["predict", *argv, "--quiet"]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.cuda
def test_predict_on_a_gpu_agrees_with_the_cpu(run_dir, tmp_path):
    import torch
    if not torch.cuda.is_available(): pytest.skip("no CUDA GPU")
    _photos(tmp_path / "photos")
    cpu = sun_seg.predict(run_dir, tmp_path / "photos", device="cpu", progress=False)["written"]
    gpu = sun_seg.predict(run_dir, tmp_path / "photos", device="cuda", progress=False)["written"]
    for a, b in zip(cpu, gpu):  # the same classes up to float rounding at near-ties
        assert a["image"] == b["image"] and (a["labels"] == b["labels"]).mean() > 0.99
