"""The weights wing: everything about trained weights, above the model registry.

- ``checkpoint``: the weights format (safetensors + ``model.json``), checked before a model is built;
- ``published``: the one table of the published B-cos-v2 ImageNet weights;
- ``hub``: those weights downloaded once, verified, converted once and cached;
- ``convert``: the reference's checkpoints as bcosvit models;
- ``shipped``: the weights inside the package;
- ``imagenet``: ImageNet-1k's classes;
- ``factory``: ``create_model`` (a registered name, with shipped or published weights) and
  ``load_weights`` (a run folder, a weights file or a registered name);
- ``hf_hub``: ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` on the Hugging Face hub
  (imported on first use of its names: it imports ``huggingface_hub``, an optional dependency).

The library below (``layers``, ``models``, ``explanation``, ...) never imports this package.
"""

from .checkpoint import load_model, read_metadata, save_weights
from .convert import convert_official
from .factory import (
    PRETRAINED_CHOICES,
    PretrainedWeights,
    create_model,
    list_pretrained_weights,
    load_weights,
    resolve_source,
    weights_metadata,
)
from .published import IMAGENET, PUBLISHED
from .shipped import SHIPPED, list_pretrained, ship_weights

__all__ = [
    "HubVisionTransformer",
    "IMAGENET",
    "PRETRAINED_CHOICES",
    "PUBLISHED",
    "SHIPPED",
    "PretrainedWeights",
    "as_hub_model",
    "convert_official",
    "create_model",
    "from_pretrained",
    "list_pretrained",
    "list_pretrained_weights",
    "load_model",
    "load_weights",
    "push_to_hub",
    "read_metadata",
    "resolve_source",
    "save_pretrained",
    "save_weights",
    "ship_weights",
    "weights_metadata",
]

_HUB_NAMES = frozenset({"HubVisionTransformer", "as_hub_model", "from_pretrained", "push_to_hub", "save_pretrained"})


def __getattr__(name: str) -> object:
    """``hf_hub``'s names, imported on first use (PEP 562): it imports ``huggingface_hub``."""
    if name in _HUB_NAMES:
        from . import hf_hub

        return getattr(hf_hub, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
