"""Training: the configuration (``config``) and the recipe files that fill it in (``recipes``), the
recipe runner (``runner``), the loop (``loop``) and what it is built from (``distributed``, ``builders``,
``step``, ``run_folder``, ``losses``, ``schedules``, ``clipping``, ``mosaics``, ``align``, ``teacher``)."""

from .config import TrainConfig
from .distributed import unwrap
from .loop import evaluate, train
from .recipes import Recipe, Stage, list_recipes, load_recipe

__all__ = ["Recipe", "Stage", "TrainConfig", "evaluate", "list_recipes", "load_recipe", "train", "unwrap"]
