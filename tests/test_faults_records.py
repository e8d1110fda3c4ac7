"""Untrusted files read defensively: study files limited before parsing, damaged run records named per run.

- A study file larger than `MAX_STUDY_BYTES` (1 MiB) or nested deeper than `MAX_STUDY_DEPTH` (32) is refused before
  YAML reads it, naming the file and the limit; deep nesting never gives a raw `RecursionError`.
- A run folder's `metrics.json` or `history.csv` that is not UTF-8, not a JSON object, lacks fields or columns, holds
  text where numbers belong, or disagrees with the other (more epochs in the history than `metrics.json` completed)
  is a `RunRecordError` naming the file and the fault; the study records the run as damaged, skips it in the tables
  and the site shows it as "damaged: <reason>" - never a raw traceback, never shown as if true.
"""
import time

import pytest

from sun_seg.cli import main
from sun_seg.core import DataError
from sun_seg.study import MAX_STUDY_BYTES, MAX_STUDY_DEPTH, read_yaml

GOOD_HEAD = "study: limits\nseeds: [0]\n"


def test_large_study_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "study.yaml"
    # valid YAML (a long comment): without a size limit it is parsed and accepted
    path.write_text(GOOD_HEAD + "# " + "x" * (MAX_STUDY_BYTES + 10) + "\n")
    start = time.monotonic()
    with pytest.raises(DataError, match="1 MiB") as e:
        read_yaml(path)
    assert str(path) in str(e.value) and f"{MAX_STUDY_BYTES:,}" in str(e.value)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("nested", [
    "runs: " + "[" * 40 + "]" * 40 + "\n",  # flow brackets, within Python's recursion limit: parsed today
    "runs: " + "{a: " * 40 + "1" + "}" * 40 + "\n",
    "runs:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 40)) + " " * 40 + "v: 1\n",  # block indentation
    "runs:\n" + "".join("  " * i + "-\n" for i in range(1, 40)) + "  " * 40 + "- 1\n",  # nested block lists
])
def test_deeply_nested_study_file_is_refused_naming_the_limit(tmp_path, nested):
    path = tmp_path / "study.yaml"
    path.write_text(GOOD_HEAD + nested)
    with pytest.raises(DataError, match=f"deeper than {MAX_STUDY_DEPTH} levels") as e:
        read_yaml(path)
    assert str(path) in str(e.value)


def test_very_deep_nesting_is_a_named_error_not_a_recursion_error(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(GOOD_HEAD + "runs: " + "[" * 20000 + "]" * 20000 + "\n")  # a raw RecursionError in YAML today
    assert main(["study", "--study", str(path), "--profile", "demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"deeper than {MAX_STUDY_DEPTH} levels" in err and str(path) in err
    assert "Traceback" not in err and "RecursionError" not in err, err
    assert not (tmp_path / "out").exists()


def test_ordinary_study_files_pass_the_limits():
    from sun_seg.study import default_study_path, load_study
    assert load_study(default_study_path()).runs  # the repository's study file: far below both limits
