"""bcosvit: holistically explainable B-cos Vision Transformers.

The library is everything under ``bcosvit`` except ``bcosvit.app``: ``layers``, ``models`` (the
architectures and the registry of named configurations), ``explanation`` (``explain``,
``explain_unit``, ``token_contributions``), ``attribution``, ``metrics``, ``visualize``,
``bcosification`` (``bcosify``: trained standard ViTs as B-cos models) and, above them, the weights
wing ``weights``: the weights format, the published B-cos-v2 checkpoints (one table, downloaded
once, verified, converted and cached), the shipped weights, ImageNet's classes, ``create_model``
and ``load_model``. ``bcosvit.app`` is the application built on it: the command line, the training
loop and its recipes, the evaluation protocol, the report, datasets and image files. The library
never imports the application, and nothing in the library below the weights wing imports it.

The sub-modules that pull in heavier libraries (``attribution``: Captum; ``visualize``: matplotlib;
``metrics``, ``app``) are imported on first use, so ``import bcosvit`` stays light while
``bcosvit.attribution.attribute(...)`` works without importing the module first.
"""

import importlib
from types import ModuleType

from .bcosification import bcosify
from .errors import BcosVitError, CheckpointError, ConfigError, DataError, InputError
from .explanation import Explanation, explain, explain_unit, token_contributions
from .layers import explanation_mode
from .models import VisionTransformer, ViTConfig, list_models
from .weights import convert_official, create_model, list_pretrained, list_pretrained_weights, load_model

__version__ = "0.1.0"

__all__ = [
    "BcosVitError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Explanation",
    "InputError",
    "ViTConfig",
    "VisionTransformer",
    "bcosify",
    "convert_official",
    "create_model",
    "explain",
    "explain_unit",
    "explanation_mode",
    "list_models",
    "list_pretrained",
    "list_pretrained_weights",
    "load_model",
    "token_contributions",
]

_LAZY_SUBMODULES = frozenset({"app", "attribution", "metrics", "visualize"})


def __getattr__(name: str) -> ModuleType:
    """Import the sub-module ``bcosvit.<name>`` on first attribute access (PEP 562)."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)
