"""The demo dataset: deterministic, read back as demo data, shaped like SUN RGB-D, two domains, learnable."""
import hashlib
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sun_seg.core import CLASS_NAMES, DEMO_NOTICE, IGNORE_INDEX, NUM_CLASSES, DataError, ParameterError, sun_seg_home
from sun_seg.data.demo import (DEFAULT_N_TEST, DEFAULT_N_TRAIN, SUBSET_COUNTS, demo_folder_name, demo_marker,
                               demo_parameters, demo_root, make_demo_dataset)
from sun_seg.data.formats import SENSOR_SIZES
from sun_seg.data.prepare import image_statistics
from sun_seg.data.sunrgbd import SunRGBD


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode()); h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def default_root() -> Path:
    """The default demo dataset, as the demo study uses it (generated once into the test session's SUN_SEG_HOME)."""
    return demo_root(progress=False)


@pytest.fixture(scope="module")
def train_stats(default_root):
    return image_statistics(SunRGBD(default_root, "train"), progress=False)


def test_deterministic_byte_for_byte(tmp_path):
    a = make_demo_dataset(tmp_path / "a", n_train=12, n_test=4, seed=3, progress=False)
    b = make_demo_dataset(tmp_path / "b", n_train=12, n_test=4, seed=3, progress=False)
    c = make_demo_dataset(tmp_path / "c", n_train=12, n_test=4, seed=4, progress=False)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)
    # a set is the same whatever else is generated with it: the test split does not depend on n_train
    d = make_demo_dataset(tmp_path / "d", n_train=6, n_test=4, seed=3, progress=False)
    test_a, test_d = SunRGBD(a, "test"), SunRGBD(d, "test")
    for i in range(4):
        assert torch.equal(test_a[i]["image"], test_d[i]["image"])
        assert torch.equal(test_a[i]["target"], test_d[i]["target"])


def test_reads_back_as_demo_data(default_root):
    assert default_root.parent == sun_seg_home() / "demo"
    assert default_root.name == demo_folder_name(demo_parameters())
    fit = SunRGBD(default_root, "fit")
    assert fit.kind == "demo" and fit.info["kind"] == "demo" and fit.form == "preprocessed"
    assert fit.split_sizes == {"train": DEFAULT_N_TRAIN, "test": DEFAULT_N_TEST, "val": 24, "fit": 216}
    marker = demo_marker(default_root)
    assert marker["notice"] == DEMO_NOTICE and marker["parameters"] == demo_parameters()
    assert marker["counts"] == {"train": DEFAULT_N_TRAIN, "test": DEFAULT_N_TEST}
    sample = fit[0]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape[0] == 3
    assert sample["target"].dtype == torch.int64
    values = set(sample["target"].unique().tolist())
    assert values <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}
    # each sensor's images have its (scaled) real size, and the sensor mix is the official one
    test = SunRGBD(default_root, "test")
    for i in range(len(test)):
        meta = test[i]["meta"]
        h, w = SENSOR_SIZES[meta["sensor"]]
        assert meta["orig_size"] == (round(h / 4), round(w / 4))
    kv2_share = sum(r.sensor == "kv2" for r in SunRGBD(default_root, "train").records) / DEFAULT_N_TRAIN
    official = sum(v[1] for k, v in SUBSET_COUNTS.items() if k[0] == "kv2") / 5285
    assert abs(kv2_share - official) < 0.01
    assert demo_root(progress=False) == default_root  # a second call is a cheap no-op


def test_statistics_like_sunrgbd(train_stats):
    void = train_stats.void_share
    assert void.quantile(0.1) < 0.1 and void.quantile(0.9) > 0.3  # a widely varying share of void per image
    assert void.max() > 0.5 and void.min() < 0.05
    px = train_stats[[f"px_{c}" for c in CLASS_NAMES]].sum()
    share = px / px.sum()
    assert list(share.sort_values(ascending=False).index[:2]) == ["px_wall", "px_floor"]
    assert share["px_wall"] > 0.3 and share["px_floor"] > 0.1
    assert (share > 0).all()  # every class occurs
    assert (share < 0.005).sum() >= 8  # many rare classes
    assert share.max() / share[share > 0].min() > 200  # strong imbalance
    present = (train_stats[px.index] > 0).mean()
    assert present["px_wall"] > 0.9 and (present < 0.1).sum() >= 5


def test_source_domain_differs(tmp_path):
    roots = {d: make_demo_dataset(tmp_path / d, n_train=30, n_test=2, domain=d, progress=False)
             for d in ("target", "source")}
    assert demo_marker(roots["source"])["domain"] == "source"
    stats = {d: image_statistics(SunRGBD(r, "train"), progress=False) for d, r in roots.items()}
    share = {d: s[[f"px_{c}" for c in CLASS_NAMES]].sum() / s[[f"px_{c}" for c in CLASS_NAMES]].sum().sum()
             for d, s in stats.items()}
    assert share["source"]["px_ceiling"] > 2 * share["target"]["px_ceiling"]  # higher, flatter camera
    assert stats["source"].void_share.mean() < stats["target"].void_share.mean()  # cleaner annotation
    saturation = {}
    for d, r in roots.items():
        rgb = [SunRGBD(r, "train")[i]["image"].float().flatten(1) for i in range(20)]
        saturation[d] = float(np.mean([((x.max(0).values - x.min(0).values) / x.max(0).values.clamp(min=1)).mean() for x in rgb]))
    assert saturation["source"] > saturation["target"] * 1.1


