"""Fault injection on the data path: every bad input of the data issue and the faults of a real machine (a read-only
output folder, a full disk, a file size limit, symbolic link loops, non-ASCII paths), and tampered or foreign cache
files. Each fault must give a `DataError` naming the file and saying what to do, make the real `sun-seg` command
exit non-zero with that message and no traceback, and leave nothing half-written that looks complete (no cache
index in OUT, no partial folder in OUT's place, an existing good cache untouched).

The machine faults are real where the machine allows it: as root, a read-only folder is made real by dropping the
capabilities that let root ignore permissions (`setpriv`), a read-only file system by a read-only bind mount, and a
full disk by a small tmpfs, each in a private mount namespace (`unshare -m`); these skip, with the reason, where the
machine does not allow them. A file size limit (`RLIMIT_FSIZE`) and a file standing where a folder must be created
work everywhere."""
import errno
import io
import json
import os
import pickle
import re
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import importlib
from sun_seg.core import DataError, raw_to_target
from sun_seg.data.formats import (CACHE_IMAGES, CACHE_INDEX, CACHE_LABELS, CACHE_VERSION, LABELS_DIR, META_MAT, SEG_MAT,
                                  SPLIT_MAT, TEST_IMAGES_DIR, TRAIN_IMAGES_DIR, cache_checksum, detect_form,
                                  format_bytes, write_official_release, write_preprocessed_release)
from sun_seg.data.sunrgbd import CacheReader, SunRGBD

from data_fixtures import make_frames

prep = importlib.import_module("sun_seg.data.prepare")  # the module (`sun_seg.data.prepare` the attribute is the function)
analysis = importlib.import_module("sun_seg.data.analysis")
demo = importlib.import_module("sun_seg.data.demo")
demo_dataset = importlib.import_module("sun_seg.data.demo.dataset")  # the module that checks the free space

SUN_SEG = Path(sys.executable).parent / "sun-seg"
N_TRAIN, N_TEST = 10, 6  # labels 1..6 are the test images', 7..16 the train images' (train i -> label 6 + i)


@pytest.fixture(scope="module")
def frames():
    return make_frames(N_TRAIN, 100), make_frames(N_TEST)


