"""Clusters: `--shard slurm` reads the array job's variables, shards are balanced by each run's expected cost, and
data-loader workers are sized from the CPUs allotted to the process."""
import os

import pytest
import torch

from sun_seg.cli import main
from sun_seg.core import allotted_cpus
from sun_seg.study import balanced_shards, load_study, parse_shard, resolve_grid, run_cost, select_runs
from sun_seg.train.batches import auto_workers

SLURM_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_CPUS_PER_TASK")


@pytest.fixture
def no_slurm(monkeypatch):
    for name in SLURM_VARIABLES: monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def grid():
    """The study's own grid (profile full: 20-, 75- and 100-epoch U-Nets, three fine-tuning depths), ids from the parameters."""
    return resolve_grid(load_study(), "full", lambda p: "-".join(f"{k}={p[k]}" for k in sorted(p)))


def test_shard_slurm_takes_the_array_task_slice(no_slurm, grid):
    no_slurm.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    slices = []
    for task in range(4):  # sbatch --array=0-3
        no_slurm.setenv("SLURM_ARRAY_TASK_ID", str(task))
        assert parse_shard("slurm") == (task + 1, 4)
        slices.append(select_runs(grid, shard=parse_shard("slurm")))
    assert slices == [select_runs(grid, shard=(i, 4)) for i in (1, 2, 3, 4)]  # the same slices as --shard i/4
    no_slurm.setenv("SLURM_ARRAY_TASK_MIN", "1"); no_slurm.setenv("SLURM_ARRAY_TASK_ID", "1")  # sbatch --array=1-4
    assert parse_shard("slurm") == (1, 4)


def test_shard_slurm_without_the_variables_is_refused_clearly(no_slurm, tmp_path, capsys):
    assert main(["study", "--demo", "--out", str(tmp_path / "out"), "--shard", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "parameter `shard`: 'slurm' reads SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT" in err
    assert "are not set" in err and "--shard i/n" in err and not (tmp_path / "out").exists()


def test_shards_are_balanced_by_expected_cost(grid):
    total = sum(run_cost(r.params) for r in grid)
    largest = max(run_cost(r.params) for r in grid)
    for n in (2, 3, 4, 6, 8):
        slices = balanced_shards(grid, n)
        assert sorted(r.run_id for s in slices for r in s) == sorted(r.run_id for r in grid)  # each run exactly once
        assert balanced_shards(grid, n) == slices  # deterministic: every machine computes the same slices
        costs = [sum(run_cost(r.params) for r in s) for s in slices]
        robin = [sum(run_cost(r.params) for r in grid[i::n]) for i in range(n)]
        assert max(costs) <= max(robin)
        # greedy LPT: no slice exceeds the ideal share by more than the largest single run
        assert max(costs) <= total / n + largest, (n, costs)
    assert max(sum(run_cost(r.params) for r in s) for s in balanced_shards(grid, 8)) < \
        max(sum(run_cost(r.params) for r in grid[i::8]) for i in range(8))  # strictly better on the study's grid


def test_run_cost_follows_epochs_size_and_depth():
    base = dict(model="unet", epochs=20, image_size="480x640")
    assert run_cost({**base, "epochs": 100}) == pytest.approx(5 * run_cost(base))
    assert run_cost({**base, "image_size": "240x320"}) == pytest.approx(run_cost(base) / 4)
    depths = [run_cost({**base, "model": "upernet", "finetune": f}) for f in ("classifier", "decoder", "encoder+decoder")]
    assert depths == sorted(depths) and depths[0] < depths[-1]
    assert run_cost({**base, "max_train_batches": 2, "batch_size": 8}) < run_cost(base)


def test_loader_workers_come_from_the_allotted_cpus(no_slurm):
    if not hasattr(os, "sched_getaffinity"): pytest.skip("no CPU affinity on this platform")
    no_slurm.setattr(os, "cpu_count", lambda: 128)  # the whole node
    no_slurm.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))  # what this job may use
    assert allotted_cpus() == 8
    assert auto_workers(torch.device("cuda"), 1) == 7 and auto_workers(torch.device("cuda"), 2) == 3
    no_slurm.setenv("SLURM_CPUS_PER_TASK", "4")
    assert allotted_cpus() == 4 and auto_workers(torch.device("cuda"), 1) == 3
    assert auto_workers(torch.device("cpu"), 1) == 0  # unchanged: no workers on a CPU


def test_slurm_examples_are_valid_scripts_with_options_sun_seg_accepts(repo_root):
    import re
    import shlex
    import subprocess
    from sun_seg.cli import build_parser
    folder = repo_root / "examples" / "slurm"
    scripts = {p.name: p.read_text() for p in folder.iterdir()}
    assert {"train-array.sbatch", "evaluate-report.sbatch", "submit.sh"} <= set(scripts)
    for name in scripts: subprocess.run(["bash", "-n", str(folder / name)], check=True)
    assert "#SBATCH --array=" in scripts["train-array.sbatch"] and "--shard slurm" in scripts["train-array.sbatch"]
    assert "--dependency=afterok:" in scripts["submit.sh"]
    parser = build_parser("study")
    for name in ("train-array.sbatch", "evaluate-report.sbatch"):
        line = next(l for l in scripts[name].splitlines() if re.match(r"\s*(exec )?sun-seg study", l))
        words = shlex.split(line.split("#")[0].replace('"$SUN_SEG_DATA"', "DATA").replace('"$OUT"', "OUT"))
        args = parser.parse_args(words[words.index("study"):])  # every option the script passes exists
        assert args.out == "OUT" and args.data == "DATA"
