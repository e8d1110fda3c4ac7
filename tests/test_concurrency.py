"""One writer per output, with real concurrent processes and real signals: `sun-seg prepare` and `sun-seg report`
on one folder, the run locks (races on a stale lock, two simulated hosts, a file system without flock), a study that
finds runs held by another process, and killed commands leaving no worker processes and no build folders behind.

Helper processes are plain `python -c` scripts running the real library; where a window must be wide enough to be
hit every time, a script slows one step down (as a slow disk would) instead of relying on luck.
"""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import sun_seg.study as study_module
from sun_seg.cli import main
from sun_seg.core import Lease, LockHeld, _record, hold
from sun_seg.data.formats import write_preprocessed_release
from sun_seg.data.prepare import prepare
from sun_seg.data.sunrgbd import CacheReader, SunRGBD
from sun_seg.report import build_site
from sun_seg.study import RunLock, load_study, run_state, run_study
from sun_seg.testing import SimulatedTrainer, simulate_study

from data_fixtures import make_frames
from lock_fixtures import NO_FLOCK, alone_env, hold_in_another_process, stop

SLOW_PREPARE = """
import sys, time
import sun_seg.data.prepare
prep = sys.modules["sun_seg.data.prepare"]  # the package exports the function under the module's name
real = prep.prepare_sample
def slow(*a, **k):
    time.sleep(float(sys.argv[1]))  # a slow disk: the window in which a second writer could interleave
    return real(*a, **k)
prep.prepare_sample = slow
wait_for = sys.argv[2]
if wait_for != "-":  # start only once the other process is writing
    from pathlib import Path
    while not (Path(wait_for).is_file() and Path(wait_for).stat().st_size): time.sleep(0.02)
from sun_seg.cli import main
sys.exit(main(["prepare", *sys.argv[3:]]))
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "src"
    return write_preprocessed_release(root, make_frames(40, 0, size=(24, 32)), make_frames(8, 40, size=(24, 32)))


def slow_prepare(delay, wait_for, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(delay), str(wait_for), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=alone_env(),
                            start_new_session=True)


def same_samples(source, cache):
    for split in ("train", "test"):
        a, b = SunRGBD(source, split), SunRGBD(cache, split)
        assert a.ids == b.ids
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"]), (split, i)


# ================================================================ prepare: one writer per cache
@pytest.mark.slow
def test_second_prepare_waits_then_finds_the_cache(source, tmp_path):
    """Two `sun-seg prepare` processes on one folder, the second started while the first is writing (its journal has
    samples): the second waits, saying for whom, and then finds the finished cache; both exit 0 and the cache is
    sample for sample the source (today's code: the second resumes from the first's journal and both append)."""
    out = tmp_path / "cache"
    first = slow_prepare(0.1, "-", source, out, "--workers", "0")
    second = slow_prepare(0.0, tmp_path / ".cache.partial" / "journal.jsonl", source, out, "--workers", "0")
    (o1, e1), (o2, e2) = first.communicate(timeout=600), second.communicate(timeout=600)
    assert first.returncode == 0, e1[-2000:]
    assert second.returncode == 0, e2[-2000:]
    assert f"waiting for the cache {out}: held by process {first.pid} on " in o2
    assert f"{out} already holds this cache: nothing to do" in o2
    CacheReader(out).verify(progress=False)
    same_samples(source, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no lock, partial or old folder left


def _children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _gone(procs: list[psutil.Process], timeout: float = 20) -> list[psutil.Process]:
    """The processes of `procs` still alive after `timeout` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE: alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline: return alive
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_prepare_leaves_no_worker_processes(source, tmp_path, sig):
    """`sun-seg prepare --workers 2` killed (SIGKILL or SIGTERM) while its workers decode: every worker ends with it
    (today's code leaves them alive for good); the same command then finishes the cache."""
    out = tmp_path / "cache"
    proc = slow_prepare(0.2, "-", source, out, "--workers", "2")
    journal = tmp_path / ".cache.partial" / "journal.jsonl"
    deadline = time.monotonic() + 300
    while not (journal.is_file() and journal.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert proc.poll() is None and len(workers) >= 2, proc.communicate()[1][-2000:] if proc.poll() is not None else workers
    os.kill(proc.pid, sig)
    proc.communicate(timeout=60)
    try:
        assert not _gone(workers), "worker processes outlived the killed prepare"
    finally:
        for p in workers:
            try: p.kill()
            except psutil.NoSuchProcess: pass
    prepare(source, out, workers=0, progress=False)  # the next invocation continues and finishes
    CacheReader(out).verify(progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# ================================================================ run locks: races, hosts, no flock
def _slow_reads():
    """Every read of a file takes 20 ms longer (a slow shared file system): the window between looking at a lock and
    taking it, which a check-then-act lock leaves open, is then hit in most rounds instead of a few in a hundred."""
    import pathlib
    for name in ("read_text", "read_bytes"):
        real = getattr(pathlib.Path, name)
        def slow(self, *a, _real=real, **k):
            time.sleep(0.02)
            return _real(self, *a, **k)
        setattr(pathlib.Path, name, slow)
    real_pread = os.pread
    def pread(*a):
        time.sleep(0.02)
        return real_pread(*a)
    os.pread = pread


def _contend(path, barrier, results, no_flock):
    _slow_reads()
    if no_flock:
        exec(NO_FLOCK, {})
    import warnings
    warnings.simplefilter("ignore")
    os.environ.pop("SUN_SEG_LOCK_TOKENS", None)
    lock = RunLock(path)
    barrier.wait()
    got = lock.acquire()
    results.put(got)
    barrier.wait()  # every contender has tried while the winner still holds it
    if got: lock.release()


def _race(path: Path, contenders: int, no_flock: bool) -> list[bool]:
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(contenders), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(path, barrier, results, no_flock)) for _ in range(contenders)]
    for p in procs: p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs: p.join(60)
    return got


