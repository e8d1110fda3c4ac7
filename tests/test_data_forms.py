"""The on-disk forms of SUN RGB-D: fixtures written in each real form (the official release with its MATLAB v7.3
label file of HDF5 object references, the preprocessed release) are read back pixel-exactly, with the right
pairing and splits; the real split and list files from ../shared are parsed when present."""
import json
import pickle
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from sun_seg.core import DATA_ENV, DataError, ParameterError, raw_to_target
from sun_seg.data.formats import (
    DEMO_MARKER, LABELS_DIR, SEG_MAT, META_MAT, SPLIT_MAT, SENSORS, TEST_IMAGES_DIR, TRAIN_IMAGES_DIR, TRAIN_LIST,
    detect_form, example_frame_path, frame_key, sensor_of, write_official_release, write_preprocessed_release)
from sun_seg.data.sunrgbd import (
    OfficialReader, PreprocessedReader, SunRGBD, collate, open_reader, read_image_file)
from sun_seg.data.readers import read_allsplit, read_list


def make_frames(n, start=0, size=(12, 16), sensors=SENSORS, seed=0):
    """`n` frames (image, raw label 0..37, frame path), sensors in turn; every label differs."""
    rng = np.random.default_rng(seed * 1000 + start)
    yy, xx = np.mgrid[:size[0], :size[1]]
    smooth = lambda i: np.stack([xx * 6 + i * 17 % 60, yy * 7 + i * 5 % 60, (xx + yy) * 3 + i % 60], -1).astype(np.uint8)
    return [(smooth(i), rng.integers(0, 38, size, dtype=np.uint8), example_frame_path(sensors[i % len(sensors)], i))
            for i in range(start, start + n)]


@pytest.fixture(scope="module")
def frames():
    return make_frames(7, 100), make_frames(5, 0)  # train, test: different counts catch a wrong label offset


@pytest.fixture(scope="module")
def official(tmp_path_factory, frames):
    return write_official_release(tmp_path_factory.mktemp("official"), *frames)


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory, frames):
    return write_preprocessed_release(tmp_path_factory.mktemp("pre"), *frames)


# ---------------------------------------------------------------- the fixtures are in the real forms
def test_official_fixture_is_matlab73_with_object_references(official, frames):
    seg = official / "SUNRGBDtoolbox" / SEG_MAT
    head = seg.read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file") and head[126:128] == b"IM"
    with pytest.raises(NotImplementedError):  # what scipy says about every real v7.3 file
        scipy.io.loadmat(seg)
    with h5py.File(seg, "r") as f:
        seglabel = f["SUNRGBD2Dseg"]["seglabel"]
        assert seglabel.shape == (12, 1) and seglabel.dtype == h5py.ref_dtype
        assert set(f["SUNRGBD2Dseg"]) == {"seglabel", "seglabelall", "names"}
        first_train = f[seglabel[5][0]][()]  # test frames come first
        assert first_train.shape == (16, 12)  # stored transposed (W, H)
        np.testing.assert_array_equal(first_train.T, frames[0][0][1])
        names = ["".join(map(chr, f[r][()].ravel())) for r in f["seg37list"][()].ravel()]
        assert names[:2] == ["wall", "floor"] and len(names) == 37
    meta = scipy.io.loadmat(official / "SUNRGBDtoolbox" / META_MAT, squeeze_me=True, struct_as_record=False)["SUNRGBDMeta"]
    assert meta[0].rgbpath.startswith("/n/fs/sun3d/data/SUNRGBD/")
    assert any("//image/" in m.rgbpath for m in meta)  # the trailing-slash quirk
    frames_on_disk = sorted(p.relative_to(official / "SUNRGBD") for p in (official / "SUNRGBD").rglob("image/*.jpg"))
    assert len(frames_on_disk) == 12
    assert len({len(p.parts) for p in frames_on_disk}) > 1  # uneven depth, like the release
    assert (official / "SUNRGBD" / frame_key(frames[1][0][2]) / "depth_bfx").is_dir()


def test_preprocessed_fixture_layout(preprocessed):
    labels = sorted(p.name for p in (preprocessed / LABELS_DIR).iterdir())
    assert labels == [f"img-{i:06d}.png" for i in range(1, 13)]
    assert Image.open(preprocessed / LABELS_DIR / "img-000012.png").mode == "L"
    assert len(list((preprocessed / TRAIN_IMAGES_DIR).iterdir())) == 7
    assert len(list((preprocessed / TEST_IMAGES_DIR).iterdir())) == 5


