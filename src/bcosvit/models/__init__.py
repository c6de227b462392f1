"""Model definitions and the registry of named configurations."""

from .registry import create_model, list_models, list_pretrained, model_config, register, twin_name
from .vit import POS_EMBED_SCHEMES, Capture, CaptureRecord, VisionTransformer, ViTConfig

__all__ = [
    "POS_EMBED_SCHEMES",
    "Capture",
    "CaptureRecord",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "list_models",
    "list_pretrained",
    "model_config",
    "register",
    "twin_name",
]
