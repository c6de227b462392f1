"""bcosvit: holistically explainable B-cos Vision Transformers."""

from .errors import BcosVitError, CheckpointError, ConfigError, DataError, InputError
from .explain import Explanation, explain, explain_unit, token_contributions
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
    "create_model",
    "explain",
    "explain_unit",
    "explanation_mode",
    "list_models",
    "list_pretrained",
    "token_contributions",
]
