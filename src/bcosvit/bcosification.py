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
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .layers import BcosConv2d, BcosLinear
from .models.vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer, ViTConfig


def bcosify(model: nn.Module) -> VisionTransformer:
    """A B-cos ``VisionTransformer`` computing ``model``'s logits (``b = 1``, biases kept).

    Args:
        model: a bcosvit standard twin, or a timm ``VisionTransformer`` (converted with
            ``from_timm``, which reads its input normalisation from ``model.pretrained_cfg``).

    Returns:
        the converted model, on ``model``'s device and dtype, in ``model``'s training mode.
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
        act="gelu",
        input_mean=None,
        input_std=None,
        attn_bias=None,
        stem_bias=None,
        class_names=None if standard.config.class_names is None else list(standard.config.class_names),
    )
    converted = _built_like(config, standard)
    converted.load_state_dict(_bcos_state(standard, converted))
    return converted


def _built_like(config: ViTConfig, like: nn.Module) -> VisionTransformer:
    """A new model of ``config`` on ``like``'s device and dtype, in ``like``'s training mode."""
    param = next(like.parameters())
    return VisionTransformer(config).to(device=param.device, dtype=param.dtype).train(like.training)


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
    encode = model.encode
    return encode.mean.flatten().double(), encode.std.flatten().double()


def set_b(model: VisionTransformer, b: float) -> None:
    """Set the alignment exponent ``b >= 1`` of every B-cos layer of ``model`` (and its config)."""
    if not b >= 1:
        raise ConfigError(f"the B-cos exponent b must be >= 1, got {b}")
    for module in model.modules():
        if isinstance(module, BcosLinear | BcosConv2d):
            module.b = float(b)
    model.config.b = float(b)


@torch.no_grad()
def scale_biases(model: VisionTransformer, factor: float) -> None:
    """Multiply every bias of a B-cosified model by ``factor`` in place (B-cos layers, LayerNorms,
    the attention's query/key/value)."""
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.mul_(factor)


def remove_biases(model: VisionTransformer) -> VisionTransformer:
    """``model`` as a bias-free B-cos model (``config.bias = False``): the same weights, the biases
    dropped. After fine-tuning has taken them to 0 this is the same function, and explanations of
    the result are complete (``logit = w(x)·x + positional + logit_bias``)."""
    if not model.is_bcos:
        raise ConfigError("remove_biases takes a B-cos model (from bcosify)")
    config = dataclasses.replace(model.config, bias=False)
    bias_free = _built_like(config, model)
    kept = {k: v for k, v in model.state_dict().items() if k in bias_free.state_dict()}
    bias_free.load_state_dict(kept)
    return bias_free


# --- timm -------------------------------------------------------------------------------------


def from_timm(model: nn.Module) -> VisionTransformer:
    """The bcosvit standard twin computing the same logits as a timm ``VisionTransformer``.

    Supported: a class token with token or mean pooling, or mean pooling without one; learned
    absolute positions; GELU MLPs; LayerNorms of any epsilon; query/key/value with or without bias.
    ``ConfigError`` names the feature of ``model`` that has no counterpart here (register tokens,
    LayerScale, query/key norms, a pre-norm, pooling other than token or average).
    """
    _check_timm_supported(model)
    block = model.blocks[0]
    dim = model.embed_dim
    patch = model.patch_embed
    mean, std = _timm_normalisation(model)
    pool = model.global_pool
    config = ViTConfig(
        bcos=False,
        image_size=int(patch.img_size[0]),
        patch_size=int(patch.patch_size[0]),
        in_chans=int(patch.proj.in_channels),
        num_classes=int(model.head.out_features),
        embed_dim=dim,
        depth=len(model.blocks),
        num_heads=int(block.attn.num_heads),
        mlp_ratio=block.mlp.fc1.out_features / dim,
        pos_embed="learned" if model.pos_embed is not None else "none",
        input_mean=list(mean),
        input_std=list(std),
        attn_bias=block.attn.qkv.bias is not None,
        norm_eps=float(block.norm1.eps),
        class_token=model.cls_token is not None,
        global_pool="token" if pool == "token" else "avg",
    )
    twin = _built_like(config, model)
    twin.load_state_dict(_timm_state(model, twin))
    check_same_function(twin, model, mean, std)
    return twin


# The largest relative difference of the logits that from_timm accepts between the converted model
# and timm's on its probe batch, in float64 (a faithful conversion differs by rounding: ~1e-15).
PROBE_TOLERANCE = 1e-6


@torch.no_grad()
def check_same_function(
    twin: VisionTransformer, model: nn.Module, mean: Sequence[float], std: Sequence[float], images: int = 2
) -> float:
    """Raise ``ConfigError`` unless ``twin`` computes the timm ``model``'s logits: both in float64
    (copies) on a seeded probe batch of ``images`` random images in [0, 1], timm's normalised with
    ``mean``/``std`` as its ``pretrained_cfg`` says; their largest difference relative to the
    logits' largest magnitude must stay below ``PROBE_TOLERANCE``. Returns that difference.

    This catches what the feature checks cannot: a timm feature bcosvit does not know of, left
    out silently (timm's RoPE models were once converted with a relative logit error of 1.8)."""
    size = twin.image_size
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(images, twin.in_chans, size, size, generator=generator, dtype=torch.float64)
    shape = (1, -1, 1, 1)
    normalised = (probe - torch.tensor(mean, dtype=torch.float64).view(shape)) / torch.tensor(
        std, dtype=torch.float64
    ).view(shape)
    ours = copy.deepcopy(twin).double().eval()(probe)
    theirs = copy.deepcopy(model).double().eval()(normalised)
    difference = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))
    if not difference < PROBE_TOLERANCE:
        raise ConfigError(
            f"the converted {type(model).__name__} does not compute the timm model's logits: on a probe batch "
            f"their relative difference is {difference:.2e}, above the tolerance {PROBE_TOLERANCE:g}; the model "
            "has a feature bcosvit does not convert (please report it with the timm model's name)"
        )
    return difference


