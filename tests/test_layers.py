"""The package's import rule, checked from the source (every import, those inside functions too).

quantmoe is built in layers, each importing only the layers below it (docs/architecture.md):

    base < gptq < formats < model < stages < backends < apps < api, cli (and the package root)

Inside a layer modules may import each other, except apps, which do not import each other. There
is no import cycle anywhere. An import inside a function is kept only for optional extras (names in
OPTIONAL) and for the command line's lazy start (cli.py and the package root).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quantmoe"
LAYERS = ("base", "gptq", "formats", "model", "stages", "backends", "apps")
TOP = len(LAYERS)  # api.py, cli.py, __init__.py, __main__.py
OPTIONAL = {"bitsandbytes", "gptqmodel", "triton", "datasets", "huggingface_hub", "optimum",
            "accelerate", "tomli", "yaml", "compressed_tensors"}
LAZY_START = {"quantmoe", "quantmoe.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else TOP


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import of quantmoe or an optional extra in ``path``."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module or not node.level else [f"{target}.{a.name}" for a in node.names]
            # "from .pkg import module" imports that module
            for a in node.names:
                sub = f"{target}.{a.name}"
                if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file():
                    names.append(sub)
            found += [(n, id(node) in inside, node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in inside, node.lineno) for a in node.names]
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for target, _, _ in imports(p):
            while target and target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != m and not m.startswith(target + "."):
                edges[m].add(target)
    return edges


def test_there_is_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_imports_point_down():
    upward = []
    for p in PACKAGE.rglob("*.py"):
        me = module_name(p)
        for target, _, line in imports(p):
            if not target.startswith("quantmoe.") or me.startswith(target + ".") or target == "quantmoe":
                if target == "quantmoe" and me != "quantmoe" and not me.startswith("quantmoe.cli"):
                    upward.append(f"{me}:{line} imports the package root")
                continue
            if layer(target) > layer(me):
                upward.append(f"{me}:{line} -> {target}")
            elif layer(me) == LAYERS.index("apps") == layer(target) and target.split(".")[2:3] != me.split(".")[2:3]:
                upward.append(f"{me}:{line} -> {target} (apps do not import each other)")
    assert upward == []


def test_imports_inside_functions_are_only_for_optional_extras_or_the_lazy_start():
    found = []
    for p in PACKAGE.rglob("*.py"):
        me = module_name(p)
        for target, inside, line in imports(p):
            if inside and me not in LAZY_START and target.split(".")[0] not in OPTIONAL:
                found.append(f"{me}:{line} imports {target} inside a function")
    assert found == []


@pytest.mark.parametrize("source, expect", [
    ("import quantmoe.model.stream\n", "quantmoe.model.stream"),
    ("def f():\n    from ..stages import quantize\n", "quantmoe.stages.quantize"),
])
def test_the_rule_sees_imports(tmp_path, source, expect, monkeypatch):
    """The guard itself: a planted upward import inside a function is seen, with its place."""
    planted = PACKAGE / "base" / "_planted_for_test.py"
    planted.write_text(source)
    try:
        found = {t for t, _, _ in imports(planted)}
        assert expect in found
        assert layer(expect) > layer(module_name(planted))
    finally:
        planted.unlink()
