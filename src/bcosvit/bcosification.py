"""B-cosification: a B-cos ViT that starts as a trained standard ViT's function (Arya et al., NeurIPS 2024).

``bcosify(model)`` turns a standard ViT (a bcosvit standard twin, or timm's ``VisionTransformer``
through ``from_timm``) into a bcosvit B-cos ``VisionTransformer`` computing the same logits. Nothing
here is a second model definition: the converted model is the ordinary ViT with a configuration of
its B-cos layers (docs/design.md#b-cosification):

- ``b = 1``: a B-cos layer is then a plain linear map;
- ``weight_norm = False``: layers keep their trained weights' norms (the authors' ``BcosifyLinear``);
- ``bias = True``: every layer keeps its bias (linear, convolution, LayerNorm, query/key/value);
- ``act = "gelu"``: the GELU stays, its gate detached in explanation mode (their ``MyGELU``);
- the input: the standard model normalises ``z = (x - μ) / σ``; the B-cos model reads ``[x, 1 - x]``.
  A first-layer weight ``W`` on ``z`` becomes ``[W (1 - μ) / σ, -W μ / σ]`` on ``[x, 1 - x]``,
  since ``a x + b (1 - x) = (a - b) x + b``: the normalisation, affine in ``x``, is linear in the
  encoded input, with no bias and no normalisation layer. (The authors normalise the six channels
  and split ``W`` into ``[W/2, -W/2]``; at ``b = 1`` both compute the standard model's function.)
- the logit bias ``log(1/(C-1))`` of every B-cos model is compensated in the head's bias.

Fine-tuning then raises B to 2 (``set_b``) and takes the biases to 0 (``scale_biases``,
``remove_biases``); the result is a bias-free B-cos model, dynamic linear and explained exactly.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .layers import BcosConv2d, BcosLayerNorm, BcosLayerNorm2d, BcosLinear
from .models.vit import VisionTransformer, built_like
from .timm_conversion import PROBE_TOLERANCE, check_same_function, check_same_outputs, from_timm


def bcosify(model: nn.Module) -> VisionTransformer:
    """A B-cos ``VisionTransformer`` computing ``model``'s logits (``b = 1``, biases kept).

    Args:
        model: a bcosvit standard twin, or a timm ``VisionTransformer`` (converted with
            ``from_timm``, which reads its input normalisation from ``model.pretrained_cfg``).

    Returns:
        the converted model, on ``model``'s device and dtype, in ``model``'s training mode.

    Raises ``ConfigError`` when ``model`` has a part without a counterpart, or when the converted
    model's outputs differ from ``model``'s on a seeded float64 probe batch by more than
    ``PROBE_TOLERANCE`` (relative).
    """
    standard = model if isinstance(model, VisionTransformer) else from_timm(model)
    if standard.is_bcos:
        raise ConfigError("the model is already a B-cos model; bcosify takes a standard ViT")
    config = dataclasses.replace(
        standard.config,
        bcos=True,
        b=1.0,
        bias=True,
        weight_norm=False,
        act=standard.config.act or "gelu",
        input_mean=None,
        input_std=None,
        attn_bias=None,
        qkv_bias=None,
        stem_bias=None,
        class_names=None if standard.config.class_names is None else list(standard.config.class_names),
    )
    converted = built_like(config, standard)
    converted.load_state_dict(_bcos_state(standard, converted))
    reference = copy.deepcopy(standard).double().eval()
    check_same_outputs(converted, reference, "standard model")
    return converted


def _bcos_state(standard: VisionTransformer, converted: VisionTransformer) -> dict[str, Tensor]:
    """``converted``'s state dict holding ``standard``'s weights (missing biases are 0)."""
    source = standard.state_dict()
    state = {}
    for key, value in converted.state_dict().items():
        if key in source:
            state[key] = source[key].to(value.dtype)
        elif key.endswith(".bias"):
            state[key] = torch.zeros_like(value)  # a layer the standard model keeps bias-free
        else:
            raise ConfigError(f"the standard model has no {key!r}; it is not the converted model's twin")
    first, fold = _first_layer(converted)
    mean, std = _normalisation(standard)
    state[f"{first}.weight"] = fold(source[f"{first}.weight"], mean.to(source[f"{first}.weight"]), std.to(mean))
    if converted.num_classes:
        state["head.bias"] = state["head.bias"] - converted.logit_bias_value
    return state


def _first_layer(model: VisionTransformer) -> tuple[str, object]:
    """The name of the layer that reads the encoded input, and how its weight folds the normalisation."""
    if hasattr(model.tokenizer, "proj"):
        return "tokenizer.proj", _fold_patch_weight
    return "tokenizer.stages.0", _fold_conv_weight


def _fold_pair(weight: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """``W`` on ``(x - μ)/σ`` -> the weights ``(a, b)`` on ``x`` and ``1 - x`` (channels on the last axis)."""
    return weight * (1 - mean) / std, -weight * mean / std


def _fold_patch_weight(weight: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(D, p·p·C)`` patch weights ``(p1 p2 c)`` -> ``(D, p·p·2C)`` on ``[x, 1 - x]``."""
    channels = mean.numel()
    per_pixel = weight.unflatten(1, (-1, channels))  # (D, p*p, C)
    a, b = _fold_pair(per_pixel, mean, std)
    return torch.cat([a, b], dim=-1).flatten(1)


