"""The grid pointing game (docs/design.md: grid pointing game): images the model classifies confidently, tiled into
grids of
``grid × grid`` distinct classes, and the share of each cell's explanation that falls inside it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..inputs import as_model_input
from ..layers.detach import attribution_state
from ..models.vit import check_images
from ..targets import required_classes
from .passes import (
    AttributionMethod,
    as_maps,
    check_batch_size,
    is_bcos_model,
    predict_logits,
    target_probabilities,
)
from .statistics import mean_ci95


def confident_images_by_class(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | Sequence[int],
    batch_size: int = 32,
    *,
    threshold: float = 0.5,
    is_bcos: bool | None = None,
    logits: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Images the model classifies correctly with confidence ``> threshold``, per class.

    Correct means ``argmax(logits) == label``; confidence is the label's probability (sigmoid of its
    logit for B-cos models, softmax probability for standard ones).

    Args:
        images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``.
        logits: ``predict_logits(model, images)`` when the caller already has them (saves a pass
            over every image).

    Returns:
        ``(indices, confidences)``, two lists with one entry per class ``k`` of the model output:
        ``indices[k]`` ``(M_k,)`` long indices into ``images``, sorted by confidence descending (equal
        confidences keep the lower index first), and ``confidences[k]`` ``(M_k,)`` float64.
    """
    check_images(images)
    labels = required_classes(labels, images.shape[0], "labels")
    bcos = is_bcos_model(model, is_bcos)
    if logits is None:
        logits = predict_logits(model, images, batch_size)
    elif logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        raise InputError(f"expected logits of shape ({images.shape[0]}, K), got {tuple(logits.shape)}")
    if images.shape[0] == 0:
        return [], []
    confidence = target_probabilities(logits, labels, bcos).double()
    return confident_indices_by_class(logits.argmax(dim=1), confidence, labels, logits.shape[1], threshold=threshold)


def confident_indices_by_class(
    predicted: Tensor,
    confidence: Tensor,
    labels: Tensor | Sequence[int],
    num_classes: int,
    *,
    threshold: float = 0.5,
) -> tuple[list[Tensor], list[Tensor]]:
    """The selection of ``confident_images_by_class`` from what one pass over the images leaves:
    no images, no logits, so it runs on the predictions of a whole test set streamed through the model.

    Args:
        predicted: ``(N,)`` long, each image's predicted class (``argmax`` of its logits).
        confidence: ``(N,)`` the probability of each image's label (``target_probabilities``).
        labels: ``(N,)`` classes in ``[0, num_classes)``.
        num_classes: ``K``, the model's classes (one list entry each).

    Returns:
        ``(indices, confidences)`` as ``confident_images_by_class`` returns them: per class ``k``,
        the images with ``predicted == label == k`` and ``confidence > threshold``, most confident
        first (equal confidences keep the lower index first), and their float64 confidences.
    """
    labels = required_classes(labels, predicted.shape[0], "labels")
    if predicted.shape != labels.shape or confidence.shape != labels.shape:
        raise InputError(
            f"predicted {tuple(predicted.shape)}, confidence {tuple(confidence.shape)} and labels "
            f"{tuple(labels.shape)} must all have shape (N,)"
        )
    if labels.numel() == 0:
        return [], []
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise InputError(f"labels must lie in [0, {num_classes - 1}] (the model's classes)")
    confidence = confidence.double().cpu()
    labels = labels.cpu()
    keep = (predicted.cpu() == labels) & (confidence > threshold)
    # one stable sort by class then confidence instead of a scan of every image per class (K = 1000)
    order = torch.argsort(confidence[keep], descending=True, stable=True)
    members = torch.nonzero(keep).flatten()[order]
    members = members[torch.argsort(labels[members], stable=True)]
    counts = torch.bincount(labels[members], minlength=num_classes).tolist()
    indices = list(torch.split(members, counts))
    return indices, [confidence[idx] for idx in indices]