def run_cli(*args, env=None, prefix=(), timeout=300, **kw):
    """Run the installed console command `sun-seg ARGS` (optionally under `prefix`, e.g. setpriv)."""
    return subprocess.run([*prefix, str(SUN_SEG), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ.copy(), **kw)


def assert_cli_error(proc, command, *needles):
    """Exit code 2, `sun-seg COMMAND: error:` with every needle on stderr, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert f"sun-seg {command}: error:" in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for needle in needles:
        assert str(needle) in proc.stderr, (needle, proc.stderr[-4000:])


def assert_no_cache_written(out: Path):
    """OUT holds no cache (absent or empty), and no hidden work folder beside it holds an index that could pass for one."""
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    if out.parent.is_dir():
        for work in out.parent.glob(f".{out.name}*"):
            assert not (work / CACHE_INDEX).exists(), work


def tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ================================================================ bad samples
def _png_rgb16(path: Path, rgb: np.ndarray):
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write one)."""
    h, w = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _save_as(path: Path, array: np.ndarray, fmt: str = "PNG", mode=None):
    """Save `array` into `path` in another format than its name says (PIL reads by content, as real copies get)."""
    path.unlink(missing_ok=True)
    Image.fromarray(array, mode).save(path, fmt)


def _train(root, i): return root / TRAIN_IMAGES_DIR / f"img-{i:06d}.jpg"
def _test(root, i): return root / TEST_IMAGES_DIR / f"img-{i:06d}.jpg"
def _label(root, i): return root / LABELS_DIR / f"img-{i:06d}.png"


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _link(path: Path, target: str):
    path.unlink(missing_ok=True)
    path.symlink_to(target)


# name: (damage(root), split, index of the sample, the file the error names, what is wrong, what to do)
BAD_SAMPLES = {
    "corrupt_image": (lambda r: _train(r, 1).write_bytes(b"\x89PNG not a jpeg at all"), "train", 0,
                      lambda r: _train(r, 1), "corrupt or truncated image", "re-extract it from its archive"),
    "truncated_image": (lambda r: _truncate(_train(r, 2)), "train", 1, lambda r: _train(r, 2),
                        "corrupt or truncated image (Truncated File Read)", "re-extract it from its archive"),
    "missing_image": (lambda r: _train(r, 3).unlink(), "train", 2, lambda r: _train(r, 3),
                      "image file is missing", "Restore it"),
    "missing_label": (lambda r: _label(r, 6 + 4).unlink(), "train", 3, lambda r: _label(r, 10),
                      "label file is missing", "Restore it"),
    "size_mismatch": (lambda r: _save_as(_label(r, 6 + 5), np.zeros((10, 16), np.uint8)), "train", 4,
                      lambda r: _label(r, 11), "is 16x10", "restore both"),
    "label_above_37": (lambda r: _save_as(_label(r, 6 + 6), np.full((12, 16), 41, np.uint8)), "train", 5,
                       lambda r: _label(r, 12), "label values [41] are out of range", "use the 37-class labels"),
    "label_255_ignore": (lambda r: _save_as(_label(r, 4), np.full((12, 16), 255, np.uint8)), "test", 3,
                         lambda r: _label(r, 4), "255 marks 'ignore' in other datasets", "use the 37-class labels"),
    "rgb_label": (lambda r: _save_as(_label(r, 1), np.zeros((12, 16, 3), np.uint8)), "test", 0,
                  lambda r: _label(r, 1), "label is RGB-encoded", "Use the release's label file"),
    "depth_map_as_image": (lambda r: _save_as(_test(r, 2), np.full((12, 16), 3000, np.uint16)), "test", 1,
                           lambda r: _test(r, 2), "single-channel 16-bit image", "Put the RGB image"),
    "transparent_image": (lambda r: _save_as(_test(r, 3), np.dstack([np.zeros((12, 16, 3), np.uint8),
                                                                     np.full((12, 16), 128, np.uint8)])),
                          "test", 2, lambda r: _test(r, 3), "transparent pixels", "Use the release's RGB file"),
    "image_link_loop": (lambda r: _link(_train(r, 7), _train(r, 7).name), "train", 6, lambda r: _train(r, 7),
                        "symbolic link loop", "Replace it with the real file"),
    "broken_label_link": (lambda r: _link(_label(r, 6 + 8), "gone.png"), "train", 7, lambda r: _label(r, 14),
                          "symbolic link to 'gone.png', which does not exist", "Restore that file"),
}


@pytest.fixture
def release(tmp_path, frames):
    return write_preprocessed_release(tmp_path / "src", *frames)


@pytest.mark.parametrize("fault", list(BAD_SAMPLES))
def test_bad_sample_is_named(fault, release, tmp_path):
    """Reading the sample raises a DataError naming its file and what to do; `prepare` lists it and writes nothing."""
    damage, split, i, culprit, what, todo = BAD_SAMPLES[fault]
    damage(release)
    ds = SunRGBD(release, split)
    with pytest.raises(DataError) as e:
        ds[i]
    message = str(e.value)
    assert str(culprit(release)) in message and what in message and todo in message, message
    for j in range(len(ds)):  # every other sample still reads
        if j != i: ds[j]
    out = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        prep.prepare(release, out, workers=0, progress=False)
    assert "1 of 16 samples are bad" in str(e.value) and str(culprit(release)) in str(e.value)
    assert "--skip-bad" in str(e.value)
    assert_no_cache_written(out)


def test_every_bad_sample_through_the_command(release, tmp_path):
    """All the bad samples at once: `sun-seg prepare` exits 2, names every file with its problem; OUT is not created."""
    for damage, *_ in BAD_SAMPLES.values(): damage(release)
    out = tmp_path / "cache"
    proc = run_cli("prepare", release, out, "--workers", "0")
    assert_cli_error(proc, "prepare", f"{len(BAD_SAMPLES)} of 16 samples are bad", "No cache was written")
    for fault, (_, _, _, culprit, what, todo) in BAD_SAMPLES.items():
        assert any(str(culprit(release)) in l and what in l and todo in l for l in proc.stderr.splitlines()), fault
    assert_no_cache_written(out)


# ---------------------------------------------------------------- what is converted, not refused
def _rgb_of(root, i):  # the train image as written (JPEG-decoded), to compare conversions with
    return np.array(Image.open(_train(root, i)).convert("RGB"))


LABEL = np.arange(12 * 16).reshape(12, 16) % 38  # every class and void


def _greyscale_image(root):
    _save_as(_train(root, 1), _rgb_of(root, 1)[..., 1], "JPEG")
    return np.array(Image.open(_train(root, 1)))[..., None].repeat(3, -1)  # the grey value in all three channels

def _opaque_rgba_image(root):
    rgb = _rgb_of(root, 1)
    _save_as(_train(root, 1), np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))
    return rgb

def _rgb_16bit_image(root):
    rgb = _rgb_of(root, 1)
    _png_rgb16(_train(root, 1), rgb.astype(np.uint16) * 257)
    return rgb  # the high byte

def _cmyk_jpeg_image(root):
    rgb = _rgb_of(root, 1)
    Image.fromarray(rgb).convert("CMYK").save(_train(root, 1), "JPEG", quality=100)
    converted = np.array(Image.open(_train(root, 1)).convert("RGB"))
    assert np.abs(converted.astype(int) - rgb).max() <= 2  # the expected value is the colours written, not any output
    return converted

def _palette_label(root):
    im = Image.fromarray(LABEL.astype(np.uint8), "P")
    im.putpalette(np.random.default_rng(0).integers(0, 256, 768).astype(np.uint8).tolist())  # colours for viewing only
    _label(root, 7).unlink(); im.save(_label(root, 7))
    assert Image.open(_label(root, 7)).mode == "P"
    return LABEL  # the indices, not the colours

def _label_16bit(root):
    _save_as(_label(root, 7), LABEL.astype(np.uint16))
    assert Image.open(_label(root, 7)).mode.startswith("I;16")
    return LABEL


