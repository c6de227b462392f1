"""Schedules over the steps of a run: the learning rate (linear warm-up, cosine decay) and the
B-cosification schedule (B from 1 to 2, biases to 0)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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
