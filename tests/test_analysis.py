"""Dataset analysis: class statistics and weights (formula, absent classes, cache), tables, figures, data-summary."""
import argparse
import json

import numpy as np
import pandas as pd
import pytest
import torch

from sun_seg.core import CLASS_NAMES, DEMO_NOTICE, NUM_CLASSES, DataError, ParameterError
from sun_seg.data import analysis
from sun_seg.data.analysis import (CLASS_WEIGHT_METHODS, REDNET_WEIGHTS, class_statistics, class_weights,
                                   plot_class_frequency, plot_void_share, sensor_counts, void_share_summary,
                                   weights_cache_path, weights_from_statistics)
from sun_seg.data.demo import make_demo_dataset
from sun_seg.data.prepare import STAT_COLUMNS, image_statistics
from sun_seg.data.sunrgbd import SunRGBD


def table(images, size=(2, 5), split="train", sensors=None):
    """A statistics table from one {class: pixels} dict per image."""
    h, w = size
    rows = []
    for i, counts in enumerate(images):
        row = {"id": f"img{i}", "split": split, "sensor": (sensors or ["kv1"] * len(images))[i], "height": h, "width": w}
        row.update({f"px_{c}": counts.get(c, 0) for c in CLASS_NAMES})
        row["void_pixels"] = h * w - sum(counts.values())
        row["void_share"] = row["void_pixels"] / (h * w)
        rows.append(row)
    return pd.DataFrame(rows, columns=STAT_COLUMNS)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("analysis") / "demo", n_train=24, n_test=8, progress=False)


def test_median_frequency_by_hand():
    # wall in 3 images: (6+5+7)/30 = 0.6; floor in 2: (4+2)/20 = 0.3; bed in 1: 2/10 = 0.2 -> median 0.3
    stats = table([{"wall": 6, "floor": 4}, {"wall": 5, "floor": 2, "bed": 2}, {"wall": 7}])
    classes = class_statistics(stats)
    assert np.allclose(classes.loc[["wall", "floor", "bed"], "frequency"], [0.6, 0.3, 0.2])
    assert list(classes.loc[["wall", "floor", "bed"], "images"]) == [3, 2, 1]
    w = weights_from_statistics(classes, "median_frequency")
    assert np.allclose(w[[0, 1, 3]], [0.5, 1.0, 1.5])
    # void counts in an image's size (ESANet divides by h * w), not as a class
    assert classes["pixels"].sum() == 26 and np.isclose(classes["pixel_share"].sum(), 1.0)


def test_inverse_and_logarithmic_by_hand():
    classes = class_statistics(table([{"wall": 6, "floor": 2}, {"wall": 2}]))
    inv = weights_from_statistics(classes, "inverse_frequency")
    assert np.allclose(inv[[0, 1]], [10 / (37 * 8), 10 / (37 * 2)])
    log = weights_from_statistics(classes, "logarithmic")
    assert np.allclose(log[[0, 1]], [1 / np.log(1.02 + 0.8), 1 / np.log(1.02 + 0.2)])


@pytest.mark.parametrize("method", CLASS_WEIGHT_METHODS)
def test_absent_classes_never_nan(method):
    classes = class_statistics(table([{"wall": 6, "floor": 4}, {"wall": 3, "sofa": 1}]))
    assert np.isnan(classes.loc["bag", "frequency"])  # the statistics say it is absent ...
    w = weights_from_statistics(classes, method)
    assert w.shape == (NUM_CLASSES,) and np.isfinite(w).all() and (w > 0).all()
    present = classes["pixels"].to_numpy() > 0
    assert np.allclose(w[~present], w[present].max())  # ... its weight is the largest present one


def test_no_labelled_pixel_is_an_error():
    with pytest.raises(DataError, match="no labeled pixel"):
        weights_from_statistics(class_statistics(table([{}, {}])))
    with pytest.raises(ParameterError, match="parameter `method`"):
        weights_from_statistics(class_statistics(table([{"wall": 1}])), "median")
    with pytest.raises(ParameterError, match="parameter `stats`"):
        class_statistics(pd.DataFrame({"id": ["a"]}))


