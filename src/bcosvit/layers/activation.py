"""Gated activations ``act(x) = g(x) · x`` whose gate detaches in explanation mode.

B-cos models need no activation (B supplies the non-linearity). B-cosified models (Arya et al.
2024, ``MyGELU`` in their code) keep the standard model's activation so that the converted network
starts as the original function; with the gate ``g(x)`` treated as a constant in explanation mode,
the activation is one more dynamic linear factor and explanations stay exact. Every activation of
the ViTs people start from is such a gate:

- ``gelu``: ``g(x) = Φ(x)``, the standard normal CDF;
- ``quick_gelu``: ``g(x) = σ(1.702 x)`` (OpenAI's CLIP);
- ``silu``: ``g(x) = σ(x)`` (SwiGLU's gate, EVA-02).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .detach import DetachableModule

GATED_ACTIVATIONS = ("gelu", "quick_gelu", "silu")
QUICK_GELU_SLOPE = 1.702


def activation_gate(x: Tensor, kind: str) -> Tensor:
    """The gate ``g(x)`` of the activation ``kind`` (``act(x) = g(x) · x``), elementwise."""
    if kind == "gelu":
        return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if kind == "quick_gelu":
        return torch.sigmoid(QUICK_GELU_SLOPE * x)
    if kind == "silu":
        return torch.sigmoid(x)
    raise ValueError(f"unknown activation {kind!r}; one of {GATED_ACTIVATIONS}")


class QuickGELU(nn.Module):
    """``x · σ(1.702 x)``, the activation of OpenAI's CLIP: ``(...) -> (...)`` (standard twins)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(QUICK_GELU_SLOPE * x)


class DynamicActivation(DetachableModule):
    """``(...) -> (...)``: the activation ``kind``; in explanation mode ``x · g(x)`` with ``g(x)`` detached."""

    def __init__(self, kind: str = "gelu") -> None:
        super().__init__()
        if kind not in GATED_ACTIVATIONS:
            raise ValueError(f"unknown activation {kind!r}; one of {GATED_ACTIVATIONS}")
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        if not self.detach:
            if self.kind == "gelu":
                return F.gelu(x)
            if self.kind == "silu":
                return F.silu(x)
            return x * activation_gate(x, self.kind)
        with torch.no_grad():
            gate = activation_gate(x, self.kind)
        return x * gate

    def extra_repr(self) -> str:
        return self.kind


def standard_activation(kind: str) -> nn.Module:
    """The standard twin's module for the activation ``kind`` (no detachable gate)."""
    if kind == "gelu":
        return nn.GELU()
    if kind == "silu":
        return nn.SiLU()
    if kind == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {kind!r}; one of {GATED_ACTIVATIONS}")


class GatedLinearUnit(DetachableModule):
    """A gated linear unit (SwiGLU for ``kind="silu"``): ``(..., 2H) -> (..., H)``, ``act(a) · b`` for
    the halves ``a, b`` of the last axis. In explanation mode the gate ``act(a)`` is detached as a
    whole, so the unit is linear in ``b``; ``a`` only shapes the gate."""

    def __init__(self, kind: str = "silu") -> None:
        super().__init__()
        self.act = DynamicActivation(kind)

    def forward(self, x: Tensor) -> Tensor:
        gate_input, value = x.chunk(2, dim=-1)
        if not self.detach:
            return self.act(gate_input) * value
        with torch.no_grad():
            gate = activation_gate(gate_input, self.act.kind) * gate_input
        return gate * value

    def extra_repr(self) -> str:
        return self.act.kind
