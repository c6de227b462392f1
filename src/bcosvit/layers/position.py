"""Positional schemes: additive embeddings (sin-cos, learned), 2-D rotary embeddings and a
distance penalty on attention scores.

Additive embeddings are added to the tokens after tokenisation; an explanation reports their
contribution as the positional term (docs/design.md#completeness). Rotary embeddings act on the
(detached) queries and keys only, and the distance penalty on the (detached) attention scores, so
neither leaves a positional term.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Grid = tuple[int, int]
Table = TypeVar("Table")


def cached_table(cache: dict, key: tuple, build: Callable[[], Table]) -> Table:
    """``build()`` once per ``key`` in eager mode, kept in ``cache``. Under ``torch.compile`` the
    table is computed inside the graph instead: a dict written while tracing fails its own guard on
    the next call and costs a second compilation of the whole model."""
    if torch.compiler.is_compiling():
        return build()
    if key not in cache:
        cache[key] = build()
    return cache[key]


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
        def build() -> tuple[Tensor, Tensor]:
            quarter = self.head_dim // 4
            freqs = 1.0 / self.temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
            y, x = grid_positions(grid).unbind(dim=1)
            angles = torch.cat([y[:, None] * freqs, x[:, None] * freqs], dim=1)
            angles = torch.cat([angles, angles], dim=1)
            return angles.cos().to(device, dtype), angles.sin().to(device, dtype)

        return cached_table(self._cache, (tuple(grid), device, dtype), build)

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
        def build() -> Tensor:
            positions = grid_positions(grid)
            distance = torch.cdist(positions, positions, compute_mode="donot_use_mm_for_euclid_dist")
            return (-self.slope * distance).to(device, dtype)

        return cached_table(self._cache, (tuple(grid), device, dtype), build)

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


ROPE_TYPES = ("cat", "dinov3", "mixed")


class TimmRotary2d(nn.Module):
    """timm's 2-D rotary embedding of the ``Eva`` family, for queries/keys ``(N, heads, L, head_dim) -> same shape``.

    It reproduces ``apply_rot_embed_cat`` with the tables of timm's ``RotaryEmbeddingCat``
    (``rope_type="cat"``: EVA-02, the SBB ``vit_*_rope_*`` models, Naver's RoPE-Axial ViTs),
    ``RotaryEmbeddingDinoV3`` (``"dinov3"``) and ``RotaryEmbeddingMixed`` (``"mixed"``: Naver's
    RoPE-Mixed ViTs, learned per-head frequencies). The first ``num_prefix_tokens`` tokens (class and
    register tokens) pass unchanged; the others are the ``grid = (rows, cols)`` patches in row-major order.

    Patch ``t`` turns its channel pair ``p`` (``head_dim // 2`` pairs) by ``angle[t, p] = Σ_a coord_a(t) · freq[a, p]``:

    * ``"cat"``: axial; coordinates are patch indices ``(i + grid_offset)``, times ``ref_grid / grid``
      per axis when ``ref_grid`` is set (EVA's rescaling, so the angles depend on the grid);
      ``freq = temperature ** (-k / (head_dim // 4))``, ``k < head_dim // 4``.
    * ``"dinov3"``: axial; coordinates ``2 (i + 0.5 + grid_offset) / denom - 1`` in ``[-1, 1]``
      (``denom`` per ``normalize_coords``: each axis' size, or the grid's ``min``/``max``);
      ``freq = 2π / period`` with ``period = temperature ** (k / (head_dim // 4))``, or geometric from
      ``min_period`` to ``max_period``.
    * ``"mixed"``: ``coord = (t_x, t_y)`` patch indices, ``freq = freqs[:, head]``, a learned
      ``(2, num_heads, head_dim // 2)`` parameter (timm's ``rope.freqs[:, block]``).

    Axial pairs ``p < head_dim // 4`` follow the first coordinate channel, the rest the second; the
    channels are ``(row, col)`` for ``grid_indexing="ij"`` and ``(col, row)`` for ``"xy"``. Pair ``p`` is
    channels ``(2p, 2p + 1)`` (``rotate_half=False``, timm's ``rot``) or ``(p, p + head_dim // 2)``
    (``rotate_half=True``). Fixed tables are computed in float64 and cast to the input's dtype; learned
    frequencies are used in their own dtype (at least float32). timm's training-time coordinate
    augmentations (``shift/jitter/rescale_coords``) are not reproduced: this is its eval-mode rotation.
    """

    def __init__(
        self,
        head_dim: int,
        *,
        num_prefix_tokens: int = 0,
        rope_type: str = "cat",
        rotate_half: bool = False,
        temperature: float = 10000.0,
        grid_indexing: str = "ij",
        grid_offset: float = 0.0,
        ref_grid: Grid | None = None,
        normalize_coords: str = "separate",
        min_period: float | None = None,
        max_period: float | None = None,
        num_heads: int | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(f"rotary embeddings need a head dimension divisible by 4, got {head_dim}")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
        if grid_indexing not in ("ij", "xy"):
            raise ValueError(f"grid_indexing must be 'ij' or 'xy', got {grid_indexing!r}")
        if normalize_coords not in ("separate", "min", "max"):
            raise ValueError(f"normalize_coords must be 'separate', 'min' or 'max', got {normalize_coords!r}")
        if rope_type == "mixed":
            if num_heads is None:
                raise ValueError("rope_type='mixed' needs num_heads (its frequencies are learned per head)")
            if rotate_half or ref_grid is not None or grid_offset:
                raise ValueError("rope_type='mixed' turns interleaved pairs of patch indices (no half/ref/offset)")
        if rope_type != "cat" and ref_grid is not None:
            raise ValueError("ref_grid (EVA's rescaling) exists for rope_type='cat' only")
        if (min_period is None) != (max_period is None) or (min_period is not None and rope_type != "dinov3"):
            raise ValueError("min_period and max_period go together, with rope_type='dinov3'")
        self.head_dim = head_dim
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.rope_type = rope_type
        self.rotate_half = bool(rotate_half)
        self.temperature = float(temperature)
        self.grid_indexing = grid_indexing
        self.grid_offset = float(grid_offset)
        self.ref_grid = None if ref_grid is None else (int(ref_grid[0]), int(ref_grid[1]))
        self.normalize_coords = normalize_coords
        self.min_period = min_period
        self.max_period = max_period
        self.num_heads = num_heads
        if rope_type == "mixed":
            self.freqs = nn.Parameter(torch.empty(2, num_heads, head_dim // 2))
            self.reset_parameters()
        self._cache: dict[tuple, Tensor] = {}

    def reset_parameters(self) -> None:
        """Draw learned frequencies as timm's ``init_random_2d_freqs`` does: magnitudes
        ``temperature ** (-4k / head_dim)`` turned by a random angle per head."""
        if self.rope_type != "mixed":
            return
        mag = 1.0 / self.temperature ** (torch.arange(0, self.head_dim, 4, dtype=torch.float64) / self.head_dim)
        angles = torch.rand(self.num_heads, 1, dtype=torch.float64) * 2 * math.pi
        fx = torch.cat([mag * angles.cos(), mag * (angles + math.pi / 2).cos()], dim=-1)
        fy = torch.cat([mag * angles.sin(), mag * (angles + math.pi / 2).sin()], dim=-1)
        with torch.no_grad():
            self.freqs.copy_(torch.stack([fx, fy]))

    def _coords(self, grid: Grid) -> Tensor:
        """``(rows*cols, 2)`` float64 coordinate channels of the patches, in timm's channel order."""
        return cached_table(self._cache, ("coords", tuple(grid)), lambda: self._build_coords(grid))

    def _build_coords(self, grid: Grid) -> Tensor:
        sizes = [int(grid[0]), int(grid[1])]
        refs = None if self.ref_grid is None else list(self.ref_grid)
        axes = []
        for axis, size in enumerate(sizes):
            if self.rope_type == "dinov3":
                denom = {"separate": size, "min": min(sizes), "max": max(sizes)}[self.normalize_coords]
                t = 2.0 * ((torch.arange(size, dtype=torch.float64) + 0.5 + self.grid_offset) / denom) - 1.0
            else:
                t = torch.arange(size, dtype=torch.float64) + self.grid_offset
                if refs is not None:
                    t = t / size * refs[axis]
            axes.append(t)
        rows, cols = torch.meshgrid(axes[0], axes[1], indexing="ij")
        channels = [rows.flatten(), cols.flatten()]
        if self.grid_indexing == "xy":
            channels = channels[::-1]
        return torch.stack(channels, dim=1)

    def _axial_frequencies(self) -> Tensor:
        """``(head_dim // 4,)`` float64 angular frequencies of the axial types."""
        quarter = self.head_dim // 4
        k = torch.arange(quarter, dtype=torch.float64)
        if self.rope_type == "cat":
            return 1.0 / self.temperature ** (k / quarter)
        if self.min_period is not None:
            exponents = torch.linspace(0, 1, quarter, dtype=torch.float64)
            periods = self.min_period * (self.max_period / self.min_period) ** exponents
        else:
            periods = self.temperature ** (k / quarter)
        return 2 * math.pi / periods

    def _layout(self, values: Tensor) -> Tensor:
        """Per-pair values ``(..., head_dim // 2)`` to per-channel ``(..., head_dim)``."""
        return torch.cat([values, values], dim=-1) if self.rotate_half else values.repeat_interleave(2, dim=-1)

    def _cos_sin(self, grid: Grid, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos, sin`` tables ``(P, head_dim)`` (``(heads, P, head_dim)`` for learned frequencies)."""
        coords = self._coords(grid)
        if self.rope_type == "mixed":
            work = torch.promote_types(self.freqs.dtype, torch.float32)
            freqs = self.freqs.to(work)
            t = coords.to(device=freqs.device, dtype=work)
            angles = t[:, 0, None] * freqs[0, :, None, :] + t[:, 1, None] * freqs[1, :, None, :]
            angles = self._layout(angles)
            return angles.cos().to(device, dtype), angles.sin().to(device, dtype)

        def build() -> tuple[Tensor, Tensor]:
            freqs = self._axial_frequencies()
            angles = self._layout(torch.cat([coords[:, :1] * freqs, coords[:, 1:] * freqs], dim=1))
            return angles.cos().to(device, dtype), angles.sin().to(device, dtype)

        return cached_table(self._cache, ("table", tuple(grid), device, dtype), build)

    def _turn(self, x: Tensor) -> Tensor:
        """The quarter turn of every pair: ``rot`` (interleaved) or ``rotate_half`` of timm."""
        if self.rotate_half:
            first, second = x.chunk(2, dim=-1)
            return torch.cat([-second, first], dim=-1)
        return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        """Turn the patch tokens of ``x`` ``(N, heads, L, head_dim)``; ``L = num_prefix_tokens + rows*cols``."""
        npt = self.num_prefix_tokens
        patches = x[..., npt:, :]
        if patches.shape[-2] != grid[0] * grid[1]:
            raise ValueError(f"{patches.shape[-2]} patch tokens do not fill a {tuple(grid)} grid")
        cos, sin = self._cos_sin(grid, x.device, x.dtype)
        turned = patches * cos + self._turn(patches) * sin
        return torch.cat([x[..., :npt, :], turned], dim=-2) if npt else turned

    def extra_repr(self) -> str:
        extra = f", ref_grid={self.ref_grid}" if self.ref_grid is not None else ""
        return (
            f"head_dim={self.head_dim}, rope_type={self.rope_type!r}, num_prefix_tokens={self.num_prefix_tokens}, "
            f"rotate_half={self.rotate_half}, temperature={self.temperature}, grid_indexing={self.grid_indexing!r}"
            + extra
        )
