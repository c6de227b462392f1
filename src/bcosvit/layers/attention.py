"""Multi-head self-attention that is dynamic linear in its input (docs/design.md: explanation mode).

``out = proj(A(x) · v(x))`` with ``A = softmax(q kᵀ / sqrt(d) + bias)``, where the optional bias
is a distance penalty on the token grid. In explanation mode the
attention matrix is a constant (queries and keys are computed without gradient), so the block
is linear in ``x`` through ``v`` and ``proj``.

Two paths compute the same values (up to float rounding): the fast path calls
``F.scaled_dot_product_attention``; ``return_attn=True`` computes the softmax explicitly and
also returns the attention maps ``(N, heads, L, L)`` (what a model's ``Capture(attention=True)``
records for the attention-based baselines).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .detach import DetachableModule
from .position import DistancePenalty, Grid, Rotary2d


class Attention(DetachableModule):
    """Self-attention ``(N, L, D) -> (N, L, D)``; queries/keys/values from one plain linear map."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        proj: nn.Module,
        qkv_bias: bool = False,
        rotary: Rotary2d | None = None,
        distance_penalty: DistancePenalty | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = proj
        self.rotary = rotary
        self.distance_penalty = distance_penalty

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.detach:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            # q and k only shape the (constant) attention matrix: no graph for them, and the
            # backward pass runs through the value third of the projection only.
            weight, bias = self.qkv.weight, self.qkv.bias
            d = self.dim
            with torch.no_grad():
                q, k = F.linear(x, weight[: 2 * d], None if bias is None else bias[: 2 * d]).chunk(2, dim=-1)
            v = F.linear(x, weight[2 * d :], None if bias is None else bias[2 * d :])
        q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=self.num_heads) for t in (q, k, v))
        return q, k, v

    def forward(self, x: Tensor, grid: Grid, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        q, k, v = self._qkv(x)
        if self.rotary is not None:
            q, k = self.rotary(q, grid), self.rotary(k, grid)
        bias = None if self.distance_penalty is None else self.distance_penalty(grid, q.device, q.dtype)
        if return_attn or self.detach:
            # Explanation mode multiplies by the constant attention matrix explicitly: the fused
            # kernel has no double backward, which explanation-regularised training needs.
            scores = (q * self.scale) @ k.transpose(-2, -1)
            attn = torch.softmax(scores if bias is None else scores + bias, dim=-1)
            if self.detach:
                attn = attn.detach()
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = self.proj(rearrange(out, "n h l d -> n l (h d)"))
        return (out, attn) if return_attn else out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
