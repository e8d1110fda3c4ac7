"""DistributedDataParallel on CPU: `torchrun --nproc_per_node 2 -m sun_seg.train` (gloo) against one process."""
import json
import os
import subprocess
import sys

import pytest

from sun_seg.train import evaluate_run, fit, read_history

from train_fixtures import param_pairs, tiny_params, write_tiny_release


def _rows(run_dir):
    return read_history(run_dir / "history.csv")


def test_two_gloo_processes_match_one_process(tmp_path):
    data = write_tiny_release(tmp_path / "data")
    params = tiny_params(data, tmp_path / "ddp", precision="fp32", epochs=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sun_seg.train", "--quiet", *param_pairs(params)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0 prints the record's summary
    run_ddp = tmp_path / "ddp" / os.path.basename(summary["run_dir"])
    ddp_env = json.loads((run_ddp / "environment.json").read_text())
    assert ddp_env["world_size"] == 2 and ddp_env["micro_batch_size"] == 2 and ddp_env["accumulation_steps"] == 1
    ddp_metrics = json.loads((run_ddp / "metrics.json").read_text())
    assert ddp_metrics["status"] == "completed" and ddp_metrics["world_size"] == 2
    assert ddp_metrics["val"]["images"] == 3  # every validation image scored once, none twice

    # Evaluation: the processes score disjoint shares of the validation split and add up their confusion
    # matrices; one process scoring the same weights finds the same numbers.
    alone = evaluate_run(run_ddp, split="val", which="best", device="cpu", progress=False)
    assert alone["images"] == ddp_metrics["val"]["images"]
    assert alone["miou"] == pytest.approx(ddp_metrics["best_val_miou"], abs=1e-9)
    assert alone["loss"] == pytest.approx(ddp_metrics["val"]["loss"], rel=1e-6)

    # Training: one process accumulating two micro-batches of 2 sees the same BatchNorm groups as two processes
    # of 2 images each, so it trains the same way up to float rounding. (Evaluation then differs a little:
    # BatchNorm's running statistics are averaged over the processes but updated micro-batch after micro-batch
    # by one process.) Adam divides each step by the gradient's running scale, so rounding differences between
    # an all-reduce and a local sum grow a little from step to step: exact at the start, within 0.2% after two epochs
    # (the 4-image batch below differs by percents).
    same_groups = fit(tiny_params(data, tmp_path / "one", precision="fp32", epochs=2, micro_batch_size=2), progress=False)
    assert same_groups["run_id"] == run_ddp.name  # the process count is not part of the run's identity
    assert len(_rows(run_ddp)) == len(_rows(tmp_path / "one" / same_groups["run_id"])) == 2
    for a, b in zip(_rows(run_ddp), _rows(tmp_path / "one" / same_groups["run_id"])):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4 if a["epoch"] == 1 else 2e-3), a["epoch"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=0.05), a["epoch"]

    # One process with the whole batch of 4 in one piece: BatchNorm statistics over 4 images instead of 2, so
    # close rather than equal.
    whole = fit(tiny_params(data, tmp_path / "whole", precision="fp32", epochs=2), progress=False)
    assert len(_rows(tmp_path / "whole" / whole["run_id"])) == 2
    for a, b in zip(_rows(run_ddp), _rows(tmp_path / "whole" / whole["run_id"])):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.05)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=0.05)