# ---------------------------------------------------------------- reading back
@pytest.mark.parametrize("form", ["official", "preprocessed"])
def test_labels_pixel_exact_and_pairing(form, official, preprocessed, frames):
    root = official if form == "official" else preprocessed
    for split, written in (("train", frames[0]), ("test", frames[1])):
        ds = SunRGBD(root, split)
        assert len(ds) == len(written)
        for i, (image, label, path) in enumerate(written):
            item = ds[i]
            np.testing.assert_array_equal(ds.raw_label(i), label)
            np.testing.assert_array_equal(item["target"].numpy(), raw_to_target(label))
            assert item["target"].dtype == torch.int64 and item["image"].dtype == torch.uint8
            # JPEG is lossy: the image equals the decoded file and is close to what was written
            decoded = read_image_file(item["meta"]["image_path"])
            np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), decoded)
            assert np.abs(decoded.astype(int) - image).mean() < 10  # another frame differs by ~50
            meta = item["meta"]
            assert (meta["id"], meta["index"], meta["official_split"], meta["sensor"]) == (frame_key(path), i, split, sensor_of(path))
            assert meta["orig_size"] == (12, 16)


def test_preprocessed_label_offset_is_counted(preprocessed):
    reader = PreprocessedReader(preprocessed)
    assert reader.n_test == 5
    train = [r for r in reader.records if r.split == "train"]
    assert [Path(r.loc).name for r in train[:2]] == ["img-000006.png", "img-000007.png"]
    assert Path(train[0].image_path).name == "img-000001.jpg"


def test_missing_last_test_images_cannot_shift_labels(tmp_path, frames):
    root = write_preprocessed_release(tmp_path, *frames)
    (root / TEST_IMAGES_DIR / "img-000005.jpg").unlink()
    assert PreprocessedReader(root).n_test == 5  # the test list pins the count: image 5 is just missing
    with pytest.raises(DataError, match="img-000005.jpg: image file is missing"):
        SunRGBD(root, "test")[4]
    (root / "sunrgbd_testing_images.txt").unlink()
    with pytest.raises(DataError, match="labels go up to img-000012.png but there are only 4 test"):
        SunRGBD(root, "train")


def test_same_ids_and_fingerprints_stable(official, preprocessed):
    a, b = open_reader(official), open_reader(preprocessed)
    assert [r.id for r in a.records] == [r.id for r in b.records]
    assert a.fingerprint() == OfficialReader(official).fingerprint()
    assert a.fingerprint() != b.fingerprint()


def test_fingerprint_changes_with_a_label(tmp_path, frames):
    root = write_preprocessed_release(tmp_path / "p", *frames)
    before = open_reader(root).fingerprint()
    Image.fromarray(np.full((12, 16), 3, np.uint8)).save(root / LABELS_DIR / "img-000002.png")  # other size on disk
    assert open_reader(root).fingerprint() != before


# ---------------------------------------------------------------- splits
@pytest.mark.parametrize("form", ["official", "preprocessed"])
def test_val_fit_partition_deterministic_disjoint(form, official, preprocessed):
    root = official if form == "official" else preprocessed
    train = set(SunRGBD(root, "train").ids)
    val, fit = SunRGBD(root, "val", val_fraction=0.3), SunRGBD(root, "fit", val_fraction=0.3)
    assert set(val.ids) | set(fit.ids) == train and not set(val.ids) & set(fit.ids)
    assert len(val) == 2
    assert SunRGBD(root, "val", val_fraction=0.3).ids == val.ids
    assert not set(val.ids) & set(SunRGBD(root, "test").ids)
    assert val.info["split_sizes"] == {"train": 7, "test": 5, "val": 2, "fit": 5}


