"""The swappable layer sets that turn one ViT definition into a B-cos model or its standard twin."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from .activation import DynamicActivation, standard_activation
from .bcos import BcosConv2d, BcosLinear
from .norm import BcosLayerNorm, BcosLayerNorm2d, LayerNorm2d


@dataclass(frozen=True)
class LayerSet:
    """Factories for every swappable layer of the ViT.

    Attributes:
        linear: ``(in_features, out_features) -> module`` for tokeniser, output projection, MLP, head.
        conv: ``(in_ch, out_ch, kernel_size, stride, padding) -> module`` for the conv stem.
        norm: ``dim -> module``, LayerNorm over the last axis.
        norm2d: ``channels -> module``, LayerNorm over (C, H, W).
        act: ``() -> module``, the MLP/stem non-linearity (identity for B-cos: B supplies it).
        norm_eps: the epsilon of every norm (also the attention's query/key norms).
        attn_proj: ``(in_features, out_features) -> module``, the attention's output projection.
        qkv_bias: whether the query/key/value projection has a bias.
    """

    linear: Callable[[int, int], nn.Module]
    conv: Callable[[int, int, int, int, int], nn.Module]
    norm: Callable[[int], nn.Module]
    norm2d: Callable[[int], nn.Module]
    act: Callable[[], nn.Module]
    attn_proj: Callable[[int, int], nn.Module]
    qkv_bias: bool
    norm_eps: float = 1e-5


def bcos_layer_set(
    b: float = 2.0,
    max_out: int = 1,
    bias: bool = False,
    weight_norm: bool = True,
    act: str = "identity",
    norm_eps: float = 1e-5,
) -> LayerSet:
    """B-cos layers: bias-free, unit-norm weights, no activation, bias-free LayerNorms.

    The other arguments configure the B-cosified models of ``bcosvit.bcosify`` (Arya et al. 2024):
    ``bias`` keeps biases in every layer (query/key/value included), ``weight_norm=False`` keeps the
    weights' norms, ``act`` ("gelu", "quick_gelu", "silu") the standard model's activation, its gate
    detached in explanation mode (``DynamicActivation``).
    """
    linear = partial(BcosLinear, b=b, max_out=max_out, bias=bias, weight_norm=weight_norm)
    return LayerSet(
        linear=linear,
        conv=lambda i, o, k, s, p: BcosConv2d(
            i, o, k, stride=s, padding=p, b=b, max_out=max_out, bias=bias, weight_norm=weight_norm
        ),
        norm=partial(BcosLayerNorm, eps=norm_eps, bias=bias),
        norm2d=partial(BcosLayerNorm2d, eps=norm_eps, bias=bias),
        act=nn.Identity if act == "identity" else partial(DynamicActivation, act),
        attn_proj=linear,
        qkv_bias=bias,
        norm_eps=norm_eps,
    )


def standard_layer_set(
    attn_bias: bool = True,
    stem_bias: bool = False,
    norm_eps: float = 1e-5,
    act: str = "gelu",
    qkv_bias: bool | None = None,
) -> LayerSet:
    """Ordinary ViT layers: linear maps with bias, LayerNorm with bias, an activation (GELU).

    Args:
        attn_bias: whether the attention's output projection has a bias (timm's ViTs have one; the
            B-cos-v2 reference's standard ViTs do not).
        qkv_bias: whether the query/key/value projection has one; None: as ``attn_bias``.
        stem_bias: whether the conv stem's convolutions have biases (the reference's do).
        norm_eps: the LayerNorms' epsilon (timm's ViTs: 1e-6).
        act: the MLP's activation: "gelu", "quick_gelu" (CLIP) or "silu".
    """
    return LayerSet(
        linear=nn.Linear,
        conv=lambda i, o, k, s, p: nn.Conv2d(i, o, k, stride=s, padding=p, bias=stem_bias),
        norm=partial(nn.LayerNorm, eps=norm_eps),
        norm2d=partial(LayerNorm2d, eps=norm_eps),
        act=partial(standard_activation, act),
        attn_proj=partial(nn.Linear, bias=attn_bias),
        qkv_bias=attn_bias if qkv_bias is None else qkv_bias,
        norm_eps=norm_eps,
    )