def test_proportional_to_rednet_published_weights():
    """Frequencies proportional to 1 / w_RedNet give weights proportional to RedNet's (median frequency = 1/freq up to a constant)."""
    rednet = np.array(REDNET_WEIGHTS)
    pixels = np.round(1e5 / rednet).astype(int)
    images = [{c: int(p)} for c, p in zip(CLASS_NAMES, pixels)]
    w = weights_from_statistics(class_statistics(table(images, size=(1000, 1000))))
    ratio = w / rednet
    assert np.allclose(ratio, ratio.mean(), rtol=1e-4)
    assert np.isclose(np.median(w), 1.0)  # ours: the median class gets 1
    assert np.isclose(rednet[7] + rednet[8], 2.0)  # RedNet: the middle pair (door, window) averages 1


def test_class_weights_cached_by_fingerprint_and_split(small_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SUN_SEG_HOME", str(tmp_path / "home"))
    fit = SunRGBD(small_root, "fit")
    path = weights_cache_path(fit)
    assert not path.exists()
    w = class_weights(fit, progress=False)
    assert path.is_file() and path.parent == tmp_path / "home" / "class_weights"
    record = json.loads(path.read_text())
    assert record["key"]["fingerprint"] == fit.fingerprint and record["key"]["split"] == "fit"
    assert record["kind"] == "demo" and set(record["weights"]) == set(CLASS_WEIGHT_METHODS)
    assert w.dtype == torch.float32 and w.shape == (NUM_CLASSES,) and torch.isfinite(w).all()
    # the same data: no label is read again, for any method
    calls = []
    monkeypatch.setattr(analysis, "image_statistics", lambda *a, **k: calls.append(1) or image_statistics(*a, **k))
    assert torch.equal(class_weights(SunRGBD(small_root, "fit"), progress=False), w)
    class_weights(SunRGBD(small_root, "fit"), "inverse_frequency", progress=False)
    assert calls == []
    # another split of the same data, another val seed, or other data (another fingerprint): computed anew
    class_weights(SunRGBD(small_root, "train"), progress=False)
    class_weights(SunRGBD(small_root, "fit", val_seed=7), progress=False)
    other = make_demo_dataset(tmp_path / "other", n_train=24, n_test=8, seed=1, progress=False)
    assert SunRGBD(other, "fit").fingerprint != fit.fingerprint
    class_weights(SunRGBD(other, "fit"), progress=False)
    assert len(calls) == 3 and len(list(path.parent.iterdir())) == 4
    # the cached weights equal a fresh computation; a damaged cache is recomputed, not trusted
    assert torch.equal(class_weights(fit, cache=False, progress=False), w)
    path.write_text("{not json")
    assert torch.equal(class_weights(SunRGBD(small_root, "fit"), progress=False), w)
    with pytest.raises(ParameterError, match="training images"):
        class_weights(SunRGBD(small_root, "test"))


def test_tables_and_figures(small_root):
    train, test = SunRGBD(small_root, "train"), SunRGBD(small_root, "test")
    stats = pd.concat([image_statistics(train, progress=False), image_statistics(test, progress=False)], ignore_index=True)
    counts = sensor_counts(stats)
    assert counts.loc["total", "train"] == 24 and counts.loc["total", "test"] == 8 and counts.loc["total", "total"] == 32
    summary = void_share_summary(stats)
    assert list(summary.index) == ["test", "train", "all"] and summary.loc["all", "images"] == 32
    assert np.isclose(summary.loc["all", "mean"], stats["void_share"].mean())
    assert set(void_share_summary(stats, by="sensor").index) <= {"kv1", "kv2", "realsense", "xtion", "all"}
    from sun_seg.core import data_label
    label = data_label(train.kind, train.fingerprint)
    fig = plot_void_share(stats, label)
    assert DEMO_NOTICE in fig.axes[0].get_title() and train.fingerprint[:12] in fig.axes[0].get_title()
    assert sum(p.get_height() for p in fig.axes[0].patches) == 32
    fig2 = plot_class_frequency(class_statistics(stats[stats.split == "train"]), label)
    assert DEMO_NOTICE in fig2.axes[0].get_title()
    assert [t.get_text() for t in fig2.axes[0].get_xticklabels()][:1] == ["wall"]


def test_data_summary_cli(small_root, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    analysis.add_cli(parser.add_subparsers())
    args = parser.parse_args(["data-summary", str(small_root), "--quiet", "--figures", str(tmp_path / "fig")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert DEMO_NOTICE in out and "Images per sensor and split" in out and "median_frequency_weight" in out
    assert (tmp_path / "fig" / "F11_void_share.png").is_file()
