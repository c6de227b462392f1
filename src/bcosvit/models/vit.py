"""One Vision Transformer definition for B-cos models and their standard twins.

    images [0, 1] -> encode -> tokenise -> (+ position) -> blocks -> mean over tokens -> norm -> head

Options cover the timm ViTs that people start from (``bcosvit.bcosify``): a class token and register
tokens before the patch tokens, LayerScale, a pre-norm, query/key norms, GELU / QuickGELU / SiLU, the
final norm on the tokens or the pooled features, token / mean / attention (MAP) pooling, and a
headless backbone (``num_classes = 0``: the pooled features are the output).

The layer set (``bcosvit.layers.sets``) decides which family is built: B-cos layers give a model
that is dynamic linear end to end (``logit = w(x)·x + positional + logit_bias``); the standard set
gives the ordinary ViT with the same shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, InputError
from ..layers import (
    GATED_ACTIVATIONS,
    AddInverse,
    AdditivePositionalEmbedding,
    Attention,
    AttentionPool,
    DistancePenalty,
    GatedLinearUnit,
    LayerScale,
    LayerSet,
    LearnedPositionalEmbedding,
    LogitBias,
    Normalize,
    Rotary2d,
    SinCosPositionalEmbedding,
    TimmRotary2d,
    bcos_layer_set,
    standard_layer_set,
)
from ..layers.position import Grid
from ..validation import is_int, is_number

POS_EMBED_SCHEMES = ("sincos", "learned", "rope", "none")
GLOBAL_POOLS = ("avg", "token", "map")
FINAL_NORMS = ("pooled", "tokens")
ACTIVATIONS = {True: ("identity", *GATED_ACTIVATIONS), False: GATED_ACTIVATIONS}  # by family (bcos)
MAX_REG_TOKENS = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The largest architecture any config may ask for, checked before anything is built: values
# (parameters and buffers; 8 GiB in float32, ViT-g has 1.0e9) and blocks.
MAX_MODEL_VALUES = 2**31
MAX_DEPTH = 1024


@dataclass
class ViTConfig:
    """Everything that defines a model's architecture (stored with every checkpoint)."""

    bcos: bool = True
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000  # 0: a headless backbone, whose output is the pooled features
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    pos_embed: str = "sincos"
    attn_distance_penalty: float = 0.0  # > 0: attention scores minus this × token distance
    stem_channels: list[int] | None = None  # None: patch embedding; else the conv stem's widths
    stem_strides: list[int] | None = None
    b: float = 2.0
    max_out: int = 1
    input_mean: list[float] | None = None  # standard twin only; None: ImageNet for RGB, else 0.5
    input_std: list[float] | None = None
    attn_bias: bool | None = None  # standard twin only; None: True (timm's layout); B-cos layers have no bias
    qkv_bias: bool | None = None  # standard twin only: the query/key/value bias; None: as attn_bias
    stem_bias: bool | None = None  # standard twin only; None: False
    norm_eps: float = 1e-5  # every LayerNorm's epsilon (timm's ViTs: 1e-6)
    class_token: bool = False  # prepend a learned class token (timm's ViTs); positions then exclude it
    global_pool: str = "avg"  # "avg": mean over the patch tokens; "token": the class token; "map": attention pool
    reg_tokens: int = 0  # learned register tokens after the class token (Darcet et al., ICLR 2024)
    layer_scale: bool = False  # a learned per-channel scale on each residual branch (DINOv2, DeiT-III)
    pre_norm: bool = False  # a norm on the embedded tokens before the first block (CLIP)
    qk_norm: bool = False  # LayerNorms over each head's queries and keys
    final_norm: str = "pooled"  # the last norm on the "pooled" features, or on every token before pooling
    mlp_gate: str | None = None  # a gated MLP (SwiGLU: "silu"): the gate's activation; None: a plain MLP
    mlp_norm: bool = False  # a norm over the MLP's hidden units (EVA's scale_mlp)
    rotary: dict | None = None  # timm's Eva rotary embedding (layers.TimmRotary2d settings), on patch tokens
    # B-cosified models (bcosvit.bcosify, Arya et al. 2024), B-cos family only:
    bias: bool = False  # every layer keeps a bias (the conversion step; decayed to 0 by fine-tuning)
    weight_norm: bool = True  # False: B-cos layers keep their weights' norms
    act: str | None = None  # None: the family's (B-cos: none, standard: GELU); "gelu": for B-cos, detachable
    # Evaluation preprocessing: the shorter side is resized to resize_size, then the centre
    # image_size × image_size crop is taken (ImageNet: 256 -> 224). None: resized to image_size.
    resize_size: int | None = None
    class_names: list[str] | None = field(default=None, compare=False)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        """A validated config from stored values (a checkpoint's ``architecture``); ``ConfigError``
        names an unknown key or the first invalid value. Missing keys take their defaults."""
        if not isinstance(data, dict):
            raise ConfigError(f"an architecture must be a mapping of option names to values, got {data!r:.60}")
        unknown = sorted(set(data) - set(cls.option_names()), key=str)
        if unknown:
            raise ConfigError(f"unknown architecture option(s) {unknown}; valid options are {cls.option_names()}")
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid value (types first, then ranges)."""
        self._validate_types()
        if self.num_classes == 1:
            raise ConfigError("num_classes must be at least 2, or 0 for a headless backbone, got 1")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.b < 1:
            raise ConfigError(f"the B-cos exponent b must be >= 1, got {self.b}")
        if self.pos_embed not in POS_EMBED_SCHEMES:
            raise ConfigError(f"pos_embed must be one of {POS_EMBED_SCHEMES}, got {self.pos_embed!r}")
        penalty = self.attn_distance_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 <= penalty < float("inf"):
            raise ConfigError(f"attn_distance_penalty must be a finite number >= 0, got {penalty!r}")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            raise ConfigError(f"pos_embed='sincos' needs embed_dim divisible by 4, got {self.embed_dim}")
        if self.pos_embed == "rope" and (self.embed_dim // self.num_heads) % 4:
            raise ConfigError(
                f"pos_embed='rope' needs a head dimension divisible by 4, got {self.embed_dim // self.num_heads}"
            )
        if self.stem_channels is not None:
            strides = self.stem_strides or [2] * len(self.stem_channels)
            if len(strides) != len(self.stem_channels):
                raise ConfigError(
                    f"stem_strides needs one stride per stem layer ({len(self.stem_channels)}), got {len(strides)}"
                )
            reduction = 1
            for s in strides:
                reduction *= s
            if reduction != self.patch_size:
                raise ConfigError(
                    f"the conv stem reduces the image by {reduction}, but patch_size is {self.patch_size}"
                )
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if not is_number(self.norm_eps) or self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be a positive number, got {self.norm_eps!r:.60}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r:.60}")
        if self.global_pool == "token" and not self.class_token:
            raise ConfigError("global_pool='token' needs class_token=true")
        if not is_int(self.reg_tokens) or not 0 <= self.reg_tokens <= MAX_REG_TOKENS:
            raise ConfigError(f"reg_tokens must be an integer in [0, {MAX_REG_TOKENS}], got {self.reg_tokens!r:.60}")
        if (self.class_token or self.reg_tokens) and (self.pos_embed == "rope" or self.attn_distance_penalty > 0):
            raise ConfigError(
                "class and register tokens have no grid position: use pos_embed 'sincos', 'learned' or 'none' "
                "and no attn_distance_penalty"
            )
        if self.mlp_gate is not None and self.mlp_gate not in GATED_ACTIVATIONS:
            raise ConfigError(f"mlp_gate must be null or one of {GATED_ACTIVATIONS}, got {self.mlp_gate!r:.60}")
        self._validate_rotary()
        if self.final_norm not in FINAL_NORMS:
            raise ConfigError(f"final_norm must be one of {FINAL_NORMS}, got {self.final_norm!r:.60}")
        if self.act not in (None, *ACTIVATIONS[self.bcos]):
            family = ACTIVATIONS[self.bcos]
            raise ConfigError(f"act must be null or one of {family} for this family, got {self.act!r:.60}")
        if self.resize_size is not None and (not is_int(self.resize_size) or self.resize_size < self.image_size):
            raise ConfigError(
                f"resize_size must be null or an integer >= image_size {self.image_size}, got {self.resize_size!r:.60}"
            )
        for name in ("input_mean", "input_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.in_chans:
                raise ConfigError(f"{name} needs {self.in_chans} values (one per channel), got {len(value)}")
        if self.input_std is not None and min(self.input_std) <= 0:
            raise ConfigError(f"input_std must be positive, got {self.input_std}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(f"class_names needs one name per class ({self.num_classes}), got {len(self.class_names)}")
        self._validate_size()

    def _validate_rotary(self) -> None:
        if self.rotary is None:
            return
        if not isinstance(self.rotary, dict):
            raise ConfigError(f"rotary must be null or a mapping of TimmRotary2d settings, got {self.rotary!r:.60}")
        if self.pos_embed == "rope":
            raise ConfigError("rotary (timm's rotary embedding) and pos_embed='rope' (bcosvit's) exclude each other")
        if {"head_dim", "num_prefix_tokens"} & set(self.rotary):
            raise ConfigError("rotary must not set head_dim or num_prefix_tokens: they follow the architecture")
        try:
            TimmRotary2d(self.embed_dim // self.num_heads, num_prefix_tokens=0, **self.rotary)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"rotary: {exc}") from None

    def value_count(self) -> int:
        """An upper estimate of the values (parameters and buffers) the model holds, from the
        config alone: the blocks' projections, the patch embedding or stem, positions and head."""
        width, hidden, units = self.embed_dim, int(self.embed_dim * self.mlp_ratio), self.max_out
        tokens = (self.image_size // self.patch_size) ** 2 + 1 + self.reg_tokens
        mlp = (3 if self.mlp_gate else 2) * width * hidden
        blocks = (self.depth + 1) * (units * (4 * width * width + mlp) + 8 * width)  # + a MAP head
        channels = [2 * self.in_chans, *(self.stem_channels or [])]
        stem = sum(a * b * 9 * units for a, b in zip(channels, channels[1:]))
        embed = units * width * (channels[-1] * (1 if self.stem_channels else self.patch_size**2))
        return blocks + stem + embed + 2 * tokens * width + units * width * self.num_classes + 4 * width

    def _validate_size(self) -> None:
        """Raise ``ConfigError`` for an architecture beyond ``MAX_DEPTH`` blocks or ``MAX_MODEL_VALUES``
        values, before anything is allocated (a crafted head of 10^8 classes asked for 77 GB)."""
        if self.depth > MAX_DEPTH:
            raise ConfigError(f"depth {self.depth} is more than the {MAX_DEPTH} blocks a bcosvit model may have")
        values = self.value_count()
        if values > MAX_MODEL_VALUES:
            raise ConfigError(
                f"this architecture needs about {values:,} values ({values * 4 / 2**30:,.0f} GiB in float32), more "
                f"than the {MAX_MODEL_VALUES:,} a bcosvit model may have (embed_dim {self.embed_dim}, depth "
                f"{self.depth}, num_classes {self.num_classes}, image_size {self.image_size}); choose a smaller one"
            )

    def _validate_types(self) -> None:
        """Raise ``ConfigError`` naming the first field whose value has the wrong type."""
        for name in ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r:.60}")
        if not is_int(self.max_out) or self.max_out < 1:
            raise ConfigError(f"max_out must be a positive integer, got {self.max_out!r:.60}")
        if not isinstance(self.bcos, bool):
            raise ConfigError(f"bcos must be true or false, got {self.bcos!r:.60}")
        for name in ("class_token", "bias", "weight_norm", "layer_scale", "pre_norm", "qk_norm", "mlp_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r:.60}")
        if not self.bcos and (self.bias or not self.weight_norm):
            raise ConfigError("bias and weight_norm configure B-cos layers; a standard twin has its own biases")
        for name in ("attn_bias", "qkv_bias", "stem_bias"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{name} must be null, true or false, got {value!r:.60}")
            if value and self.bcos:
                raise ConfigError(f"{name}=true is for standard twins; B-cos layers have no bias")
        for name in ("mlp_ratio", "b"):  # attn_distance_penalty: checked with its range below
            if not is_number(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)!r:.60}")
        if not is_int(self.num_classes) or self.num_classes < 0:
            raise ConfigError(f"num_classes must be a non-negative integer, got {self.num_classes!r:.60}")
        if not isinstance(self.pos_embed, str):
            raise ConfigError(f"pos_embed must be one of {POS_EMBED_SCHEMES}, got {self.pos_embed!r:.60}")
        for name, is_item, what in (
            ("stem_channels", _is_positive_int, "positive integers"),
            ("stem_strides", _is_positive_int, "positive integers"),
            ("input_mean", is_number, "finite numbers"),
            ("input_std", is_number, "finite numbers"),
            ("class_names", lambda v: isinstance(v, str), "strings"),
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple)) or not all(map(is_item, value))):
                raise ConfigError(f"{name} must be null or a list of {what}, got {value!r:.60}")


