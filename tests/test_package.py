"""The package namespace: what ``import bcosvit`` gives, as the README uses it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import bcosvit

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_names() -> list[str]:
    """Every dotted name ``bcosvit.x[.y...]`` the README writes (code and prose alike)."""
    return sorted(set(re.findall(r"\bbcosvit(?:\.\w+)+", README.read_text())))


@pytest.mark.slow
def test_every_bcosvit_name_the_readme_uses_resolves_after_a_plain_import():
    names = _readme_names()
    assert "bcosvit.attribution.attribute" in names and "bcosvit.visualize" in names
    lookups = "\n".join(f"print({name!r}, type({name}).__name__)" for name in names)
    # A fresh interpreter: in this one the test suite has already imported every sub-module.
    result = subprocess.run([sys.executable, "-c", f"import bcosvit\n{lookups}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(names)


def test_no_module_is_shadowed_by_a_function_of_the_same_name():
    package = Path(bcosvit.__file__).parent
    modules = {p.stem for p in package.rglob("*.py")} | {p.name for p in package.rglob("*") if p.is_dir()}
    shadowed = sorted(name for name in bcosvit.__all__ if name in modules)
    assert not shadowed, shadowed
    assert callable(bcosvit.explain) and bcosvit.Explanation.__module__ == "bcosvit.explanation"


def test_the_library_never_imports_the_application():
    package = Path(bcosvit.__file__).parent
    # __main__.py is `python -m bcosvit`, the application's entry point
    library = [
        p for p in package.rglob("*.py") if "app" not in p.relative_to(package).parts and p.name != "__main__.py"
    ]
    offenders = [
        f"{p.relative_to(package)}: {line.strip()}"
        for p in library
        for line in p.read_text().splitlines()
        if re.match(r"\s*(from|import)\s+(\.+app\b|bcosvit\.app\b)", line)
    ]
    assert len(library) > 10 and not offenders, offenders


@pytest.mark.slow
def test_importing_the_library_loads_no_application_module():
    code = "import sys, bcosvit\nprint(sorted(m for m in sys.modules if m.startswith('bcosvit.app')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_load_model_is_exported():
    from bcosvit.weights.checkpoint import load_model

    assert bcosvit.load_model is load_model and "load_model" in bcosvit.__all__
