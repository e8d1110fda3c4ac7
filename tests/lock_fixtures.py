"""Processes that hold a lock, as another invocation or another host would (shared by the concurrency tests; not a test module)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

from sun_seg.core import _record

_HOLDER = """
import sys, time
from sun_seg.core import Lease
lease = Lease(sys.argv[1], "a test lock")
if not lease.acquire(): sys.exit(3)
print("held", flush=True)
time.sleep(600)
"""


def alone_env(**extra) -> dict:
    """This environment without the lease tokens a parent holds (a process that is not a child of a holder)."""
    env = {k: v for k, v in os.environ.items() if k != "SUN_SEG_LOCK_TOKENS"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def hold_in_another_process(path, no_flock: bool = False, **env) -> subprocess.Popen:
    """Start a process that takes the lease `path` and keeps it (until killed); returns once it holds it."""
    code = _HOLDER if not no_flock else NO_FLOCK + _HOLDER
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                            env=alone_env(**env), start_new_session=True)
    line = proc.stdout.readline()
    assert line.strip() == "held", f"the holder did not take {path} (exit {proc.poll()})"
    return proc


def stop(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.wait(30)


# a file system without flock (Lustre without -o flock): fcntl.flock fails with ENOSYS
NO_FLOCK = """
import errno, fcntl
def _no_flock(*a, **k): raise OSError(errno.ENOSYS, "Function not implemented")
fcntl.flock = _no_flock
"""


def held_locks(out) -> list[Path]:
    """The run locks of a study's output folder that name a holder (none once every invocation has ended)."""
    return [p for p in Path(out, "runs").glob("*/.lock") if _record(p.read_bytes()) is not None]
