"""The bcosvit application, built on the library: the command line (``cli``), training runs and
their recipes (``training``), the evaluation protocol (``evaluation``) and its HTML report
(``report``), datasets (``data``), explanations of image files (``explain_files``) and the choice of
numeric precision (``precision``). The library (everything in ``bcosvit`` outside ``app``) never
imports from here.

Sub-modules are imported on first use: ``bcosvit.app.training.train`` works after ``import bcosvit``.
"""

import importlib
from types import ModuleType

_SUBMODULES = frozenset({"cli", "data", "evaluation", "explain_files", "precision", "report", "training"})


def __getattr__(name: str) -> ModuleType:
    """Import the sub-module ``bcosvit.app.<name>`` on first attribute access (PEP 562)."""
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
