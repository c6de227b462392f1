"""Quantitative evaluation of attribution methods: localisation and faithfulness (SPEC §2.8, §3).

An *attribution method* is any callable ``method(model, images, target) -> maps`` taking images
``(N, C, H, W)`` in [0, 1] and target classes ``(N,)`` (long) and returning spatial maps
``(N, H, W)`` at input resolution (a ``(N, C, H, W)`` result is summed over channels), e.g.
``lambda m, x, t: bcosvit.explain(m, x, t).contributions``.

- ``grid_pointing_game``: the grid pointing game of SPEC §2.8 (with ``confident_images_by_class``,
  ``sample_grids``, ``assemble_grids``, ``make_grids`` and ``grid_cell_scores`` as its parts).
- ``deletion_insertion``: deletion and insertion curves and their areas (faithfulness).
- ``completeness_stats``: summary of completeness errors (SPEC §2.3).
- ``mean_ci95``: mean and 95 % confidence interval (normal approximation).

Probabilities are ``sigmoid(logit)`` for B-cos models (trained with binary cross-entropy) and the
softmax probability for standard models; ``is_bcos=None`` reads ``model.is_bcos``. Every function
works on whole batches (``batch_size`` bounds how many images go through the model at once; the
defaults are the 32 that ``bcosvit evaluate`` uses) and runs the model in eval mode
(``bcosvit.layers.detach.attribution_state``), restoring its state afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, InputError
from .layers.detach import attribution_state
from .targets import required_classes

__all__ = [
    "AttributionMethod",
    "CurveResult",
    "GridResult",
    "Grids",
    "assemble_grids",
    "completeness_stats",
    "compute_attributions",
    "confident_images_by_class",
    "deletion_insertion",
    "grid_cell_scores",
    "grid_pointing_game",
    "make_grids",
    "mean_ci95",
    "predict_logits",
    "sample_grids",
    "target_probabilities",
]

AttributionMethod = Callable[[nn.Module, Tensor, Tensor], Tensor]

Z95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal distribution


# --- small helpers -------------------------------------------------------------------------------


def mean_ci95(values: Tensor | Sequence[float]) -> tuple[float, float, float]:
    """Mean of ``values`` ``(M,)`` (any shape, flattened) and its 95 % confidence interval.

    Normal approximation: ``mean ± 1.96 · std / sqrt(M)`` with the sample standard deviation
    (``M - 1`` in the denominator). With a single value the interval is undefined: ``(nan, nan)``.

    Returns:
        ``(mean, low, high)`` as floats.
    """
    v = _float64(values)
    if v.numel() == 0:
        raise InputError("mean_ci95 needs at least one value, got an empty tensor")
    mean = float(v.mean())
    if v.numel() < 2:
        return mean, math.nan, math.nan
    half = Z95 * float(v.std(unbiased=True)) / math.sqrt(v.numel())
    return mean, mean - half, mean + half


def completeness_stats(errors: Tensor, outputs: Tensor | None = None) -> dict[str, float]:
    """Summary of completeness errors (SPEC §2.3), e.g. ``Explanation.completeness_error``.

    Args:
        errors: completeness errors of any shape (absolute values are taken).
        outputs: optional explained values (logits) of the same shape; when given, relative errors
            ``|error| / max(|output|, 1e-12)`` are summarised too (as in
            ``Explanation.relative_completeness_error``).

    Returns:
        ``{"count", "abs_mean", "abs_median", "abs_max", "abs_p99"}`` and, with ``outputs``, the same
        ``rel_*`` keys. Median and p99 use linear interpolation between order statistics.
    """
    e = _float64(errors).abs()
    if e.numel() == 0:
        raise InputError("completeness_stats needs at least one error value, got an empty tensor")
    stats: dict[str, float] = {"count": float(e.numel())}
    stats.update(_summary(e, "abs"))
    if outputs is not None:
        o = _float64(outputs)
        if o.shape != e.shape:
            raise InputError(f"outputs must have as many values as errors ({e.numel()}), got {o.numel()}")
        stats.update(_summary(e / o.abs().clamp_min(1e-12), "rel"))
    return stats


def _float64(values: Tensor | Sequence[float]) -> Tensor:
    """Values of any shape -> flat float64 CPU tensor (Python floats are not rounded to float32)."""
    if isinstance(values, Tensor):
        return values.detach().double().flatten().cpu()
    return torch.as_tensor(values, dtype=torch.float64).flatten()


def _summary(v: Tensor, prefix: str) -> dict[str, float]:
    median, p99 = np.quantile(v.numpy(), [0.5, 0.99])
    return {
        f"{prefix}_mean": float(v.mean()),
        f"{prefix}_median": float(median),
        f"{prefix}_max": float(v.max()),
        f"{prefix}_p99": float(p99),
    }


def _is_bcos(model: nn.Module, is_bcos: bool | None) -> bool:
    if is_bcos is not None:
        return bool(is_bcos)
    value = getattr(model, "is_bcos", None)
    if value is None:
        raise ConfigError(
            f"{type(model).__name__} has no 'is_bcos' attribute; pass is_bcos=True (sigmoid probabilities) "
            "or is_bcos=False (softmax probabilities)"
        )
    return bool(value)


def target_probabilities(logits: Tensor, target: Tensor, is_bcos: bool) -> Tensor:
    """``(N,)`` probability of ``target`` ``(N,)`` from ``logits`` ``(N, K)``: sigmoid (B-cos) or softmax."""
    index = target.to(logits.device).long()[:, None]
    if is_bcos:
        return torch.sigmoid(logits.gather(1, index)).squeeze(1)
    return torch.softmax(logits, dim=1).gather(1, index).squeeze(1)


def _to_model(model: nn.Module, x: Tensor) -> Tensor:
    """Move images to the model's device and floating dtype (models without parameters: unchanged)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return x.to(tensor.device, tensor.dtype)
    return x


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"expected images of shape (N, C, H, W), got {shape}")
    if not images.is_floating_point():
        raise InputError(f"expected floating-point images in [0, 1], got dtype {images.dtype}; divide uint8 by 255")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")