ACCEPTED = {  # name: (change(root) -> the expected image or raw label of train sample 0, which of the two)
    "greyscale_image": (_greyscale_image, "image"), "opaque_rgba_image": (_opaque_rgba_image, "image"),
    "rgb_16bit_image": (_rgb_16bit_image, "image"), "cmyk_jpeg_image": (_cmyk_jpeg_image, "image"),
    "palette_label": (_palette_label, "label"), "label_16bit": (_label_16bit, "label"),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_converted_modes_are_read_as_documented(case, release, tmp_path):
    """The decoding policy: greyscale, opaque RGBA, 16-bit colour and CMYK images become RGB; a palette label gives its
    indices (not its colours); a 16-bit label gives its values. `prepare` stores exactly that."""
    change, what = ACCEPTED[case]
    expected = change(release)
    item = SunRGBD(release, "train")[0]
    if what == "image":
        np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), expected)
    else:
        np.testing.assert_array_equal(item["target"].numpy(), raw_to_target(expected.astype(np.uint8)))
    cache = prep.prepare(release, tmp_path / "cache", workers=0, progress=False)
    cached = SunRGBD(cache, "train")[0]
    assert (cached["image"] == item["image"]).all() and (cached["target"] == item["target"]).all()


# ================================================================ bad folders
def _empty(root: Path): root.mkdir()
def _unrecognised(root: Path):
    root.mkdir(); (root / "notes.txt").write_text("x"); (root / "photos").mkdir()
def _empty_image_folders(root: Path):
    for d in (TRAIN_IMAGES_DIR, TEST_IMAGES_DIR, LABELS_DIR): (root / d).mkdir(parents=True)
    _save_as(_label(root, 1), np.zeros((4, 4), np.uint8))
def _empty_labels(root: Path, frames):
    write_preprocessed_release(root, *frames)
    for p in (root / LABELS_DIR).iterdir(): p.unlink()
def _root_link_loop(root: Path): root.symlink_to(root.name)


FOLDERS = {  # name: (make(root, frames), the path named, what is wrong, what to do)
    "empty": (lambda r, f: _empty(r), lambda r: r, "the data folder is empty", "`sun-seg demo-data`"),
    "unrecognised": (lambda r, f: _unrecognised(r), lambda r: r, "no SUN RGB-D form recognised (found: notes.txt, photos)",
                     "Each form needs"),
    "empty_image_folders": (lambda r, f: _empty_image_folders(r), lambda r: r, "hold no images",
                            "Extract SUNRGBD-train_images.tgz"),
    "empty_label_folder": (_empty_labels, lambda r: r / LABELS_DIR, "holds no label files", "extract sunrgbd_train_test_labels"),
    "root_is_a_link_loop": (lambda r, f: _root_link_loop(r), lambda r: r, "symbolic link that leads nowhere",
                            "Point to the real data folder"),
}


@pytest.mark.parametrize("fault", list(FOLDERS))
def test_bad_folder_is_named(fault, tmp_path, frames):
    make, named, what, todo = FOLDERS[fault]
    root = tmp_path / "data"
    make(root, frames)
    with pytest.raises(DataError) as e:
        SunRGBD(root, "train")
    assert str(e.value).startswith(f"{named(root)}: ") and what in str(e.value) and todo in str(e.value), str(e.value)
    out = tmp_path / "cache"
    with pytest.raises(DataError) as again:
        prep.prepare(root, out, workers=0, progress=False)
    assert str(again.value) == str(e.value)
    assert_no_cache_written(out)


@pytest.mark.parametrize("fault, command", [("empty", "prepare"), *(pytest.param(*fc, marks=pytest.mark.slow) for fc in (
    ("unrecognised", "prepare"), ("empty", "data-summary"), ("unrecognised", "data-summary"),
    ("root_is_a_link_loop", "prepare")))])
def test_bad_folder_through_the_commands(fault, command, tmp_path, frames):
    make, named, what, todo = FOLDERS[fault]
    root = tmp_path / "data"
    make(root, frames)
    out = tmp_path / "cache"
    args = ("prepare", root, out, "--workers", "0") if command == "prepare" else ("data-summary", root, "--quiet")
    assert_cli_error(run_cli(*args), command, f"{named(root)}: ", what, todo)
    assert_no_cache_written(out)


# ================================================================ the official release's toolbox files
def _point_row_to_garbage(root: Path):
    seg = root / "SUNRGBDtoolbox" / SEG_MAT
    with h5py.File(seg, "r") as f:
        offset = f["SUNRGBD2Dseg/seglabel"].id.get_offset()
    with open(seg, "r+b") as f:  # row 6 (the first train frame: the 6 test frames come first) points into nowhere
        f.seek(offset + 6 * 8); f.write((987654321).to_bytes(8, "little"))


TOOLBOX = {  # name: (damage(root), the file named, what is wrong)
    "unresolvable_reference": (_point_row_to_garbage, SEG_MAT, "seglabel[6] (frame"),
    "truncated_label_file": (lambda r: _truncate(r / "SUNRGBDtoolbox" / SEG_MAT), SEG_MAT, "truncated or damaged"),
    "truncated_meta_file": (lambda r: _truncate(r / "SUNRGBDtoolbox" / META_MAT), META_MAT, "cannot read the frame metadata"),
    "split_file_not_a_mat": (lambda r: (r / "SUNRGBDtoolbox" / SPLIT_MAT).write_bytes(b"<html>404</html>"), SPLIT_MAT,
                             "cannot read the split file"),
}


@pytest.fixture
def official(tmp_path, frames):
    return write_official_release(tmp_path / "src", *frames, extras=False)