def _fold_conv_weight(weight: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(O, C, k, k)`` kernels -> ``(O, 2C, k, k)`` on ``[x, 1 - x]`` (zero padding stays exact:
    a padded standard input ``z = 0`` and a padded encoded input both contribute nothing)."""
    a, b = _fold_pair(weight.movedim(1, -1), mean, std)
    return torch.cat([a, b], dim=-1).movedim(-1, 1)


def _normalisation(model: VisionTransformer) -> tuple[Tensor, Tensor]:
    """The standard model's per-channel input mean and std, ``(C,)`` each, in float64."""
    mean, std = model.encode.constants(torch.float64)
    return mean.flatten(), std.flatten()


def set_b(model: VisionTransformer, b: float) -> None:
    """Set the alignment exponent ``b >= 1`` of every B-cos layer of ``model`` (and its config)."""
    if not b >= 1:
        raise ConfigError(f"the B-cos exponent b must be >= 1, got {b}")
    for module in model.modules():
        if isinstance(module, BcosLinear | BcosConv2d):
            module.b = float(b)
    model.config.b = float(b)


NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, BcosLayerNorm, BcosLayerNorm2d)  # LayerNorm2d is a GroupNorm


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is one of the norms (``NORM_TYPES``) whose bias ``scale_biases`` may scale apart."""
    return isinstance(module, NORM_TYPES)


@torch.no_grad()
def scale_biases(model: VisionTransformer, factor: float, norm_factor: float | None = None) -> None:
    """Multiply every bias of a B-cosified model by ``factor`` in place (B-cos layers, LayerNorms,
    the attention's query/key/value, the head); with ``norm_factor``, the norms' biases (``is_norm``:
    the LayerNorms, query/key norms included) by that instead."""
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            bias.mul_(norm_factor if norm_factor is not None and is_norm(module) else factor)


def remove_biases(model: VisionTransformer) -> VisionTransformer:
    """``model`` as a bias-free B-cos model (``config.bias = False``): the same weights, the biases
    dropped. After fine-tuning has taken them to 0 this is the same function, and explanations of
    the result are complete (``logit = w(x)·x + positional + logit_bias``)."""
    if not model.is_bcos:
        raise ConfigError("remove_biases takes a B-cos model (from bcosify)")
    config = dataclasses.replace(model.config, bias=False)
    bias_free = built_like(config, model)
    kept = {k: v for k, v in model.state_dict().items() if k in bias_free.state_dict()}
    bias_free.load_state_dict(kept)
    return bias_free


__all__ = ["PROBE_TOLERANCE", "bcosify", "check_same_function", "from_timm", "remove_biases", "scale_biases", "set_b"]
