"""Faithfulness: deletion and insertion curves and the areas under them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..inputs import as_model_input
from ..layers.detach import attribution_state
from ..models.vit import check_images
from ..targets import required_classes
from .passes import as_maps, check_batch_size, is_bcos_model, target_probabilities
from .statistics import mean_ci95


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


def concat_curves(parts: Sequence[CurveResult]) -> CurveResult:
    """The curves of several image sets measured alike (same mode, steps and baseline) as one
    result: their images in the order of ``parts`` (e.g. the shards of a distributed evaluation)."""
    if not parts:
        raise InputError("concat_curves needs at least one CurveResult")
    first = parts[0]
    for part in parts[1:]:
        same_steps = torch.equal(part.fractions, first.fractions)
        if part.mode != first.mode or part.baseline != first.baseline or not same_steps:
            raise InputError(
                f"cannot join {part.mode} curves (baseline {part.baseline}, {part.fractions.numel() - 1} steps) "
                f"with {first.mode} curves (baseline {first.baseline}, {first.fractions.numel() - 1} steps)"
            )
    scores = torch.cat([part.scores for part in parts])
    auc = torch.cat([part.auc for part in parts])
    return CurveResult(first.mode, first.fractions, scores, auc, first.baseline)


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
    check_images(images)
    check_batch_size(batch_size)
    n, c, h, w = images.shape
    target = required_classes(target, n)
    attributions = as_maps(torch.as_tensor(attributions), images)
    bcos = is_bcos_model(model, is_bcos)
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
        constant = as_model_input(model, fill.expand(1, c, h, w).contiguous())
        constant_score = target_probabilities(model(constant).expand(n, -1), target, bcos).double().cpu()
        base = constant[0]  # (C, H, W) on the model's device and dtype
        for start in range(0, image_of.numel(), batch_size):
            part = slice(start, start + batch_size)
            x = as_model_input(model, images[image_of[part]])
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
