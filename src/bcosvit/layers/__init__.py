"""Reusable layers of B-cos ViTs and their standard twins."""

from .activation import DynamicGELU
from .attention import Attention
from .bcos import BcosConv2d, BcosLinear
from .detach import DetachableModule, explanation_mode, is_explanation_mode, set_explanation_mode
from .encoding import AddInverse, LogitBias, Normalize
from .norm import BcosLayerNorm, BcosLayerNorm2d, LayerNorm2d
from .position import (
    AdditivePositionalEmbedding,
    DistancePenalty,
    LearnedPositionalEmbedding,
    Rotary2d,
    SinCosPositionalEmbedding,
    sincos_2d,
)
from .sets import LayerSet, bcos_layer_set, standard_layer_set

__all__ = [
    "AddInverse",
    "AdditivePositionalEmbedding",
    "Attention",
    "BcosConv2d",
    "BcosLayerNorm",
    "BcosLayerNorm2d",
    "BcosLinear",
    "DetachableModule",
    "DistancePenalty",
    "DynamicGELU",
    "LayerNorm2d",
    "LayerSet",
    "LearnedPositionalEmbedding",
    "LogitBias",
    "Normalize",
    "Rotary2d",
    "SinCosPositionalEmbedding",
    "bcos_layer_set",
    "explanation_mode",
    "is_explanation_mode",
    "set_explanation_mode",
    "sincos_2d",
    "standard_layer_set",
]
