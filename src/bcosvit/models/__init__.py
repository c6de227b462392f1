"""Model definitions and the registry of named configurations."""

from .registry import BCOS_PREFIX, build_model, list_models, model_config, register, twin_name
from .vit import POS_EMBED_SCHEMES, Capture, CaptureRecord, VisionTransformer, ViTConfig, class_probabilities

__all__ = [
    "BCOS_PREFIX",
    "POS_EMBED_SCHEMES",
    "Capture",
    "CaptureRecord",
    "ViTConfig",
    "VisionTransformer",
    "build_model",
    "class_probabilities",
    "list_models",
    "model_config",
    "register",
    "twin_name",
]
