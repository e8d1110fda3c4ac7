"""`sun_seg.metrics` against independent implementations on random inputs with void pixels and absent classes."""
import math

import numpy as np
import pytest
import torch
import torchmetrics

from sun_seg.core import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from sun_seg.metrics import (class_accuracy, confusion_matrix, iou_per_class, mean_class_accuracy, miou,
                             pixel_accuracy, summarize)
from sun_seg.testing import reference_scores


def _random_case(seed, shape=(4, 30, 40), num_classes=NUM_CLASSES):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.5, target, torch.randint(0, num_classes, shape, generator=g))
    gone_from_target = torch.randperm(num_classes, generator=g)[:5]
    gone_from_pred = torch.randperm(num_classes, generator=g)[:5]
    target[torch.isin(target, gone_from_target)] = 3
    pred[torch.isin(pred, gone_from_pred)] = 4
    target[torch.rand(shape, generator=g) < 0.25] = IGNORE_INDEX
    return pred, target


@pytest.mark.parametrize("seed", range(8))
def test_matches_numpy_loop(seed):
    pred, target = _random_case(seed)
    cm = confusion_matrix(pred, target)
    ref = reference_scores(pred.numpy(), target.numpy())
    ours = iou_per_class(cm).numpy()
    assert np.array_equal(np.isnan(ours), np.isnan(ref["iou"]))
    np.testing.assert_allclose(ours[~np.isnan(ours)], ref["iou"][~np.isnan(ref["iou"])], rtol=0, atol=1e-12)
    assert miou(cm) == pytest.approx(ref["miou"], abs=1e-12)
    assert pixel_accuracy(cm) == pytest.approx(ref["pixel_accuracy"], abs=1e-12)
    assert mean_class_accuracy(cm) == pytest.approx(ref["mean_class_accuracy"], abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_matches_torchmetrics(seed):
    pred, target = _random_case(seed)
    cm = confusion_matrix(pred, target)
    tm_cm = torchmetrics.classification.MulticlassConfusionMatrix(NUM_CLASSES, ignore_index=IGNORE_INDEX)(pred, target)
    assert torch.equal(cm, tm_cm)
    tm_iou = torchmetrics.classification.MulticlassJaccardIndex(NUM_CLASSES, average="none", ignore_index=IGNORE_INDEX,
                                                                zero_division=float("nan"))(pred, target)
    ours = iou_per_class(cm).float()
    present = ~ours.isnan()
    assert torch.equal(present, ~tm_iou.isnan())
    torch.testing.assert_close(ours[present], tm_iou[present])
    tm_acc = torchmetrics.classification.MulticlassRecall(NUM_CLASSES, average="none", ignore_index=IGNORE_INDEX)(pred, target)
    support = cm.sum(1) > 0
    torch.testing.assert_close(class_accuracy(cm).float()[support], tm_acc[support])


def test_split_matrix_is_sum_of_batches_not_mean_of_batch_scores():
    pred, target = _random_case(11, shape=(6, 20, 20))
    whole = confusion_matrix(pred, target)
    batched = sum(confusion_matrix(pred[i:i + 2], target[i:i + 2]) for i in range(0, 6, 2))
    assert torch.equal(whole, batched)
    per_batch_mean = np.mean([miou(confusion_matrix(pred[i:i + 2], target[i:i + 2])) for i in range(0, 6, 2)])
    assert miou(whole) != pytest.approx(per_batch_mean, abs=1e-9)  # the two definitions really differ here


def test_logits_void_and_absent_classes():
    target = torch.full((1, 4, 4), IGNORE_INDEX)
    target[0, 0, :2] = 5
    logits = torch.zeros(1, NUM_CLASSES, 4, 4)
    logits[0, 5, 0, 0] = 1.0  # right
    logits[0, 9, 0, 1] = 1.0  # wrong: class 9 predicted where 5 is true
    logits[0, 9, 3, 3] = 1.0  # on a void pixel: not counted
    cm = confusion_matrix(logits, target)
    assert cm.sum() == 2 and cm[5, 5] == 1 and cm[5, 9] == 1
    ious = iou_per_class(cm)
    assert ious[5] == 0.5 and ious[9] == 0.0  # a false alarm class gets 0, and counts in the mean
    assert ious.isnan().sum() == NUM_CLASSES - 2
    assert miou(cm) == pytest.approx(0.25)
    rec = summarize(cm)
    assert list(rec["iou_per_class"]) == list(CLASS_NAMES) and math.isnan(rec["iou_per_class"]["wall"])
    assert rec["pixels"] == 2 and rec["pixel_accuracy"] == 0.5 and rec["mean_class_accuracy"] == 0.5


def test_empty_and_bad_shapes():
    empty = confusion_matrix(torch.zeros(2, 3, 3, dtype=torch.long), torch.full((2, 3, 3), IGNORE_INDEX))
    assert empty.sum() == 0 and math.isnan(miou(empty)) and math.isnan(pixel_accuracy(empty))
    with pytest.raises(ValueError, match="upsample the logits"):
        confusion_matrix(torch.zeros(1, NUM_CLASSES, 8, 8), torch.zeros(1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        confusion_matrix(torch.zeros(1, 5, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long))


def test_dtype_and_device_kept():
    pred, target = _random_case(3, shape=(1, 8, 8))
    cm = confusion_matrix(pred.to(torch.uint8), target.to(torch.int64))
    assert cm.dtype == torch.int64 and cm.shape == (NUM_CLASSES, NUM_CLASSES) and cm.device == target.device


@pytest.mark.cuda
def test_cuda_matrix_equals_cpu_matrix():
    if not torch.cuda.is_available(): pytest.skip("no CUDA GPU")
    pred, target = _random_case(5, shape=(8, 64, 80))
    assert torch.equal(confusion_matrix(pred.cuda(), target.cuda()).cpu(), confusion_matrix(pred, target))


@pytest.mark.parametrize("seed", range(4))
def test_uint8_fast_path_equals_general_path(seed):
    """uint8 targets (the engine's loaders) take a one-histogram path; it must give the same matrix, void and
    out-of-range labels (38..254) included, with predictions given as classes or as logits."""
    pred, target = _random_case(seed)
    g = torch.Generator().manual_seed(100 + seed)
    target[torch.rand(target.shape, generator=g) < 0.05] = torch.randint(NUM_CLASSES, 255, (), generator=g).item()
    general = confusion_matrix(pred, target.to(torch.int64))
    fast = confusion_matrix(pred, target.to(torch.uint8))
    assert torch.equal(general, fast)
    logits = torch.nn.functional.one_hot(pred, NUM_CLASSES).permute(0, 3, 1, 2).float()
    assert torch.equal(confusion_matrix(logits, target.to(torch.uint8)), general)


def test_fast_path_refuses_predicted_classes_out_of_range():
    target = torch.zeros(2, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside 0..36"):
        confusion_matrix(torch.full((2, 4, 4), 37), target)
    assert confusion_matrix(torch.zeros(0, 4, 4, dtype=torch.int64), torch.zeros(0, 4, 4, dtype=torch.uint8)).sum() == 0


def test_uint8_target_with_an_ignored_class_inside_the_range():
    """An `ignore_index` below `num_classes` (e.g. class 1 of 3 left out) is honoured for uint8 targets too."""
    target = torch.tensor([[[0, 1, 2, 1]]])
    pred = torch.tensor([[[0, 1, 2, 2]]])
    general = confusion_matrix(pred, target, num_classes=3, ignore_index=1)
    assert int(general.sum()) == 2
    assert torch.equal(confusion_matrix(pred, target.to(torch.uint8), num_classes=3, ignore_index=1), general)