def sample_grids(
    indices_by_class: Sequence[Tensor | Sequence[int]],
    grid: int = 2,
    num_grids: int = 100,
    seed: int = 0,
    cycle: bool = True,
) -> tuple[Tensor, Tensor]:
    """Choose the classes and images of ``num_grids`` grids of ``grid × grid`` cells.

    Each grid takes ``grid²`` distinct classes drawn uniformly at random (``torch.Generator`` seeded
    with ``seed``; the cell order is the draw order) among the classes that have images, and each
    cell takes its class's next image from ``indices_by_class[k]`` (most confident first, as returned
    by ``confident_images_by_class``). The draws are sequential, so the first grids do not depend on
    ``num_grids``.

    When a class has used all its images: with ``cycle=True`` (default) it starts again from its most
    confident image (so images repeat across grids, never within one grid since its classes are
    distinct); with ``cycle=False`` the class leaves the pool, and sampling stops early (fewer grids
    than asked) once fewer than ``grid²`` classes have unused images.

    Returns:
        ``(classes, image_indices)``, both ``(G, grid²)`` long, cells in row-major order.
    """
    if grid < 1:
        raise ConfigError(f"grid must be at least 1, got {grid}")
    if num_grids < 1:
        raise ConfigError(f"num_grids must be at least 1, got {num_grids}")
    cells = grid * grid
    pools = [torch.as_tensor(p, dtype=torch.long).flatten().tolist() for p in indices_by_class]
    with_images = [k for k, pool in enumerate(pools) if pool]
    if len(with_images) < cells:
        raise InputError(
            f"only {len(with_images)} classes have confidently classified images; a {grid}×{grid} grid needs "
            f"{cells} distinct classes (use more images, a smaller grid or a better model)"
        )
    generator = torch.Generator().manual_seed(seed)
    cursor = [0] * len(pools)
    classes: list[list[int]] = []
    chosen: list[list[int]] = []
    for _ in range(num_grids):
        pool_classes = with_images if cycle else [k for k in with_images if cursor[k] < len(pools[k])]
        if len(pool_classes) < cells:
            break
        picks = torch.randperm(len(pool_classes), generator=generator)[:cells].tolist()
        row_classes, row_images = [], []
        for j in picks:
            k = pool_classes[j]
            if cursor[k] == len(pools[k]):
                cursor[k] = 0
            row_classes.append(k)
            row_images.append(pools[k][cursor[k]])
            cursor[k] += 1
        classes.append(row_classes)
        chosen.append(row_images)
    return (
        torch.tensor(classes, dtype=torch.long).reshape(-1, cells),
        torch.tensor(chosen, dtype=torch.long).reshape(-1, cells),
    )


