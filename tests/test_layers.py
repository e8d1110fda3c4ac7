"""One-way layers (GitHub issue 11): every module's imports, read from its source (AST), go only down the layers.

    core < data < models < metrics < runs < train < study < analysis < report < top (bench, cli, pipeline, testing, lab)

A module may import its own layer and the ones below it, never a later one; no `sun_seg` import sits inside a
function body (the real graph is the one at the top of each module); no module imports another's private name;
the bottom layers (`sun_seg.core`, `sun_seg.runs`) import no torch; no library module is over 600 lines.
`python tests/test_layers.py` prints the import graph by layer.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sun_seg"
LAYERS = ("core", "data", "models", "metrics", "runs", "train", "study", "analysis", "report", "top")
# module (or package) -> layer; the longest matching prefix decides
LAYER_OF = {"sun_seg": "core", "sun_seg.core": "core", "sun_seg.data": "data", "sun_seg.models": "models",
            "sun_seg.metrics": "metrics", "sun_seg.runs": "runs", "sun_seg.train": "train", "sun_seg.inference": "train",
            "sun_seg.export": "train", "sun_seg.study": "study", "sun_seg.estimate": "study",
            "sun_seg.analysis": "analysis", "sun_seg.report": "report", "sun_seg.bench": "top", "sun_seg.cli": "top",
            "sun_seg.pipeline": "top", "sun_seg.testing": "top", "sun_seg.lab": "top"}
MAX_LINES = 600
GENERATED = {"sun_seg._modidx"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    candidates = [m for m in LAYER_OF if module == m or (m != "sun_seg" and module.startswith(m + "."))]
    return LAYER_OF[max(candidates, key=len)] if candidates else None


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "templates" not in p.parts}
    return {m: p for m, p in found.items() if m not in GENERATED}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level: return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path):
    """(imported sun_seg module, names, line, inside a function) for each import statement of `module`."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, [], child.lineno, in_function) for a in child.names if a.name.split(".")[0] == "sun_seg")
            elif isinstance(child, ast.ImportFrom):
                target = _absolute(module, path, child)
                if target.split(".")[0] == "sun_seg":
                    names = [a.name for a in child.names]
                    # `from sun_seg.x import y` where y is a submodule imports the submodule
                    found.append((target, names, child.lineno, in_function))
            visit(child, inner)
    visit(tree, False)
    return found


def _target_modules(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return subs or [target]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for target, names, _, _ in imports(m, p) for t in _target_modules(target, names, known) if t != m}
            for m, p in known.items()}


def format_graph() -> str:
    edges, lines = graph(), []
    for layer in LAYERS:
        members = sorted(m for m in edges if layer_of(m) == layer)
        if not members: continue
        lines.append(f"{layer}:")
        for m in members:
            below = sorted({layer_of(t) or "?" for t in edges[m]} - {layer}, key=lambda l: LAYERS.index(l) if l in LAYERS else 99)
            lines.append(f"  {m} ({len(modules()[m].read_text().splitlines())} lines)"
                         + (f" -> {', '.join(below)}" if below else ""))
    return "\n".join(lines)


def test_every_module_has_a_layer():
    assert not [m for m in modules() if layer_of(m) is None], "add the new module to LAYER_OF"


def test_imports_go_only_down_the_layers():
    bad = []
    for module, targets in graph().items():
        mine = LAYERS.index(layer_of(module))
        bad += [f"{module} ({layer_of(module)}) imports {t} ({layer_of(t)})" for t in sorted(targets)
                if layer_of(t) and LAYERS.index(layer_of(t)) > mine]
    print(format_graph())
    assert not bad, "\n".join(bad)


def test_no_sun_seg_import_inside_a_function():
    bad = [f"{p.relative_to(PACKAGE.parent)}:{line} imports {target} inside a function"
           for m, p in modules().items() for target, _, line, inner in imports(m, p) if inner]
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = [f"{p.relative_to(PACKAGE.parent)}:{line} imports {', '.join(n for n in names if n.startswith('_') and not n.startswith('__'))} from {target}"
           for m, p in modules().items() for target, names, line, _ in imports(m, p)
           if target != m and any(n.startswith("_") and not n.startswith("__") for n in names)]
    assert not bad, "\n".join(bad)


def test_no_library_module_is_over_600_lines():
    sizes = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    assert not {m: n for m, n in sizes.items() if n > MAX_LINES}


@pytest.mark.parametrize("module", ["sun_seg.core", "sun_seg.runs", "sun_seg.cli"])
def test_the_bottom_layers_and_the_cli_import_no_torch(module):
    probe = f"import sys, {module}; sys.exit(3 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0, f"importing {module} imports torch"


if __name__ == "__main__":
    print(format_graph())
