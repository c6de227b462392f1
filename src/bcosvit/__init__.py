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

A model's preprocessing is library API too: ``bcosvit.transforms(model)`` (a torchvision v2
transform) and ``bcosvit.load_image(path, model)`` (any image file, as the model takes it), both
from ``bcosvit.images``.

The outside tools' entry points come from ``bcosvit.ecosystem``: ``quantus_explain`` (Quantus'
``explain_func``), ``CastInputs`` (a model taking any float dtype), ``focus_mosaics`` (Quantus' Focus),
``BcosAttribution`` and ``PosthocAttribution`` (Captum attributions), ``gradcam_reshape_transform``
and ``gradcam_target_layers`` (pytorch-grad-cam).

The sub-modules that pull in heavier libraries (``attribution`` and ``ecosystem``: Captum;
``visualize``: matplotlib; ``images``: torchvision and Pillow; ``metrics``, ``app``) are imported on
first use, so ``import bcosvit`` stays light while ``bcosvit.attribution.attribute(...)`` works without importing the
module first.
"""

import importlib

from .bcosification import bcosify
from .errors import BcosVitError, CheckpointError, ConfigError, DataError, InputError
from .explanation import Explanation, explain, explain_unit, token_contributions
from .layers import explanation_mode
from .models import VisionTransformer, ViTConfig, list_models
from .targets import TopK
from .weights import convert_official, create_model, list_pretrained, list_pretrained_weights, load_model

__version__ = "0.1.0"

__all__ = [
    "BcosAttribution",
    "BcosVitError",
    "CastInputs",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Explanation",
    "HubVisionTransformer",
    "InputError",
    "PosthocAttribution",
    "TopK",
    "ViTConfig",
    "VisionTransformer",
    "bcosify",
    "convert_official",
    "create_model",
    "explain",
    "explain_unit",
    "explanation_mode",
    "focus_mosaics",
    "from_pretrained",
    "gradcam_reshape_transform",
    "gradcam_target_layers",
    "list_models",
    "list_pretrained",
    "list_pretrained_weights",
    "load_image",
    "load_model",
    "push_to_hub",
    "quantus_explain",
    "save_pretrained",
    "token_contributions",
    "transforms",
]

_LAZY_SUBMODULES = frozenset({"app", "attribution", "ecosystem", "images", "metrics", "visualize"})
_LAZY_FUNCTIONS = {  # name -> the sub-module defining it
    "load_image": "images",
    "transforms": "images",
    **dict.fromkeys(
        [
            "BcosAttribution",
            "CastInputs",
            "PosthocAttribution",
            "focus_mosaics",
            "gradcam_reshape_transform",
            "gradcam_target_layers",
            "quantus_explain",
        ],
        "ecosystem",
    ),
    # the Hugging Face hub (bcosvit.weights.hf_hub imports huggingface_hub, an optional dependency)
    **dict.fromkeys(["HubVisionTransformer", "from_pretrained", "push_to_hub", "save_pretrained"], "weights.hf_hub"),
}


def __getattr__(name: str) -> object:
    """Import the sub-module ``bcosvit.<name>`` (or the one defining ``name``) on first access (PEP 562)."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(f".{_LAZY_FUNCTIONS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES | set(_LAZY_FUNCTIONS))
