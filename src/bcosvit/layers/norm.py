"""Bias-free LayerNorms whose divisor detaches in explanation mode (docs/design.md#explanation-mode).

Mean subtraction is linear and stays live; the standard deviation is the dynamic factor.
Outside explanation mode the fused ``F.layer_norm`` / ``F.group_norm`` kernels compute the
same values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .detach import DetachableModule


class BcosLayerNorm(DetachableModule):
    """LayerNorm over the last axis without bias: ``(..., D) -> (..., D)``, learned scale γ."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the scale γ back to ones."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if not self.detach:
            return F.layer_norm(x, (self.dim,), self.weight, None, self.eps)
        centred = x - x.mean(dim=-1, keepdim=True)
        std = (centred.square().mean(dim=-1, keepdim=True) + self.eps).sqrt()
        return centred / std.detach() * self.weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class BcosLayerNorm2d(DetachableModule):
    """LayerNorm over (C, H, W) of a feature map without bias: ``(N, C, H, W) -> (N, C, H, W)``.

    One mean and one standard deviation per sample; a learned scale per channel.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the scale γ back to ones."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if not self.detach:
            return F.group_norm(x, 1, self.weight, None, self.eps)
        centred = x - x.mean(dim=(1, 2, 3), keepdim=True)
        std = (centred.square().mean(dim=(1, 2, 3), keepdim=True) + self.eps).sqrt()
        return centred / std.detach() * self.weight[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}"


class LayerNorm2d(nn.GroupNorm):
    """Ordinary LayerNorm over (C, H, W) with per-channel scale and bias (standard twin)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(1, channels, eps=eps)
