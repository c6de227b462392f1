"""Multi-head self-attention that is dynamic linear in its input (docs/design.md: explanation mode).

``out = proj(A(x) · v(x))`` with ``A = softmax(q kᵀ / sqrt(d) + bias)``, where the optional bias
is a distance penalty on the token grid. In explanation mode the
attention matrix is a constant (queries and keys are computed without gradient), so the block
is linear in ``x`` through ``v`` and ``proj``. What acts on queries and keys only (rotary
embeddings, query/key norms) shapes that constant and leaves the block dynamic linear.

``AttentionPool`` is the attention-pooling (MAP) head of SigLIP-style models: a learned latent
query attends to the tokens; its softmax detaches in the same way.

Two paths compute the same values (up to float rounding): the fast path calls
``F.scaled_dot_product_attention``; ``return_attn=True`` computes the softmax explicitly and
also returns the attention maps ``(N, heads, L, L)`` (what a model's ``Capture(attention=True)``
records for the attention-based baselines).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .detach import DetachableModule
from .position import DistancePenalty, Grid


def explicit_attention_pays(q: Tensor) -> bool:
    """Whether ``softmax(q kᵀ) v`` written out beats ``F.scaled_dot_product_attention`` for queries
    ``q``: on a CPU in bfloat16 or float16 (autocast's dtype where autocast is on). There torch
    2.14's fused CPU kernel is 2-6x slower, forward and backward, than the two matrix products and
    the softmax (which run on the same bf16 GEMMs as the linear layers): 16 vs 3 ms for 64 x 4 heads
    x 49 tokens x 32, 38 vs 12 ms for ViT-Ti's 32 x 3 x 197 x 64, AVX512-BF16 without AMX
    (docs/results.md, "Performance"). In float32, and on CUDA, the fused kernel stays."""
    if q.device.type != "cpu":
        return False
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    return dtype in (torch.bfloat16, torch.float16)


def attend(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, detach: bool, return_attn: bool
) -> tuple[Tensor, Tensor | None]:
    """``softmax(q kᵀ / sqrt(d) + bias) v`` per head: ``(N, h, Lq, d), (N, h, L, d) x2 -> (N, h, Lq, d)``,
    and the attention maps ``(N, h, Lq, L)`` with ``return_attn`` (else None). ``detach``: the
    attention matrix is a constant (explanation mode)."""
    if not (return_attn or detach or explicit_attention_pays(q)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), None
    # Explanation mode multiplies by the constant attention matrix explicitly: the fused kernel has
    # no double backward, which explanation-regularised training needs.
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    attn = torch.softmax(scores if bias is None else scores + bias, dim=-1)
    if detach:
        attn = attn.detach()
    return attn @ v, attn if return_attn else None


def _head_norm(enabled: bool, head_dim: int, eps: float, bias: bool) -> nn.Module:
    """A LayerNorm over each head's queries or keys (timm's ``qk_norm``), or the identity."""
    return nn.LayerNorm(head_dim, eps=eps, bias=bias) if enabled else nn.Identity()


class Attention(DetachableModule):
    """Self-attention ``(N, L, D) -> (N, L, D)``; queries/keys/values from one plain linear map.

    ``qk_norm``: LayerNorms over each head's queries and keys (ViT-22B, timm's ``qk_norm``; their
    bias follows ``qkv_bias``). ``rotary`` turns queries and keys by the tokens' grid positions.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        proj: nn.Module,
        qkv_bias: bool = False,
        rotary: nn.Module | None = None,
        distance_penalty: DistancePenalty | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = _head_norm(qk_norm, self.head_dim, norm_eps, qkv_bias)
        self.k_norm = _head_norm(qk_norm, self.head_dim, norm_eps, qkv_bias)
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
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: Tensor, grid: Grid, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        q, k, v = self._qkv(x)
        if self.rotary is not None:
            q, k = self.rotary(q, grid), self.rotary(k, grid)
        bias = None if self.distance_penalty is None else self.distance_penalty(grid, q.device, q.dtype)
        out, attn = attend(q, k, v, bias, self.detach, return_attn)
        out = self.proj(rearrange(out, "n h l d -> n l (h d)"))
        return (out, attn) if return_attn else out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


class AttentionPool(DetachableModule):
    """Attention pooling with a learned latent query (SigLIP's MAP head, timm's ``AttentionPoolLatent``):
    tokens ``(N, L, D) -> (N, D)``.

    ``x = proj(softmax(q(latent) k(t)ᵀ / sqrt(d)) v(t))``, then ``x + mlp(norm(x))``, then the first
    latent. The latent's query and the keys shape the (constant, in explanation mode) attention
    matrix; the values, ``proj``, ``norm`` and ``mlp`` are the model family's layers. Names follow timm's.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        proj: nn.Module,
        norm: nn.Module,
        mlp: nn.Module,
        qkv_bias: bool = False,
        latent_len: int = 1,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, latent_len, dim))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.q_norm = _head_norm(qk_norm, self.head_dim, norm_eps, qkv_bias)
        self.k_norm = _head_norm(qk_norm, self.head_dim, norm_eps, qkv_bias)
        self.proj = proj
        self.norm = norm
        self.mlp = mlp
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw a new latent query from ``N(0, 1/D)`` (timm's init)."""
        nn.init.trunc_normal_(self.latent, std=self.latent.shape[-1] ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        dim = x.shape[-1]
        split = partial(rearrange, pattern="n l (h d) -> n h l d", h=self.num_heads)
        weight, bias = self.kv.weight, self.kv.bias
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach):
            q = split(self.q(self.latent.to(x.dtype)).expand(x.shape[0], -1, -1))
            k = split(F.linear(x, weight[:dim], None if bias is None else bias[:dim]))
            q, k = self.q_norm(q), self.k_norm(k)
        v = split(F.linear(x, weight[dim:], None if bias is None else bias[dim:]))
        out, _ = attend(q, k, v, None, self.detach, return_attn=False)
        out = self.proj(rearrange(out, "n h l d -> n l (h d)"))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]