def test_refuses_foreign_and_conflicting_folders(tmp_path):
    (tmp_path / "mine").mkdir(); (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(DataError, match="holds no demo dataset"):
        make_demo_dataset(tmp_path / "mine", n_train=4, n_test=2, progress=False)
    make_demo_dataset(tmp_path / "d", n_train=4, n_test=2, progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        make_demo_dataset(tmp_path / "d", n_train=5, n_test=2, progress=False)
    with pytest.raises(ParameterError, match="parameter `scale`"):
        make_demo_dataset(tmp_path / "e", scale=0, progress=False)


def test_colour_alone_does_not_give_the_class(default_root):
    """One pixel's colour is informative (each class has a colour tendency, as real walls and floors do) but far from
    giving the class: the Bayes-optimal colour classifier stays well below what texture, shape and context allow."""
    from sun_seg.metrics import confusion_matrix, miou, pixel_accuracy
    levels = 16
    def pixels(split):  # numpy: single-threaded, fast on a busy machine
        reader = SunRGBD(default_root, split)
        for i in range(len(reader)):
            q = reader.reader.read_image(reader.records[i]).astype(np.int64) * levels // 256
            yield (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2], reader.raw_label(i).astype(np.int64) - 1
    index = np.concatenate([(code * NUM_CLASSES + target)[target >= 0] for code, target in pixels("fit")])
    lut = np.bincount(index, minlength=levels ** 3 * NUM_CLASSES).reshape(levels ** 3, NUM_CLASSES).argmax(1)
    codes, targets = zip(*pixels("test"))
    target = torch.from_numpy(np.concatenate([t.ravel() for t in targets]))
    target[target < 0] = IGNORE_INDEX
    cm_colour = confusion_matrix(torch.from_numpy(lut[np.concatenate([c.ravel() for c in codes])]), target)
    cm_wall = confusion_matrix(torch.zeros_like(target), target)
    # measured with generator v3 (class_tint 0.4): colour-only pixel accuracy 0.57 and mIoU 0.11, 'wall' 0.36
    assert pixel_accuracy(cm_wall) + 0.05 < pixel_accuracy(cm_colour) < 0.7
    assert miou(cm_colour) < 0.2


def train_briefly(root, steps, size=(64, 80), batch_size=8, lr=1e-3, seed=0):
    """A real UNet, bare loop (Adam, cross-entropy ignoring void, bf16 autocast); test mIoU and pixel accuracy."""
    from sun_seg.core import normalize_images
    from sun_seg.train.device import seed_everything
    from sun_seg.data.sunrgbd import collate
    from sun_seg.data.transforms import eval_transform, train_transform
    from sun_seg.metrics import confusion_matrix, miou, pixel_accuracy
    from sun_seg.models.unet import UNet
    seed_everything(seed)
    loader = torch.utils.data.DataLoader(SunRGBD(root, "fit", transform=train_transform(size)), batch_size=batch_size,
                                         shuffle=True, drop_last=True, collate_fn=collate)
    model = UNet().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step, t0 = 0, time.time()
    while step < steps:
        for batch in loader:
            x = normalize_images(batch["image"]).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["target"], ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            step += 1
            if step == steps: break
    seconds, cm, cm_wall = time.time() - t0, 0, 0
    model.eval()
    test = SunRGBD(root, "test", transform=eval_transform(size))
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(test, batch_size=16, collate_fn=collate):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(normalize_images(batch["image"]))
            cm = cm + confusion_matrix(logits.argmax(1), batch["target"])
            cm_wall = cm_wall + confusion_matrix(torch.zeros_like(batch["target"]), batch["target"])
    return {"steps": steps, "seconds": round(seconds, 1), "images_per_second": round(steps * batch_size / seconds, 1),
            "miou": miou(cm), "pixel_accuracy": pixel_accuracy(cm),
            "majority_miou": miou(cm_wall), "majority_pixel_accuracy": pixel_accuracy(cm_wall)}


@pytest.mark.slow
def test_learnability(default_root):
    """A real UNet trained a couple of CPU minutes scores far above the majority-class baseline, and more training helps."""
    short = train_briefly(default_root, steps=60)
    long = train_briefly(default_root, steps=200)
    print("\nlearnability:", short, "\n             ", long)
    assert long["miou"] > 3 * long["majority_miou"]
    assert long["pixel_accuracy"] > long["majority_pixel_accuracy"] + 0.1
    assert long["miou"] > short["miou"]


@pytest.mark.slow
def test_workers_give_the_same_files(tmp_path):
    a = make_demo_dataset(tmp_path / "a", n_train=10, n_test=4, workers=1, progress=False)
    b = make_demo_dataset(tmp_path / "b", n_train=10, n_test=4, workers=2, progress=False)
    assert tree_digest(a) == tree_digest(b)