@pytest.mark.parametrize("fault", list(TOOLBOX))
def test_toolbox_fault_is_named(fault, official, tmp_path):
    damage, named, what = TOOLBOX[fault]
    damage(official)
    culprit = official / "SUNRGBDtoolbox" / named
    with pytest.raises(DataError) as e:
        ds = SunRGBD(official, "train")
        ds[0]
    assert str(culprit) in str(e.value) and what in str(e.value) and "e-extract SUNRGBDtoolbox.zip" in str(e.value), str(e.value)
    out = tmp_path / "cache"
    with pytest.raises(DataError, match=named.split("/")[-1]):
        prep.prepare(official, out, workers=0, progress=False)
    assert_no_cache_written(out)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["unresolvable_reference", "truncated_label_file"])
def test_toolbox_fault_through_the_command(fault, official, tmp_path):
    damage, named, what = TOOLBOX[fault]
    damage(official)
    out = tmp_path / "cache"
    proc = run_cli("prepare", official, out, "--workers", "0")
    assert_cli_error(proc, "prepare", official / "SUNRGBDtoolbox" / named, what, "e-extract SUNRGBDtoolbox.zip")
    assert_no_cache_written(out)


# ================================================================ symbolic link loops in a data folder
@pytest.mark.timeout(120)
@pytest.mark.parametrize("form", ["preprocessed", "official"])
def test_link_loops_inside_the_data_do_not_hang(form, tmp_path, frames):
    """Link cycles beside and inside the data (a folder linking to its parent, a link to itself, two links to each
    other) neither hang form detection, reading, fingerprinting nor `prepare`, nor change the result: nothing walks
    the tree recursively."""
    clean = (write_preprocessed_release if form == "preprocessed" else write_official_release)(tmp_path / "clean", *frames)
    root = (write_preprocessed_release if form == "preprocessed" else write_official_release)(tmp_path / "src", *frames)
    inner = root / (TRAIN_IMAGES_DIR if form == "preprocessed" else "SUNRGBD/kv1")
    (root / "up").symlink_to(".")
    (inner / "parent").symlink_to("..")
    (root / "self").symlink_to("self")
    (inner / "a").symlink_to("b"); (inner / "b").symlink_to("a")
    assert detect_form(root) == form
    assert SunRGBD(root, "train").ids == SunRGBD(clean, "train").ids
    a = prep.prepare(root, tmp_path / "a", workers=0, progress=False)
    b = prep.prepare(clean, tmp_path / "b", workers=0, progress=False)
    assert (a / CACHE_IMAGES).read_bytes() == (b / CACHE_IMAGES).read_bytes()
    (tmp_path / "wrapper").mkdir(); (tmp_path / "wrapper" / "loop").symlink_to("../wrapper")
    with pytest.raises(DataError, match="no SUN RGB-D form recognised"):  # the loop is looked into once, not followed
        detect_form(tmp_path / "wrapper")


# ================================================================ non-ASCII paths and spaces
@pytest.mark.parametrize("form", ["preprocessed", "official"])
def test_non_ascii_and_space_paths(form, tmp_path, frames):
    write = write_preprocessed_release if form == "preprocessed" else write_official_release
    plain = write(tmp_path / "plain", *frames)
    root = write(tmp_path / "données" / "SUN RGB-D copy", *frames)
    assert detect_form(root) == form
    a, b = SunRGBD(root, "train"), SunRGBD(plain, "train")
    assert a.ids == b.ids
    if form == "preprocessed": assert a.fingerprint == b.fingerprint  # relative names: the same data, the same id
    for i in range(len(a)):
        assert (a[i]["image"] == b[i]["image"]).all() and (a[i]["target"] == b[i]["target"]).all()
    cache = prep.prepare(root, tmp_path / "données" / "cache é 1", workers=0, progress=False)
    assert SunRGBD(cache, "test").info["root"] == str(cache.resolve())
    assert CacheReader(cache).index["source"]["root"] == str(root.resolve())


def test_non_ascii_paths_through_the_command_in_an_ascii_locale(tmp_path, frames):
    root = write_preprocessed_release(tmp_path / "données" / "SUN RGB-D copy", *frames)
    out = tmp_path / "données" / "cache é"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    proc = run_cli("prepare", root, out, "--workers", "0", env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"cache ready: {out}" in proc.stdout
    assert len(SunRGBD(out, "train")) == N_TRAIN


# ================================================================ a read-only output folder
def _can(cmd) -> bool:
    try: return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired): return False


@pytest.fixture(scope="session")
def no_dac_prefix(tmp_path_factory):
    """The command prefix under which root obeys file permissions (None when not possible here)."""
    if os.geteuid() != 0: return ()
    probe = tmp_path_factory.mktemp("probe-ro")
    probe.chmod(0o555)
    prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--")
    works = shutil.which("setpriv") and _can([*prefix, "true"]) and not _can([*prefix, "touch", str(probe / "x")])
    probe.chmod(0o755)
    return prefix if works else None


