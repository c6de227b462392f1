"""Training followed by what a user wants to see: test accuracy and explanations of test images."""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig
from .loop import train


def run_training(
    config: TrainConfig, out: Path, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> dict:
    metrics = train(config, out, resume=resume, progress=progress, stop_after=stop_after)
    return metrics
