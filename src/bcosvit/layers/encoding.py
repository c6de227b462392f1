"""Input encodings and the fixed logit bias."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class AddInverse(nn.Module):
    """B-cos input encoding ``[x, 1 - x]``: ``(N, C, H, W)`` in [0, 1] -> ``(N, 2C, H, W)``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, 1 - x], dim=1)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for standard models: ``(N, C, H, W) -> (N, C, H, W)``.

    The buffers hold the constants in float32 (and follow the model's dtype); a float64 input is
    normalised with the exact constants (a float32 ``0.485`` is off by 1e-8, which a float64
    comparison with another implementation sees)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.values = (tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def constants(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """The mean and std ``(1, C, 1, 1)`` each, exact in ``dtype`` (on the buffers' device)."""
        mean, std = (torch.tensor(v, dtype=dtype, device=self.mean.device).view(1, -1, 1, 1) for v in self.values)
        return mean, std

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float64:
            mean, std = self.constants(torch.float64)
            return (x - mean) / std
        return (x - self.mean) / self.std


class LogitBias(nn.Module):
    """Adds the fixed logit bias ``log(1 / (C - 1))`` for ``C`` classes (docs/design.md#head-and-loss)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a B-cos classifier needs at least 2 classes, got {num_classes}")
        self.value = math.log(1.0 / (num_classes - 1))

    def forward(self, logits: Tensor) -> Tensor:
        return logits + self.value

    def extra_repr(self) -> str:
        return f"value={self.value:.4f}"
