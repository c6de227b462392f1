"""timm's own rope tables of an ``Eva`` model, built by timm's code in float64 (timm builds them in
float32 even for a float64 model): what the float64 comparisons with timm's Eva models need."""

from __future__ import annotations

import torch
from torch import nn

D64 = torch.float64


def exact_rope_table(model: nn.Module, grid: tuple[int, int], block: int) -> torch.Tensor:
    """timm's own rope table for ``grid``, built by timm's code with float64 instead of float32 frequencies."""
    rope = model.rope
    quarter = torch.arange(rope.dim // 4, dtype=D64) / (rope.dim // 4) if hasattr(rope, "dim") else None
    kind = type(rope).__name__
    if kind == "RotaryEmbeddingCat":
        return rope._build_embed_cat(list(grid), 1.0 / rope.temperature**quarter, dtype=D64)
    if kind == "RotaryEmbeddingDinoV3":
        rope.register_buffer("periods", rope.temperature**quarter, persistent=False)
        return rope.get_embed(list(grid))
    from timm.layers.pos_embed_sincos import get_mixed_grid

    t_x, t_y = get_mixed_grid(list(grid), grid_indexing=rope.grid_indexing)  # float32 integers: exact
    freqs = rope.freqs.detach()[:, block]
    angles = t_x.double()[:, None] * freqs[0][:, None, :] + t_y.double()[:, None] * freqs[1][:, None, :]
    # get_mixed_freqs' own layout (computed by timm in float32, hence rebuilt here): interleaved sin | cos
    return torch.cat([angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)], dim=-1)
