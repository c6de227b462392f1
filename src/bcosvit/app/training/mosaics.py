"""Mosaic batches: images tiled into grid x grid canvases, the cells' classes and the canvases'
multi-label or area-weighted targets."""

from __future__ import annotations

import torch
from torch import Tensor

from ...metrics import tile_grids


def mosaic(images: Tensor, targets: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Tile consecutive images of a shuffled batch into ``grid × grid`` canvases.

    Args:
        images: ``(N, C, H, W)``; the last ``N mod grid²`` images are dropped.
        targets: ``(N, K)`` one-hot or soft targets.

    Returns:
        canvases ``(N // grid², C, grid·H, grid·W)`` (row-major cells, ``bcosvit.metrics.tile_grids``)
        and their targets ``(N // grid², K)``: the sum of the cells' targets (class k present in m
        cells scores m), to be turned into multi-label or area-weighted targets by ``mosaic_targets``.
    """
    n = images.shape[0]
    cells = grid * grid
    m = n // cells
    if m == 0:
        raise ValueError(f"a {grid}x{grid} mosaic needs at least {cells} images per batch, got {n}")
    return tile_grids(images[: m * cells], grid), targets[: m * cells].reshape(m, cells, -1).sum(dim=1)


def draw_mosaic_grid(max_grid: int) -> int:
    """Cells per side of the next mosaic, uniform in ``2..max_grid`` (torch's global generator)."""
    return int(torch.randint(2, max_grid + 1, ()))


def mosaic_cells(targets: Tensor, grid: int, canvases: int) -> Tensor:
    """Class of every cell of the first ``canvases`` canvases that ``mosaic`` tiles from a batch with
    these ``(N, K)`` targets: ``(canvases, grid²)``, row-major, the argmax of each image's target."""
    return targets[: canvases * grid * grid].argmax(dim=1).reshape(canvases, grid * grid)


def mosaic_targets(summed: Tensor, cells: int, loss: str) -> Tensor:
    """Targets of mosaic canvases: multi-label (every class present scores 1) for the B-cos BCE loss,
    area-weighted (a distribution, as in CutMix) for cross-entropy."""
    return summed.clamp(max=1.0) if loss == "bce" else summed / cells
