"""The runtime package's layers: imports point one way and never in a circle.

    ui -> conversations -> models -> serving -> engine

Every import statement counts, also those inside functions and under TYPE_CHECKING (a lazy import
that breaks a cycle is still a cycle a reader has to untangle). Read from the source with `ast`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fm_demo"

# layer of each module (by dotted-name prefix; the longest prefix wins); higher may import lower
LAYERS = {
    "fm_demo.engine": 0,
    "fm_demo.hardware": 0,
    "fm_demo.zerogpu": 1,
    "fm_demo.serving": 1,
    "fm_demo.metrics": 1,
    "fm_demo.checkpoints": 1,
    "fm_demo.stops": 1,
    "fm_demo.tiny": 1,
    "fm_demo.settings": 2,
    "fm_demo.chat": 2,
    "fm_demo.templates": 2,
    "fm_demo.models": 3,
    "fm_demo.lab": 3,
    "fm_demo.conversations": 4,
    "fm_demo.cluster": 5,
    "fm_demo.ui": 6,
    "fm_demo": 6,  # the package's own __init__
    # the cluster's entry points put the UI (build_demo) on models served by the replicas, as app.py
    # does on local ones: the Serve ingress, the application builder and `python -m fm_demo.cluster`
    "fm_demo.cluster.ingress": 7,
    "fm_demo.cluster.app": 7,
    "fm_demo.cluster.__main__": 7,
}
OUTSIDE = ("deploy", "kernels_check", "bench", "tests", "app")  # never imported by the runtime


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of fm_demo (and top-level names) that `name` imports, anywhere in its source."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known}
            found |= subs or {mod}
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found.add("__import__")
    return found - {name}


def layer(name: str) -> int:
    return LAYERS[max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_module_uses_dynamic_imports_or_reaches_outside_the_runtime():
    for name, deps in graph().items():
        assert "__import__" not in deps, name
        outside = {d for d in deps if d.split(".")[0] in OUTSIDE}
        assert not outside, f"{name} imports {sorted(outside)}"


def test_imports_point_down_the_layers():
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            if dep.startswith("fm_demo") and dep in modules() and layer(dep) > layer(name):
                wrong.append(f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})")
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_cycle():
    g = {n: {d for d in deps if d in modules()} for n, deps in graph().items()}
    # a package's __init__ re-exporting its own modules is not a cycle a reader must untangle
    g = {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in g.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in g[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
