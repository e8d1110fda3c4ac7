"""Data identified by content, and bad data found before training.

- The data fingerprint, the prepared cache's validity and the run id follow the CONTENT of the source files: a label
  edited in place with the same byte size (even with its modification time put back) gives another fingerprint,
  another run id and a cache prepared again - never "nothing to do" over stale labels. File hashes are cached by
  path, size, times and inode under $SUN_SEG_HOME, so a re-check reads no unchanged file.
- Demo data that still holds the content its generator recorded keeps the fingerprint (and run ids) it had.
- `prepare` resumes per sample by content: fixing one bad file (which changes its size and the fingerprint) redoes
  that sample only, and so does a finished sample whose files changed.
- Before the first epoch a run checks every sample it may read (fit, val, and test when the test is planned),
  whatever the caps (`max_train_batches`), and refuses with the sample's file named.
"""
import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sun_seg.core import DataError, stable_hash
from sun_seg.data.formats import LABELS_DIR, write_preprocessed_release
from sun_seg.data.sunrgbd import CacheReader, open_reader

from data_fixtures import make_frames

prep = importlib.import_module("sun_seg.data.prepare")
sunrgbd = importlib.import_module("sun_seg.data.sunrgbd")
data_files = importlib.import_module("sun_seg.data.files")  # the content hashes (split out of sunrgbd)


def _label(root, i): return root / LABELS_DIR / f"img-{i:06d}.png"


def _record_of(root, i):
    return next(r for r in open_reader(root).records if Path(r.loc) == _label(root, i))


def _save_raw_png(path: Path, label: np.ndarray):
    """A label PNG stored uncompressed: its byte size depends on its shape only, never on its values."""
    Image.fromarray(label).save(path, compress_level=0)


def _edit_in_place_same_size(path: Path, label: np.ndarray) -> np.ndarray:
    """Change some label values, keep the byte size and put the modification time back (a sneaky in-place edit)."""
    st = path.stat()
    edited = label.copy()
    edited[:4] = (edited[:4] % 37) + 1  # other classes in the top rows
    _save_raw_png(path, edited)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    return edited


@pytest.fixture
def release(tmp_path):
    root = write_preprocessed_release(tmp_path / "src", make_frames(12, 0), make_frames(4, 100))
    label = np.array(Image.open(_label(root, 7)))  # train image 3's (the 4 test labels come first)
    _save_raw_png(_label(root, 7), label)
    return root, label


def test_label_edited_in_place_with_the_same_size_changes_fingerprint_cache_and_run_id(release, tmp_path, capsys):
    from sun_seg.train.engine import plan_run
    from train_fixtures import tiny_params
    root, label = release
    before = open_reader(root).fingerprint()
    run_before = plan_run(tiny_params(root, tmp_path / "runs"), quiet=True).run_id
    cache = prep.prepare(root, tmp_path / "cache", workers=0, progress=False)
    edited = _edit_in_place_same_size(_label(root, 7), label)
    assert open_reader(root).fingerprint() != before
    assert plan_run(tiny_params(root, tmp_path / "runs"), quiet=True).run_id != run_before
    prep.prepare(root, cache, workers=0, progress=True)  # the same command: the cache is stale, prepared again
    out = capsys.readouterr().out
    assert "nothing to do" not in out and "changed since this cache was prepared" in out, out
    reader = CacheReader(cache)
    rec = next(r for r in reader.records if r.id == _record_of(root, 7).id)
    assert (reader.read_label(rec) == edited).all()
    assert reader.index["source"]["fingerprint"] == open_reader(root).fingerprint()


def test_hashes_are_cached_so_a_recheck_reads_no_unchanged_file(release, monkeypatch):
    root, _ = release
    monkeypatch.setattr(data_files, "_RACY_NS", 0)  # the files were written just now; a real re-check comes later
    first = open_reader(root).fingerprint()
    read = []
    real = data_files._sha256_file
    monkeypatch.setattr(data_files, "_sha256_file", lambda p, *a: (read.append(p), real(p, *a))[1])
    assert open_reader(root).fingerprint() == first and read == []
    _edit_in_place_same_size(_label(root, 7), np.array(Image.open(_label(root, 7))))
    assert open_reader(root).fingerprint() != first and [Path(p).name for p in read] == ["img-000007.png"]


def _names_and_sizes_fingerprint(reader) -> str:
    """The fingerprint as it was computed before content was hashed (names, sizes and the lists' content)."""
    files = [Path(r.image_path) for r in reader.records] + [Path(r.loc) for r in reader.records]
    return stable_hash({"form": reader.form, "n_test": reader.n_test,
                        "files": [[str(p.relative_to(reader.root)), p.stat().st_size] for p in files],
                        "lists": {k: data_files._sha256_file(reader.files[k]) if reader.files[k] else None
                                  for k in ("train_list", "test_list")}}, 64)


