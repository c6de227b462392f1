"""Which test images the localisation and faithfulness protocols use, chosen from the labels and the
accuracy pass's predictions without reading any image, and the few of them this process needs,
loaded by index: the grid pointing game's cells (``load_grid_cells``) and the faithfulness images
(``load_faithfulness``). Their number is fixed by the settings (``num_grids`` and the grid sizes,
``faithfulness_images``), not by the size of the test set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ...metrics import sample_grids
from ..data import stratified_indices
from .runtime import EvalRuntime
from .stream import load_images


def selection(count: int, total: int, seed: int, what: str = "images") -> str:
    """How ``count`` of ``total`` images are chosen, for logs and reports: ``"all 400 images"`` or
    ``"24 of 400 images, stratified by class (seed 0)"`` (``stratified_indices``)."""
    if count >= total:
        return f"all {total} {what}"
    return f"{count} of {total} {what}, stratified by class (seed {seed})"


@dataclass
class DrawnGrids:
    """The grids of one size drawn for a model (``sample_grids``) and this process's share of them.

    Attributes:
        grid: cells per side.
        classes: ``(G, grid²)`` class of each cell, row-major.
        image_indices: ``(G, grid²)`` each cell's image, an index into the test set.
        pairs: this process's (grid, cell) pairs, flat indices into ``classes`` (``score_grid_cells``).
        local_indices: ``(G, grid²)`` each cell's image as an index into ``GridCells.images``; -1 for
            the images of grids outside ``pairs``.
    """

    grid: int
    classes: Tensor
    image_indices: Tensor
    pairs: range
    local_indices: Tensor


@dataclass
class GridCells:
    """The grids of every size that could be drawn and the images ``(M, C, H, W)`` on the device
    that this process's pairs use (M is at most ``num_grids · Σ grid²``, whatever the size of the
    test set); ``skipped``: grid size -> why it has no grids (too few classes with confident images)."""

    grids: dict[int, DrawnGrids]
    images: Tensor
    skipped: dict[int, str]


def too_few_classes(confident: Sequence[Tensor], grid: int) -> str | None:
    """Why no ``grid × grid`` grid can be drawn from ``confident`` (one entry of image indices per
    class), or None when one can: each grid needs ``grid²`` classes with confident images."""
    present = sum(1 for indices in confident if len(indices))
    if present >= grid * grid:
        return None
    return (
        f"only {present} classes have confidently classified images (correct, confidence > 0.5); a "
        f"{grid}x{grid} grid needs {grid * grid} (a better trained model, or more test images)"
    )


def _grids_of(pairs: range, cells: int) -> range:
    """The grids that the (grid, cell) pairs ``pairs`` fall in."""
    return range(pairs.start // cells, -(-pairs.stop // cells)) if len(pairs) else range(0)


def load_grid_cells(
    data: Dataset,
    confident: Sequence[Tensor],
    grids: Sequence[int],
    num_grids: int,
    seed: int,
    runtime: EvalRuntime,
    batch_size: int,
) -> GridCells:
    """Draw ``num_grids`` grids of each size in ``grids`` from the ``confident`` images of each class
    (``confident_indices_by_class``; ``sample_grids`` with ``seed``), take this process's share of
    their (grid, cell) pairs (``runtime.shard``) and load the images of its grids, each once. A size
    that needs more classes than have confident images is skipped (``too_few_classes`` says why)."""
    skipped = {grid: reason for grid in grids if (reason := too_few_classes(confident, grid))}
    drawn = {grid: sample_grids(confident, grid, num_grids, seed) for grid in grids if grid not in skipped}
    shares = {grid: runtime.shard(classes.numel(), batch_size) for grid, (classes, _) in drawn.items()}
    used = []
    for grid, (_, image_indices) in drawn.items():
        mine = _grids_of(shares[grid], grid * grid)
        used.append(image_indices[mine.start : mine.stop].reshape(-1))
    needed = torch.unique(torch.cat(used)) if used else torch.zeros(0, dtype=torch.long)
    position = torch.full((len(data),), -1, dtype=torch.long)  # test-set index -> row of the loaded images
    position[needed] = torch.arange(needed.numel())
    images = load_images(data, needed.tolist(), runtime, batch_size) if needed.numel() else torch.zeros(0)
    return GridCells(
        {
            grid: DrawnGrids(grid, classes, image_indices, shares[grid], position[image_indices])
            for grid, (classes, image_indices) in drawn.items()
        },
        images,
        skipped,
    )


@dataclass
class FaithfulnessImages:
    """The faithfulness images (deletion, insertion, completeness) and this process's share of them.

    Attributes:
        indices: ``(F,)`` the test-set indices of all of them, increasing.
        share: this process's positions in ``indices``.
        images: ``(len(share), C, H, W)`` its images on the device.
        predicted: ``(len(share),)`` long, their predicted classes (the classes explained).
    """

    indices: Tensor
    share: range
    images: Tensor
    predicted: Tensor


def faithfulness_indices(labels: Tensor, count: int, seed: int) -> Tensor:
    """``(min(count, N),)`` the faithfulness images among a test set's ``labels`` ``(N,)``: drawn
    stratified by class with ``seed`` (``stratified_indices``; every class keeps its share, where
    the first ``count`` images of a folder tree, stored in class order, would be a few classes),
    in increasing order; all of them when ``count >= N``."""
    return torch.from_numpy(stratified_indices(labels.numpy(), count, seed)).long()


def load_faithfulness(
    data: Dataset, labels: Tensor, predicted: Tensor, count: int, seed: int, runtime: EvalRuntime, batch_size: int
) -> FaithfulnessImages:
    """The ``faithfulness_indices`` of ``data`` and this process's share of them (``runtime.shard``),
    loaded, with their ``predicted`` classes (``(N,)``, from the accuracy pass)."""
    indices = faithfulness_indices(labels, count, seed)
    share = runtime.shard(indices.numel(), batch_size)
    mine = indices[share.start : share.stop]
    images = load_images(data, mine.tolist(), runtime, batch_size) if mine.numel() else torch.zeros(0)
    return FaithfulnessImages(indices, share, images, predicted[mine])
