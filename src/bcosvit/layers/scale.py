"""LayerScale (Touvron et al., ICCV 2021; DINOv2, DeiT-III): a learned per-channel scale of a block's
residual branch. A diagonal linear map: dynamic linear as it is, the same in both model families."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """``(..., D) -> (..., D)``: ``x · γ`` with a learned ``γ`` of ``D`` values (timm's ``gamma``)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set every scale back to ``init_values``."""
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"{self.gamma.numel()}"
