"The README's promises point at tests that exist: a renamed or deleted test must not leave a guarantee unbacked."
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"(tests/[\w/]+\.py)?::(test_\w+)")


def _cited_tests(section):
    "`tests/f.py::test_x` and the `::test_y` that follow it on the same line (same file); any other form is an error."
    for line in section.splitlines():
        current = None
        for span in re.findall(r"`([^`]*::[^`]*)`", line):
            match = CITATION.fullmatch(span)
            assert match, f"README cites `{span}`: write `tests/file.py::test_name` or `::test_name` after one"
            current = match[1] or current
            assert current, f"README cites `{span}` without a file before it: {line[:80]}"
            yield current, match[2]


def test_every_guarantee_names_a_test_that_exists():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    cited = list(_cited_tests(section))
    assert len(cited) > 40
    missing = [f"{p}::{n}" for p, n in cited
               if not (ROOT / p).is_file() or not re.search(rf"^def {n}\(", (ROOT / p).read_text(), re.M)]
    assert not missing, f"README's Guarantees cite tests that do not exist: {missing}"
    rows = [l for l in section.splitlines() if l.startswith("| ") and not l.startswith("| what") and "---" not in l]
    assert all("tests/" in r for r in rows), [r[:60] for r in rows if "tests/" not in r]
