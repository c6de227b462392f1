"""Pieces of the training recipe: losses, adaptive gradient clipping, the learning-rate schedule,
mosaic batches, the energy loss that teaches explanations to stay inside their mosaic cell, the
B-cosification schedule (B from 1 to 2, biases to 0) and the alignment loss to a teacher."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...metrics import positive_mass_per_cell, tile_grids


def bce_uniform_off_labels(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy on one-hot or mixup-soft ``targets`` ``(N, C)`` whose off-labels are
    clamped to at least ``1/C`` (the B-cos recipe, docs/design.md: head and loss)."""
    targets = targets.clamp(min=1.0 / logits.shape[1])
    return F.binary_cross_entropy_with_logits(logits, targets)


def soft_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with one-hot or soft ``targets`` ``(N, C)``."""
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / logits.shape[1]
    return torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()


def _unitwise_norm(t: Tensor) -> Tensor:
    """Norm of each output unit (row) of a weight; the whole tensor's norm for vectors."""
    if t.ndim <= 1:
        return t.norm()
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


@torch.no_grad()
def adaptive_clip_grad_(parameters: Iterable[nn.Parameter], clip: float = 0.01, eps: float = 1e-3) -> None:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021): scale each unit's gradient down to
    at most ``clip * max(||W_unit||, eps)``."""
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = _unitwise_norm(p).clamp_min(eps) * clip
        grad_norm = _unitwise_norm(p.grad)
        scale = (max_norm / grad_norm.clamp_min(1e-6)).clamp(max=1.0)
        p.grad.mul_(scale)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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


def energy_loss(maps: Tensor, inside: Tensor, grid: int) -> Tensor:
    """Energy pointing-game loss (Rao et al. 2023, "Studying how to efficiently and effectively guide
    models with explanations") on mosaic canvases: ``1 - positive attribution inside / everywhere``,
    averaged over canvases; the training counterpart of the grid pointing game.

    Args:
        maps: ``(M, grid·H, grid·W)`` contribution maps of one class per canvas (differentiable).
        inside: ``(M, grid²)`` bool, the cells that show the explained class (a class can appear in
            several cells of a shuffled batch's mosaic).
    """
    per_cell = positive_mass_per_cell(maps, grid)
    share = (per_cell * inside).sum(dim=1) / per_cell.sum(dim=1).clamp_min(1e-12)
    return (1 - share).mean()


def bcosify_progress(step: int, warmup_steps: int) -> tuple[float, float]:
    """``(b, bias_scale)`` of a B-cosified model after ``step`` optimisation steps: over the first
    ``warmup_steps`` steps B rises linearly from 1 to 2 and the biases shrink linearly to exactly 0
    (``bias_scale``: their factor relative to the converted model's). ``warmup_steps = 0`` is the
    released choice of Arya et al. (NeurIPS 2024, "B-cosification"): B = 2 and no biases from the start."""
    done = 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)
    return 1.0 + done, 1.0 - done


def bias_step_ratio(step: int, warmup_steps: int) -> float:
    """The factor that takes the biases from ``bias_scale`` after ``step`` steps to that after
    ``step + 1`` (multiplied in after each update): ``s(t+1)/s(t)``, and 0 once the warmup is over,
    which holds the biases at exactly 0 however the optimizer moves them."""
    _, before = bcosify_progress(step, warmup_steps)
    _, after = bcosify_progress(step + 1, warmup_steps)
    return after / before if before > 0 else 0.0


def cosine_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean(1 - cos(student, teacher))`` over every leading index: tokens ``(N, L, D)`` or pooled
    features ``(N, D)``, the mean over tokens then over the batch (ALOE, Maser et al., CVPR 2026)."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