def _check_timm_supported(model: nn.Module) -> None:
    needed = ("blocks", "patch_embed", "cls_token", "pos_embed", "global_pool", "head", "norm", "fc_norm")
    missing = [name for name in needed if not hasattr(model, name)]
    if missing:
        raise ConfigError(
            f"expected a bcosvit standard twin or a timm VisionTransformer, got {type(model).__name__} (no {missing})"
        )
    timm_class = _timm_vision_transformer()
    if timm_class is not None and type(model) is not timm_class:
        # subclasses (the distilled DeiT, EVA's relatives) and other classes with the same attribute
        # names compute something else: only timm's VisionTransformer itself is read
        raise ConfigError(
            f"bcosvit converts timm's VisionTransformer; this is {type(model).__module__}.{type(model).__name__}"
            + (" (a distillation token)" if getattr(model, "dist_token", None) is not None else "")
        )
    problems = []
    if isinstance(model.head, nn.Identity):
        problems.append("no classifier head (num_classes=0: a headless backbone)")
    if getattr(model, "num_reg_tokens", 0):
        problems.append("register tokens")
    if not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity):
        problems.append("a pre-norm (norm_pre)")
    if model.global_pool not in ("token", "avg"):
        problems.append(f"global_pool={model.global_pool!r} (token or avg are supported)")
    if model.global_pool == "avg" and not isinstance(model.norm, nn.Identity):
        problems.append("mean pooling after a per-token norm (fc_norm=False)")
    if getattr(model, "dynamic_img_size", False):
        problems.append("dynamic_img_size")
    if getattr(model, "no_embed_class", False) and model.cls_token is not None:
        problems.append("no_embed_class")
    if not isinstance(getattr(model, "head_drop", nn.Identity()), nn.Identity | nn.Dropout):
        problems.append("a head dropout module of another kind")
    if getattr(model, "attn_pool", None) is not None:
        problems.append("attention pooling (attn_pool)")
    for k, block in enumerate(model.blocks):
        if not isinstance(getattr(block, "ls1", nn.Identity()), nn.Identity):
            problems.append(f"LayerScale (block {k})")
        if not isinstance(getattr(block.attn, "q_norm", nn.Identity()), nn.Identity):
            problems.append(f"query/key norms (block {k})")
        act = getattr(block.mlp, "act", None)
        if not isinstance(act, nn.GELU) or act.approximate != "none":
            problems.append(f"MLP activation {type(act).__name__} (block {k}; exact GELU is supported)")
        if not isinstance(getattr(block.attn, "norm", nn.Identity()), nn.Identity):
            problems.append(f"an attention norm (block {k})")
        if not isinstance(getattr(block.mlp, "norm", nn.Identity()), nn.Identity):
            problems.append(f"an MLP norm (block {k})")
        if not isinstance(block.norm1, nn.LayerNorm) or not isinstance(block.norm2, nn.LayerNorm):
            problems.append(f"norms other than LayerNorm (block {k})")
    if problems:
        raise ConfigError(f"this timm ViT has {', '.join(sorted(set(problems)))}, which bcosvit models do not")


def _timm_vision_transformer() -> type | None:
    """timm's ``VisionTransformer`` class, or None when timm is not installed."""
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
    except ImportError:
        return None
    return TimmVisionTransformer


def _timm_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels = int(model.patch_embed.proj.in_channels)
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(
            f"the timm model's pretrained_cfg gives mean {mean} and std {std} for {channels} input channels"
        )
    return mean, std


def _timm_state(model: nn.Module, twin: VisionTransformer) -> dict[str, Tensor]:
    """``twin``'s state dict holding the timm model's weights."""
    source = model.state_dict()
    state = dict(twin.state_dict())  # the input normalisation buffers come from the twin's config
    conv = source["patch_embed.proj.weight"]  # (D, C, p, p) -> (D, p·p·C) in (p1 p2 c) order
    state["tokenizer.proj.weight"] = conv.permute(0, 2, 3, 1).flatten(1)
    state["tokenizer.proj.bias"] = source.get("patch_embed.proj.bias", torch.zeros(conv.shape[0]))
    prefix = twin.num_prefix_tokens
    if "pos_embed" in source:
        positions = source["pos_embed"][0]  # (prefix + L, D); the class token's row is its own
        state["pos_embed.weight"] = positions[prefix:]
        if prefix:
            state["cls_token"] = source["cls_token"] + positions[:prefix]
    elif prefix:
        state["cls_token"] = source["cls_token"]
    final_norm = "fc_norm" if twin.global_pool == "avg" else "norm"
    renames = {f"{final_norm}.": "norm.", "head.": "head."}
    for key, value in source.items():
        if key.startswith("blocks."):
            state[key] = value
        for old, new in renames.items():
            if key.startswith(old):
                state[new + key[len(old) :]] = value
    missing = sorted(k for k in twin.state_dict() if k not in state)
    if missing:
        raise ConfigError(f"the timm model lacks {missing[:5]}; it is not a supported VisionTransformer")
    return {k: v.to(twin.state_dict()[k].dtype) for k, v in state.items() if k in twin.state_dict()}


__all__ = ["bcosify", "from_timm", "remove_biases", "scale_biases", "set_b"]
