"""Summary statistics: means with 95 % confidence intervals, completeness errors, top-k accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

Z95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal distribution


def _float64(values: Tensor | Sequence[float]) -> Tensor:
    """Values of any shape -> flat float64 CPU tensor (Python floats are not rounded to float32)."""
    if isinstance(values, Tensor):
        return values.detach().double().flatten().cpu()
    return torch.as_tensor(values, dtype=torch.float64).flatten()


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


@dataclass(frozen=True)
class Summary:
    """Mean, median, maximum and 99th percentile of some values (median and p99 interpolate linearly
    between order statistics)."""

    mean: float
    median: float
    max: float
    p99: float

    @classmethod
    def of(cls, values: Tensor) -> Summary:
        """The summary of a flat float64 CPU tensor ``(M,)``, ``M >= 1``."""
        median, p99 = np.quantile(values.numpy(), [0.5, 0.99])
        return cls(float(values.mean()), float(median), float(values.max()), float(p99))


@dataclass(frozen=True)
class CompletenessStats:
    """Completeness errors summarised (``completeness_stats``).

    Attributes:
        count: how many errors.
        absolute: summary of ``|error|``.
        relative: summary of ``|error| / max(|output|, 1e-12)``; None when no outputs were given.
    """

    count: int
    absolute: Summary
    relative: Summary | None = None

    def to_dict(self) -> dict[str, float]:
        """``{"count", "abs_mean", "abs_median", "abs_max", "abs_p99"}`` and, with ``relative``, the same
        ``rel_*`` keys."""
        out = {"count": float(self.count)}  # a float, as in every metrics.json written so far
        for prefix, summary in (("abs", self.absolute), ("rel", self.relative)):
            if summary is not None:
                out.update({f"{prefix}_{key}": getattr(summary, key) for key in ("mean", "median", "max", "p99")})
        return out


def completeness_stats(errors: Tensor, outputs: Tensor | None = None) -> CompletenessStats:
    """Summary of completeness errors (docs/design.md: completeness), e.g. ``Explanation.completeness_error``.

    Args:
        errors: completeness errors of any shape (absolute values are taken).
        outputs: optional explained values (logits) of the same shape; when given, relative errors
            ``|error| / max(|output|, 1e-12)`` are summarised too (as in
            ``Explanation.relative_completeness_error``).
    """
    e = _float64(errors).abs()
    if e.numel() == 0:
        raise InputError("completeness_stats needs at least one error value, got an empty tensor")
    relative = None
    if outputs is not None:
        o = _float64(outputs)
        if o.shape != e.shape:
            raise InputError(f"outputs must have as many values as errors ({e.numel()}), got {o.numel()}")
        relative = Summary.of(e / o.abs().clamp_min(1e-12))
    return CompletenessStats(e.numel(), Summary.of(e), relative)


@dataclass(frozen=True)
class TopkAccuracy:
    """How many of ``total`` images have their label as the highest logit (``top1_hits``) or among the
    five highest (``top5_hits``; all of them when there are fewer than five classes). Results of
    batches add up: ``sum(parts, TopkAccuracy())``."""

    top1_hits: int = 0
    top5_hits: int = 0
    total: int = 0

    def __add__(self, other: TopkAccuracy) -> TopkAccuracy:
        return TopkAccuracy(
            self.top1_hits + other.top1_hits, self.top5_hits + other.top5_hits, self.total + other.total
        )

    @property
    def top1(self) -> float:
        """Top-1 accuracy in %."""
        return 100.0 * (self.top1_hits / self.total)

    @property
    def top5(self) -> float:
        """Top-5 accuracy in %."""
        return 100.0 * (self.top5_hits / self.total)

    def to_dict(self) -> dict[str, float]:
        """``{"top1": %, "top5": %}``."""
        return {"top1": self.top1, "top5": self.top5}


def topk_accuracy(logits: Tensor, labels: Tensor) -> TopkAccuracy:
    """Top-1 and top-5 hits of ``logits`` ``(N, K)`` for ``labels`` ``(N,)``."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    labels = labels.to(top5.device)
    return TopkAccuracy(
        int((top5[:, 0] == labels).sum()), int((top5 == labels[:, None]).any(dim=1).sum()), labels.shape[0]
    )
