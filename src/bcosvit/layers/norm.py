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


class _DetachedStdLayerNorm(torch.autograd.Function):
    """LayerNorm over the last axis whose standard deviation is a constant of the backward pass:
    ``out = (x - mean(x)) · rstd · γ (+ β)`` with ``rstd`` detached (explanation mode).

    The forward is torch's fused kernel; the backward is written out: ``grad_x = rstd · (gγ - mean(gγ))``.
    Written with autograd, the same layer takes about eight element-wise passes forward and more
    backward. Where a graph of the backward is requested (``create_graph``: explanation-regularised
    training) the backward recomputes the centred input with differentiable operations.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
        # forward and setup_context apart: torch.func transforms (jacrev, vmap) can then run it.
        x, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiable in x, γ and the incoming gradient
            mean = x.mean(dim=-1, keepdim=True)
        scaled = grad * weight
        grad_x = ((scaled - scaled.mean(dim=-1, keepdim=True)) * rstd).to(x.dtype) if need_x else None
        rows = tuple(range(grad.ndim - 1))
        grad_weight = (grad * ((x - mean) * rstd)).sum(dim=rows).to(weight.dtype) if need_weight else None
        grad_bias = grad.sum(dim=rows).to(weight.dtype) if need_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None


class BcosLayerNorm(DetachableModule):
    """LayerNorm over the last axis without bias: ``(..., D) -> (..., D)``, learned scale γ.

    ``bias=True`` adds a learned shift β, which is not dynamic linear: B-cosification starts from a
    standard LayerNorm's β and decays it to 0.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the scale γ back to ones (and β to zeros)."""
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self.detach:
            return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
        return _DetachedStdLayerNorm.apply(x, self.weight, self.bias, self.eps)[0]

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}" + ("" if self.bias is None else ", bias=True")


class BcosLayerNorm2d(DetachableModule):
    """LayerNorm over (C, H, W) of a feature map without bias: ``(N, C, H, W) -> (N, C, H, W)``.

    One mean and one standard deviation per sample; a learned scale per channel (and a shift with
    ``bias=True``, as ``BcosLayerNorm``).
    """

    def __init__(self, channels: int, eps: float = 1e-5, bias: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the scale γ back to ones (and β to zeros)."""
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self.detach:
            return F.group_norm(x, 1, self.weight, self.bias, self.eps)
        centred = x - x.mean(dim=(1, 2, 3), keepdim=True)
        std = (centred.square().mean(dim=(1, 2, 3), keepdim=True) + self.eps).sqrt()
        out = centred / std.detach() * self.weight[:, None, None]
        return out if self.bias is None else out + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}" + ("" if self.bias is None else ", bias=True")


class LayerNorm2d(nn.GroupNorm):
    """Ordinary LayerNorm over (C, H, W) with per-channel scale and bias (standard twin)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(1, channels, eps=eps)
