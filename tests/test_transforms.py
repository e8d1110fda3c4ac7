"""Joint image/mask augmentation: labels never interpolated, image and mask aligned, shapes, determinism."""
import pickle

import numpy as np
import pytest
import torch

from sun_seg.core import IGNORE_INDEX, NUM_CLASSES, PALETTE, ParameterError, colorize
from sun_seg.data.transforms import SegmentationTransform, eval_transform, parse_size, train_transform

TRANSFORMS = {
    "train": lambda: train_transform("48x64"),
    "train-strong-scale": lambda: train_transform((40, 40), scale_range=(0.25, 3.0), jitter=0.4),
    "train-upscale-only": lambda: train_transform(96, scale_range=(1.5, 2.0)),
    "woAugment": lambda: train_transform("48x64", augment=False),
    "eval-resize": lambda: eval_transform("33x47"),
    "eval-identity": lambda: eval_transform(),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: a second thread only adds synchronisation (badly so on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pattern(h=60, w=90, block=10, seed=0):
    """A sample whose image colour is its label's palette colour (void black), in random blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, NUM_CLASSES + 1, ((h + block - 1) // block, (w + block - 1) // block), generator=g)
    target = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]
    target[target == NUM_CLASSES] = IGNORE_INDEX
    image = torch.from_numpy(colorize(target.numpy())).permute(2, 0, 1).contiguous()
    return image, target


def decode(image):
    palette = torch.from_numpy(PALETTE).float()
    return ((image.permute(1, 2, 0).float()[..., None, :] - palette) ** 2).sum(-1).argmin(-1)


def interior(y):
    """Labelled pixels whose 3x3 neighbourhood has the same label (away from blurred block edges)."""
    pad = torch.nn.functional.pad(y[None, None].float(), (1, 1, 1, 1), mode="replicate")
    window = torch.nn.functional.unfold(pad, 3).view(9, *y.shape)
    return (window == y).all(0) & (y != IGNORE_INDEX)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_masks_only_hold_input_values_and_ignore(name):
    torch.manual_seed(0)
    t = TRANSFORMS[name]()
    for seed in range(15):
        image, target = pattern(h=50 + seed, w=70 + 2 * seed, seed=seed)
        for dtype in (torch.int64, torch.uint8):
            x, y = t(image, target.to(dtype))
            allowed = set(target.unique().tolist()) | {IGNORE_INDEX}
            assert set(y.unique().tolist()) <= allowed
            assert x.dtype == torch.uint8 and y.dtype == dtype and x.shape[1:] == y.shape  # the target keeps its dtype


@pytest.mark.parametrize("name", ["train", "train-upscale-only", "woAugment", "eval-resize"])
def test_image_and_mask_stay_aligned(name):
    torch.manual_seed(1)
    t = TRANSFORMS[name]()
    if name.startswith("train") and t._colour is not None:  # colours must stay decodable: no jitter here
        t = SegmentationTransform(t.size, augment=True, scale_range=t.scale_range, jitter=0.0)
    agreements = []
    for seed in range(12):
        image, target = pattern(seed=seed)
        x, y = t(image, target)
        keep = interior(y)
        if keep.sum() < 20: continue
        agreements.append((decode(x)[keep] == y[keep]).float().mean().item())
        misaligned = (decode(x.flip(-1))[keep] == y[keep]).float().mean().item()
        assert misaligned < 0.5  # the check would see a flipped image
    assert len(agreements) >= 8 and min(agreements) > 0.95 and np.mean(agreements) > 0.99


def test_shapes_and_padding():
    image, target = pattern(h=30, w=40)
    x, y = train_transform("64x80", scale_range=(0.5, 0.5), hflip=False, jitter=0.0)(image, target)
    assert x.shape == (3, 64, 80) and y.shape == (64, 80)
    # scaled to half of "just covering" the crop (30x40 -> 32x43): the rest is padding, image 0 and target ignored
    pad = (y == IGNORE_INDEX) & (x == 0).all(0)
    assert pad.float().mean() >= 1 - 32 * 43 / (64 * 80) - 1e-3
    for size, expected in [(32, (32, 32)), ((24, 40), (24, 40)), ("20x30", (20, 30))]:
        assert train_transform(size)(image, target)[0].shape[1:] == expected
        assert eval_transform(size)(image, target)[1].shape == expected
    x, y = eval_transform()(image, target)
    assert torch.equal(x, image) and torch.equal(y, target)


def test_deterministic_under_a_seed():
    image, target = pattern()
    t = train_transform("48x64")
    def draws(seed):
        torch.manual_seed(seed)
        return [t(image, target) for _ in range(6)]
    a, b, c = draws(3), draws(3), draws(4)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    # without augmentation the RNG does not matter; it is exactly the eval resize
    torch.manual_seed(0); w1 = train_transform("48x64", augment=False)(image, target)
    torch.manual_seed(9); w2 = train_transform("48x64", augment=False)(image, target)
    e = eval_transform("48x64")(image, target)
    assert torch.equal(w1[0], w2[0]) and torch.equal(w1[1], e[1]) and torch.equal(w1[0], e[0])
    # the transform travels to DataLoader workers
    torch.manual_seed(5); p1 = t(image, target)
    torch.manual_seed(5); p2 = pickle.loads(pickle.dumps(t))(image, target)
    assert torch.equal(p1[0], p2[0]) and torch.equal(p1[1], p2[1])


def test_jitter_touches_the_image_only_and_flip_both():
    image, target = pattern()
    t = SegmentationTransform((60, 90), augment=True, scale_range=(1.0, 1.0), hflip=False, jitter=0.5)
    torch.manual_seed(0)
    x, y = t(image, target)
    assert torch.equal(y, target) and not torch.equal(x, image)
    flip = SegmentationTransform((60, 90), augment=True, scale_range=(1.0, 1.0), hflip=True, jitter=0.0)
    outcomes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x, y = flip(image, target)
        if torch.equal(y, target):
            assert torch.equal(x, image); outcomes.add("kept")
        else:
            assert torch.equal(y, target.flip(-1)) and torch.equal(x, image.flip(-1)); outcomes.add("flipped")
    assert outcomes == {"kept", "flipped"}


def test_parse_size_and_bad_parameters():
    assert parse_size("480x640") == (480, 640) and parse_size(64) == (64, 64) and parse_size([3, 4]) == (3, 4)
    assert parse_size(np.int64(8)) == (8, 8)
    for bad in ["64*80", "x64", (1, 2, 3), 1.5, True, (0, 4), "-3x4", None]:
        with pytest.raises(ParameterError, match="parameter `image_size`"):
            parse_size(bad, "image_size")
    image, target = pattern()
    with pytest.raises(ParameterError, match="parameter `size`"):
        train_transform(None)
    with pytest.raises(ParameterError, match="parameter `scale_range`"):
        train_transform(32, scale_range=(0.0, 1.0))
    with pytest.raises(ParameterError, match="parameter `jitter`"):
        train_transform(32, jitter=1.5)
    with pytest.raises(ParameterError, match="parameter `image`"):
        eval_transform()(image.permute(1, 2, 0), target)
    with pytest.raises(ParameterError, match="parameter `target`"):
        eval_transform()(image, target[:, :5])
    with pytest.raises(ParameterError, match="parameter `target`"):
        eval_transform()(image, target + 300)
