"""The package namespace: what ``import bcosvit`` gives, as the README uses it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import bcosvit

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_names() -> list[str]:
    """Every dotted name ``bcosvit.x[.y...]`` the README writes (code and prose alike)."""
    return sorted(set(re.findall(r"\bbcosvit(?:\.\w+)+", README.read_text())))


def test_every_bcosvit_name_the_readme_uses_resolves_after_a_plain_import():
    names = _readme_names()
    assert "bcosvit.attribution.attribute" in names and "bcosvit.visualize" in names
    lookups = "\n".join(f"print({name!r}, type({name}).__name__)" for name in names)
    # A fresh interpreter: in this one the test suite has already imported every sub-module.
    result = subprocess.run([sys.executable, "-c", f"import bcosvit\n{lookups}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(names)


def test_the_explain_function_and_the_explain_module_both_stay_reachable():
    code = (
        "import bcosvit\n"
        "from bcosvit.explain import Explanation, normalize_target\n"
        "import bcosvit.explain\n"
        "assert callable(bcosvit.explain) and bcosvit.explain.__name__ == 'explain'\n"
        "assert bcosvit.Explanation is Explanation\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_load_model_is_exported():
    from bcosvit.checkpoint import load_model

    assert bcosvit.load_model is load_model and "load_model" in bcosvit.__all__