@pytest.mark.parametrize("no_flock", [False, True], ids=["flock", "no-flock"])
def test_a_stale_run_lock_is_taken_by_exactly_one_process(tmp_path, no_flock):
    """Six processes find the same stale lock (a dead holder on this host, in today's format and in the lease's)
    at the same moment, on a slow file system, 15 times: exactly one takes it each time (today's check-then-act
    lock: two or more in about a third of the rounds)."""
    path = tmp_path / "runs" / "r" / ".lock"
    path.parent.mkdir(parents=True)
    for round in range(15):
        stale = (f"{os.uname().nodename} 999999999 0\n" if round % 2 else
                 json.dumps({"host": os.uname().nodename, "pid": 999999999, "since": 0, "token": "dead"}))
        path.write_text(stale)
        got = _race(path, 6, no_flock)
        assert sum(got) == 1, f"round {round}: {sum(got)} processes took the lock"


HOLDER = """
import sys, time
from sun_seg.core import Lease
lease = Lease(sys.argv[1], "a run")
assert lease.acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("no_flock", [False, True], ids=["flock", "no-flock"])
def test_dead_holder_on_another_host_is_taken_over_after_the_lease_only(tmp_path, monkeypatch, no_flock):
    """Two simulated hosts ($SUN_SEG_HOSTNAME), a lease of 2 s: while host A's holder lives (its heartbeat refreshes
    the lease) host B never takes the lock, even after three leases; once A is killed, B takes it over after the
    lease ran out, not before. Without flock (fcntl.flock raising ENOSYS, as on Lustre without -o flock) the same,
    with a warning instead of a crash."""
    path = tmp_path / "runs" / "r" / ".lock"
    monkeypatch.setenv("SUN_SEG_LEASE_SECONDS", "2")
    holder = hold_in_another_process(path, no_flock=no_flock, SUN_SEG_HOSTNAME="host-a", SUN_SEG_LEASE_SECONDS=2)
    monkeypatch.setenv("SUN_SEG_HOSTNAME", "host-b")
    monkeypatch.delenv("SUN_SEG_LOCK_TOKENS", raising=False)
    if no_flock:
        import errno, fcntl
        def no_flock_here(*a, **k): raise OSError(errno.ENOSYS, "Function not implemented")
        monkeypatch.setattr(fcntl, "flock", no_flock_here)
    b = RunLock(path)
    try:
        if no_flock:
            with pytest.warns(RuntimeWarning, match="does not support file locks"):
                assert not b.acquire(wait=6)
        else:
            assert not b.acquire(wait=6)
        assert "host-a" in b.owner() and f"process {holder.pid} " in b.owner()
    finally:
        stop(holder)
    start = time.monotonic()
    assert b.acquire(wait=30)
    waited = time.monotonic() - start
    assert waited >= 0.9, f"taken over {waited:.2f} s after the holder died: the lease (2 s) was not respected"
    assert _record(path.read_bytes())["host"] == "host-b"
    b.release()


# ================================================================ the study: runs held by another process
def test_study_skips_runs_held_elsewhere_and_exits_0(tmp_path, monkeypatch, capsys):
    """A run of the grid is being trained by another process (it holds runs/<id>/.lock, the engine's lock): `sun-seg
    study` says `held by process ... on ...`, trains every other run, does not count the held one as failed and exits 0
    (today's: it trains the held run a second time, its lock being another file)."""
    from test_faults_study import use_trainer, write_study
    path = write_study(tmp_path)
    out = tmp_path / "out"
    runs = run_study(path, "demo", out, list_only=True, log=lambda s: None)["runs"]
    held = runs[1]
    trainer = SimulatedTrainer()
    use_trainer(monkeypatch, trainer)
    holder = hold_in_another_process(out / "runs" / held.run_id / ".lock")
    try:
        code = main(["study", "--study", str(path), "--profile", "demo", "--out", str(out), "--quiet", "--no-report"])
        text = capsys.readouterr().out
    finally:
        stop(holder)
    assert code == 0, text[-3000:]
    assert f"{held.entry} (seed 0, run {held.run_id}): held by process {holder.pid} on " in text
    assert "still running in other processes" in text and "1 held by other processes" in text
    assert held.entry not in {entry for entry, _, _ in trainer.calls} and trainer.calls
    for r in runs:
        assert run_state(out, r.run_id)[0] == ("absent" if r is held else "completed")


# ================================================================ report: one build at a time, leftovers removed
@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    from test_faults_study import write_study
    folder = tmp_path_factory.mktemp("study")
    out = folder / "out"
    simulate_study(out, load_study(write_study(folder)))
    return out


def test_report_waits_for_another_report_and_removes_killed_builds(study_out, tmp_path):
    """While another process builds the report of a folder (it holds out/.report.lock), `build_site` waits instead of
    building beside it; the build folders a killed report left (`.site-building-*`, `.site-old-*`) are removed."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(study_out, out)
    for name in (".site-building-999999", ".site-old-999999"):
        (out / name / "assets").mkdir(parents=True)
    holder = hold_in_another_process(out / ".report.lock")
    done = []
    thread = threading.Thread(target=lambda: done.append(build_site(out, api=False, notebooks=False)), daemon=True)
    try:
        thread.start()
        thread.join(5)
        assert not done and not (out / "site").exists(), "the report was built while another process held the lock"
    finally:
        stop(holder)
    thread.join(300)
    assert done and (done[0] / "index.html").is_file()
    assert not list(out.glob(".site-*")) and not (out / ".report.lock").exists()


@pytest.mark.slow
def test_two_sun_seg_reports_on_one_folder(study_out, tmp_path):
    """Two `sun-seg report` processes started together on one folder: both exit 0 and the site is complete
    (today's: one may crash with shutil.Error on the other's temporary files)."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(study_out, out)
    cmd = [str(Path(sys.executable).parent / "sun-seg"), "report", "--out", str(out), "--no-api", "--no-notebooks"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=alone_env()) for _ in range(2)]
    for p in procs:
        o, e = p.communicate(timeout=600)
        assert p.returncode == 0, e[-3000:]
    assert (out / "site" / "index.html").is_file() and not list(out.glob(".site-*"))
