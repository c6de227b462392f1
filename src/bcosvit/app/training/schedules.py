"""Schedules over the steps of a run: the learning rate (linear warm-up, cosine decay) and the
B-cosification schedule (B from 1 to 2, biases to 0: ``BcosifySchedule``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


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


@dataclasses.dataclass(frozen=True)
class BcosifySchedule:
    """The B-cosification schedule of a run, in optimisation steps: B rises linearly from 1 to 2
    over ``b_steps``; the biases of every layer but the norms shrink linearly to exactly 0 over
    ``bias_steps``, the norms' (LayerNorm) biases over ``norm_bias_steps`` (each >= 1). Longer bias
    schedules than B's decay the biases more slowly, and a longer one for the norms keeps their
    biases after the others are gone (both suggested by Arya et al., NeurIPS 2024). The model is the
    final bias-free B-cos model from ``steps`` (the longest of the three) on."""

    b_steps: int
    bias_steps: int
    norm_bias_steps: int

    @classmethod
    def from_config(cls, config: Any, steps_per_epoch: int) -> BcosifySchedule | None:
        """The schedule of ``config`` (a ``TrainConfig``: ``bcosify_warmup_epochs``,
        ``bcosify_bias_epochs``, ``bcosify_norm_bias_epochs``, None meaning the one before) for
        epochs of ``steps_per_epoch`` steps; None without one (no ``bcosify_from``, or
        ``bcosify_warmup_epochs = 0``: the model starts bias-free with B = 2)."""
        if config.bcosify_from is None or config.bcosify_warmup_epochs == 0:
            return None
        b_epochs = config.bcosify_warmup_epochs
        bias_epochs = config.bcosify_bias_epochs if config.bcosify_bias_epochs is not None else b_epochs
        norm_epochs = config.bcosify_norm_bias_epochs if config.bcosify_norm_bias_epochs is not None else bias_epochs
        steps = lambda epochs: max(1, round(epochs * steps_per_epoch))  # noqa: E731
        return cls(steps(b_epochs), steps(bias_epochs), steps(norm_epochs))

    @property
    def steps(self) -> int:
        """The steps after which B = 2 and every bias is 0."""
        return max(self.b_steps, self.bias_steps, self.norm_bias_steps)

    def b(self, step: int) -> float:
        """B after ``step`` steps."""
        return bcosify_progress(step, self.b_steps)[0]

    def bias_scales(self, step: int) -> tuple[float, float]:
        """``(other biases, norms' biases)``: their factors after ``step`` steps relative to the
        converted model's."""
        return bcosify_progress(step, self.bias_steps)[1], bcosify_progress(step, self.norm_bias_steps)[1]

    def bias_ratios(self, step: int) -> tuple[float, float]:
        """``(other biases, norms' biases)``: the factors multiplied in after the update of ``step``
        (``bias_step_ratio``; 0 once the respective schedule is over)."""
        return bias_step_ratio(step, self.bias_steps), bias_step_ratio(step, self.norm_bias_steps)

    def biases_gone(self, step: int) -> bool:
        """Whether every bias is exactly 0 after ``step`` steps."""
        return step >= max(self.bias_steps, self.norm_bias_steps)

    def record(self, step: int) -> dict[str, float | int]:
        """Where the schedule stands after ``step`` steps (stored with a run's state; ``warmup_steps``
        and ``bias_scale`` as before the bias schedules were separate: B's and the other biases')."""
        other, norm = self.bias_scales(step)
        return {
            "warmup_steps": self.b_steps,
            "bias_steps": self.bias_steps,
            "norm_bias_steps": self.norm_bias_steps,
            "b": self.b(step),
            "bias_scale": other,
            "norm_bias_scale": norm,
        }