def _is_positive_int(value: object) -> bool:
    return is_int(value) and value >= 1


# Pixel values the models accept. Images are meant to be in [0, 1]; the margin of 1 on either side
# leaves room for what legitimately reaches the model near that range: mixup, RandAugment and
# attribution paths (from a baseline image to the image) stay inside [0, 1], and additive Gaussian
# noise of sigma up to 0.15 crosses the margin with probability ~1e-11 per pixel (6.7 sigma). 8-bit
# values (up to 255) and ImageNet mean/std-normalised images (-2.1 to 2.6) fall outside it unless the
# image is nearly black.
PIXEL_RANGE = (-1.0, 2.0)


def check_images(images: Tensor, channels: int | None = None) -> None:
    """Raise ``InputError`` unless ``images`` is a floating-point ``(N, C, H, W)`` tensor (with
    ``C == channels`` when given): the check of any model's input (``bcosvit.inputs.as_model_input``,
    the metrics), and the first part of ``VisionTransformer.check_input``."""
    if not isinstance(images, Tensor):
        raise InputError(f"expected a torch.Tensor of images, got {type(images).__name__}")
    if images.ndim != 4:
        raise InputError(f"expected images of shape (N, {channels or 'C'}, H, W), got shape {tuple(images.shape)}")
    if channels is not None and images.shape[1] != channels:
        raise InputError(
            f"expected {channels} input channels, got {images.shape[1]} (shape {tuple(images.shape)}); "
            f"convert the images or create the model with in_chans={images.shape[1]}"
        )
    if not images.is_floating_point():
        raise InputError(
            f"expected floating-point images in [0, 1], got dtype {images.dtype}; divide uint8 images by 255"
        )


