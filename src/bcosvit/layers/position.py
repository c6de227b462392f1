"""Positional schemes: additive embeddings (sin-cos, learned), 2-D rotary embeddings and a
distance penalty on attention scores.

Additive embeddings are added to the tokens after tokenisation; an explanation reports their
contribution as the positional term (docs/design.md#completeness). Rotary embeddings act on the
(detached) queries and keys only, and the distance penalty on the (detached) attention scores, so
neither leaves a positional term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Grid = tuple[int, int]


def grid_positions(grid: Grid) -> Tensor:
    """``(rows*cols, 2)`` float64 ``(row, col)`` coordinates of a token grid, in row-major token order."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)


def sincos_2d(grid: Grid, dim: int, temperature: float = 10000.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """The fixed 2-D sin-cos embedding of a ``grid = (rows, cols)`` token grid: ``(rows*cols, dim)``."""
    if dim % 4 != 0:
        raise ValueError(f"the sin-cos embedding needs embed_dim divisible by 4, got {dim}")
    y, x = grid_positions(grid).unbind(dim=1)
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / max(dim // 4 - 1, 1))
    y = y[:, None] * omega[None, :]
    x = x[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).to(dtype)


class AdditivePositionalEmbedding(nn.Module):
    """Base of the embeddings added to tokens: ``(N, L, D), grid -> (N, L, D)``.

    ``weight`` is the ``(L, D)`` embedding of the ``grid`` the model was built for; subclasses say
    how to get the embedding of another grid.
    """

    learned: bool

    def __init__(self, dim: int, grid: Grid) -> None:
        super().__init__()
        self.dim = dim
        self.grid = tuple(grid)

    def embedding(self, grid: Grid) -> Tensor:
        """The ``(L, D)`` embedding added for a token grid ``(rows, cols)``."""
        if tuple(grid) == self.grid:
            return self.weight
        return self._embedding_for_other_grid(tuple(grid))

    def _embedding_for_other_grid(self, grid: Grid) -> Tensor:
        raise NotImplementedError

    def forward(self, tokens: Tensor, grid: Grid) -> Tensor:
        return tokens + self.embedding(grid)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}, learned={self.learned}"


class SinCosPositionalEmbedding(AdditivePositionalEmbedding):
    """The fixed 2-D sin-cos embedding, computed by formula for any grid.

    It has no parameters and so no ``reset_parameters``: tools that randomise every layer having
    one (Quantus' model-parameter randomisation) would otherwise count a layer that cannot change.
    """

    learned = False

    def __init__(self, dim: int, grid: Grid) -> None:
        super().__init__(dim, grid)
        self.register_buffer("weight", sincos_2d(self.grid, dim), persistent=False)

    def embedding(self, grid: Grid) -> Tensor:
        """The ``(L, D)`` embedding of ``grid``; a float64 model gets the table computed in float64
        (the buffer, cast from float32, would carry float32 rounding)."""
        if self.weight.dtype == torch.float64:
            return sincos_2d(tuple(grid), self.dim, dtype=torch.float64).to(self.weight.device)
        return super().embedding(grid)

    def _embedding_for_other_grid(self, grid: Grid) -> Tensor:
        return sincos_2d(grid, self.dim, dtype=self.weight.dtype).to(self.weight.device)


class LearnedPositionalEmbedding(AdditivePositionalEmbedding):
    """A learned embedding for ``grid``, bicubically resized for other grids."""

    learned = True

    def __init__(self, dim: int, grid: Grid) -> None:
        super().__init__(dim, grid)
        self.weight = nn.Parameter(torch.empty(self.grid[0] * self.grid[1], dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw a new embedding from ``N(0, 0.02²)``."""
        nn.init.normal_(self.weight, std=0.02)

    def _embedding_for_other_grid(self, grid: Grid) -> Tensor:
        square = self.weight.T.reshape(1, self.dim, *self.grid)
        resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
        return resized.reshape(self.dim, -1).T


class Rotary2d(nn.Module):
    """Axial 2-D rotary embedding for queries/keys ``(N, heads, L, head_dim) -> same shape``.

    The first half of the rotated pairs turns with the token's row, the second with its column.
    """

    def __init__(self, head_dim: int, temperature: float = 100.0) -> None:
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(f"rotary embeddings need a head dimension divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.temperature = temperature
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _cos_sin(self, grid: Grid, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (tuple(grid), device, dtype)
        if key not in self._cache:
            quarter = self.head_dim // 4
            freqs = 1.0 / self.temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
            y, x = grid_positions(grid).unbind(dim=1)
            angles = torch.cat([y[:, None] * freqs, x[:, None] * freqs], dim=1)
            angles = torch.cat([angles, angles], dim=1)
            self._cache[key] = (angles.cos().to(device, dtype), angles.sin().to(device, dtype))
        return self._cache[key]

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        cos, sin = self._cos_sin(grid, x.device, x.dtype)
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}"


class DistancePenalty(nn.Module):
    """Additive attention-score bias ``-slope * distance(i, j)`` between tokens of a 2-D grid: ``(L, L)``.

    A fixed 2-D form of ALiBi (Press et al., ICLR 2022) with Euclidean distances in token units.
    It makes attention prefer nearby tokens, so evidence stays closer to where it was found. It
    depends on relative offsets only, so it applies unchanged to any grid size.
    """

    def __init__(self, slope: float) -> None:
        super().__init__()
        self.slope = float(slope)
        self._cache: dict[tuple, Tensor] = {}

    def forward(self, grid: Grid, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (tuple(grid), device, dtype)
        if key not in self._cache:
            positions = grid_positions(grid)
            distance = torch.cdist(positions, positions, compute_mode="donot_use_mm_for_euclid_dist")
            self._cache[key] = (-self.slope * distance).to(device, dtype)
        return self._cache[key]

    def extra_repr(self) -> str:
        return f"slope={self.slope}"
