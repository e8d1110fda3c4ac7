"""Resource faults of training, on real small file systems where this machine allows it: a full disk while a checkpoint
is written (a 1 MiB tmpfs), the file size limit (`ulimit -f`, RLIMIT_FSIZE), an `out_dir` that cannot be created and
a read-only file system. Each gives a sun_seg error naming the path or parameter and what to do; a failure the
process survives never leaves the run's status at `running` nor a `.pending` checkpoint behind; a folder that cannot
be written is refused before the data and the model are set up.

The tmpfs tests mount a file system, which needs root (or CAP_SYS_ADMIN): elsewhere they skip cleanly.
"""
import contextlib
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from sun_seg.core import DataError, ParameterError, read_json
from sun_seg.train import fit
from sun_seg.train.engine import Trainer

from train_fixtures import tiny_params, write_tiny_release


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("tiny") / "sunrgbd")


@contextlib.contextmanager
def small_fs(path: Path, size: str = "1m", read_only: bool = False):
    """A real tmpfs of `size` mounted at `path` (skips the test where mounting is not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None: pytest.skip("no mount command")
    options = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode: pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.rglob("*") if p.name.endswith((".pending", ".tmp")))


def only_run(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def assert_failed_cleanly(run_dir: Path, words: str):
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "failed" and words in metrics["reason"], metrics
    assert not leftovers(run_dir), leftovers(run_dir)


@pytest.mark.slow
def test_full_disk_while_a_checkpoint_is_written(data, tmp_path):
    """The run folder on a 1 MiB file system: the records fit, the first epoch's checkpoint does not. The error names
    the file and says to free space; the status is `failed` (not `running`) and no `.pending` weights are left."""
    with small_fs(tmp_path / "small") as small:
        with pytest.raises(DataError) as e:
            fit(tiny_params(data, small / "runs", epochs=1), progress=False)
        message = str(e.value)
        assert "the disk is full" in message and "Free some space" in message and str(small / "runs") in message, message
        assert "same command resumes it" in message
        assert_failed_cleanly(only_run(small / "runs"), "the disk is full")


def test_file_size_limit_while_a_checkpoint_is_written(data, tmp_path):
    """`ulimit -f` of 200 kB (RLIMIT_FSIZE, EFBIG): the checkpoint cannot be written; named, status `failed`, nothing
    pending left. Works for any user."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises(DataError) as e:
            fit(tiny_params(data, tmp_path / "runs", epochs=1), progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "file size limit" in str(e.value) and str(tmp_path / "runs") in str(e.value), str(e.value)
    assert_failed_cleanly(only_run(tmp_path / "runs"), "file size limit")


def _no_setup(monkeypatch):
    def setup(self): raise AssertionError("the data were set up although out_dir cannot be written")
    monkeypatch.setattr(Trainer, "_setup_data", setup)


@pytest.mark.parametrize("where", ["/proc/sun-seg-cannot/runs", "a-file/runs"])
def test_out_dir_that_cannot_be_created_is_refused_before_setup(data, tmp_path, monkeypatch, where):
    """An `out_dir` under /proc (no folder can be made there, whatever the user) or through a file: ParameterError
    naming `out_dir`, raised before the data and the model are set up, nothing written (today's: a raw
    FileNotFoundError once the data and the model are set up)."""
    (tmp_path / "a-file").write_text("mine")
    out = where if where.startswith("/") else str(tmp_path / where)
    _no_setup(monkeypatch)
    with pytest.raises(ParameterError) as e:
        fit(tiny_params(data, out), progress=False)
    assert e.value.name == "out_dir" and str(Path(out).parent) in str(e.value), str(e.value)
    assert "choose an out_dir you can write to" in str(e.value) or "give a folder" in str(e.value), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_read_only_file_system_is_refused_before_setup(data, tmp_path, monkeypatch):
    """`out_dir` on a read-only file system (a read-only tmpfs; root is not stopped by permissions, only by this)."""
    _no_setup(monkeypatch)
    with small_fs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(ParameterError) as e:
            fit(tiny_params(data, ro / "runs"), progress=False)
        assert e.value.name == "out_dir" and "read-only file system" in str(e.value), str(e.value)
