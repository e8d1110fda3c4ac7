"""Shared pytest set-up: offline, quiet, isolated caches, and helpers to find the repo and ../shared."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Tests never reach the network and never write into the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# One cache folder for the whole test session (demo data is generated once), outside the user's home.
os.environ.setdefault("SUN_SEG_HOME", str(ROOT / ".pytest_cache" / "sun_seg_home"))


def pytest_configure(config):
    # With pytest-xdist each worker gets one core, so workers do not fight over the two cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_samples() -> Path:
    """`../shared/samples/sunrgbd` (real SUN RGB-D metadata); skips when it is absent (a user's clone)."""
    path = SHARED / "samples" / "sunrgbd"
    if not path.is_dir():
        pytest.skip("../shared/samples/sunrgbd is not beside this checkout")
    return path
