"""Registry of named configurations and ``create_model``.

Every configuration is registered twice: the B-cos model (``bcos_...``) and its standard twin
(the same name without the ``bcos_`` prefix), so the two always share their shapes. The registry
builds models from configurations (``build_model``); loading weights into them is the weights
wing's job (``bcosvit.weights.create_model``), which sits above it.
"""

from __future__ import annotations

import difflib
import fnmatch

from ..errors import ConfigError
from .vit import VisionTransformer, ViTConfig

_CONFIGS: dict[str, dict] = {}
BCOS_PREFIX = "bcos_"


def register(name: str, twin: dict | None = None, **config) -> None:
    """Register the B-cos configuration ``name`` (must start with ``bcos_``) and its standard twin;
    ``twin`` holds options of the twin alone (its biases)."""
    if not name.startswith(BCOS_PREFIX):
        raise ValueError(f"registered names start with {BCOS_PREFIX!r}, got {name!r}")
    _CONFIGS[name] = dict(config, bcos=True)
    _CONFIGS[name[len(BCOS_PREFIX) :]] = dict(config, **(twin or {}), bcos=False)


def twin_name(name: str) -> str:
    """The name of the other family's model with the same shapes."""
    return name[len(BCOS_PREFIX) :] if name.startswith(BCOS_PREFIX) else BCOS_PREFIX + name


def list_models(pattern: str = "*") -> list[str]:
    """All registered names matching a shell-style ``pattern`` (B-cos models first)."""
    names = [n for n in _CONFIGS if fnmatch.fnmatch(n, pattern)]
    return sorted(names, key=lambda n: (not n.startswith(BCOS_PREFIX), n))


def model_config(name: str, **overrides) -> ViTConfig:
    """The validated configuration of ``name`` with ``overrides`` applied."""
    if name not in _CONFIGS:
        close = difflib.get_close_matches(name, _CONFIGS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run `bcosvit models` to list them"
        raise ConfigError(f"unknown model name {name!r}{hint}")
    valid = set(ViTConfig.option_names()) - {"bcos"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(f"unknown model option(s) {unknown}; valid options are {sorted(valid)}")
    config = ViTConfig(**{**_CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None}})
    config.validate()
    return config


def build_model(name: str, num_classes: int | None = None, **overrides) -> VisionTransformer:
    """The registered model ``name`` with fresh weights (``model_config(name, ...)``).

    Weights are the weights wing's business: ``bcosvit.create_model(name, pretrained=...)`` builds
    through this function and loads them; the registry never reads a file.
    """
    return VisionTransformer(model_config(name, num_classes=num_classes, **overrides))


# --- Published ImageNet architectures (docs/design.md#published-architectures) --------------------
# The twins match the reference's standard ViTs: no bias in the attention projections, biases in
# the stem's convolutions. Images: shorter side resized to 256, centre crop of 224.
_VITC_SMALL_STEM = dict(stem_channels=[24, 48, 96, 192], stem_strides=[2, 2, 2, 2])
_VITC_LARGE_STEM = dict(stem_channels=[64, 128, 128, 256, 256, 512], stem_strides=[2, 2, 1, 2, 1, 2])
_IMAGENET = dict(resize_size=256, twin=dict(attn_bias=False, stem_bias=True))

register("bcos_vit_tiny_patch16_224", embed_dim=192, depth=12, num_heads=3, **_IMAGENET)
register("bcos_vit_small_patch16_224", embed_dim=384, depth=12, num_heads=6, **_IMAGENET)
register("bcos_vit_base_patch16_224", embed_dim=768, depth=12, num_heads=12, **_IMAGENET)
register("bcos_vit_large_patch16_224", embed_dim=1024, depth=14, num_heads=16, **_IMAGENET)
register("bcos_vitc_tiny_224", embed_dim=192, depth=11, num_heads=3, **_VITC_SMALL_STEM, **_IMAGENET)
register(
    "bcos_vitc_small_224",
    embed_dim=384,
    depth=11,
    num_heads=6,
    stem_channels=[48, 96, 192, 384],
    stem_strides=[2, 2, 2, 2],
    **_IMAGENET,
)
register("bcos_vitc_base_224", embed_dim=768, depth=11, num_heads=12, **_VITC_LARGE_STEM, **_IMAGENET)
register("bcos_vitc_large_224", embed_dim=1024, depth=13, num_heads=16, **_VITC_LARGE_STEM, **_IMAGENET)

# --- Small configurations for 28-64 px inputs ---------------------------------------------
_SMALL = dict(num_classes=10)
register(
    "bcos_vit_nano_patch4_28", image_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=2, **_SMALL
)
register(
    "bcos_vit_micro_patch4_28", image_size=28, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4, **_SMALL
)
register(
    "bcos_vit_mini_patch4_28", image_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=6, num_heads=3, **_SMALL
)
register(
    "bcos_vitc_micro_28",
    image_size=28,
    patch_size=4,
    in_chans=1,
    embed_dim=128,
    depth=5,
    num_heads=4,
    stem_channels=[32, 64],
    stem_strides=[2, 2],
    **_SMALL,
)
register(
    "bcos_vit_micro_patch4_32", image_size=32, patch_size=4, in_chans=3, embed_dim=128, depth=6, num_heads=4, **_SMALL
)
register(
    "bcos_vit_mini_patch4_32", image_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=6, num_heads=3, **_SMALL
)
register(
    "bcos_vit_mini_patch8_64", image_size=64, patch_size=8, in_chans=3, embed_dim=192, depth=6, num_heads=3, **_SMALL
)
