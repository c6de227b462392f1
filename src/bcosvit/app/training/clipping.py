"""Adaptive (unit-wise) gradient clipping (Brock et al. 2021): what ``clip = "agc"`` does, the choice of
"auto" for B-cos models."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def _unitwise_norm(t: Tensor) -> Tensor:
    """Norm of each output unit (row) of a weight; the whole tensor's norm for vectors."""
    if t.ndim <= 1:
        return t.norm()
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


@torch.no_grad()
def adaptive_clip_grad_(parameters: Iterable[nn.Parameter], clip: float = 0.01, eps: float = 1e-3) -> None:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021): scale each unit's gradient down to
    at most ``clip * max(||W_unit||, eps)``."""
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = _unitwise_norm(p).clamp_min(eps) * clip
        grad_norm = _unitwise_norm(p.grad)
        scale = (max_norm / grad_norm.clamp_min(1e-6)).clamp(max=1.0)
        p.grad.mul_(scale)
