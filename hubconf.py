"""torch.hub entry points: the published B-cos-v2 ImageNet ViTs as bcosvit models.

    model = torch.hub.load("<owner>/bcosvit", "bcos_vit_tiny_patch16_224")            # from GitHub
    model = torch.hub.load("/path/to/bcosvit", "bcos_vitc_small_224", source="local")  # a checkout

Each entry point takes ``pretrained=True`` (the published ImageNet weights, downloaded once, checked
against their SHA-256, converted once and cached in torch.hub's folder; False: random weights) and
the keyword arguments of ``bcosvit.create_model`` (``weights=PATH`` for a file you already have,
``progress``, ``num_classes``, ``image_size``). The models take images in [0, 1]; their class names
are ``model.config.class_names``.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch", "torchvision", "einops", "safetensors", "numpy"]

try:
    import bcosvit as _bcosvit
except ImportError:  # a checkout, not installed: the package lives in src/
    _sys.path.insert(0, str(_Path(__file__).resolve().parent / "src"))
    import bcosvit as _bcosvit

from bcosvit.weights.hub import PUBLISHED as _PUBLISHED  # noqa: E402


def _entry_point(name: str):
    """The torch.hub entry point of the published model ``name``."""
    entry = _PUBLISHED[name]

    def load(pretrained: bool = True, **kwargs) -> _bcosvit.VisionTransformer:
        return _bcosvit.create_model(name, pretrained="imagenet" if pretrained else False, **kwargs)

    family = "B-cos" if name.startswith("bcos_") else "Standard (not B-cos)"
    load.__name__ = load.__qualname__ = name
    load.__doc__ = (
        f"{family} {name}: ImageNet top-1 {entry.top1:.3f}%, top-5 {entry.top5:.3f}% (published; the reference's "
        f"bcos.models.pretrained.{entry.reference}).\n\n"
        "pretrained: load the published weights (downloaded once from\n"
        f"{entry.url}); **kwargs: bcosvit.create_model's (weights=PATH, progress, num_classes, image_size)."
    )
    return load


bcos_vit_tiny_patch16_224 = _entry_point("bcos_vit_tiny_patch16_224")
bcos_vit_small_patch16_224 = _entry_point("bcos_vit_small_patch16_224")
bcos_vit_base_patch16_224 = _entry_point("bcos_vit_base_patch16_224")
bcos_vit_large_patch16_224 = _entry_point("bcos_vit_large_patch16_224")
bcos_vitc_tiny_224 = _entry_point("bcos_vitc_tiny_224")
bcos_vitc_small_224 = _entry_point("bcos_vitc_small_224")
bcos_vitc_base_224 = _entry_point("bcos_vitc_base_224")
bcos_vitc_large_224 = _entry_point("bcos_vitc_large_224")
vit_tiny_patch16_224 = _entry_point("vit_tiny_patch16_224")
vit_small_patch16_224 = _entry_point("vit_small_patch16_224")
vit_base_patch16_224 = _entry_point("vit_base_patch16_224")
vit_large_patch16_224 = _entry_point("vit_large_patch16_224")
vitc_tiny_224 = _entry_point("vitc_tiny_224")
vitc_small_224 = _entry_point("vitc_small_224")
vitc_base_224 = _entry_point("vitc_base_224")
vitc_large_224 = _entry_point("vitc_large_224")