def check_pixel_values(x: Tensor) -> None:
    """Raise ``InputError`` when the float images ``x`` ``(N, C, H, W)`` hold NaN/Inf values or values
    outside ``PIXEL_RANGE`` (images in [0, 255], or normalised images, instead of [0, 1])."""
    if x.numel() == 0:
        return
    low, high = torch.aminmax(x.detach())
    low, high = float(low), float(high)  # NaN propagates into both; Inf into one of them
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = (~torch.isfinite(x.detach()).flatten(1).all(dim=1)).nonzero().flatten().tolist()
        raise InputError(f"images {bad[:10]} contain NaN or Inf values; clean or drop them before calling the model")
    if low < PIXEL_RANGE[0] or high > PIXEL_RANGE[1]:
        hint = (  # values well below 0 come from a mean/std normalisation, never from 8-bit images
            "pass them without mean/std normalisation (the model encodes its input itself)"
            if low < PIXEL_RANGE[0]
            else "divide 8-bit images (0-255) by 255"
        )
        raise InputError(f"image values lie in [{low:.4g}, {high:.4g}], but the model expects images in [0, 1]: {hint}")


def class_probabilities(logits: Tensor, is_bcos: bool, classes: Tensor | None = None) -> Tensor:
    """Class probabilities from ``logits`` ``(N, K)``, by family: ``sigmoid(logits)`` for a B-cos model
    (its training objective is binary cross-entropy), ``softmax`` over the classes for a standard one.
    In the logits' dtype.

    Returns:
        ``(N, K)``, or with ``classes`` (long ``(N, T)``) the probabilities of those classes ``(N, T)``
        (a B-cos model's sigmoid is taken of their logits alone).
    """
    if classes is None:
        return torch.sigmoid(logits) if is_bcos else torch.softmax(logits, dim=-1)
    if is_bcos:
        return torch.sigmoid(logits.gather(1, classes))
    return torch.softmax(logits, dim=-1).gather(1, classes)


