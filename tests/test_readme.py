"The README's promises point at tests that exist: a renamed or deleted test must not leave a guarantee unbacked."
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cited_tests(text):
    "`tests/f.py::name` and the `::name` that follow it on the same line (same file)."
    for line in text.splitlines():
        current = None
        for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", line):
            current = path or current
            assert current, f"README cites `::{name}` without a file before it: {line[:80]}"
            yield current, name


def test_every_guarantee_names_a_test_that_exists():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    cited = list(_cited_tests(section))
    assert len(cited) > 40
    missing = [f"{p}::{n}" for p, n in cited
               if not re.search(rf"^def {n}\(", (ROOT / p).read_text(), re.M)]
    assert not missing, f"README's Guarantees cite tests that do not exist: {missing}"
    rows = [l for l in section.splitlines() if l.startswith("| ") and not l.startswith("| what") and "---" not in l]
    assert all("tests/" in r for r in rows), [r[:60] for r in rows if "tests/" not in r]
