"""`prepare`: the cache equals its source pixel for pixel, resizes correctly, reports every bad sample in one pass,
never leaves a half-written cache or replaces a good one, resumes after an interruption, and `sun-seg prepare`
exits non-zero with the message."""
import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import importlib
from sun_seg.core import DataError, ParameterError
from sun_seg.data.formats import (CACHE_IMAGES, CACHE_INDEX, CACHE_LABELS, DEMO_MARKER, LABELS_DIR, SEG_MAT,
                                  TEST_IMAGES_DIR, TRAIN_IMAGES_DIR, detect_form, write_official_release,
                                  write_preprocessed_release)
from sun_seg.data.prepare import STAT_COLUMNS, image_statistics, prepare
from sun_seg.data.sunrgbd import SunRGBD

from data_fixtures import make_frames

# the module itself: `sun_seg.data.prepare` as an attribute is the re-exported function
prep = importlib.import_module("sun_seg.data.prepare")


@pytest.fixture(scope="module")
def frames():
    return make_frames(6, 100), make_frames(4)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, frames):
    base = tmp_path_factory.mktemp("src")
    return {"official": write_official_release(base / "official", *frames),
            "preprocessed": write_preprocessed_release(base / "pre", *frames)}


def same_samples(a: SunRGBD, b: SunRGBD):
    assert a.ids == b.ids
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
        assert (x["meta"]["index"], x["meta"]["sensor"]) == (y["meta"]["index"], y["meta"]["sensor"])


# ---------------------------------------------------------------- the cache equals its source
@pytest.mark.parametrize("form", ["official", "preprocessed"])
def test_cache_equals_source_at_native_size(tmp_path, sources, form):
    cache = prepare(sources[form], tmp_path / "cache", workers=0, progress=False)
    assert detect_form(cache) == "cache"
    for split in ("train", "test", "val", "fit"):
        same_samples(SunRGBD(sources[form], split), SunRGBD(cache, split))
    index = json.loads((cache / CACHE_INDEX).read_text())
    assert index["source"]["form"] == form and index["size"] is None and index["splits"] == {"train": 6, "test": 4}
    assert (cache / CACHE_IMAGES).stat().st_size == 10 * 3 * 12 * 16
    assert (cache / CACHE_LABELS).stat().st_size == 10 * 12 * 16
    info = SunRGBD(cache, "train").info
    assert info["form"] == "cache" and info["source_form"] == form and info["image_size"] == [12, 16]
    assert info["fingerprint"] == index["fingerprint"]
    if form == "official":  # allsplit.mat's trainvalsplit travels with the cache
        assert SunRGBD(cache, "val", val_method="official").ids == SunRGBD(sources[form], "val", val_method="official").ids
    else:
        with pytest.raises(ParameterError, match="prepared from data without allsplit.mat's trainvalsplit"):
            SunRGBD(cache, "val", val_method="official")


def test_same_content_same_fingerprint_across_forms(tmp_path, sources):
    a = prepare(sources["official"], tmp_path / "a", workers=0, progress=False)
    b = prepare(sources["preprocessed"], tmp_path / "b", workers=0, progress=False)
    # identical decoded pixels and ids give the same content fingerprint, whatever the source form
    assert SunRGBD(a).fingerprint == SunRGBD(b).fingerprint
    assert (a / CACHE_IMAGES).read_bytes() == (b / CACHE_IMAGES).read_bytes()


def test_stats_csv_matches_image_statistics(tmp_path, sources, frames):
    cache = prepare(sources["preprocessed"], tmp_path / "cache", workers=0, progress=False)
    stats = pd.read_csv(cache / "stats.csv")
    assert list(stats.columns) == STAT_COLUMNS and len(stats) == 10
    label = frames[1][0][1]  # first test frame = first row (test first)
    row = stats.iloc[0]
    assert row["void_pixels"] == (label == 0).sum() and row["px_bag"] == (label == 37).sum()
    assert row["void_share"] == pytest.approx((label == 0).mean())
    assert stats[[c for c in STAT_COLUMNS if c.startswith("px_")]].sum(axis=1).add(stats["void_pixels"]).eq(12 * 16).all()
    for split in ("train", "val"):
        from_source = image_statistics(SunRGBD(sources["official"], split), progress=False)
        from_cache = image_statistics(SunRGBD(cache, split), progress=False)
        pd.testing.assert_frame_equal(from_source, from_cache)


def test_resize(tmp_path, sources, frames):
    cache = prepare(sources["preprocessed"], tmp_path / "small", (6, 10), workers=0, progress=False)
    ds = SunRGBD(cache, "train")
    item = ds[0]
    assert item["image"].shape == (3, 6, 10) and item["target"].shape == (6, 10)
    assert item["meta"]["orig_size"] == (6, 10) and item["meta"]["source_size"] == (12, 16)
    image, label, _ = frames[0][0]
    source = SunRGBD(sources["preprocessed"], "train")[0]["image"].permute(1, 2, 0).numpy()
    expected = np.asarray(Image.fromarray(source).resize((10, 6), Image.BILINEAR, reducing_gap=None))
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), expected)
    nearest = np.asarray(Image.fromarray(label).resize((10, 6), Image.NEAREST))
    np.testing.assert_array_equal(ds.raw_label(0), nearest)
    assert json.loads((cache / CACHE_INDEX).read_text())["size"] == [6, 10]
    # a cache can be prepared again from a cache
    again = prepare(cache, tmp_path / "smaller", "3x5", workers=0, progress=False)
    assert SunRGBD(again, "test")[0]["image"].shape == (3, 3, 5)
    with pytest.raises(ParameterError, match="`size`"):
        prepare(sources["preprocessed"], tmp_path / "x", "big", workers=0, progress=False)