@pytest.fixture(scope="session")
def mount_namespace():
    """True when this process may mount a tmpfs and a read-only bind in a private mount namespace (`unshare -m`)."""
    return bool(shutil.which("unshare")) and _can(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"])


@pytest.fixture
def read_only_folder(tmp_path, frames, no_dac_prefix):
    """(source, a read-only folder holding a good cache `good`, the cache's bytes); write permission is restored after."""
    if no_dac_prefix is None:
        pytest.skip("running as root and `setpriv` cannot drop CAP_DAC_OVERRIDE here, so permissions cannot be enforced")
    src = write_preprocessed_release(tmp_path / "src", *frames)
    other = write_preprocessed_release(tmp_path / "other", make_frames(3, 50), make_frames(2, 60))
    ro = tmp_path / "ro"
    good = prep.prepare(other, ro / "good", workers=0, progress=False)
    before = tree_bytes(good)
    ro.chmod(0o555)
    yield src, ro, before
    ro.chmod(0o755)
    assert sorted(p.name for p in ro.iterdir()) == ["good"]  # nothing was created
    assert tree_bytes(ro / "good") == before
    CacheReader(ro / "good").verify(progress=False)


def test_read_only_output_folder(read_only_folder, no_dac_prefix):
    """A folder without write permission (made real for root by dropping the capabilities that let it ignore
    permissions): `sun-seg prepare` exits 2 naming the output folder; nothing is created there."""
    src, ro, _ = read_only_folder
    proc = run_cli("prepare", src, ro / "cache", "--workers", "0", prefix=no_dac_prefix)
    assert_cli_error(proc, "prepare", f"{ro / 'cache'}: cannot be written: permission denied",
                     "Choose an output folder you can write to")


@pytest.mark.slow
def test_read_only_output_folder_keeps_its_cache(read_only_folder, no_dac_prefix):
    """Replacing a good cache in a read-only folder (`--overwrite`) and `sun-seg demo-data` there: refused, the cache
    is untouched (checked by the fixture, sample by sample)."""
    src, ro, _ = read_only_folder
    proc = run_cli("prepare", src, ro / "good", "--workers", "0", "--overwrite", prefix=no_dac_prefix)
    assert_cli_error(proc, "prepare", f"{ro / 'good'}: cannot be written: permission denied")
    proc = run_cli("demo-data", ro / "demo", "--n-train", "2", "--n-test", "1", "--quiet", prefix=no_dac_prefix)
    assert_cli_error(proc, "demo-data", f"{ro / 'demo'}: cannot be written: permission denied")


@pytest.mark.slow
def test_read_only_file_system(tmp_path, frames, mount_namespace):
    """The output folder on a read-only file system (a read-only bind mount in a private mount namespace)."""
    if not mount_namespace: pytest.skip("no private mount namespace (`unshare -m` with mount) on this machine")
    src = write_preprocessed_release(tmp_path / "src", *frames)
    ro = tmp_path / "ro"; ro.mkdir()
    script = f'mount --bind -o ro "{ro}" "{ro}" && exec "{SUN_SEG}" prepare "{src}" "{ro}/cache" --workers 0'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert_cli_error(proc, "prepare", f"{ro}", "it is on a read-only file system", "Choose an output folder you can write to")
    assert list(ro.iterdir()) == []


def test_output_path_through_a_file(tmp_path, frames):
    """An output path that runs through a regular file (works for any user): named, nothing written anywhere."""
    src = write_preprocessed_release(tmp_path / "src", *frames)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError) as e:
        prep.prepare(src, tmp_path / "notes.txt" / "cache", workers=0, progress=False)
    assert str(e.value).startswith(f"{tmp_path / 'notes.txt' / 'cache'}: cannot be written: a part of the path is a "
                                   "file, not a folder. Choose an output folder you can write to"), str(e.value)
    with pytest.raises(DataError) as e:
        demo.make_demo_dataset(tmp_path / "notes.txt" / "demo", n_train=2, n_test=1, progress=False)
    assert str(e.value).startswith(f"{tmp_path / 'notes.txt'}: cannot be written: a file of that name is in the way")
    from sun_seg.data.download import download  # fails before any request is made
    with pytest.raises(DataError, match="notes.txt/sunrgbd: cannot be written: a part of the path is a file"):
        download(tmp_path / "notes.txt" / "sunrgbd", "preprocessed", base_url="http://127.0.0.1:9", retries=0, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "src"]


# ================================================================ a full disk
def _need(n_samples, h, w): return 4 * h * w * n_samples + prep._BYTES_PER_SAMPLE * n_samples


