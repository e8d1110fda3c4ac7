"""Small generated data and tiny training parameters shared by the training tests (not a test module)."""
from pathlib import Path

import numpy as np

from sun_seg.data.formats import SENSORS, example_frame_path, write_preprocessed_release
from sun_seg.train import Callback


def _frames(n: int, start: int, size=(32, 40), seed=0):
    """Frames whose labels can be learnt: flat colour blocks per class, with noise and some void."""
    rng = np.random.default_rng(seed + start)
    colours = np.random.default_rng(seed).integers(0, 256, (38, 3))
    for i in range(start, start + n):
        label = np.full(size, 1, np.uint8)  # background: "wall"
        for _ in range(3):
            c = rng.integers(2, 8)
            y0, x0 = rng.integers(0, size[0] - 6), rng.integers(0, size[1] - 6)
            label[y0:y0 + rng.integers(6, 20), x0:x0 + rng.integers(6, 24)] = c
        label[:2] = 0  # a void strip, as SUN RGB-D's unlabeled borders
        image = np.clip(colours[label] + rng.normal(0, 12, (*size, 3)), 0, 255).astype(np.uint8)
        yield image, label, example_frame_path(SENSORS[i % 4], i)


def write_tiny_release(root: Path, n_train: int = 30, n_test: int = 6, size=(32, 40), seed=0) -> Path:
    """A SUN RGB-D copy in the preprocessed release's form: `n_train` train (10% of them val) and `n_test` test frames."""
    if not (root / "sunrgbd_training_images.txt").is_file():
        write_preprocessed_release(root, list(_frames(n_train, 100, size, seed)), list(_frames(n_test, 0, size, seed)))
    return root


def tiny_params(data_dir, out_dir, **overrides) -> dict:
    """Training parameters for runs of a few seconds on a CPU: a 4-channel-wide U-Net on 32x32 crops."""
    params = dict(data_dir=str(data_dir), out_dir=str(out_dir), unet_width=4, image_size="32x32", batch_size=4,
                  epochs=3, patience=0, max_train_batches=3, num_workers=0, device="cpu", profile="full", lr=0.01)
    params.update(overrides)
    return params


def param_pairs(params: dict) -> list[str]:
    """`-p name value` command-line pairs (papermill's and `sun-seg train`'s form) of a parameter dict."""
    return [x for k, v in params.items() for x in ("-p", k, str(v))]


def weights_of(path) -> dict:
    """The tensors of a safetensors checkpoint."""
    from safetensors.torch import load_file
    return load_file(str(path))


class InterruptAt(Callback):
    """Raise KeyboardInterrupt (as Ctrl-C would) after a given optimizer step of a given epoch."""
    def __init__(self, epoch, step): self.epoch, self.step = epoch, step
    def after_step(self, trainer, epoch, step):
        if (epoch, step) == (self.epoch, self.step): raise KeyboardInterrupt
