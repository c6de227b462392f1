"""Training: configuration and recipe files, recipe pieces, the (distributed) loop."""

from .config import Recipe, Stage, TrainConfig, list_recipes, load_recipe
from .loop import evaluate, train, unwrap

__all__ = ["Recipe", "Stage", "TrainConfig", "evaluate", "list_recipes", "load_recipe", "train", "unwrap"]
