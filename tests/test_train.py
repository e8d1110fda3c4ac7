"""The training engine end to end on small generated data: run folders, resume, determinism, divergence, bad parameters."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from sun_seg.core import CLASS_NAMES, ParameterError
from sun_seg.train import (HISTORY_COLUMNS, Callback, TrainConfig, evaluate_run, fit, load_run_model, plan_run,
                           read_history)
from sun_seg.train.checkpoint import weights_metadata

from train_fixtures import InterruptAt, tiny_params, weights_of, write_tiny_release

TIMING_COLUMNS = {"seconds", "train_images_per_second"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("tiny_sunrgbd"))


def _history_numbers(run_dir):
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in read_history(run_dir / "history.csv")]


def _same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _assert_same_rows(rows_a, rows_b):
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        diff = {k: (ra[k], rb[k]) for k in ra if not _same(ra[k], rb[k])}
        assert not diff, f"epoch {ra['epoch']} differs: {diff}"



def test_run_folder_contract(data, tmp_path):
    record = fit(tiny_params(data, tmp_path, test=True), progress=False)
    run_dir = tmp_path / record["run_id"]
    assert record["run_dir"] == str(run_dir) and record["trained"] is True
    for name in ("params.json", "data.json", "environment.json", "history.csv", "metrics.json",
                 "checkpoints/best.safetensors"):
        assert (run_dir / name).is_file(), name
    # completed: what only a resume would read is gone (the last weights too, as keep_last was not asked)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.safetensors"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["reason"] is None
    assert metrics["epochs_completed"] == 3 and metrics["data_kind"] == "sunrgbd"
    for key in ("best_epoch", "best_val_miou", "trainable_params", "total_params", "flops_per_image", "wall_seconds",
                "train_images_per_second", "device", "precision", "stopped_early", "data_fingerprint"):
        assert key in metrics, key
    assert metrics["trainable_params"] == metrics["total_params"] == sum(
        p.numel() for p in load_run_model(run_dir).parameters())
    assert metrics["val"]["epoch"] == metrics["best_epoch"] and metrics["val"]["miou"] == metrics["best_val_miou"]
    assert set(metrics["test"]["iou_per_class"]) == set(CLASS_NAMES) and metrics["test"]["split"] == "test"
    assert metrics["test"]["images"] == 6
    with open(run_dir / "history.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == HISTORY_COLUMNS
    rows = read_history(run_dir / "history.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    best = max(rows, key=lambda r: r["val_miou"])
    assert best["epoch"] == metrics["best_epoch"] and best["val_miou"] == metrics["best_val_miou"]
    assert math.isnan(rows[0]["val_iou_bag"])  # class 36 is in neither the ground truth nor (here) the prediction
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["world_size"] == 1 and env["micro_batch_size"] == 4 and env["accumulation_steps"] == 1
    assert {"torch", "python", "git_commit", "device_type", "precision"} <= set(env)
    params = json.loads((run_dir / "params.json").read_text())
    assert params["lr"] == 0.01 and params["run_id"] == record["run_id"] and params["profile_applied"] == "full"
    # the best checkpoint reproduces the recorded validation score
    again = evaluate_run(run_dir, split="val", progress=False)
    assert again["miou"] == pytest.approx(metrics["best_val_miou"], abs=1e-12)
    # evaluation at each image's original size is available (the labels are 32x40; the model sees 32x32)
    original = evaluate_run(run_dir, split="test", original_size=True, progress=False)
    assert original["original_size"] and original["pixels"] > 0
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["original_size"] is True
    _check_per_image_counts(run_dir, metrics, original)


def _check_per_image_counts(run_dir, metrics, retested):
    """The engine keeps each image's intersections and unions (the report's bootstrap needs them); summed, they are the record."""
    from sun_seg.metrics import image_counts_path, load_image_counts, miou_from_counts
    val = load_image_counts(image_counts_path(run_dir, "val"))
    assert val["epoch"] == metrics["best_epoch"] and val["split"] == "val"
    assert val["union"].shape == (metrics["val"]["images"], len(CLASS_NAMES))
    assert list(val["index"]) == list(range(metrics["val"]["images"]))
    assert miou_from_counts(val["intersection"], val["union"]) == pytest.approx(metrics["best_val_miou"], abs=1e-12)
    # the test evaluation's, replaced by a later evaluation of the test split (here at the original size)
    test = load_image_counts(image_counts_path(run_dir, "test"))
    assert len(test["union"]) == 6 and (test["intersection"] <= test["union"]).all()
    assert miou_from_counts(test["intersection"], test["union"]) == pytest.approx(retested["miou"], abs=1e-12)


def test_per_image_counts_give_the_recorded_miou(data, tmp_path):
    """A fit with its test evaluation: val_per_image.npz and test_per_image.npz sum to the recorded mIoUs."""
    from sun_seg.metrics import image_counts_path, load_image_counts, miou_from_counts
    record = fit(tiny_params(data, tmp_path, test=True, epochs=1), progress=False)
    run_dir = tmp_path / record["run_id"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = load_image_counts(image_counts_path(run_dir, "test"))
    assert test["epoch"] == metrics["best_epoch"]
    assert miou_from_counts(test["intersection"], test["union"]) == pytest.approx(metrics["test"]["miou"], abs=1e-12)
    _check_per_image_counts(run_dir, metrics, metrics["test"])


def test_completed_run_keeps_what_a_user_needs(data, tmp_path):
    """Best weights and records stay; `last_state.pt` goes; the last weights stay only with keep_last=True."""
    kept = fit(tiny_params(data, tmp_path / "a", epochs=2, keep_last=True), progress=False)
    run_dir = Path(kept["run_dir"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]
    assert weights_metadata(run_dir / "checkpoints" / "last.safetensors")["epoch"] == "2"
    plain = fit(tiny_params(data, tmp_path / "b", epochs=2), progress=False)
    assert plain["run_id"] == kept["run_id"]  # keep_last is not part of the run's identity
    assert sorted(p.name for p in (Path(plain["run_dir"]) / "checkpoints").iterdir()) == ["best.safetensors"]
    again = fit(tiny_params(data, tmp_path / "b", epochs=2), progress=False)  # still reported finished
    assert again["trained"] is False and again["status"] == "completed"
    interrupted = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_params(data, interrupted, epochs=2), callbacks=[InterruptAt(epoch=2, step=1)], progress=False)
    checkpoints = interrupted / kept["run_id"] / "checkpoints"
    assert {"last_state.pt", "last.safetensors"} <= {p.name for p in checkpoints.iterdir()}  # a resume needs them
    resumed = fit(tiny_params(data, interrupted, epochs=2), progress=False)
    assert resumed["status"] == "completed" and resumed["best_val_miou"] == plain["best_val_miou"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.safetensors"]


def test_default_out_dir_is_ignored_by_git():
    """`sun-seg train` from the repository root (or papermill from nbs/) writes runs/ there: git ignores it."""
    import subprocess
    from conftest import ROOT
    if not (ROOT / ".git").exists(): pytest.skip("not a git checkout")
    assert TrainConfig().out_dir == "runs"
    for folder in ("runs", "nbs/runs"):
        path = f"{folder}/unet-lr0.0001-plateau-0123456789ab/checkpoints/best.safetensors"
        assert subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0, path


def test_finished_run_is_reported_not_retrained(data, tmp_path):
    first = fit(tiny_params(data, tmp_path, epochs=1), progress=False)
    again = fit(tiny_params(data, tmp_path, epochs=1, num_workers=1), progress=False)  # a speed setting: same run
    assert again["trained"] is False and again["run_id"] == first["run_id"]
    assert again["wall_seconds"] == first["wall_seconds"]
    tested = fit(tiny_params(data, tmp_path, epochs=1, test=True), progress=False)  # test asked later: only tested
    assert tested["trained"] is False and tested["test"]["images"] == 6
    other = fit(tiny_params(data, tmp_path, epochs=1, seed=1), progress=False)
    assert other["run_id"] != first["run_id"]  # other parameters never share a folder


def test_resume_equals_uninterrupted_and_same_seed_same_numbers(data, tmp_path):
    params = dict(precision="auto", keep_last=True)  # bf16 autocast where the CPU has it natively: the real path
    whole = fit(tiny_params(data, tmp_path / "a", **params), progress=False)
    repeat = fit(tiny_params(data, tmp_path / "b", **params), progress=False)
    run_a, run_b = tmp_path / "a" / whole["run_id"], tmp_path / "b" / repeat["run_id"]
    _assert_same_rows(_history_numbers(run_a), _history_numbers(run_b))  # same seed on CPU: the same numbers

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_params(data, tmp_path / "c", **params), callbacks=[InterruptAt(epoch=2, step=2)], progress=False)
    run_c = tmp_path / "c" / whole["run_id"]
    interrupted = json.loads((run_c / "metrics.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["epochs_completed"] == 1
    assert "resume" in interrupted["reason"]
    resumed = fit(tiny_params(data, tmp_path / "c", **params), progress=False)
    assert resumed["status"] == "completed" and resumed["epochs_completed"] == 3
    _assert_same_rows(_history_numbers(run_a), _history_numbers(run_c))
    assert resumed["best_val_miou"] == whole["best_val_miou"] and resumed["best_epoch"] == whole["best_epoch"]
    for which in ("last.safetensors", "best.safetensors"):
        wa, wc = weights_of(run_a / "checkpoints" / which), weights_of(run_c / "checkpoints" / which)
        assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa), which
    assert json.loads((run_c / "environment.json").read_text())["resumed"] is True

    other_seed = fit(tiny_params(data, tmp_path / "d", seed=1, **params), progress=False)
    assert _history_numbers(tmp_path / "d" / other_seed["run_id"])[0]["train_loss"] != _history_numbers(run_a)[0]["train_loss"]


def test_jitter_on_the_device_repeats_and_resumes(data, tmp_path, monkeypatch):
    """The CUDA path of the photometric jitter (applied to the batch on the device), exercised on the CPU."""
    monkeypatch.setenv("SUN_SEG_JITTER_ON_DEVICE", "1")
    whole = fit(tiny_params(data, tmp_path / "a"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_params(data, tmp_path / "b"), callbacks=[InterruptAt(epoch=2, step=1)], progress=False)
    resumed = fit(tiny_params(data, tmp_path / "b"), progress=False)
    _assert_same_rows(_history_numbers(tmp_path / "a" / whole["run_id"]), _history_numbers(tmp_path / "b" / resumed["run_id"]))
    monkeypatch.delenv("SUN_SEG_JITTER_ON_DEVICE")
    in_loader = fit(tiny_params(data, tmp_path / "c"), progress=False)
    assert _history_numbers(tmp_path / "c" / in_loader["run_id"])[0]["train_loss"] != \
        _history_numbers(tmp_path / "a" / whole["run_id"])[0]["train_loss"]  # the jitter ran elsewhere: other numbers ...
    assert in_loader["run_id"] != whole["run_id"]  # ... so never the same run folder (issue 10)


def _batchnorm_free_model(config, num_classes=len(CLASS_NAMES), **options):
    """Per-pixel layers only: BatchNorm would see micro-batches of 2 instead of 4 and change the numbers itself."""
    from torch import nn
    torch.manual_seed(config.seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))


def test_gradient_accumulation_matches_one_piece(data, tmp_path, monkeypatch):
    import sun_seg.train.trainer as trainer
    monkeypatch.setattr(trainer, "build_run_model", _batchnorm_free_model)
    one = fit(tiny_params(data, tmp_path / "one", precision="fp32", epochs=2, channels_last=False), progress=False)
    acc = fit(tiny_params(data, tmp_path / "acc", precision="fp32", epochs=2, channels_last=False, micro_batch_size=2),
              progress=False)
    assert one["run_id"] == acc["run_id"]  # a speed setting: the same run
    assert (one["micro_batch_size"], one["accumulation_steps"]) == (4, 1)
    assert (acc["micro_batch_size"], acc["accumulation_steps"]) == (2, 2)
    env = json.loads((tmp_path / "acc" / acc["run_id"] / "environment.json").read_text())
    assert (env["micro_batch_size"], env["accumulation_steps"]) == (2, 2)
    rows_one, rows_acc = _history_numbers(tmp_path / "one" / one["run_id"]), _history_numbers(tmp_path / "acc" / acc["run_id"])
    assert len(rows_one) == len(rows_acc) == 2
    for a, b in zip(rows_one, rows_acc):  # the same optimisation up to float rounding
        for key in ("train_loss", "val_loss", "val_miou"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_divergence_is_recorded(data, tmp_path):
    record = fit(tiny_params(data, tmp_path, lr=1e30, precision="fp32"), progress=False)
    assert record["status"] == "diverged" and "loss became" in record["reason"]
    metrics = json.loads((tmp_path / record["run_id"] / "metrics.json").read_text())
    assert metrics["status"] == "diverged"
    again = fit(tiny_params(data, tmp_path, lr=1e30, precision="fp32"), progress=False)
    assert again["trained"] is False and again["status"] == "diverged"  # a diverged run is final


class PoisonAfterFirstEpoch(Callback):
    def after_epoch(self, trainer, row):
        if row["epoch"] == 1:
            with torch.no_grad(): next(trainer.model.parameters()).fill_(float("nan"))


def test_divergence_keeps_what_was_recorded(data, tmp_path):
    record = fit(tiny_params(data, tmp_path), callbacks=[PoisonAfterFirstEpoch()], progress=False)
    run_dir = tmp_path / record["run_id"]
    assert record["status"] == "diverged" and "epoch 2" in record["reason"]
    assert record["epochs_completed"] == 1 and record["best_epoch"] == 1 and record["val"]["epoch"] == 1
    assert [r["epoch"] for r in read_history(run_dir / "history.csv")] == [1]
    assert (run_dir / "checkpoints" / "best.safetensors").is_file()


class Boom(Callback):
    def after_step(self, trainer, epoch, step): raise RuntimeError("disk on fire")


def test_failure_is_recorded_and_reraised(data, tmp_path):
    with pytest.raises(RuntimeError, match="disk on fire"):
        fit(tiny_params(data, tmp_path), callbacks=[Boom()], progress=False)
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "disk on fire" in metrics["reason"]


@pytest.mark.parametrize("bad, name", [
    (dict(model="resnet"), "model"), (dict(lr=-0.0001), "lr"), (dict(lr="fast"), "lr"),
    (dict(finetune="decoder"), "finetune"), (dict(model="upernet", finetune="everything"), "finetune"),
    (dict(data_dir="/no/such/folder"), "data_dir"), (dict(epochs=0), "epochs"), (dict(batch_size=2.5), "batch_size"),
    (dict(scheduler="cosine"), "scheduler"), (dict(augment="yes"), "augment"), (dict(precision="fp16"), "precision"),
    (dict(image_size="big"), "image_size"), (dict(run_name="../escape"), "run_name"), (dict(learning_rate=0.1), "learning_rate"),
    (dict(batch_size=1000), "batch_size"), (dict(micro_batch_size=3), "micro_batch_size")])
def test_bad_parameters_are_refused_before_training(data, tmp_path, bad, name):
    params = {**tiny_params(data, tmp_path / "runs"), **bad}
    with pytest.raises(ParameterError) as info:
        fit(params, progress=False)
    assert f"parameter `{name}`" in str(info.value)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing was written


def test_plan_names_run_from_parameters_and_data(data, tmp_path):
    plan = plan_run(TrainConfig(**tiny_params(data, tmp_path)))
    assert plan.run_id.startswith("unet-lr0.01-plateau-") and plan.data_kind == "sunrgbd"
    assert plan_run(TrainConfig(**tiny_params(data, tmp_path, num_workers=1))).run_id == plan.run_id
    assert plan_run(TrainConfig(**tiny_params(data, tmp_path, augment=False))).run_id != plan.run_id
    assert plan_run(TrainConfig(**tiny_params(data, tmp_path, run_name="mine"))).run_dir == tmp_path / "mine"


@pytest.mark.slow
def test_engine_learns_the_demo_data(tmp_path, monkeypatch):
    """After a short training on the demo data the model beats predicting the most frequent class everywhere."""
    from sun_seg.data.demo import demo_root
    from sun_seg.data.sunrgbd import SunRGBD
    from sun_seg.data.transforms import eval_transform
    from sun_seg.metrics import confusion_matrix, miou, pixel_accuracy
    monkeypatch.delenv("SUN_SEG_DATA", raising=False)
    # the demo profile's size and batch, six epochs (the profile stops at three), a narrow U-Net
    record = fit(dict(out_dir=str(tmp_path), unet_width=16, lr=0.001, epochs=6, patience=0, image_size="64x80",
                      batch_size=8, profile="full", num_workers=0, device="cpu"), progress=False)
    assert record["data_kind"] == "demo" and record["status"] == "completed"

    root = demo_root()
    counts = torch.zeros(len(CLASS_NAMES) + 1, dtype=torch.long)
    for item in SunRGBD(root, "fit"):
        counts += torch.bincount(item["target"].clamp(max=len(CLASS_NAMES)).view(-1), minlength=len(CLASS_NAMES) + 1)
    majority = int(counts[:-1].argmax())
    val = SunRGBD(root, "val", transform=eval_transform((64, 80)))
    cm = sum(confusion_matrix(torch.full_like(item["target"], majority), item["target"]) for item in val)
    baseline = {"miou": miou(cm), "pixel_accuracy": pixel_accuracy(cm)}
    learnt = {k: record["val"][k] for k in ("miou", "pixel_accuracy", "mean_class_accuracy")}
    assert learnt["miou"] > 2 * baseline["miou"], (learnt, baseline)
    assert learnt["pixel_accuracy"] > baseline["pixel_accuracy"], (learnt, baseline)


@pytest.mark.cuda
@pytest.mark.parametrize("extra", [dict(), dict(compile=True), dict(micro_batch_size=2)])
def test_cuda_run(data, tmp_path, extra):
    """bf16 autocast, channels_last, fused Adam, optional torch.compile, pinned memory, accumulation on a GPU."""
    if not torch.cuda.is_available(): pytest.skip("no CUDA GPU")
    record = fit(tiny_params(data, tmp_path, device="cuda", precision="auto", test=True, **extra), progress=False)
    assert record["status"] == "completed" and record["device"].startswith("cuda")
    assert record["precision"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    env = json.loads((tmp_path / record["run_id"] / "environment.json").read_text())
    assert env["device_type"] == "cuda" and env["compile"] == bool(extra.get("compile"))
    assert record["micro_batch_size"] * record["accumulation_steps"] == 4
    model = load_run_model(tmp_path / record["run_id"], device="cuda")
    assert next(model.parameters()).is_cuda


@pytest.mark.slow
def test_compiled_run_on_cpu_matches_eager(data, tmp_path):
    """`compile=True` on the CPU (inductor, C++ kernels): the same run folder contract and, up to the rounding of fused
    kernels, the same numbers as eager mode; its checkpoints load into a plain model."""
    eager = fit(tiny_params(data, tmp_path / "eager", precision="fp32", epochs=2), progress=False)
    compiled = fit(tiny_params(data, tmp_path / "compiled", precision="fp32", epochs=2, compile=True), progress=False)
    assert compiled["status"] == "completed" and compiled["run_id"] == eager["run_id"]  # compile is not part of a run's identity
    run = tmp_path / "compiled" / compiled["run_id"]
    assert json.loads((run / "environment.json").read_text())["compile"] is True
    rows_eager, rows_compiled = _history_numbers(tmp_path / "eager" / eager["run_id"]), _history_numbers(run)
    assert len(rows_eager) == len(rows_compiled) == 2
    for a, b in zip(rows_eager, rows_compiled):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3), a["epoch"]
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-2), a["epoch"]
    plain = load_run_model(run)  # keys saved without torch.compile's `_orig_mod.` prefix
    assert not any(k.startswith("_orig_mod") for k in plain.state_dict())
    assert evaluate_run(run, split="val", which="best", device="cpu", progress=False)["miou"] == \
        pytest.approx(compiled["best_val_miou"], abs=1e-6)


def test_weighted_loss_uses_the_training_splitweights_of(data, tmp_path):
    from sun_seg.data.analysis import class_weights
    from sun_seg.data.sunrgbd import SunRGBD
    plain = fit(tiny_params(data, tmp_path, epochs=1), progress=False)
    weighted = fit(tiny_params(data, tmp_path, epochs=1, weighted_loss=True), progress=False)
    assert weighted["run_id"] != plain["run_id"] and "-weighted-" in weighted["run_id"]
    recorded = json.loads((tmp_path / weighted["run_id"] / "data.json").read_text())["class_weights"]
    expected = class_weights(SunRGBD(data, "fit"), method="median_frequency", progress=False)
    assert recorded == pytest.approx(expected.tolist())
    assert json.loads((tmp_path / plain["run_id"] / "data.json").read_text())["class_weights"] is None
    # the validation loss is the weighted criterion: it differs from the unweighted one on the same first step
    assert weighted["val"]["loss"] != plain["val"]["loss"]


def test_run_records_method_split_and_loaded_commit(data, tmp_path):
    """method.json, the validation split as a parameter, and the hub commit of the pretrained folder: recorded in
    environment.json and part of the run id, while a folder that names no commit keeps the id without it (issue 10)."""
    from sun_seg.train import method_values, run_identity
    from train_fixtures import write_published_checkpoint
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--openmmlab--upernet-convnext-tiny" / "snapshots" / commit
    write_published_checkpoint(snapshot)
    params = tiny_params(data, tmp_path / "runs", model="upernet", pretrained=str(snapshot), unet_width=64, epochs=1,
                         max_train_batches=1, max_eval_batches=1, val_fraction=0.3, val_seed=2)
    record = fit(params, progress=False)
    run_dir = tmp_path / "runs" / record["run_id"]
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["pretrained_commit"] == commit and env["pretrained_revision"] == "main"
    plan = plan_run(params, quiet=True)
    assert run_identity(plan.config, plan.data_info, plan.dtype)["params"]["pretrained_commit"] == commit
    method = json.loads((run_dir / "method.json").read_text())
    assert method == json.loads(json.dumps(method_values(plan.config)))
    assert (method["val_fraction"], method["val_seed"], method["aux_loss_weight"]) == (0.3, 2, 0.4)
    data_json = json.loads((run_dir / "data.json").read_text())
    assert (data_json["val_method"], data_json["val_fraction"], data_json["val_seed"]) == ("seeded", 0.3, 2)
    plain = tmp_path / "plain"
    write_published_checkpoint(plain)
    assert plan_run({**params, "pretrained": str(plain)}, quiet=True).run_id != record["run_id"]
    assert plan_run({**params, "val_seed": 3}, quiet=True).run_id != record["run_id"]


def test_hub_id_not_in_the_cache_is_named_with_the_commit_it_will_load(data, tmp_path, monkeypatch):
    """A hub id the cache does not hold: plan_run fetches only its config.json into the cache (as huggingface_hub
    does: refs/<revision> and snapshots/<commit>/), so the run id carries the commit the weights will be loaded at,
    the same before and after the download; offline (HF_HUB_OFFLINE) nothing is fetched and the id has no commit."""
    import huggingface_hub
    from huggingface_hub import constants
    from sun_seg.train import run_identity
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    calls = []

    def fake_download(repo_id, filename, revision=None, **kw):  # what hf_hub_download leaves in the cache
        calls.append((repo_id, filename, revision))
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / filename).write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / (revision or "main")).write_text(commit)
        return str(repo / "snapshots" / commit / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    params = tiny_params(data, tmp_path / "runs", model="upernet", pretrained="someone/upernet", unet_width=64)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = plan_run(params, quiet=True)
    assert calls == [] and "pretrained_commit" not in run_identity(offline.config, offline.data_info, offline.dtype)["params"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    online = plan_run(params, quiet=True)
    assert calls == [("someone/upernet", "config.json", "main")] and online.run_id != offline.run_id
    assert run_identity(online.config, online.data_info, online.dtype)["params"]["pretrained_commit"] == commit
    assert plan_run(params, quiet=True).run_id == online.run_id and len(calls) == 1  # now from the cache