def tile_grids(cells: Tensor, grid: int) -> Tensor:
    """Tile consecutive images into ``grid × grid`` grid images (differentiable).

    Args:
        cells: ``(G·grid², C, H, W)``; grid ``g`` is made of ``cells[g·grid² : (g + 1)·grid²]``, row-major.

    Returns:
        ``(G, C, grid·H, grid·W)``; cell ``j`` covers rows ``(j // grid)·H ...`` and columns ``(j % grid)·W ...``.
    """
    n, c, h, w = cells.shape
    if n % (grid * grid):
        raise InputError(f"{grid}x{grid} grids need a multiple of {grid * grid} cell images, got {n}")
    g = n // (grid * grid)
    return cells.reshape(g, grid, grid, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(g, c, grid * h, grid * w)


def assemble_grids(images: Tensor, image_indices: Tensor, grid: int) -> Tensor:
    """Tile ``images[image_indices]`` into grid images (``tile_grids``).

    Args:
        images: ``(N, C, H, W)``; image_indices: ``(G, grid²)`` row-major cell images.

    Returns:
        ``(G, C, grid·H, grid·W)``.
    """
    check_images(images)
    if image_indices.ndim != 2 or image_indices.shape[1] != grid * grid:
        raise InputError(f"image_indices must have shape (G, {grid * grid}), got {tuple(image_indices.shape)}")
    return tile_grids(images[image_indices.reshape(-1).to(images.device)], grid)


@dataclass
class Grids:
    """Grid images for figures and the cells they are made of.

    Attributes:
        images: ``(G, C, grid·H, grid·W)`` grid images.
        classes: ``(G, grid²)`` class of each cell (row-major).
        image_indices: ``(G, grid²)`` index of each cell's image in the source images.
        confidences: ``(G, grid²)`` float64 model confidence of each cell's image.
        grid: cells per side.
    """

    images: Tensor
    classes: Tensor
    image_indices: Tensor
    confidences: Tensor
    grid: int


def _grid_cells(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | Sequence[int],
    grid: int,
    num_grids: int,
    seed: int,
    batch_size: int,
    is_bcos: bool | None,
    cycle: bool,
    confident: tuple[list[Tensor], list[Tensor]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if confident is None:
        confident = confident_images_by_class(model, images, labels, batch_size, is_bcos=is_bcos)
    indices, confidences = confident
    classes, image_indices = sample_grids(indices, grid, num_grids, seed, cycle)
    confidence_of = torch.zeros(images.shape[0], dtype=torch.float64)
    for idx, conf in zip(indices, confidences):
        confidence_of[idx] = conf
    return classes, image_indices, confidence_of[image_indices]


def make_grids(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | Sequence[int],
    grid: int = 2,
    num_grids: int = 100,
    seed: int = 0,
    batch_size: int = 32,
    is_bcos: bool | None = None,
    cycle: bool = True,
) -> Grids:
    """The grids ``grid_pointing_game`` uses with the same arguments (the first ``num_grids`` of them).

    Args:
        images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``. See ``sample_grids`` for ``cycle``.
    """
    classes, image_indices, confidences = _grid_cells(
        model, images, labels, grid, num_grids, seed, batch_size, is_bcos, cycle
    )
    return Grids(assemble_grids(images, image_indices, grid), classes, image_indices, confidences, grid)


def _smooth(maps: Tensor, kernel: int) -> Tensor:
    """Average pooling ``(B, H, W)`` -> ``(B, H, W)``, stride 1, zero padding not counted."""
    h, w = maps.shape[-2:]
    pooled = F.avg_pool2d(maps[:, None], kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return pooled[:, 0, :h, :w]


def positive_mass_per_cell(maps: Tensor, grid: int) -> Tensor:
    """Sum of the positive part of ``maps`` ``(B, grid·H, grid·W)`` in each cell: ``(B, grid²)``,
    row-major; differentiable (the energy loss of localisation training uses it too)."""
    b, h, w = maps.shape
    positive = maps.clamp_min(0)
    return positive.reshape(b, grid, h // grid, grid, w // grid).sum(dim=(2, 4)).reshape(b, grid * grid)


def grid_cell_scores(maps: Tensor, cells: Tensor, grid: int, smooth: int = 0) -> Tensor:
    """Pointing-game score of one cell per map.

    Args:
        maps: ``(B, grid·H, grid·W)`` attribution maps of whole grids.
        cells: ``(B,)`` row-major index of the cell each map should point to.
        smooth: average-pooling kernel applied before keeping positive values (0 or 1: none; odd
            kernels are centred, even ones shifted by half a pixel).

    Returns:
        ``(B,)`` float64: positive attribution inside the cell / total positive attribution (0 where
        the total is 0).
    """
    maps = maps.detach().double()
    if maps.ndim != 3 or maps.shape[1] % grid or maps.shape[2] % grid:
        raise InputError(f"maps must have shape (B, H, W) with H and W divisible by {grid}, got {tuple(maps.shape)}")
    if smooth < 0:
        raise ConfigError(f"smooth must be 0 (none) or a pooling kernel size, got {smooth}")
    if smooth > 1:
        maps = _smooth(maps, smooth)
    per_cell = positive_mass_per_cell(maps, grid)
    inside = per_cell.gather(1, cells.to(per_cell.device).long()[:, None]).squeeze(1)
    total = per_cell.sum(dim=1)
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)), 0.0)


@dataclass
class GridResult:
    """Result of the grid pointing game.

    Attributes:
        scores: ``(G, grid²)`` float64 score of each cell (its class's attribution share).
        classes: ``(G, grid²)`` class of each cell; image_indices: ``(G, grid²)`` its source image.
        grid: cells per side; num_grids: G.
        mean: mean score over all cells and grids.
        ci95: 95 % confidence interval of ``mean``, normal approximation over the G per-grid means
            (``mean_ci95``).
    """

    scores: Tensor
    classes: Tensor
    image_indices: Tensor
    grid: int
    num_grids: int
    mean: float
    ci95: tuple[float, float]

    @classmethod
    def of(cls, scores: Tensor, classes: Tensor, image_indices: Tensor, grid: int) -> GridResult:
        """The result of cell ``scores`` ``(G, grid²)`` (``score_grid_cells``, reshaped) of the grids
        ``classes`` and ``image_indices`` ``(G, grid²)``: their mean and its 95 % CI over grids."""
        mean, low, high = mean_ci95(scores.mean(dim=1))
        return cls(scores, classes, image_indices, grid, scores.shape[0], mean, (low, high))

    @property
    def per_grid(self) -> Tensor:
        """``(G,)`` mean score of each grid."""
        return self.scores.mean(dim=1)

    def per_class(self) -> dict[int, float]:
        """Mean score of each class that appears in the grids."""
        return {int(k): float(self.scores[self.classes == k].mean()) for k in self.classes.unique()}

    def to_dict(self, include_scores: bool = True) -> dict[str, Any]:
        """JSON-ready summary (scores and cells as nested lists when ``include_scores``)."""
        out: dict[str, Any] = {
            "metric": "grid_pointing_game",
            "grid": self.grid,
            "num_grids": self.num_grids,
            "mean": self.mean,
            "ci95": list(self.ci95),
            "per_class": {str(k): v for k, v in self.per_class().items()},
        }
        if include_scores:
            out["scores"] = self.scores.tolist()
            out["classes"] = self.classes.tolist()
            out["image_indices"] = self.image_indices.tolist()
        return out


def grid_pointing_game(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | Sequence[int],
    method: AttributionMethod,
    grid: int = 2,
    num_grids: int = 100,
    seed: int = 0,
    batch_size: int = 32,
    smooth: int = 0,
    is_bcos: bool | None = None,
    cycle: bool = True,
    confident: tuple[list[Tensor], list[Tensor]] | None = None,
) -> GridResult:
    """The grid pointing game (docs/design.md: grid pointing game) of ``method`` on ``model``.

    1. keep the images ``model`` classifies correctly with confidence > 0.5, sorted per class by
       confidence (``confident_images_by_class``);
    2. build ``num_grids`` grids of ``grid × grid`` distinct classes with a fixed ``seed``, each
       cell taking its class's next most confident image (``sample_grids``; ``cycle`` says what
       happens when a class runs out of images);
    3. explain every cell's class on its whole grid image ``(C, grid·H, grid·W)``: the
       ``G·grid²`` (grid, class) pairs go through ``method`` in batches of ``batch_size``;
    4. score each cell with ``grid_cell_scores`` (optional smoothing, positive part, share inside
       the cell).

    Args:
        images: ``(N, C, H, W)`` in [0, 1] (the model must accept ``grid``-times larger inputs;
            bcosvit models accept any size divisible by the patch size); labels: ``(N,)``.
        method: ``method(model, grid_images (B, C, grid·H, grid·W), target (B,)) -> (B, grid·H, grid·W)``.
        confident: ``confident_images_by_class(model, images, labels)`` computed once beforehand, to
            reuse it across methods and grid sizes (it runs the model over every image).

    Returns:
        a ``GridResult``.
    """
    check_images(images)
    check_batch_size(batch_size)
    classes, image_indices, _ = _grid_cells(
        model, images, labels, grid, num_grids, seed, batch_size, is_bcos, cycle, confident
    )
    scores = score_grid_cells(model, images, classes, image_indices, method, grid, batch_size=batch_size, smooth=smooth)
    return GridResult.of(scores.reshape(classes.shape), classes, image_indices, grid)


def score_grid_cells(
    model: nn.Module,
    images: Tensor,
    classes: Tensor,
    image_indices: Tensor,
    method: AttributionMethod,
    grid: int,
    pairs: range | None = None,
    batch_size: int = 32,
    smooth: int = 0,
) -> Tensor:
    """Steps 3 and 4 of ``grid_pointing_game`` for drawn grids: explain each (grid, cell) pair's
    class on its grid image and score the cell (``grid_cell_scores``).

    Args:
        images: ``(N, C, H, W)`` in [0, 1], the images ``image_indices`` index.
        classes, image_indices: ``(G, grid²)``, the cells of ``sample_grids``, row-major.
        pairs: which pairs, as a range of flat indices into ``classes`` (pair ``p`` is cell
            ``p % grid²`` of grid ``p // grid²``); default all ``G·grid²``. They go through
            ``method`` in batches of ``batch_size`` from ``pairs.start``, so the parts of a range split
            at multiples of ``batch_size`` are scored exactly as the whole range is (sharding).

    Returns:
        ``(len(pairs),)`` float64 scores.
    """
    check_images(images)
    check_batch_size(batch_size)
    g, cells = classes.shape
    pairs = range(g * cells) if pairs is None else pairs
    if pairs.step != 1 or not 0 <= pairs.start <= pairs.stop <= g * cells:
        raise InputError(f"pairs must be a contiguous range within [0, {g * cells}], got {pairs}")
    grid_of = torch.arange(g).repeat_interleave(cells)
    cell_of = torch.arange(cells).repeat(g)
    targets = classes.reshape(-1)
    scores = torch.empty(len(pairs), dtype=torch.float64)
    with attribution_state(model, explanation=None, gradients=None):
        for start in range(0, len(pairs), batch_size):
            part = slice(pairs.start + start, min(pairs.start + start + batch_size, pairs.stop))
            x = as_model_input(model, assemble_grids(images, image_indices[grid_of[part]], grid))
            maps = as_maps(method(model, x, targets[part].to(x.device)), x)
            scores[start : start + batch_size] = grid_cell_scores(maps, cell_of[part], grid, smooth).cpu()
    return scores


# --- deletion and insertion (faithfulness) -------------------------------------------------------
