"""Models with weights: ``create_model`` (a registered configuration, with shipped or published
weights) and ``load_weights`` (a run folder, a weights file or a registered name).

The model registry (``bcosvit.models``) builds models from configurations and never reads a file;
this module sits above it, as timm's ``build_model_with_cfg`` sits above timm's registry.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models.registry import build_model, model_config
from ..models.vit import VisionTransformer
from .checkpoint import load_model, read_metadata, trained_config
from .hub import convert_published, published_location
from .published import IMAGENET, PUBLISHED, published
from .shipped import SHIPPED, list_pretrained, load_shipped, shipped_path

PRETRAINED_CHOICES = (SHIPPED, IMAGENET)


def create_model(
    name: str,
    pretrained: bool | str = False,
    num_classes: int | None = None,
    *,
    weights: str | Path | None = None,
    progress: bool = True,
    **overrides,
) -> VisionTransformer:
    """Build the registered model ``name``.

    Args:
        name: a registered name (``bcosvit.list_models()``).
        pretrained: False for random weights; True or ``"shipped"`` for the weights shipped inside
            the package (offline, ``list_pretrained()``); ``"imagenet"`` for the published B-cos-v2
            ImageNet weights (downloaded, verified and converted once, then loaded from torch.hub's
            cache; ``bcosvit.weights.hub``). The architecture and classes come from the weights, and only
            the input size may be overridden.
        num_classes: number of classes (default: the configuration's, or the weights'; with
            pretrained weights, a different number replaces the head with a new one).
        weights: with ``pretrained="imagenet"``, a published ``.pth`` file you already have.
        progress: with ``pretrained="imagenet"``, show a progress bar while downloading.
        **overrides: any ``ViTConfig`` field, e.g. ``image_size=32, in_chans=1, pos_embed="rope"``.
    """
    kind = pretrained_kind(pretrained)
    if weights is not None and kind != IMAGENET:
        raise ConfigError(f"weights= is the published file of pretrained='imagenet'; got pretrained={pretrained!r}")
    if kind is None:
        return build_model(name, num_classes=num_classes, **overrides)
    model_config(name)  # unknown names fail with a suggestion
    if kind == IMAGENET:
        published(name)  # names without published weights fail with the list of those that have them
        trained_config(model_config(name).to_dict(), overrides)  # a bad override fails before any download
        model = _with_input_size(convert_published(name, weights, progress), overrides)
    else:
        _suggest_imagenet(name)
        model = load_shipped(name, **overrides)
    return _with_classes(model, num_classes)


def pretrained_kind(pretrained: bool | str | None) -> str | None:
    """``None`` (random weights), ``"shipped"`` or ``"imagenet"``; ``ConfigError`` for anything else."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        return SHIPPED
    if isinstance(pretrained, str) and pretrained.lower() in PRETRAINED_CHOICES:
        return pretrained.lower()
    raise ConfigError(
        f"pretrained must be False, True or 'shipped' (the weights inside the package) or 'imagenet' (the "
        f"published B-cos-v2 weights, downloaded once); got {pretrained!r}"
    )


def _suggest_imagenet(name: str) -> None:
    """``ConfigError`` pointing to ``pretrained="imagenet"`` when ``name`` ships no weights but has published ones."""
    if name in PUBLISHED and name not in list_pretrained():
        raise ConfigError(
            f"no weights for {name!r} ship inside the package; its published ImageNet weights load with "
            f"pretrained='imagenet' (command line: --pretrained imagenet), downloaded once from {PUBLISHED[name].url}"
        )


def _with_input_size(model: VisionTransformer, overrides: dict[str, Any]) -> VisionTransformer:
    """``model`` for the input size in ``overrides`` (``trained_config``'s rule: nothing else may
    change); the weights do not depend on the input size."""
    config = trained_config(model.config.to_dict(), overrides)
    if config.image_size == model.config.image_size:
        return model
    resized = VisionTransformer(config)
    resized.load_state_dict(model.state_dict())
    return resized.eval()


def _with_classes(model: VisionTransformer, num_classes: int | None) -> VisionTransformer:
    """``model`` with a new head for ``num_classes`` classes when that differs from its own (fine-tuning)."""
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


# --- a model named by the user: a run folder, a weights file or a registered name --------------------------


def resolve_source(source: str | Path) -> Path | str:
    """The weights file or registered name that ``source`` means: an existing path (a run folder or a
    ``.safetensors`` file) as a ``Path``, else a registered name with shipped weights as that name;
    ``ConfigError`` naming both choices otherwise."""
    if Path(source).exists():
        return Path(source)
    if str(source) in list_pretrained():
        return str(source)
    raise ConfigError(
        f"{str(source)!r} is neither a run folder nor a model with shipped weights "
        f"({', '.join(list_pretrained()) or 'none in this install'}); pass the folder of a `bcosvit train` run "
        "(or its .safetensors file) or one of those names"
    )


def load_weights(source: str | Path) -> VisionTransformer:
    """The trained model ``source`` names (``resolve_source``): a run folder or ``.safetensors``
    file (``load_model``), or a registered name with shipped weights; in eval mode."""
    resolved = resolve_source(source)
    model = load_model(resolved) if isinstance(resolved, Path) else create_model(resolved, pretrained=SHIPPED)
    return model.eval()


def weights_metadata(source: str | Path) -> dict[str, Any]:
    """The checked ``model.json`` of the trained model ``source`` names (``resolve_source``)."""
    resolved = resolve_source(source)
    return read_metadata(resolved if isinstance(resolved, Path) else shipped_path(resolved))


# --- what can be loaded ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainedWeights:
    """A model with weights to load, and where they are.

    Attributes:
        name: the model name.
        weights: ``"shipped"`` (inside the package) or ``"imagenet"`` (published); pass it as
            ``create_model(name, pretrained=weights)``.
        status: ``"shipped"``, ``"cached"`` (on this machine: converted, or the published file in
            torch.hub's cache or ``$BCOSVIT_WEIGHTS_DIR``) or ``"downloadable"``.
        location: the file that would be read (the URL for ``"downloadable"``).
        top1, top5: the published ImageNet accuracy (%); None for shipped weights.
    """

    name: str
    weights: str
    status: str
    location: str
    top1: float | None = None
    top5: float | None = None


def list_pretrained_weights(pattern: str = "*") -> list[PretrainedWeights]:
    """Every model whose name matches ``pattern`` with weights, shipped or published, and whether
    they are on this machine (``published_location``: files checked as loading would, so a damaged
    file with a published name is not listed as cached)."""
    records = [PretrainedWeights(name, SHIPPED, SHIPPED, str(shipped_path(name))) for name in list_pretrained()]
    for entry in PUBLISHED.values():
        found = published_location(entry)
        status, location = ("cached", str(found)) if found else ("downloadable", entry.url)
        records.append(PretrainedWeights(entry.name, IMAGENET, status, location, entry.top1, entry.top5))
    return [record for record in records if fnmatch.fnmatch(record.name, pattern)]
