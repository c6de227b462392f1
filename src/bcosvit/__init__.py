"""bcosvit: holistically explainable B-cos Vision Transformers.

The library is everything under ``bcosvit`` except ``bcosvit.app``: ``layers``, ``models``,
``explanation`` (``explain``, ``explain_unit``, ``token_contributions``), ``attribution``,
``metrics``, ``visualize``, ``checkpoint`` (weights files), ``convert`` (the published B-cos-v2
checkpoints), ``hub`` (those checkpoints downloaded once, verified and cached), ``bcosification``
(``bcosify``: trained standard ViTs as B-cos models) and ``imagenet`` (ImageNet's classes).
``bcosvit.app`` is the application built on it: the command line, the training loop and its
recipes, the evaluation protocol, the report, datasets and image files. The library never imports
the application.

The sub-modules that pull in heavier libraries (``attribution``: Captum; ``visualize``: matplotlib;
``metrics``, ``app``) and ``imagenet`` are imported on first use, so ``import bcosvit`` stays light while
``bcosvit.attribution.attribute(...)`` works without importing the module first.
"""

import importlib
from types import ModuleType

from .bcosification import bcosify
from .checkpoint import load_model
from .convert import convert_official
from .errors import BcosVitError, CheckpointError, ConfigError, DataError, InputError
from .explanation import Explanation, explain, explain_unit, token_contributions
from .hub import list_pretrained_weights
from .layers import explanation_mode
from .models import VisionTransformer, ViTConfig, create_model, list_models, list_pretrained

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

_LAZY_SUBMODULES = frozenset({"app", "attribution", "imagenet", "metrics", "visualize"})


def __getattr__(name: str) -> ModuleType:
    """Import the sub-module ``bcosvit.<name>`` on first attribute access (PEP 562)."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)
