"""Teachers: trained standard ViTs that a run B-cosifies (``bcosify_from``, Arya et al., NeurIPS
2024) or aligns its student to (``align_to``, ALOE: Maser et al., CVPR 2026)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ...bcosification import bcosify, remove_biases, set_b
from ...errors import ConfigError
from ...models.registry import BCOS_PREFIX, list_models, twin_name
from ...models.vit import VisionTransformer
from ...weights import load_weights, weights_metadata


def load_teacher(source: str) -> VisionTransformer:
    """The model ``source`` names: a run folder or ``.safetensors`` file, or a registered name with
    shipped weights (``bcosvit.weights.load_weights``); in eval mode."""
    try:
        return load_weights(source)
    except ConfigError as exc:
        raise ConfigError(f"teacher: {exc}") from None


def bcos_twin_name(source: str) -> str:
    """The registered B-cos name of the teacher ``source``'s family (``vitc_micro_28`` ->
    ``bcos_vitc_micro_28``): the ``model`` a run B-cosifying or aligning to it records."""
    name = source
    if Path(source).exists():
        name = str(weights_metadata(source).get("model_name", ""))
    twin = name if name.startswith(BCOS_PREFIX) else twin_name(name)
    if twin not in list_models():
        raise ConfigError(
            f"teacher {source!r} (model {name!r}) has no registered B-cos twin; name the model with --model"
        )
    return twin


def bcosified_teacher(source: str, num_classes: int, b: float = 1.0) -> VisionTransformer:
    """``bcosify`` of the teacher ``source`` at exponent ``b``, with its biases: the start of a
    B-cosification run (``b = 1``: the teacher's logits exactly). ``num_classes``: the dataset's."""
    teacher = load_teacher(source)
    if teacher.num_classes != num_classes:
        raise ConfigError(
            f"teacher {source!r} has {teacher.num_classes} classes but the dataset {num_classes}; "
            "B-cosify a teacher trained on this dataset"
        )
    model = bcosify(teacher).train()
    set_b(model, b)
    return model


def bcos_student(source: str, num_classes: int) -> VisionTransformer:
    """The teacher ``source`` B-cosified as the published students start: B = 2, every bias dropped
    (``remove_biases``), unnormalised weights, detachable GELU (Arya et al.'s released ViT configs;
    ALOE's student initialisation)."""
    return remove_biases(bcosified_teacher(source, num_classes, b=2.0))


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode without gradients (a teacher)."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