def test_unchanged_demo_data_keeps_its_fingerprint_and_an_edit_changes_it(tmp_path):
    from sun_seg.data.demo import demo_marker, make_demo_dataset
    from sun_seg.data.formats import DEMO_MARKER
    root = make_demo_dataset(tmp_path / "demo", n_train=8, n_test=4, scale=0.1, progress=False)
    reader = open_reader(root)
    assert sunrgbd.CONTENT_MANIFEST in demo_marker(root)
    assert reader.fingerprint() == _names_and_sizes_fingerprint(reader)  # the demo's run ids are unchanged
    # a demo folder generated before markers recorded content gets its manifest on first use: the same value again
    marker = demo_marker(root)
    del marker[sunrgbd.CONTENT_MANIFEST]
    (root / DEMO_MARKER).write_text(json.dumps(marker))
    make_demo_dataset(root, n_train=8, n_test=4, scale=0.1, progress=False)
    assert open_reader(root).fingerprint() == reader.fingerprint()
    label = np.array(Image.open(reader.records[0].loc))
    label[0, 0] = (label[0, 0] % 37) + 1
    Image.fromarray(label).save(reader.records[0].loc)
    assert open_reader(root).fingerprint() != reader.fingerprint()


def test_fixing_one_bad_file_redoes_that_sample_only(release, tmp_path, monkeypatch):
    root, label = release
    good = np.array(Image.open(_label(root, 9)))
    Image.fromarray(np.full_like(good, 200)).save(_label(root, 9))  # label values out of range: a bad sample
    out = tmp_path / "cache"
    with pytest.raises(DataError, match="finished samples are kept"):
        prep.prepare(root, out, workers=0, progress=False)
    Image.fromarray(good).save(_label(root, 9))  # fixed: another size, another fingerprint
    edited = _edit_in_place_same_size(_label(root, 7), label)  # and a finished sample changed meanwhile
    calls = []
    real = prep.prepare_sample
    monkeypatch.setattr(prep, "prepare_sample", lambda *a: (calls.append(Path(a[1].loc).name), real(*a))[1])
    prep.prepare(root, out, workers=0, progress=False)
    assert sorted(calls) == ["img-000007.png", "img-000009.png"]  # the other 14 samples were kept
    clean = prep.prepare(root, tmp_path / "clean", workers=0, progress=False)
    a, b = CacheReader(out), CacheReader(clean)
    assert a.fingerprint() == b.fingerprint() and a.index["source"] == {**b.index["source"], "root": a.index["source"]["root"]}
    a.verify(progress=False)
    rec = next(r for r in a.records if r.id == _record_of(root, 7).id)
    assert (a.read_label(rec) == edited).all()


# ---------------------------------------------------------------- bad samples found before training
class _Steps:
    """Counts optimizer steps (a `Callback`): none may happen before a bad sample is refused."""
    def __init__(self): self.steps = 0
    def on_fit_start(self, trainer): pass
    def after_step(self, trainer, epoch, step): self.steps += 1
    def after_epoch(self, trainer, row): pass
    def on_fit_end(self, trainer, record): pass


@pytest.mark.parametrize("which, number", [("test", 1), ("train", 36)])  # labels: 6 test first, then 30 train
def test_bad_sample_is_found_before_the_first_epoch(tmp_path, which, number):
    """Under caps (one batch per epoch) a bad train label may never be read, and a bad test label is read only after
    the last epoch: both are refused before the first step, naming the file, with nothing written."""
    from sun_seg.train import fit
    from train_fixtures import tiny_params, write_tiny_release
    root = write_tiny_release(tmp_path / "data", n_train=30, n_test=6)
    label = _label(root, number)
    Image.fromarray(np.full((32, 40), 200, np.uint8)).save(label)  # values out of range
    steps = _Steps()
    with pytest.raises(DataError) as e:
        fit(tiny_params(root, tmp_path / "runs", test=True, max_train_batches=1, epochs=2), callbacks=[steps],
            progress=False)
    message = str(e.value)
    assert str(label) in message and "checked before training" in message and "--skip-bad" in message, message
    assert steps.steps == 0 and not list((tmp_path / "runs").glob("*/metrics.json"))


def test_the_sample_check_is_done_once_per_content(tmp_path, monkeypatch):
    from sun_seg.data.sunrgbd import SunRGBD, check_samples
    monkeypatch.setenv("SUN_SEG_HOME", str(tmp_path / "home"))  # the same content checked in an earlier session is remembered
    root = write_preprocessed_release(tmp_path / "src", make_frames(12, 0), make_frames(4, 100))
    scanned = []
    real = sunrgbd._scan_record
    monkeypatch.setattr(sunrgbd, "_scan_record", lambda reader, rec: (scanned.append(rec.id), real(reader, rec))[1])
    splits = lambda: [SunRGBD(root, "fit"), SunRGBD(root, "val"), SunRGBD(root, "test")]
    check_samples(splits(), progress=False)
    assert len(scanned) == 16
    check_samples(splits(), progress=False)
    assert len(scanned) == 16  # remembered by the content fingerprint
    Image.fromarray(np.full((12, 16), 99, np.uint8)).save(_label(root, 2))  # changed: checked again, and refused
    with pytest.raises(DataError, match=f"{_label(root, 2)}: label values \\[99\\] are out of range"):
        check_samples(splits(), progress=False)
    assert len(scanned) == 32