def test_too_little_space_is_refused_before_writing(tmp_path, frames, monkeypatch):
    """The space check (free space made small): refused before anything is written, with the space needed."""
    src = write_preprocessed_release(tmp_path / "src", *frames)
    monkeypatch.setattr(prep, "free_bytes", lambda folder: 20_000)
    out = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        prep.prepare(src, out, workers=0, progress=False)
    assert str(e.value).startswith(f"{out}: not enough disk space for the cache")
    assert f"it needs {format_bytes(_need(16, 12, 16))} more, but only {format_bytes(20_000)} are free" in str(e.value)
    assert "choose a folder on another disk" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    monkeypatch.setattr(demo_dataset, "free_bytes", lambda folder: 1000)
    with pytest.raises(DataError, match="not enough disk space for the demo data: it needs about"):
        demo.make_demo_dataset(tmp_path / "demo", n_train=2, n_test=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


class _FillingDisk(io.FileIO):
    """A data file on a disk with `room` bytes left (shared by all such files): a write beyond it is cut short, then
    fails with ENOSPC, as the kernel does."""
    room = 0
    def write(self, b):
        b = memoryview(b).cast("B")
        if len(b) > _FillingDisk.room:
            written = super().write(b[:_FillingDisk.room]) if _FillingDisk.room else 0
            _FillingDisk.room -= written or 0
            if written: return written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FillingDisk.room -= len(b)
        return super().write(b)


def test_disk_filling_up_midway_keeps_a_resumable_partial_and_the_old_cache(tmp_path, frames, monkeypatch):
    """The disk fills up while the data files are written (in-process: the data files' writes fail with ENOSPC after
    5 kB): the error names OUT and the space needed; OUT keeps the good cache it held; the finished samples stay in
    the hidden partial folder, and the same call, with room again, finishes the same bytes as a clean run."""
    src = write_preprocessed_release(tmp_path / "src", *frames)
    good = prep.prepare(write_preprocessed_release(tmp_path / "other", make_frames(3, 50), make_frames(2, 60)),
                        tmp_path / "cache", workers=0, progress=False)
    before = tree_bytes(good)
    real_open = open
    def opener(path, mode="r", *args, **kw):
        if Path(path).name in (CACHE_IMAGES, CACHE_LABELS) and mode == "ab":
            return io.BufferedWriter(_FillingDisk(path, "a"))  # buffered like open(): short writes are retried
        return real_open(path, mode, *args, **kw)
    monkeypatch.setattr(prep, "open", opener, raising=False)
    _FillingDisk.room = 5_000  # of the 12 kB the 16 samples take
    with pytest.raises(DataError) as e:
        prep.prepare(src, good, workers=0, overwrite=True, progress=False)
    message = str(e.value)
    assert message.startswith(f"{good}: the disk is full (No space left on device)"), message
    assert f"it needs {format_bytes(_need(16, 12, 16))} in all" in message
    assert "Free some space or choose a folder on another disk" in message and "the same command continues" in message
    assert tree_bytes(good) == before  # the old cache is untouched...
    part = tmp_path / ".cache.partial"
    assert not (part / CACHE_INDEX).exists() and (part / "journal.jsonl").stat().st_size > 0  # ...the new one is partial, hidden
    monkeypatch.undo()
    calls = []
    real_sample = prep.prepare_sample
    monkeypatch.setattr(prep, "prepare_sample", lambda *a: (calls.append(1), real_sample(*a))[1])
    prep.prepare(src, good, workers=0, overwrite=True, progress=False)
    assert 0 < len(calls) < 16  # finished samples were not redone
    clean = prep.prepare(src, tmp_path / "clean", workers=0, progress=False)
    for name in (CACHE_IMAGES, CACHE_LABELS, "stats.csv"):
        assert (good / name).read_bytes() == (clean / name).read_bytes()
    assert not part.exists()


def _tmpfs_run(mnt: Path, size: str, command: str) -> subprocess.CompletedProcess:
    """Run `command` in a private mount namespace with a tmpfs of `size` on `mnt`; prints the tmpfs' content after it."""
    script = (f'mount -t tmpfs -o size={size} tmpfs "{mnt}" || exit 99; {command}; rc=$?; '
              f'echo "=== tmpfs"; cd "{mnt}" && find . | sort; exit $rc')
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)


@pytest.fixture
def big_release(tmp_path):
    """16 frames of 96x128 (786 kB of cache), bigger than the tmpfs."""
    return write_preprocessed_release(tmp_path / "src", make_frames(10, 100, (96, 128)), make_frames(6, 0, (96, 128)))


@pytest.mark.slow
def test_full_disk_refused_with_the_space_needed(tmp_path, big_release, mount_namespace):
    """A real 256 kB tmpfs: `sun-seg prepare` refuses before writing and says how much it needs."""
    if not mount_namespace: pytest.skip("no private mount namespace (`unshare -m` with mount) on this machine")
    mnt = tmp_path / "mnt"; mnt.mkdir()
    proc = _tmpfs_run(mnt, "256k", f'"{SUN_SEG}" prepare "{big_release}" "{mnt}/cache" --workers 0')
    assert_cli_error(proc, "prepare", f"{mnt}/cache: not enough disk space for the cache: it needs "
                     f"{format_bytes(_need(16, 96, 128))} more, but only {format_bytes(256 * 1024)} are free")
    assert proc.stdout.split("=== tmpfs\n")[1].split() == ["."]  # nothing was written


def test_full_disk_midway_real_enospc(tmp_path, big_release, mount_namespace):
    """A real 256 kB tmpfs filling up while `prepare` writes (its space check told the disk had room, as when another
    program fills the disk meanwhile): the kernel's ENOSPC becomes the error; no index anywhere on the disk."""
    if not mount_namespace: pytest.skip("no private mount namespace (`unshare -m` with mount) on this machine")
    mnt = tmp_path / "mnt"; mnt.mkdir()
    code = ("import sys, importlib, sun_seg.cli as c; p = importlib.import_module('sun_seg.data.prepare'); "
            "p.free_bytes = lambda folder: 1 << 40; "
            f"sys.exit(c.main(['prepare', '{big_release}', '{mnt}/cache', '--workers', '0']))")
    proc = _tmpfs_run(mnt, "256k", f'"{sys.executable}" -c "{code}"')
    assert_cli_error(proc, "prepare", f"{mnt}/cache: the disk is full (No space left on device)",
                     f"it needs {format_bytes(_need(16, 96, 128))} in all", "the same command continues from them")
    on_disk = proc.stdout.split("=== tmpfs\n")[1].split()
    assert "./.cache.partial/journal.jsonl" in on_disk and not any(p.endswith(CACHE_INDEX) for p in on_disk), on_disk
    assert not any(p == "./cache" or p.startswith("./cache/") for p in on_disk)