def test_val_is_stratified_and_form_independent(tmp_path):
    train = make_frames(40, 100, sensors=("kv1", "kv1", "kv1", "kv2", "kv2", "xtion", "xtion", "realsense"))
    test = make_frames(2, 0)
    a = write_official_release(tmp_path / "o", train, test, extras=False, compression=None)
    b = write_preprocessed_release(tmp_path / "p", train, test)
    va, vb = SunRGBD(a, "val", val_fraction=0.25, val_seed=3), SunRGBD(b, "val", val_fraction=0.25, val_seed=3)
    assert va.ids == vb.ids and len(va) == 10
    counts = Counter(sensor_of(i) for i in va.ids)
    # 15 kv1, 10 kv2, 10 xtion, 5 realsense: quotas 3.75, 2.5, 2.5, 1.25, largest remainders (ties by name) get the rest
    assert counts == {"kv1": 4, "kv2": 3, "xtion": 2, "realsense": 1}
    assert SunRGBD(a, "val", val_fraction=0.25, val_seed=4).ids != va.ids


def test_official_val_method(official):
    tv = read_allsplit(official / "SUNRGBDtoolbox" / SPLIT_MAT)[2]
    val = SunRGBD(official, "val", val_method="official")
    fit = SunRGBD(official, "fit", val_method="official")
    assert set(val.ids) == {k for k, v in tv.items() if v == "val"}
    assert set(fit.ids) == {k for k, v in tv.items() if v == "train"}
    assert val.info["val_method"] == "official" and val.info["val_seed"] is None


def test_official_val_method_needs_allsplit(preprocessed):
    with pytest.raises(ParameterError, match="val_method.*no allsplit.mat"):
        SunRGBD(preprocessed, "val", val_method="official")


# ---------------------------------------------------------------- the official release's quirks
@pytest.mark.parametrize("variant", [
    dict(split_prefix="/data1/"), dict(toolbox=""), dict(toolbox="SUNRGBDtoolbox/SUNRGBDtoolbox"),
    dict(label_dtype="float64", compression=None), dict(label_dtype="uint16")])
def test_official_variants(tmp_path, variant):
    train, test = make_frames(3, 10), make_frames(2)
    root = write_official_release(tmp_path, train, test, extras=False, **variant)
    assert detect_form(root) == "official"
    ds = SunRGBD(root, "train")
    for i, (_, label, _) in enumerate(train):
        np.testing.assert_array_equal(ds.raw_label(i), label)


def test_one_element_cells_do_not_match_substrings(tmp_path):
    """With squeeze_me a one-element cell becomes a str and `key in split` matches substrings: not here."""
    img = lambda: np.zeros((4, 5, 3), np.uint8)
    lab = lambda v: np.full((4, 5), v, np.uint8)
    train = [(img(), lab(1), "SUNRGBD/kv1/NYUdata/NYU00011/image/NYU00011.jpg")]
    test = [(img(), lab(2), "SUNRGBD/kv1/NYUdata/NYU0001/image/NYU0001.jpg")]
    root = write_official_release(tmp_path, train, test, extras=False)
    split = scipy.io.loadmat(root / "SUNRGBDtoolbox" / SPLIT_MAT, squeeze_me=True)
    assert isinstance(split["alltrain"], str) and "kv1/NYUdata/NYU0001" in split["alltrain"]  # the pitfall exists
    assert SunRGBD(root, "train").ids == ["kv1/NYUdata/NYU00011"]
    assert SunRGBD(root, "test").ids == ["kv1/NYUdata/NYU0001"]
    assert int(SunRGBD(root, "test").raw_label(0).max()) == 2


