"""Scores at each image's original size (`eval_size`), evaluation in micro-batches, and the refusal of a resized cache."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sun_seg.core import DataError, IGNORE_INDEX, NUM_CLASSES
from sun_seg.data import SunRGBD
from sun_seg.data.prepare import prepare
from sun_seg.data.transforms import eval_transform
from sun_seg.core import normalize_images
from sun_seg.train import evaluate_run, fit, load_run_model, plan_run
import sun_seg.train.evaluation as evaluation

from train_fixtures import tiny_params, write_tiny_release

ORIGINAL = (30, 44)  # not the training size's aspect ratio: the two protocols differ


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("tiny_original"), n_train=80, n_test=64, size=ORIGINAL)


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    """A run that learnt something (a model predicting one class everywhere would score 0 under both protocols)."""
    out = tmp_path_factory.mktemp("runs")
    record = fit(tiny_params(data, out, epochs=2, max_train_batches=4, batch_size=8, test=True, precision="fp32"), progress=False)
    return out / record["run_id"]


@pytest.fixture(scope="module")
def run64(data, tmp_path_factory):
    """A run at the study's batch of 64 (one optimizer step)."""
    out = tmp_path_factory.mktemp("runs64")
    record = fit(tiny_params(data, out, epochs=1, max_train_batches=1, batch_size=64, max_eval_batches=1), progress=False)
    return out / record["run_id"]


def _independent_miou(run_dir, data) -> float:
    """mIoU on the test split at each image's own size, computed here with numpy: logits of the image seen at the
    training size, resized (bilinear) to the label's size, against the label as stored (never resized)."""
    model = load_run_model(run_dir).float()
    test = SunRGBD(data, "test")
    resize = eval_transform((32, 32))
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    with torch.no_grad():
        for i in range(len(test)):
            item = test[i]
            image, _ = resize(item["image"], item["target"])
            logits = model(normalize_images(image[None]))
            label = item["target"].numpy()
            assert label.shape == ORIGINAL
            pred = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False).argmax(1)[0].numpy()
            keep = label != IGNORE_INDEX
            cm += np.bincount(label[keep] * NUM_CLASSES + pred[keep], minlength=NUM_CLASSES ** 2).reshape(cm.shape)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    return float(np.mean(inter[union > 0] / union[union > 0]))


def test_original_size_scores_match_an_independent_full_resolution_computation(run_dir, data):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_size"] == "original" and metrics["test"]["eval_size"] == "original"  # the full profile's default
    assert metrics["test"]["pixels"] == 64 * (ORIGINAL[0] - 2) * ORIGINAL[1]  # void strips left out
    expected = _independent_miou(run_dir, data)
    assert metrics["test"]["miou"] == pytest.approx(expected, abs=1e-9)
    at_train_size = evaluate_run(run_dir, "test", original_size=False, progress=False)
    assert at_train_size["eval_size"] == "train" and at_train_size["pixels"] < metrics["test"]["pixels"]
    assert abs(at_train_size["miou"] - expected) > 1e-4  # the case really tells the protocols apart


def test_evaluation_forwards_micro_batches_with_the_same_metrics(run64, monkeypatch):
    seen = []
    loaded = evaluation.load_run_model

    def spied(*args, **kw):
        model = loaded(*args, **kw)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
        return model

    monkeypatch.setattr(evaluation, "load_run_model", spied)
    assert json.loads((run64 / "params.json").read_text())["batch_size"] == 64
    chunked = evaluate_run(run64, "test", progress=False)  # the run's micro-batch: 64 on a CPU, capped at 16
    assert seen and max(seen) == evaluation.MAX_EVAL_MICRO_BATCH
    seen.clear()
    whole = evaluate_run(run64, "test", micro_batch_size=64, progress=False)
    assert seen == [64]  # the first 64 test images in one forward
    assert chunked["iou_per_class"] == pytest.approx(whole["iou_per_class"], nan_ok=True)
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_a_run_folder_from_before_eval_size_is_scored_as_it_was(run_dir, tmp_path):
    import shutil
    old = tmp_path / run_dir.name
    shutil.copytree(run_dir, old)
    params = json.loads((old / "params.json").read_text())
    del params["eval_size"]
    params["eval_original_size"] = False  # what every run folder written before eval_size says
    (old / "params.json").write_text(json.dumps(params))
    assert evaluate_run(old, "test", progress=False)["eval_size"] == "train"


def test_a_resized_cache_is_refused_for_original_size_scores(data, tmp_path):
    cache = prepare(data, tmp_path / "cache32", size=(32, 32), workers=0, progress=False)
    params = tiny_params(cache, tmp_path / "runs")
    with pytest.raises(DataError, match=r"prepared at --size 32x32.*sun-seg prepare .*--overwrite.*eval_size train"):
        plan_run(params)
    assert plan_run({**params, "eval_size": "train"}).config.eval_size == "train"
    full = prepare(data, tmp_path / "cache_full", workers=0, progress=False)  # each image's own size: accepted
    assert plan_run(tiny_params(full, tmp_path / "runs")).config.eval_size == "original"