def _as_maps(maps: Tensor, images: Tensor) -> Tensor:
    """Validate a method's output for ``images`` ``(B, C, H, W)``: ``(B, H, W)`` (channels summed), float64."""
    if not isinstance(maps, Tensor):
        raise InputError(f"the attribution method must return a tensor, got {type(maps).__name__}")
    b, c, h, w = images.shape
    if maps.ndim == 4 and maps.shape[0] == b and maps.shape[2:] == (h, w):
        maps = maps.sum(dim=1)
    if maps.shape != (b, h, w):
        raise InputError(
            f"the attribution method must return maps of shape (N, H, W) = {(b, h, w)} for images {(b, c, h, w)}, "
            f"got {tuple(maps.shape)}"
        )
    maps = maps.detach().double()
    if not bool(torch.isfinite(maps).all()):
        raise InputError("the attribution method returned NaN or Inf values")
    return maps


def compute_attributions(
    model: nn.Module, images: Tensor, target: Tensor, method: AttributionMethod, batch_size: int = 32
) -> Tensor:
    """Run ``method`` over ``images`` ``(N, C, H, W)`` and ``target`` ``(N,)`` in batches.

    Returns:
        ``(N, H, W)`` float64 maps on the CPU (ready for ``deletion_insertion``).
    """
    _check_images(images)
    _check_batch_size(batch_size)
    target = required_classes(target, images.shape[0])
    out = []
    with attribution_state(model, explanation=None, gradients=None):
        for start in range(0, images.shape[0], batch_size):
            x = _to_model(model, images[start : start + batch_size])
            t = target[start : start + batch_size].to(x.device)
            out.append(_as_maps(method(model, x, t), x).cpu())
    return torch.cat(out) if out else images.new_zeros((0, *images.shape[2:]), dtype=torch.float64)