def test_official_reader_survives_pickling_and_workers(official, frames):
    ds = SunRGBD(official, "test")
    first = ds[0]  # opens the HDF5 handle in this process
    clone = pickle.loads(pickle.dumps(ds))  # spawn-style workers get no handle and open their own
    np.testing.assert_array_equal(clone[0]["target"], first["target"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)  # fork-style workers
    targets = torch.cat([b["target"] for b in loader])
    np.testing.assert_array_equal(targets.numpy(), np.stack([raw_to_target(l) for _, l, _ in frames[1]]))


def test_official_inconsistent_files(tmp_path):
    root = write_official_release(tmp_path / "a", make_frames(2, 10), make_frames(2), extras=False)
    seg = root / "SUNRGBDtoolbox" / SEG_MAT
    seg.write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(DataError, match="SUNRGBD2Dseg.mat: is not a MATLAB v7.3"):
        SunRGBD(root, "train")
    root = write_official_release(tmp_path / "b", make_frames(2, 10), make_frames(2), extras=False)
    other = write_official_release(tmp_path / "c", make_frames(3, 10), make_frames(2), extras=False)
    (root / "SUNRGBDtoolbox" / SEG_MAT).write_bytes((other / "SUNRGBDtoolbox" / SEG_MAT).read_bytes())
    with pytest.raises(DataError, match="holds 5 labels but SUNRGBDMeta.mat lists 4 frames"):
        SunRGBD(root, "train")


# ---------------------------------------------------------------- detection and errors
def test_detect_form_messages(tmp_path, official, preprocessed):
    assert (detect_form(official), detect_form(preprocessed)) == ("official", "preprocessed")
    with pytest.raises(DataError, match="does not exist"):
        detect_form(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        detect_form(tmp_path / "empty")
    assert "empty" in str(e.value) and all(f in str(e.value) for f in ("official:", "preprocessed:", "cache:"))
    (tmp_path / "partial" / TRAIN_IMAGES_DIR).mkdir(parents=True)
    with pytest.raises(DataError, match="preprocessed release but lacks SUNRGBD-test_images/, sunrgbd_train_test_labels/"):
        detect_form(tmp_path / "partial")
    (tmp_path / "parent").mkdir()
    (tmp_path / "parent" / "copy").symlink_to(preprocessed)
    with pytest.raises(DataError, match="one level down, in copy"):
        detect_form(tmp_path / "parent")
    with pytest.raises(DataError, match="holds the preprocessed form, not the official form"):
        SunRGBD(preprocessed, form="official")


def test_root_from_environment(monkeypatch, preprocessed):
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(ParameterError, match="`root`.*SUN_SEG_DATA"):
        SunRGBD()
    monkeypatch.setenv(DATA_ENV, str(preprocessed))
    assert len(SunRGBD(split="test")) == 5


def test_bad_files_name_the_file(tmp_path, frames):
    root = write_preprocessed_release(tmp_path, *frames)
    ds = SunRGBD(root, "test")
    Image.fromarray(np.full((12, 16), 40, np.uint8)).save(root / LABELS_DIR / "img-000001.png")
    with pytest.raises(DataError, match=r"img-000001.png: label values \[40\]"):
        ds[0]
    Image.fromarray(np.zeros((10, 16), np.uint8)).save(root / LABELS_DIR / "img-000002.png")
    with pytest.raises(DataError, match="img-000002.jpg: image is 16x12 but its label .*img-000002.png.* is 16x10"):
        ds[1]


def test_transform_collate_info(preprocessed):
    flips = lambda image, target: (image.flip(-1), target.flip(-1))
    plain, flipped = SunRGBD(preprocessed, "train"), SunRGBD(preprocessed, "train", transform=flips)
    np.testing.assert_array_equal(flipped[0]["target"], plain[0]["target"].flip(-1))
    batch = collate([plain[0], plain[1]])
    assert batch["image"].shape == (2, 3, 12, 16) and batch["target"].dtype == torch.int64 and len(batch["meta"]) == 2
    crop = SunRGBD(preprocessed, "train", transform=lambda i, t: (i[:, :8], t[:8]))
    with pytest.raises(ParameterError, match="samples differ in size"):
        collate([plain[0], crop[1]])
    info = plain.info
    json.dumps(info)
    assert info["kind"] == "sunrgbd" and info["form"] == "preprocessed" and info["size"] == 7
    with pytest.raises(ParameterError, match="transform"):
        SunRGBD(preprocessed, transform="flip")


def test_demo_marker_sets_kind(tmp_path, frames):
    root = write_preprocessed_release(tmp_path, *frames)
    (root / DEMO_MARKER).write_text("{}")
    assert SunRGBD(root, "test").info["kind"] == "demo"


# ---------------------------------------------------------------- the real files in ../shared
def test_real_allsplit(shared_samples):
    train, test, trainval = read_allsplit(shared_samples / "toolbox" / "allsplit.mat")
    assert (len(train), len(test)) == (5285, 5050)
    assert len(set(train)) == 5285 and not set(train) & set(test)
    assert Counter(trainval.values()) == {"train": 2666, "val": 2619}
    assert set(trainval) == set(train)  # trainvalsplit partitions alltrain
    assert all(not k.endswith("/") and "//" not in k and not k.startswith("data1") for k in train + test)
    nyu_train = scipy.io.loadmat(shared_samples / "toolbox" / "train_kv1NYU.mat")["trainSeq"]
    nyu_test = scipy.io.loadmat(shared_samples / "toolbox" / "test_kv1NYU.mat")["testSeq"]
    assert {frame_key(str(s[0])) for s in nyu_train.ravel()} == {k for k in train if k.startswith("kv1/NYUdata/")}
    assert {frame_key(str(s[0])) for s in nyu_test.ravel()} == {k for k in test if k.startswith("kv1/NYUdata/")}


def test_real_image_lists(shared_samples):
    train, test, _ = read_allsplit(shared_samples / "toolbox" / "allsplit.mat")
    lists = {s: [frame_key(l) for l in read_list(shared_samples / f"sunrgbd_{n}_images.txt")]
             for s, n in (("train", "training"), ("test", "testing"))}
    assert lists["train"] == train and lists["test"] == test  # the lists are in allsplit order
    sensors = Counter(sensor_of(k) for k in lists["test"])
    assert set(sensors) == set(SENSORS) and sum(sensors.values()) == 5050
    assert sensors["kv1"] == 654 + 276 and sensors["realsense"] == 548 + 24


def test_real_paths_in_a_preprocessed_copy(tmp_path, shared_samples):
    """A preprocessed copy whose lists hold real frame paths: real ids and sensors; with the real allsplit.mat
    beside it, the official train/val split applies."""
    real_train = read_list(shared_samples / "sunrgbd_training_images.txt")[:6]
    real_test = read_list(shared_samples / "sunrgbd_testing_images.txt")[-3:]
    rng = np.random.default_rng(0)
    fr = lambda p: (rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), rng.integers(0, 38, (6, 8), dtype=np.uint8), p)
    root = write_preprocessed_release(tmp_path, [fr(p) for p in real_train], [fr(p) for p in real_test])
    ds = SunRGBD(root, "test")
    assert ds.ids == [frame_key(p) for p in real_test]
    assert [ds[i]["meta"]["sensor"] for i in range(3)] == ["realsense"] * 3
    (root / "allsplit.mat").write_bytes((shared_samples / "toolbox" / "allsplit.mat").read_bytes())
    _, _, trainval = read_allsplit(root / "allsplit.mat")
    val = SunRGBD(root, "val", val_method="official")
    assert set(val.ids) == {frame_key(p) for p in real_train if trainval[frame_key(p)] == "val"}


def test_real_frame_folder(shared_samples):
    folder = shared_samples / "frame-kv1-b3do"
    image = read_image_file(next((folder / "image").glob("*.jpg")))
    assert image.shape == (427, 561, 3)  # kv1's size
    seg = scipy.io.loadmat(folder / "seg.mat")
    assert seg["seglabel"].shape == (427, 561)  # the per-polygon map sits beside the image, same size


@pytest.mark.slow
def test_full_size_official_copy_with_the_real_split(tmp_path, shared_samples):
    """All 10,335 real frame paths in an official-form copy (tiny images), read with the real allsplit.mat
    (prefix /data1/, trailing slashes): the official counts, the official train/val split, a full prepare."""
    from sun_seg.data.prepare import prepare
    lists = {s: read_list(shared_samples / f"sunrgbd_{n}_images.txt") for s, n in (("train", "training"), ("test", "testing"))}
    img, lab = np.zeros((2, 3, 3), np.uint8), np.ones((2, 3), np.uint8)
    root = write_official_release(tmp_path / "o", [(img, lab, p) for p in lists["train"]],
                                  [(img, lab, p) for p in lists["test"]], extras=False, compression=None)
    (root / "SUNRGBDtoolbox" / SPLIT_MAT).write_bytes((shared_samples / "toolbox" / "allsplit.mat").read_bytes())
    sizes = SunRGBD(root, "fit", val_method="official").info["split_sizes"]
    assert sizes == {"train": 5285, "test": 5050, "val": 2619, "fit": 2666}
    seeded = SunRGBD(root, "val")
    assert len(seeded) == 528 and Counter(sensor_of(i) for i in seeded.ids) == {"kv2": 192, "xtion": 170, "kv1": 107, "realsense": 59}
    cache = prepare(root, tmp_path / "cache", workers=2, progress=False)
    assert SunRGBD(cache, "val", val_method="official").ids == SunRGBD(root, "val", val_method="official").ids
