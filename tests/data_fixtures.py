"""Random frames in the shape the release writers take, shared by the data tests (not a test module)."""
import numpy as np

from sun_seg.data.formats import SENSORS, example_frame_path


def make_frames(n, start=0, size=(12, 16)):
    """`n` frames (random image, random raw label 0..37, a real-looking frame path), sensors in turn; seeded by `start`."""
    rng = np.random.default_rng(start)
    return [(rng.integers(0, 256, (*size, 3), dtype=np.uint8), rng.integers(0, 38, size, dtype=np.uint8),
             example_frame_path(SENSORS[i % 4], i)) for i in range(start, start + n)]
