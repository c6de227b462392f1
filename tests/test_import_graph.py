"""The library's structure, read from its imports: no circle, and every arrow pointing down.

The imports are read from the source (``ast``), lazy imports inside functions included, so a
circle hidden behind a function-level import is found too. Layers, lowest first: the foundations
(errors, validation, fileio, targets), the layers, the models, what computes with models
(explanation, attribution, metrics, visualize, bcosification, the input helpers), the weights wing,
the package's facade (``bcosvit/__init__``), the application.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bcosvit"

# the first matching prefix decides a module's layer
LAYERS: list[tuple[str, int]] = [
    ("bcosvit.errors", 0),
    ("bcosvit.validation", 0),
    ("bcosvit.fileio", 0),
    ("bcosvit.targets", 0),
    ("bcosvit.layers", 1),
    ("bcosvit.models", 2),
    ("bcosvit.app", 6),
    ("bcosvit.weights", 4),
    ("bcosvit.__main__", 6),
    ("bcosvit", 3),  # explanation, attribution, metrics, visualize, bcosification, inputs, images, ...
]
FACADE = "bcosvit"  # bcosvit/__init__.py re-exports from every layer of the library
FACADE_LAYER = 5


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    if module == FACADE:
        return FACADE_LAYER
    return next(layer for prefix, layer in LAYERS if module == prefix or module.startswith(prefix + "."))


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The bcosvit modules ``path`` imports (at any depth of its code), resolved to module names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            # `from .weights import checkpoint` names a module; `from .weights import load_model` names the package
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate.startswith("bcosvit"):
                found.add(candidate)
                break
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def test_the_graph_is_read_from_the_source(graph):
    assert "bcosvit.weights.factory" in graph["bcosvit.weights"]
    assert "bcosvit.models.registry" in graph["bcosvit.weights.factory"]
    assert "bcosvit.app.cli" in graph and graph["bcosvit.app.cli"]  # its imports are lazy: found anyway


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the modules (package -> its own sub-module edges excluded), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target.startswith(node + "."):
                continue  # a package's __init__ importing its own modules is no circle
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_among_the_library_modules(graph):
    library = {m: {t for t in ts if not t.startswith("bcosvit.app")} for m, ts in graph.items()}
    library = {m: ts for m, ts in library.items() if not m.startswith("bcosvit.app")}
    assert _cycle(library) is None, f"import circle: {' -> '.join(_cycle(library))}"


def test_no_import_circle_in_the_application(graph):
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_every_import_points_down_or_sideways(graph):
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module) and not target.startswith(module + ".")
    ]
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_nothing_below_the_weights_wing_imports_it(graph):
    below = [m for m in graph if layer_of(m) < layer_of("bcosvit.weights")]
    offenders = [f"{m} imports {t}" for m in below for t in graph[m] if t.startswith("bcosvit.weights")]
    assert not offenders, offenders
    assert any(t.startswith("bcosvit.models") for t in graph["bcosvit.weights.factory"])  # the check can fail


def test_the_check_finds_an_upward_import():
    fake = {"bcosvit.models.registry": {"bcosvit.weights.hub"}, "bcosvit.weights.hub": {"bcosvit.models.registry"}}
    assert _cycle(fake) is not None
    assert layer_of("bcosvit.weights.hub") > layer_of("bcosvit.models.registry")
