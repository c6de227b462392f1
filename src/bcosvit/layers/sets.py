"""The swappable layer sets that turn one ViT definition into a B-cos model or its standard twin."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

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
        qkv_bias: whether the query/key/value projection has a bias.
    """

    linear: Callable[[int, int], nn.Module]
    conv: Callable[[int, int, int, int, int], nn.Module]
    norm: Callable[[int], nn.Module]
    norm2d: Callable[[int], nn.Module]
    act: Callable[[], nn.Module]
    qkv_bias: bool


def bcos_layer_set(b: float = 2.0, max_out: int = 1) -> LayerSet:
    """B-cos layers: bias-free, unit-norm weights, no activation, bias-free LayerNorms."""
    return LayerSet(
        linear=partial(BcosLinear, b=b, max_out=max_out),
        conv=lambda i, o, k, s, p: BcosConv2d(i, o, k, stride=s, padding=p, b=b, max_out=max_out),
        norm=BcosLayerNorm,
        norm2d=BcosLayerNorm2d,
        act=nn.Identity,
        qkv_bias=False,
    )


def standard_layer_set() -> LayerSet:
    """Ordinary ViT layers: linear maps with bias, LayerNorm with bias, GELU."""
    return LayerSet(
        linear=nn.Linear,
        conv=lambda i, o, k, s, p: nn.Conv2d(i, o, k, stride=s, padding=p, bias=False),
        norm=nn.LayerNorm,
        norm2d=LayerNorm2d,
        act=nn.GELU,
        qkv_bias=True,
    )
