"""The losses of a run: binary cross-entropy with off-labels 1/C (B-cos) and soft cross-entropy
(standard), the energy loss that teaches explanations to stay inside their mosaic cell, and the
cosine distance of the alignment to a teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...metrics import positive_mass_per_cell


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


def cosine_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean(1 - cos(student, teacher))`` over every leading index: tokens ``(N, L, D)`` or pooled
    features ``(N, D)``, the mean over tokens then over the batch (ALOE, Maser et al., CVPR 2026)."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