def test_workers_give_identical_files(tmp_path, frames):
    src = write_preprocessed_release(tmp_path / "src", make_frames(14, 100), make_frames(6))
    a = prepare(src, tmp_path / "a", workers=0, progress=False)
    b = prepare(src, tmp_path / "b", workers=2, progress=False)
    for name in (CACHE_IMAGES, CACHE_LABELS, "stats.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_official_source_with_workers(tmp_path):
    """Worker processes open their own HDF5 handles."""
    src = write_official_release(tmp_path / "src", make_frames(12, 100), make_frames(6), extras=False)
    cache = prepare(src, tmp_path / "cache", workers=2, progress=False)
    same_samples(SunRGBD(src, "train"), SunRGBD(cache, "train"))


def test_demo_kind_is_kept(tmp_path, frames):
    src = write_preprocessed_release(tmp_path / "demo", *frames)
    (src / DEMO_MARKER).write_text("{}")
    cache = prepare(src, tmp_path / "cache", workers=0, progress=False)
    assert SunRGBD(cache).info["kind"] == "demo"


# ---------------------------------------------------------------- bad samples
def break_preprocessed(root):
    """Six kinds of damage, one sample each; returns (file name, expected words) per damage."""
    train, labels = root / TRAIN_IMAGES_DIR, root / LABELS_DIR
    (train / "img-000001.jpg").write_bytes(b"\x89PNG not a jpeg at all")                       # corrupt image
    data = (train / "img-000002.jpg").read_bytes()
    (train / "img-000002.jpg").write_bytes(data[:len(data) // 2])                              # truncated image
    (labels / "img-000007.png").unlink()                                                       # missing label (train 3)
    Image.fromarray(np.zeros((10, 16), np.uint8)).save(labels / "img-000008.png")              # size mismatch (train 4)
    Image.fromarray(np.full((12, 16), 41, np.uint8)).save(labels / "img-000009.png")           # values > 37 (train 5)
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(labels / "img-000002.png")           # RGB label (test 2)
    return [("img-000001.jpg", "corrupt or truncated image"), ("img-000002.jpg", "truncated"),
            ("img-000007.png", "label file is missing"), ("img-000008.png", "is 16x10"),
            ("img-000009.png", "label values [41] are out of range"), ("img-000002.png", "RGB-encoded")]


def test_every_bad_sample_in_one_error(tmp_path, frames):
    src = write_preprocessed_release(tmp_path / "src", *frames)
    damage = break_preprocessed(src)
    with pytest.raises(DataError) as e:
        prepare(src, tmp_path / "cache", workers=0, progress=False)
    message = str(e.value)
    assert "6 of 10 samples are bad" in message
    lines = [l for l in message.splitlines() if l.startswith("  - ")]
    assert len(lines) == 6
    for name, words in damage:
        assert any(name in l and words in l for l in lines), (name, words, message)
    assert not (tmp_path / "cache").exists()


def test_unresolvable_hdf5_reference(tmp_path, frames):
    src = write_official_release(tmp_path / "src", *frames, extras=False)
    seg = src / "SUNRGBDtoolbox" / SEG_MAT
    with h5py.File(seg, "r") as f:  # where the (N, 1) reference array lies in the file
        offset = f["SUNRGBD2Dseg/seglabel"].id.get_offset()
    with open(seg, "r+b") as f:  # row 5 (the first train frame: test frames come first) points to garbage
        f.seek(offset + 5 * 8); f.write((123456789).to_bytes(8, "little"))
    with h5py.File(seg, "r+") as f:
        f["SUNRGBD2Dseg/seglabel"][6, 0] = h5py.Reference()  # row 6: a null reference
    (src / "SUNRGBD" / SunRGBD(src, "test").ids[1] / "image").rename(src / "moved")  # and one image missing
    with pytest.raises(DataError) as e:
        prepare(src, tmp_path / "cache", workers=0, progress=False)
    message = str(e.value)
    assert "3 of 10 samples are bad" in message
    for row in (5, 6):
        assert f"SUNRGBD2Dseg.mat seglabel[{row}]" in message
    assert message.count("HDF5 object reference cannot be resolved") == 2
    assert "image file is missing" in message


def test_skip_bad_writes_the_list(tmp_path, frames):
    src = write_preprocessed_release(tmp_path / "src", *frames)
    break_preprocessed(src)
    cache = prepare(src, tmp_path / "cache", skip_bad=True, workers=0, progress=False)
    skipped = pd.read_csv(cache / "skipped.csv")
    assert list(skipped.columns) == ["id", "split", "index", "problem"] and len(skipped) == 6
    assert sorted(zip(skipped["split"], skipped["index"])) == [("test", 1)] + [("train", i) for i in range(5)]
    ds = SunRGBD(cache, "train")
    assert len(ds) == 1 and ds[0]["meta"]["index"] == 5
    assert len(SunRGBD(cache, "test")) == 3
    assert json.loads((cache / CACHE_INDEX).read_text())["skipped"] == 6


def test_all_of_a_split_bad_is_an_error(tmp_path, frames):
    src = write_preprocessed_release(tmp_path / "src", *frames)
    for p in (src / TEST_IMAGES_DIR).iterdir(): p.write_bytes(b"junk")
    with pytest.raises(DataError, match="every one of the 4 test samples is bad"):
        prepare(src, tmp_path / "cache", skip_bad=True, workers=0, progress=False)


# ---------------------------------------------------------------- never half-written, never replacing a good cache
def test_failed_prepare_never_replaces_a_good_cache(tmp_path, sources, frames):
    out = prepare(sources["preprocessed"], tmp_path / "cache", workers=0, progress=False)
    before = (out / CACHE_INDEX).read_bytes()
    bad = write_preprocessed_release(tmp_path / "bad", *frames)
    break_preprocessed(bad)
    with pytest.raises(DataError, match="samples are bad"):
        prepare(bad, out, workers=0, overwrite=True, progress=False)
    assert (out / CACHE_INDEX).read_bytes() == before
    same_samples(SunRGBD(sources["preprocessed"], "train"), SunRGBD(out, "train"))
    with pytest.raises(DataError, match="already holds a cache of other data"):
        prepare(bad, out, skip_bad=True, workers=0, progress=False)
    prepare(bad, out, skip_bad=True, overwrite=True, workers=0, progress=False)  # complete: now it replaces
    assert len(SunRGBD(out, "train")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "cache"]  # no partial or old folders left


def test_refuses_unrelated_folders(tmp_path, sources):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="busy: is not empty and is not a sun_seg cache"):
        prepare(sources["preprocessed"], out, workers=0, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert detect_form(prepare(sources["preprocessed"], tmp_path / "empty", workers=0, progress=False)) == "cache"
    with pytest.raises(ParameterError, match="is the source folder"):
        prepare(sources["preprocessed"], sources["preprocessed"], workers=0, progress=False)


def test_interrupted_prepare_resumes(tmp_path, sources, monkeypatch):
    src = sources["official"]
    calls = []
    real = prep.prepare_sample
    def flaky(reader, rec, size=None):
        calls.append(rec.id)
        if len(calls) == 4: raise KeyboardInterrupt  # Ctrl-C during the 4th sample
        return real(reader, rec, size)
    monkeypatch.setattr(prep, "prepare_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "cache", workers=0, progress=False)
    assert not (tmp_path / "cache").exists() and (tmp_path / ".cache.partial" / "journal.jsonl").is_file()
    # a kill can also leave bytes of an unfinished sample and a torn journal line: both are cut away on resume
    with open(tmp_path / ".cache.partial" / CACHE_IMAGES, "ab") as f: f.write(b"\x00" * 100)
    with open(tmp_path / ".cache.partial" / "journal.jsonl", "a") as f: f.write('{"pos": 3, "image_off')
    calls.clear()
    monkeypatch.setattr(prep, "prepare_sample", lambda *a: (calls.append(a[1].id), real(*a))[1])
    cache = prepare(src, tmp_path / "cache", workers=0, progress=False)
    assert len(calls) == 7  # 3 finished samples were not redone
    clean = prepare(src, tmp_path / "clean", workers=0, progress=False)
    for name in (CACHE_IMAGES, CACHE_LABELS, "stats.csv"):
        assert (cache / name).read_bytes() == (clean / name).read_bytes()
    # a finished cache is not redone at all
    calls.clear()
    prepare(src, tmp_path / "cache", workers=0, progress=False)
    assert calls == []


def test_cache_reader_refuses_truncated_files(tmp_path, sources):
    cache = prepare(sources["preprocessed"], tmp_path / "cache", workers=0, progress=False)
    with open(cache / CACHE_LABELS, "r+b") as f: f.truncate(100)
    with pytest.raises(DataError, match="labels.u8: is missing or truncated"):
        SunRGBD(cache)


# ---------------------------------------------------------------- command line
def test_cli(tmp_path, sources, frames, capsys):
    from sun_seg.cli import main
    assert main(["prepare", str(sources["preprocessed"]), str(tmp_path / "c"), "--size", "6x8", "--workers", "0"]) == 0
    assert "cache ready" in capsys.readouterr().out
    bad = write_preprocessed_release(tmp_path / "bad", *frames)
    break_preprocessed(bad)
    assert main(["prepare", str(bad), str(tmp_path / "d"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "sun-seg prepare: error:" in err and "6 of 10 samples are bad" in err and "img-000009.png" in err
    assert main(["prepare", str(bad), str(tmp_path / "d"), "--workers", "0", "--skip-bad"]) == 0
    assert (tmp_path / "d" / "skipped.csv").is_file()
