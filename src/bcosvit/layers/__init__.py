"""Reusable layers of B-cos ViTs and their standard twins."""

from .activation import GATED_ACTIVATIONS, DynamicActivation, GatedLinearUnit, QuickGELU
from .attention import Attention, AttentionPool
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
    TimmRotary2d,
    sincos_2d,
)
from .scale import LayerScale
from .sets import LayerSet, bcos_layer_set, standard_layer_set

__all__ = [
    "AddInverse",
    "AdditivePositionalEmbedding",
    "Attention",
    "AttentionPool",
    "BcosConv2d",
    "BcosLayerNorm",
    "BcosLayerNorm2d",
    "BcosLinear",
    "DetachableModule",
    "DistancePenalty",
    "DynamicActivation",
    "GATED_ACTIVATIONS",
    "GatedLinearUnit",
    "LayerNorm2d",
    "LayerScale",
    "LayerSet",
    "LearnedPositionalEmbedding",
    "LogitBias",
    "Normalize",
    "QuickGELU",
    "Rotary2d",
    "SinCosPositionalEmbedding",
    "TimmRotary2d",
    "bcos_layer_set",
    "explanation_mode",
    "is_explanation_mode",
    "set_explanation_mode",
    "sincos_2d",
    "standard_layer_set",
]