def feature_take_indices(count: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: the absolute indices among ``count`` blocks that ``indices``
    names, and the largest. None: all; an int ``n``: the last ``n``; a sequence: those indices,
    negative ones counted from the end. ``ConfigError`` for an index outside ``[-count, count)``, or
    ``n`` outside ``[1, count]``."""
    if indices is None:
        indices = count
    if is_int(indices):
        if not 0 < indices <= count:
            raise ConfigError(f"indices={indices} asks for the last {indices} blocks; this model has 1 to {count}")
        take = list(range(count - indices, count))
    elif isinstance(indices, Sequence) and not isinstance(indices, str) and len(indices) and all(map(is_int, indices)):
        take = [count + i if i < 0 else i for i in indices]
        bad = [i for i, k in zip(indices, take) if not 0 <= k < count]
        if bad:
            raise ConfigError(
                f"block indices {bad} lie outside [{-count}, {count - 1}] (this model has {count} blocks)"
            )
    else:
        raise ConfigError(f"indices must be None, an int or a non-empty list of ints, got {indices!r:.60}")
    return take, max(take)


def crop_fraction(image_size: int, resize_size: int | None) -> float:
    """timm's ``crop_pct`` for resizing the shorter side to ``resize_size`` (None: ``image_size``) and
    centre-cropping ``image_size``: ``image_size / resize_size``, lowered by float ulps where needed so
    that timm's ``floor(image_size / crop_pct)`` gives back ``resize_size`` exactly."""
    if resize_size is None or resize_size == image_size:
        return 1.0
    fraction = image_size / resize_size
    while math.floor(image_size / fraction) < resize_size:
        fraction = math.nextafter(fraction, 0.0)
    return fraction


class PatchEmbed(nn.Module):
    """Non-overlapping patches, flattened and projected: ``(N, C, H, W) -> (N, L, D), (H/p, W/p)``."""

    def __init__(self, in_chans: int, patch_size: int, dim: int, layers: LayerSet) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = layers.linear(in_chans * patch_size * patch_size, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        p = self.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        patches = rearrange(x, "n c (h p1) (w p2) -> n (h w) (p1 p2 c)", p1=p, p2=p)
        return self.proj(patches), grid


class ConvStem(nn.Module):
    """Convolutional stem (Xiao et al. 2021): 3×3 convs with norm and activation, then a 1×1 conv.

    ``(N, C, H, W) -> (N, L, D), (H/r, W/r)`` where ``r`` is the product of the strides.
    """

    def __init__(self, in_chans: int, channels: list[int], strides: list[int], dim: int, layers: LayerSet) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        for out_chans, stride in zip(channels, strides):
            stages += [layers.conv(in_chans, out_chans, 3, stride, 1), layers.norm2d(out_chans), layers.act()]
            in_chans = out_chans
        stages.append(layers.conv(in_chans, dim, 1, 1, 0))
        self.stages = nn.Sequential(*stages)

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        features = self.stages(x)
        return rearrange(features, "n d h w -> n (h w) d"), (features.shape[-2], features.shape[-1])


def hidden_width(dim: int, mlp_ratio: float) -> int:
    """The MLP's hidden width ``dim · mlp_ratio``, rounded down (a ratio read back as ``512 / 192``
    must give 512, not 511)."""
    return int(dim * mlp_ratio + 1e-6)


class Mlp(nn.Module):
    """``(N, L, D) -> (N, L, D)``: linear, activation (identity for B-cos), linear.

    ``gated``: a gated linear unit instead of the activation (SwiGLU for SiLU: EVA-02): ``fc1``
    gives ``2·hidden`` values, the gate ``act`` of the first half times the second half
    (``GatedLinearUnit``). ``norm``: a norm over the hidden units before ``fc2`` (EVA's ``scale_mlp``).
    """

    def __init__(self, dim: int, hidden: int, layers: LayerSet, gated: str | None = None, norm: bool = False) -> None:
        super().__init__()
        self.fc1 = layers.linear(dim, 2 * hidden if gated else hidden)
        self.act = GatedLinearUnit(gated) if gated else layers.act()
        self.norm = layers.norm(hidden) if norm else nn.Identity()
        self.fc2 = layers.linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm(x)))``, then ``x + ls2(mlp(norm(x)))``
    (``ls``: LayerScale, or the identity)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        layers: LayerSet,
        rotary: nn.Module | None,
        distance_penalty: DistancePenalty | None = None,
        layer_scale: bool = False,
        qk_norm: bool = False,
        mlp_gate: str | None = None,
        mlp_norm: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = layers.norm(dim)
        self.attn = Attention(
            dim,
            num_heads,
            proj=layers.attn_proj(dim, dim),
            qkv_bias=layers.qkv_bias,
            rotary=rotary,
            distance_penalty=distance_penalty,
            qk_norm=qk_norm,
            norm_eps=layers.norm_eps,
        )
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = layers.norm(dim)
        self.mlp = Mlp(dim, hidden_width(dim, mlp_ratio), layers, mlp_gate, mlp_norm)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: Tensor, grid: Grid, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Tokens ``(N, L, D)`` -> ``(N, L, D)``; with ``return_attn``, also the attention maps ``(N, heads, L, L)``."""
        out = self.attn(self.norm1(x), grid, return_attn=return_attn)
        out, attn = out if return_attn else (out, None)
        x = x + self.ls1(out)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return (x, attn) if return_attn else x


@dataclass(frozen=True)
class Capture:
    """Which intermediate tensors a forward pass keeps: ``model(x, capture=Capture(...))``.

    Attributes:
        layers: token layers to keep: 0 for the tokens entering the first block (after the additive
            positional embedding and the pre-norm, if any), ``k`` for the output of block ``k``
            (1-based), negative counts from the end (-1: the last block).
        attention: keep every block's attention maps. The blocks then compute the softmax explicitly
            instead of with the fused kernel: the same values up to float rounding.
    """

    layers: tuple[int, ...] = ()
    attention: bool = False


@dataclass
class CaptureRecord:
    """The intermediate tensors of one capturing forward pass (``model(x, capture=...)``).

    In explanation mode the logits are ``w(x)·inputs + (∂logit/∂embedded)·positional + logit_bias``:
    the gradient with respect to ``inputs`` is ``w(x)`` (``bcosvit.explanation.dynamic_linear_weights``).

    Attributes:
        inputs: ``(N, C', H, W)`` the encoded images (``[x, 1 - x]`` for a B-cos model, normalised
            for a standard twin): a leaf that requires gradients; the rest of the pass starts from it.
        embedded: ``(N, L, D)`` the tokens after the additive positional embedding (the tokenizer's
            output where the scheme adds none).
        positional: ``(L, D)`` the input-independent part of ``embedded``: the additive positional
            embedding, and the class and register tokens (their rows first) when the model has
            them; None where there is neither.
        grid: the token grid ``(rows, cols)`` of the patch tokens, row-major.
        num_prefix_tokens: tokens before the patch tokens (the class token, then the register
            tokens); ``L = num_prefix_tokens + rows * cols``.
        tokens: ``{layer: (N, L, D)}`` the tokens at each layer of ``Capture.layers``, keyed as requested.
        attentions: per block, first block first, the attention maps ``(N, heads, L, L)`` (rows sum
            to 1 over the keys); empty unless ``Capture.attention``.
    """

    inputs: Tensor
    embedded: Tensor
    positional: Tensor | None
    grid: Grid
    tokens: dict[int, Tensor] = field(default_factory=dict)
    attentions: list[Tensor] = field(default_factory=list)
    num_prefix_tokens: int = 0


def _additive_positional_embedding(scheme: str, dim: int, grid: Grid) -> AdditivePositionalEmbedding | None:
    """The embedding added to the tokens for a ``pos_embed`` scheme (None: the scheme adds none)."""
    if scheme == "sincos":
        return SinCosPositionalEmbedding(dim, grid)
    if scheme == "learned":
        return LearnedPositionalEmbedding(dim, grid)
    return None


class VisionTransformer(nn.Module):
    """A ViT built as a B-cos model or a standard twin: mean-pooled over its patch tokens (the published
    models), or, with ``class_token`` and ``global_pool="token"``, classified from a class token (timm's ViTs),
    or pooled by attention (``global_pool="map"``).

    Input: images ``(N, in_chans, H, W)`` with values in [0, 1]; ``H`` and ``W`` divisible by
    ``patch_size``. Output: logits ``(N, num_classes)``; a headless backbone (``num_classes = 0``)
    returns its pooled features ``(N, embed_dim)``. A B-cos model encodes ``[x, 1 - x]`` itself; a
    standard twin normalises with its per-channel mean and std.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.is_bcos = config.bcos
        self.num_classes = config.num_classes
        self.in_chans = config.in_chans
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.embed_dim = self.num_features = config.embed_dim
        self.grad_checkpointing = False
        layers = (
            bcos_layer_set(
                config.b,
                config.max_out,
                bias=config.bias,
                weight_norm=config.weight_norm,
                act=config.act or "identity",
                norm_eps=config.norm_eps,
            )
            if config.bcos
            else standard_layer_set(
                attn_bias=True if config.attn_bias is None else config.attn_bias,
                stem_bias=bool(config.stem_bias),
                norm_eps=config.norm_eps,
                act=config.act or "gelu",
                qkv_bias=config.qkv_bias,
            )
        )
        self._layers = layers

        if config.bcos:
            self.encode: nn.Module = AddInverse()
            encoded_chans = 2 * config.in_chans
        else:
            rgb = config.in_chans == 3
            mean = config.input_mean or (IMAGENET_MEAN if rgb else (0.5,) * config.in_chans)
            std = config.input_std or (IMAGENET_STD if rgb else (0.5,) * config.in_chans)
            self.encode = Normalize(mean, std)
            encoded_chans = config.in_chans

        dim = config.embed_dim
        if config.stem_channels is None:
            self.tokenizer: nn.Module = PatchEmbed(encoded_chans, config.patch_size, dim, layers)
        else:
            strides = config.stem_strides or [2] * len(config.stem_channels)
            self.tokenizer = ConvStem(encoded_chans, list(config.stem_channels), list(strides), dim, layers)

        grid = (config.image_size // config.patch_size,) * 2
        self.pos_embed = _additive_positional_embedding(config.pos_embed, dim, grid)
        self.num_prefix_tokens = int(config.class_token) + config.reg_tokens
        self.global_pool = config.global_pool
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim)) if config.class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, config.reg_tokens, dim)) if config.reg_tokens else None
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)  # timm's init
        self.norm_pre = layers.norm(dim) if config.pre_norm else nn.Identity()
        penalty = DistancePenalty(config.attn_distance_penalty) if config.attn_distance_penalty > 0 else None
        rotary = self._rotary()
        learned_rotary = rotary is not None and any(True for _ in rotary.parameters())
        self.blocks = nn.ModuleList(
            Block(
                dim,
                config.num_heads,
                config.mlp_ratio,
                layers,
                self._rotary() if learned_rotary else rotary,  # learned frequencies: one set per block
                penalty,
                config.layer_scale,
                config.qk_norm,
                config.mlp_gate,
                config.mlp_norm,
            )
            for _ in range(config.depth)
        )
        self.norm = layers.norm(dim)
        self.attn_pool = (
            AttentionPool(
                dim,
                config.num_heads,
                proj=layers.attn_proj(dim, dim),
                norm=layers.norm(dim),
                mlp=Mlp(dim, hidden_width(dim, config.mlp_ratio), layers),
                qkv_bias=layers.qkv_bias,
                qk_norm=config.qk_norm,
                norm_eps=config.norm_eps,
            )
            if config.global_pool == "map"
            else None
        )
        self._set_head(config.num_classes)
        self._init_weights()

    def _rotary(self) -> nn.Module | None:
        """The rotary embedding of ``pos_embed="rope"`` (bcosvit's) or of ``rotary`` (timm's Eva family)."""
        head_dim = self.embed_dim // self.config.num_heads
        if self.config.pos_embed == "rope":
            return Rotary2d(head_dim)
        if self.config.rotary is not None:
            return TimmRotary2d(head_dim, num_prefix_tokens=self.num_prefix_tokens, **self.config.rotary)
        return None

    def _set_head(self, num_classes: int) -> None:
        """A new head for ``num_classes`` classes (0: none, the pooled features are the output)."""
        self.head = self._layers.linear(self.embed_dim, num_classes) if num_classes else nn.Identity()
        self.logit_bias = LogitBias(num_classes) if self.is_bcos and num_classes else nn.Identity()

    def _init_weights(self) -> None:
        if self.is_bcos:
            return  # B-cos weights are normalised on every forward pass; their init scale is moot.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # --- timm-like contract -------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        """Raise ``InputError`` when ``x`` cannot be fed to this model: not a floating-point
        ``(N, in_chans, H, W)`` tensor (``check_images``), a size not divisible by the
        patch size, another device or dtype than the model's, NaN/Inf or values far outside [0, 1]."""
        check_images(x, self.in_chans)
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size or h == 0 or w == 0:
            raise InputError(
                f"image size {h}×{w} is not divisible by the patch size {self.patch_size}; "
                f"resize or crop to a multiple of {self.patch_size} "
                f"(the model was built for {self.image_size}×{self.image_size})"
            )
        param = self.norm.weight
        if x.device != param.device:
            raise InputError(f"images are on {x.device} but the model is on {param.device}; move one of them")
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise InputError(
                f"images have dtype {x.dtype} but the model has {param.dtype}; convert with images.to({param.dtype})"
            )
        check_pixel_values(x)

    def probabilities(self, logits: Tensor) -> Tensor:
        """``(N, K)`` class probabilities of this model's ``logits`` ``(N, K)`` (``class_probabilities``:
        sigmoid for a B-cos model, softmax for a standard one)."""
        return class_probabilities(logits, self.is_bcos)

    def forward_tokens(self, x: Tensor) -> tuple[Tensor, Grid]:
        """Encode, tokenise and add position (and the pre-norm): images ``(N, C, H, W)`` -> the tokens
        entering the first block ``(N, L, D)``, grid."""
        tokens, grid, _ = self._embed(x, None)
        return self.norm_pre(tokens), grid

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(N, C, H, W)`` in [0, 1] -> tokens after the last block ``(N, L, D)``, *before* the
        final norm (``L = num_prefix_tokens + (H/p)·(W/p)``, prefix tokens first).

        timm's ``forward_features`` applies its token norm; here ``forward_head`` applies the final norm
        (to every token or to the pooled features, as ``config.final_norm`` says), so that the captured
        tokens (``Capture(layers=(-1,))``) and these are the same tensor. What both contracts share, and
        what callers rely on: ``forward_head(forward_features(x)) == forward(x)``."""
        return self._forward_features(x, None)[0]

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens ``(N, L, D)`` -> logits ``(N, num_classes)`` (or pooled features ``(N, D)``: with
        ``pre_logits``, or from a headless backbone)."""
        norm_tokens = self.config.final_norm == "tokens"
        if norm_tokens:
            tokens = self.norm(tokens)
        if self.global_pool == "token":
            pooled = tokens[:, 0]
        elif self.global_pool == "map":
            pooled = self.attn_pool(tokens[:, self.num_prefix_tokens :])
        else:
            pooled = tokens[:, self.num_prefix_tokens :].mean(dim=1)
        if not norm_tokens:
            pooled = self.norm(pooled)
        if pre_logits:
            return pooled
        return self.logit_bias(self.head(pooled))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
    ) -> list[Tensor] | list[tuple[Tensor, Tensor]] | tuple[Tensor, list] | dict[str, Any]:
        """The tokens after chosen blocks, as timm's ``VisionTransformer.forward_intermediates``.

        Args:
            x: images ``(N, C, H, W)`` in [0, 1] (``check_input``).
            indices: which blocks, 0-based (``i``: the output of block ``i + 1``, which is
                ``Capture`` layer ``i + 1``): an int ``n`` for the last ``n`` blocks, a sequence of
                block indices (negative from the end; returned in block order, each once), None for
                every block (``feature_take_indices``).
            return_prefix_tokens: each intermediate as ``(patches, prefix)``, ``prefix``
                ``(N, num_prefix_tokens, D)`` (the class token, then the register tokens); ignored by a
                model without prefix tokens, as in timm.
            norm: apply the final norm to the intermediates where it is a token norm
                (``final_norm="tokens"``, timm's ``norm``); a norm on the pooled features
                (``final_norm="pooled"``, timm's ``fc_norm``, whose ``norm`` is then the identity) is
                not applied: the intermediates equal timm's for a converted model either way.
            stop_early: run no block after the last one asked for (the final tokens are then its output).
            output_fmt: ``"NCHW"``: patch tokens as maps ``(N, D, H/p, W/p)``; ``"NLC"``: ``(N, (H/p)·(W/p), D)``.
            intermediates_only: return the list of intermediates alone.
            output_dict: return ``{"image_intermediates": [...], "image_features": final}`` (plus
                ``"image_intermediates_prefix"`` with ``return_prefix_tokens``; no features with
                ``intermediates_only``).

        Returns:
            ``(final, intermediates)``: ``final`` ``(N, L, D)`` the tokens after the last block run,
            before the final norm as ``forward_features`` (so ``forward_head(final)`` gives the logits;
            timm's ``final`` carries its token norm), and the list of intermediates; or, with
            ``intermediates_only``, the list alone.

        ``ConfigError`` names an index outside the blocks or an unknown ``output_fmt``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ConfigError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r:.60}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        tokens, grid, _ = self._embed(x, None)
        tokens = self.norm_pre(tokens)
        token_norm = norm and self.config.final_norm == "tokens"
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            tokens = self._run_block(block, tokens, grid)
            if i in take:
                intermediates.append(self.norm(tokens) if token_norm else tokens)
        prefix = self.num_prefix_tokens
        prefixes = [y[:, :prefix] for y in intermediates] if prefix else None
        patches = [y[:, prefix:] for y in intermediates]
        if output_fmt == "NCHW":
            patches = [rearrange(y, "n (h w) d -> n d h w", h=grid[0], w=grid[1]).contiguous() for y in patches]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": patches}
            if return_prefix_tokens and prefixes is not None:
                result["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                result["image_features"] = tokens
            return result
        taken: list = list(zip(patches, prefixes)) if return_prefix_tokens and prefixes is not None else patches
        return taken if intermediates_only else (tokens, taken)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (as ``forward_intermediates``; ``config.depth``
        follows, so the model saves and loads as what it now is) and, with ``prune_head``, the head
        (``reset_classifier(0)``: the output is the pooled features). Returns the absolute indices kept.

        ``prune_norm`` is refused (``ConfigError``): the final norm is part of every architecture here
        (on the pooled features it is timm's ``fc_norm``), and ``forward_intermediates(norm=False)``
        already leaves it out."""
        if prune_norm:
            raise ConfigError(
                "prune_norm is not supported: the final norm is part of the architecture; "
                "forward_intermediates(norm=False) returns the tokens without it"
            )
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        self.config.depth = len(self.blocks)
        if prune_head:
            self.reset_classifier(0)
        return take

    def get_classifier(self) -> nn.Module:
        """The classifier layer, ``head`` (``(N, D) -> (N, num_classes)``; the identity for a headless
        backbone). A B-cos model adds its fixed ``logit_bias`` after it."""
        return self.head

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg``: the preprocessing this model expects, for
        ``timm.data.resolve_model_data_config(model)`` and ``timm.data.create_transform(**cfg)``.

        The model reads images in [0, 1] and encodes them itself, so ``mean`` is 0 and ``std`` 1 for
        every family (a transform built from them yields [0, 1] images): ``input_encoding`` says what
        the model does with them, ``"[x, 1 - x]"`` for a B-cos model, ``"(x - mean) / std"`` for a
        standard twin with its constants in ``input_mean`` / ``input_std``. The resize is that of
        ``bcosvit.transforms(model)``: the shorter side to ``config.resize_size`` (``crop_pct =
        image_size / resize_size``; 1.0 without one), bilinear, then the centre crop.
        A fresh dict on every access, following ``reset_classifier``."""
        config = self.config
        chans = config.in_chans
        cfg: dict[str, Any] = {
            "input_size": (chans, config.image_size, config.image_size),
            "interpolation": "bilinear",
            "crop_pct": crop_fraction(config.image_size, config.resize_size),
            "crop_mode": "center",
            "mean": (0.0,) * chans,
            "std": (1.0,) * chans,
            "num_classes": self.num_classes,
            "classifier": "head",
            "first_conv": "tokenizer.proj" if config.stem_channels is None else "tokenizer.stages.0",
            "input_encoding": "[x, 1 - x]" if self.is_bcos else "(x - mean) / std",
        }
        if not self.is_bcos:
            cfg["input_mean"], cfg["input_std"] = self.encode.values
        if config.class_names is not None:
            cfg["label_names"] = tuple(config.class_names)
        return cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of ``pretrained_cfg``."""
        return self.pretrained_cfg

    def forward(
        self, x: Tensor, capture: Capture | None = None, *, check: bool = True
    ) -> Tensor | tuple[Tensor, CaptureRecord]:
        """Images ``(N, C, H, W)`` in [0, 1] -> logits ``(N, num_classes)``.

        With ``capture``, returns ``(logits, record)``: the ``CaptureRecord`` of the tensors it asks
        for, from this same pass (a DistributedDataParallel wrapper sees it like any forward).
        ``ConfigError`` names a captured layer outside ``[-depth - 1, depth]``. ``check=False`` skips
        ``check_input``, for a caller that has just checked ``x`` (``bcosvit.inputs.as_model_input``).
        """
        tokens, record = self._forward_features(x, capture, check)
        logits = self.forward_head(tokens)
        return logits if record is None else (logits, record)

    def _embed(
        self, x: Tensor, capture: Capture | None, check: bool = True
    ) -> tuple[Tensor, Grid, CaptureRecord | None]:
        """``forward_tokens``, and with ``capture`` the record begun at the encoded input, made a leaf
        so that gradients of an explanation stop where ``w(x)`` is read off. ``check``: run ``check_input``."""
        if check and not torch.compiler.is_compiling():
            self.check_input(x)
        encoded = self.encode(x)
        if capture is not None:
            encoded = encoded.detach().requires_grad_()
        tokens, grid = self.tokenizer(encoded)
        positional = None if self.pos_embed is None else self.pos_embed.embedding(grid)
        if positional is not None:
            tokens = tokens + positional
        prefix = [token for token in (self.cls_token, self.reg_token) if token is not None]
        if prefix:
            start = torch.cat(prefix, dim=1).to(tokens.dtype)  # (1, P, D)
            patch_part = positional if positional is not None else tokens.new_zeros(tokens.shape[1], tokens.shape[2])
            tokens = torch.cat([start.expand(tokens.shape[0], -1, -1), tokens], dim=1)
            positional = torch.cat([start[0], patch_part], dim=0)
        if capture is None:
            return tokens, grid, None
        return tokens, grid, CaptureRecord(encoded, tokens, positional, grid, num_prefix_tokens=self.num_prefix_tokens)

    def _forward_features(
        self, x: Tensor, capture: Capture | None, check: bool = True
    ) -> tuple[Tensor, CaptureRecord | None]:
        """Tokens after the last block ``(N, L, D)`` and, with ``capture``, the filled record."""
        wanted = {} if capture is None else {layer: self._check_layer(layer) for layer in capture.layers}
        keep = set(wanted.values())
        tokens, grid, record = self._embed(x, capture, check)
        tokens = self.norm_pre(tokens)  # after the record's embedded tokens: the positional term stays additive
        kept = {0: tokens} if 0 in keep else {}
        for k, block in enumerate(self.blocks, start=1):
            if record is not None and capture.attention:
                tokens, attn = self._run_block(block, tokens, grid, return_attn=True)
                record.attentions.append(attn)
            else:
                tokens = self._run_block(block, tokens, grid)
            if k in keep:
                kept[k] = tokens
        if record is not None:
            record.tokens = {layer: kept[k] for layer, k in wanted.items()}
        return tokens, record

    def _run_block(self, block: Block, tokens: Tensor, grid: Grid, return_attn: bool = False) -> Tensor | tuple:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, tokens, grid, return_attn, use_reentrant=False)
        return block(tokens, grid, return_attn)

    def _check_layer(self, layer: int) -> int:
        """``layer`` in ``[0, depth]`` (negative layers count from the end); ``ConfigError`` outside."""
        depth = len(self.blocks)
        if not -depth - 1 <= layer <= depth:
            raise ConfigError(f"layer must lie in [0, {depth}] (0: embedded tokens, {depth}: last block), got {layer}")
        return layer % (depth + 1)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` classes (0: no head,
        the model returns its pooled features); timm's signature.

        ``global_pool`` (None: unchanged) switches the pooling among ``"avg"`` and ``"token"`` (with a
        class token), or from ``"map"`` to either (the attention pool is dropped); ``"map"`` needs a
        model built with it. timm's ``""`` (no pooling) is refused: ``forward_features`` gives the tokens."""
        if not is_int(num_classes) or num_classes == 1 or num_classes < 0:
            raise ConfigError(f"num_classes must be at least 2, or 0 for no head, got {num_classes!r:.60}")
        if global_pool is not None and global_pool != self.global_pool:
            self._set_global_pool(global_pool)
        self._set_head(num_classes)
        self.head.to(self.norm.weight.device, self.norm.weight.dtype)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.num_classes = self.config.num_classes = num_classes
        self.config.class_names = None

    def _set_global_pool(self, global_pool: str) -> None:
        """Pool by ``global_pool`` from now on (``reset_classifier``); ``ConfigError`` when this model cannot."""
        if global_pool == "":
            raise ConfigError(
                "global_pool='' (no pooling) is not supported: forward_features(x) gives the tokens (N, L, D)"
            )
        replace(self.config, global_pool=global_pool, class_names=None).validate()  # names a bad value
        if global_pool == "map":
            raise ConfigError("global_pool='map' needs the attention pool of a model built with global_pool='map'")
        self.attn_pool = None
        self.global_pool = self.config.global_pool = global_pool

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @property
    def logit_bias_value(self) -> float:
        """The constant added to every logit (0 for standard models)."""
        return self.logit_bias.value if isinstance(self.logit_bias, LogitBias) else 0.0


def built_like(config: ViTConfig, like: nn.Module) -> VisionTransformer:
    """A new model of ``config`` on ``like``'s device and dtype, in ``like``'s training mode."""
    param = next(like.parameters())
    return VisionTransformer(config).to(device=param.device, dtype=param.dtype).train(like.training)
