"""Training: configuration and presets, recipe pieces, the (distributed) loop."""

from .config import PRESETS, TrainConfig, get_preset
from .loop import evaluate, train, unwrap

__all__ = ["PRESETS", "TrainConfig", "evaluate", "get_preset", "train", "unwrap"]