# --- grid pointing game (SPEC §2.8) --------------------------------------------------------------


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, batch_size: int = 32) -> Tensor:
    """Logits ``(N, K)`` of ``model`` (in eval mode) for ``images`` ``(N, C, H, W)``, on the CPU."""
    _check_images(images)
    _check_batch_size(batch_size)
    with attribution_state(model, explanation=None, gradients=None):
        parts = [
            model(_to_model(model, images[start : start + batch_size])).float().cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


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
    _check_images(images)
    labels = required_classes(labels, images.shape[0], "labels")
    bcos = _is_bcos(model, is_bcos)
    if logits is None:
        logits = predict_logits(model, images, batch_size)
    elif logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        raise InputError(f"expected logits of shape ({images.shape[0]}, K), got {tuple(logits.shape)}")
    if images.shape[0] == 0:
        return [], []
    num_classes = logits.shape[1]
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise InputError(f"labels must lie in [0, {num_classes - 1}] (the model's classes)")
    predicted_t = logits.argmax(dim=1)
    confidence_t = target_probabilities(logits, labels, bcos).double()
    keep = (predicted_t == labels) & (confidence_t > threshold)
    indices, confidences = [], []
    for k in range(num_classes):
        members = torch.nonzero(keep & (labels == k)).flatten()
        order = torch.argsort(confidence_t[members], descending=True, stable=True)
        indices.append(members[order])
        confidences.append(confidence_t[members[order]])
    return indices, confidences


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


def assemble_grids(images: Tensor, image_indices: Tensor, grid: int) -> Tensor:
    """Tile ``images[image_indices]`` into grid images.

    Args:
        images: ``(N, C, H, W)``; image_indices: ``(G, grid²)`` row-major cell images.

    Returns:
        ``(G, C, grid·H, grid·W)``; cell ``j`` covers rows ``(j // grid)·H ...`` and columns ``(j % grid)·W ...``.
    """
    _check_images(images)
    g = image_indices.shape[0]
    if image_indices.shape != (g, grid * grid):
        raise InputError(f"image_indices must have shape (G, {grid * grid}), got {tuple(image_indices.shape)}")
    _, c, h, w = images.shape
    cells = images[image_indices.reshape(-1).to(images.device)]
    return cells.reshape(g, grid, grid, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(g, c, grid * h, grid * w)


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
    """The grid pointing game (SPEC §2.8) of ``method`` on ``model``.

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
    _check_images(images)
    _check_batch_size(batch_size)
    classes, image_indices, _ = _grid_cells(
        model, images, labels, grid, num_grids, seed, batch_size, is_bcos, cycle, confident
    )
    g, cells = classes.shape
    grid_of = torch.arange(g).repeat_interleave(cells)
    cell_of = torch.arange(cells).repeat(g)
    targets = classes.reshape(-1)
    scores = torch.empty(g * cells, dtype=torch.float64)
    with attribution_state(model, explanation=None, gradients=None):
        for start in range(0, g * cells, batch_size):
            part = slice(start, start + batch_size)
            x = _to_model(model, assemble_grids(images, image_indices[grid_of[part]], grid))
            maps = _as_maps(method(model, x, targets[part].to(x.device)), x)
            scores[part] = grid_cell_scores(maps, cell_of[part], grid, smooth).cpu()
    scores = scores.reshape(g, cells)
    mean, low, high = mean_ci95(scores.mean(dim=1))
    return GridResult(scores, classes, image_indices, grid, g, mean, (low, high))


# --- deletion and insertion (faithfulness) -------------------------------------------------------


@dataclass
class CurveResult:
    """Deletion or insertion curves.

    Attributes:
        mode: "deletion" or "insertion".
        fractions: ``(S+1,)`` float64 fraction of pixels removed/inserted at each step (exact
            ``floor(k·P/S)/P`` for ``P`` pixels, from 0 to 1).
        scores: ``(N, S+1)`` float64 target probability at each step.
        auc: ``(N,)`` float64 area under each curve (trapezoidal rule over ``fractions``).
        baseline: the value removed pixels take.
    """

    mode: str
    fractions: Tensor
    scores: Tensor
    auc: Tensor
    baseline: float | list

    @property
    def mean_curve(self) -> Tensor:
        """``(S+1,)`` mean curve over images."""
        return self.scores.mean(dim=0)

    @property
    def mean_auc(self) -> float:
        """Mean area under the curve over images."""
        return float(self.auc.mean())

    @property
    def auc_ci95(self) -> tuple[float, float]:
        """95 % confidence interval of ``mean_auc`` (``mean_ci95`` over images)."""
        _, low, high = mean_ci95(self.auc)
        return low, high

    def to_dict(self, include_scores: bool = False) -> dict[str, Any]:
        """JSON-ready summary (per-image curves too when ``include_scores``)."""
        out: dict[str, Any] = {
            "metric": self.mode,
            "num_images": int(self.scores.shape[0]),
            "steps": int(self.fractions.numel() - 1),
            "baseline": self.baseline,
            "fractions": self.fractions.tolist(),
            "mean_curve": self.mean_curve.tolist(),
            "mean_auc": self.mean_auc,
            "auc_ci95": list(self.auc_ci95),
        }
        if include_scores:
            out["scores"] = self.scores.tolist()
            out["auc"] = self.auc.tolist()
        return out


def _pixel_order(attributions: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, H, W)`` -> ``order`` ``(B, H·W)`` (pixel indices, most relevant first; ties in row-major
    order) and ``rank`` ``(B, H·W)`` (each pixel's position in ``order``, 0 = most relevant)."""
    flat = attributions.reshape(attributions.shape[0], -1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return order, torch.empty_like(order).scatter_(1, order, positions)


def _distinct_steps(
    images: Tensor, order: Tensor, fill: Tensor, counts: Tensor, constant_step: int
) -> tuple[Tensor, Tensor]:
    """Which masked images of a deletion or insertion curve differ from the image before them.

    The image at step ``k`` depends only on ``key[:, k]``, the number of pixels *not* already at
    the baseline ``fill`` ``(C, H, W)`` among the top ``counts[k]`` of ``order`` (``_pixel_order``):
    removing (or inserting) a pixel that equals the baseline leaves the image as it was. Equal keys
    mean equal images.

    Returns:
        ``key`` ``(N, S+1)`` and ``needed`` ``(N, S+1)``: the steps whose image differs both from
        the step before and from the all-baseline image (the constant step is never needed).
    """
    n = images.shape[0]
    differs = (images != fill).any(dim=1).flatten(1)  # (N, P)
    moved = torch.cat([torch.zeros(n, 1, dtype=torch.long), differs.gather(1, order).long().cumsum(dim=1)], dim=1)
    key = moved[:, counts]  # (N, S+1)
    needed = key != key[:, constant_step : constant_step + 1]
    needed[:, 1:] &= key[:, 1:] != key[:, :-1]
    return key, needed


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    target: Tensor | Sequence[int],
    attributions: Tensor,
    steps: int = 20,
    baseline: float | Tensor = 0.0,
    batch_size: int = 32,
    mode: Literal["deletion", "insertion"] = "deletion",
    is_bcos: bool | None = None,
) -> CurveResult:
    """Deletion or insertion curve of ``attributions`` on ``model``.

    Pixels (spatial positions, all channels together) are ranked by attribution, most relevant
    first, equal values in row-major order. At step ``k = 0 ... steps`` the top ``floor(k·P/steps)``
    of the ``P`` pixels are *removed* (deletion: set to ``baseline`` in every channel) or *inserted*
    (insertion: start from the all-``baseline`` image and put those pixels back), and the target's
    probability is recorded. The masked images are built with one comparison of pixel ranks against
    step counts per batch and go through the model in batches of ``batch_size``. Only images that
    differ from the step before go through it: a step that removes (or inserts) only pixels already
    at the baseline copies the score before it, and the all-``baseline`` image, the same for every
    input, goes through once.

    The default ``baseline`` 0 is black, which for Fashion-MNIST is the background (a B-cos model
    sees it as ``[0, 1]``; a standard model as ``-mean/std``). A tensor broadcastable to
    ``(C, H, W)`` (e.g. per-channel means ``(C, 1, 1)``) can be given instead.

    Lower deletion AUC and higher insertion AUC mean a more faithful attribution.

    Args:
        images: ``(N, C, H, W)`` in [0, 1]; target: ``(N,)`` classes; attributions: ``(N, H, W)``
            (``(N, C, H, W)`` is summed over channels).

    Returns:
        a ``CurveResult``.
    """
    if mode not in ("deletion", "insertion"):
        raise ConfigError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    _check_images(images)
    _check_batch_size(batch_size)
    n, c, h, w = images.shape
    target = required_classes(target, n)
    attributions = _as_maps(torch.as_tensor(attributions), images)
    bcos = _is_bcos(model, is_bcos)
    pixels = h * w
    counts = torch.arange(steps + 1) * pixels // steps  # (S+1,)
    fractions = counts.double() / pixels
    # The all-baseline image (deletion's last step, insertion's first) is one image for every input.
    constant_step = steps if mode == "deletion" else 0
    fill = torch.as_tensor(baseline, dtype=images.dtype).expand(c, h, w)
    order, rank = _pixel_order(attributions.cpu())  # once per image, not once per masked image
    key, needed = _distinct_steps(images.cpu(), order, fill.cpu(), counts, constant_step)
    image_of, step_of = needed.nonzero(as_tuple=True)
    scores = torch.empty(n, steps + 1, dtype=torch.float64)
    probabilities = torch.empty(image_of.numel(), dtype=torch.float64)
    with attribution_state(model, explanation=None, gradients=None):
        constant = _to_model(model, fill.expand(1, c, h, w).contiguous())
        constant_score = target_probabilities(model(constant).expand(n, -1), target, bcos).double().cpu()
        base = constant[0]  # (C, H, W) on the model's device and dtype
        for start in range(0, image_of.numel(), batch_size):
            part = slice(start, start + batch_size)
            x = _to_model(model, images[image_of[part]])
            top = rank[image_of[part]] < counts[step_of[part]][:, None]
            top = top.reshape(-1, 1, h, w).to(x.device)  # (B, 1, H, W)
            x = torch.where(top, base, x) if mode == "deletion" else torch.where(top, x, base)
            probabilities[part] = target_probabilities(model(x), target[image_of[part]], bcos).double().cpu()
    scores[image_of, step_of] = probabilities
    # Every other step shows the image of the step before it, or the all-baseline image.
    for k in range(steps + 1):
        same = ~needed[:, k]
        is_constant = key[same, k] == key[same, constant_step]
        scores[same, k] = torch.where(is_constant, constant_score[same], scores[same, k - 1])
    auc = torch.trapezoid(scores, fractions, dim=1)
    base_value = float(baseline) if not isinstance(baseline, Tensor) else baseline.tolist()
    return CurveResult(mode, fractions, scores, auc, base_value)