@pytest.mark.slow
def test_full_disk_demo_data_real_enospc(tmp_path, mount_namespace):
    """`sun-seg demo-data` on a real 64 kB tmpfs filling up midway: the error names the folder; nothing is left."""
    if not mount_namespace: pytest.skip("no private mount namespace (`unshare -m` with mount) on this machine")
    mnt = tmp_path / "mnt"; mnt.mkdir()
    code = ("import sys, importlib, sun_seg.cli as c; d = importlib.import_module('sun_seg.data.demo.dataset'); "
            "d.free_bytes = lambda folder: 1 << 40; "
            f"sys.exit(c.main(['demo-data', '{mnt}/demo', '--n-train', '8', '--n-test', '2', '--quiet']))")
    proc = _tmpfs_run(mnt, "64k", f'"{sys.executable}" -c "{code}"')
    assert_cli_error(proc, "demo-data", "the disk is full (No space left on device)", "choose a folder on another disk")
    assert proc.stdout.split("=== tmpfs\n")[1].split() == ["."]


@pytest.mark.slow
def test_file_size_limit(tmp_path, big_release):
    """`ulimit -f` (RLIMIT_FSIZE) below the size of images.u8: refused before writing, with both sizes."""
    limit = 200_000
    out = tmp_path / "cache"
    proc = run_cli("prepare", big_release, out, "--workers", "0",
                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert_cli_error(proc, "prepare", f"{out}: {CACHE_IMAGES} will take {format_bytes(3 * 96 * 128 * 16)}",
                     f"may not write files larger than {format_bytes(limit)}", "ulimit -f unlimited")
    assert_no_cache_written(out)


@pytest.mark.slow
def test_file_size_limit_midway_real_efbig(tmp_path, big_release):
    """The kernel's EFBIG (the size check skipped): the error says to raise the limit; no index is written."""
    limit = 200_000
    out = tmp_path / "cache"
    code = ("import sys, importlib, sun_seg.cli as c; p = importlib.import_module('sun_seg.data.prepare'); "
            "p._file_size_limit = lambda: None; "
            f"sys.exit(c.main(['prepare', '{big_release}', '{out}', '--workers', '0']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert_cli_error(proc, "prepare", "this process may not write a file this large", "ulimit -f unlimited")
    assert_no_cache_written(out)
    assert (tmp_path / ".cache.partial" / "journal.jsonl").is_file()


# ================================================================ tampered and foreign caches (Safety)
@pytest.fixture
def caches(tmp_path, frames):
    """Two caches of the same shapes but different content (`good` is tampered with, `other` gives swapped files)."""
    good = prep.prepare(write_preprocessed_release(tmp_path / "src", *frames), tmp_path / "good", workers=0, progress=False)
    other = prep.prepare(write_preprocessed_release(tmp_path / "src2", make_frames(N_TRAIN, 300), make_frames(N_TEST, 200)),
                         tmp_path / "other", workers=0, progress=False)
    return good, other


def _edit_index(cache, change, rechecksum=False):
    index = json.loads((cache / CACHE_INDEX).read_text())
    change(index)
    if rechecksum: index["checksum"] = cache_checksum(index)
    (cache / CACHE_INDEX).write_text(json.dumps(index))


class _Payload:
    """Unpickling this would run a command (what a pickle-based cache would expose)."""
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


def _pickle_in_place(cache):
    (cache / CACHE_INDEX).write_bytes(pickle.dumps(_Payload(cache.parent / "EXECUTED")))


TAMPERED = {  # name: (tamper(good, other), the file named, what is wrong)
    "index_edited": (lambda g, o: _edit_index(g, lambda i: i["samples"][0].update(split="train")), CACHE_INDEX,
                     "was changed after `sun-seg prepare` wrote it"),
    "index_truncated": (lambda g, o: _truncate(g / CACHE_INDEX), CACHE_INDEX, "is not valid JSON"),
    "index_forged_outside_files": (lambda g, o: _edit_index(g, lambda i: i["samples"][-1].update(image_offset=10**9), True),
                                   CACHE_INDEX, "lies outside the data files"),
    "index_of_another_cache": (lambda g, o: shutil.copy(o / CACHE_INDEX, g / CACHE_INDEX), CACHE_IMAGES,
                               "does not hold the bytes its index recorded"),
    "index_older_version": (lambda g, o: _edit_index(g, lambda i: i.update(version=2), True), CACHE_INDEX,
                            f"is not a sun_seg cache of version {CACHE_VERSION}"),
    "index_foreign_json": (lambda g, o: (g / CACHE_INDEX).write_text('{"lr": 0.001, "epochs": 10}'), CACHE_INDEX,
                           "is not a sun_seg cache index"),
    "index_binary": (lambda g, o: (g / CACHE_INDEX).write_bytes(bytes(range(256)) * 4), CACHE_INDEX, "it is not text"),
    "index_is_a_pickle": (lambda g, o: _pickle_in_place(g), CACHE_INDEX, "is not a sun_seg cache index"),
    "images_of_another_cache": (lambda g, o: shutil.copy(o / CACHE_IMAGES, g / CACHE_IMAGES), CACHE_IMAGES,
                                "does not hold the bytes its index recorded"),
    "labels_of_another_cache": (lambda g, o: shutil.copy(o / CACHE_LABELS, g / CACHE_LABELS), CACHE_LABELS,
                                "does not hold the bytes its index recorded"),
    "images_truncated": (lambda g, o: _truncate(g / CACHE_IMAGES), CACHE_IMAGES, "is missing or truncated"),
    "labels_grown": (lambda g, o: (g / CACHE_LABELS).open("ab").write(b"\x00" * 7), CACHE_LABELS, "is another cache's file"),
}


@pytest.mark.parametrize("fault", list(TAMPERED))
def test_tampered_or_foreign_cache_is_refused(fault, caches, tmp_path):
    """Opening the cache (as a dataset, or as the source of `prepare`) gives a DataError naming the file and saying to
    prepare the cache again; nothing is executed; the user's files are left as they are; no new cache is written."""
    good, other = caches
    tamper, named, what = TAMPERED[fault]
    tamper(good, other)
    after = tree_bytes(good)
    for attempt in (lambda: SunRGBD(good, "train"), lambda: prep.prepare(good, tmp_path / "resized", (6, 8), workers=0, progress=False)):
        with pytest.raises(DataError) as e:
            attempt()
        assert str(e.value).startswith(f"{good / named}: ") and what in str(e.value), str(e.value)
        assert "prepare" in str(e.value) and "again" in str(e.value)
    assert not (tmp_path / "EXECUTED").exists()
    assert tree_bytes(good) == after
    assert_no_cache_written(tmp_path / "resized")


def test_tampered_cache_through_the_command(caches, tmp_path):
    good, other = caches
    shutil.copy(other / CACHE_LABELS, good / CACHE_LABELS)
    out = tmp_path / "resized"
    proc = run_cli("prepare", good, out, "--size", "6x8", "--workers", "0")
    assert_cli_error(proc, "prepare", f"{good / CACHE_LABELS}: does not hold the bytes its index recorded",
                     "prepare the cache again")
    assert_no_cache_written(out)


def test_a_changed_sample_is_found_by_verify(caches, tmp_path):
    """One byte changed in a sample the opening probe does not cover: `verify()` (and `prepare(verify=True)`,
    `sun-seg prepare --verify`) names the sample; preparing again with overwrite repairs it."""
    good, _ = caches
    reader = CacheReader(good)
    probed = set(reader.index["probe"]["samples"])
    pos = next(p for p in range(len(reader.records)) if p not in probed)
    rec = reader.records[pos]
    with open(good / CACHE_LABELS, "r+b") as f:
        f.seek(rec.loc[1] + 5); old = f.read(1); f.seek(rec.loc[1] + 5); f.write(bytes([(old[0] + 1) % 256]))
    CacheReader(good)  # the quick checks on opening pass...
    with pytest.raises(DataError, match=re.escape(f"1 of 16 samples differ from what `prepare` wrote (first: {rec.id})")):
        CacheReader(good).verify(progress=False)  # ...the full check does not
    src = tmp_path / "src"
    with pytest.raises(DataError, match="holds this cache but it is damaged"):
        prep.prepare(src, good, workers=0, verify=True, progress=False)
    prep.prepare(src, good, workers=0, overwrite=True, verify=True, progress=False)
    CacheReader(good).verify(progress=False)


def test_existing_cache_of_older_version_is_prepared_again(caches, tmp_path):
    """A cache of the same data written by an older sun_seg is replaced by `prepare` (only once the new one is done)."""
    good, _ = caches
    _edit_index(good, lambda i: i.update(version=CACHE_VERSION - 1), rechecksum=True)
    prep.prepare(tmp_path / "src", good, workers=0, progress=False)
    assert CacheReader(good).index["version"] == CACHE_VERSION


# ---------------------------------------------------------------- the class-weights cache
def test_class_weights_cache_is_data_and_never_trusted_when_changed(tmp_path, frames, monkeypatch):
    """The cached class statistics are JSON with a checksum: an edited, cut, foreign or pickled record is recomputed
    (never used, never executed); a cache folder that cannot be written costs a warning, not the weights."""
    monkeypatch.setenv("SUN_SEG_HOME", str(tmp_path / "home"))
    fit = SunRGBD(write_preprocessed_release(tmp_path / "src", *frames), "fit")
    weights = analysis.class_weights(fit, progress=False)
    path = analysis.weights_cache_path(fit)
    record = json.loads(path.read_text())
    for damage in (lambda: path.write_text(json.dumps({**record, "classes": {**record["classes"],
                                                                            "pixels": [10**9] * 37}})),
                   lambda: _truncate(path), lambda: path.write_text("[1, 2, 3]"),
                   lambda: path.write_bytes(pickle.dumps(_Payload(tmp_path / "EXECUTED")))):
        damage()
        assert analysis.class_weights(fit, progress=False).tolist() == weights.tolist()
        assert json.loads(path.read_text())["checksum"] == record["checksum"]  # rewritten, intact
    assert not (tmp_path / "EXECUTED").exists()
    (tmp_path / "home-file").write_text("")
    monkeypatch.setenv("SUN_SEG_HOME", str(tmp_path / "home-file"))  # a file where the cache folder would be
    with pytest.warns(UserWarning, match="class weights are not cached: .*home-file/class_weights: cannot be written: "
                                         "a part of the path is a file"):
        assert analysis.class_weights(fit, progress=False).tolist() == weights.tolist()
