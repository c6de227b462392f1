"""Quantitative evaluation of attribution methods: localisation, faithfulness and statistics (docs/design.md: grid
pointing game, deletion and insertion).

An *attribution method* is any callable ``method(model, images, target) -> maps`` taking images
``(N, C, H, W)`` in [0, 1] and target classes ``(N,)`` (long) and returning spatial maps
``(N, H, W)`` at input resolution (a ``(N, C, H, W)`` result is summed over channels), e.g.
``lambda m, x, t: bcosvit.explain(m, x, t).contributions[:, 0]`` (its one target per image).

By job, in sub-modules whose names are all re-exported here:

- ``pointing``: the grid pointing game of docs/design.md, ``grid_pointing_game`` (with
  ``confident_images_by_class`` (its selection alone, from predictions: ``confident_indices_by_class``),
  ``sample_grids``, ``tile_grids``, ``assemble_grids``, ``make_grids``, ``score_grid_cells`` and
  ``grid_cell_scores`` as its parts);
- ``faithfulness``: ``deletion_insertion``, deletion and insertion curves and their areas
  (``concat_curves`` joins the curves of several image sets);
- ``statistics``: ``mean_ci95`` (mean and 95 % confidence interval, normal approximation),
  ``completeness_stats`` (completeness errors, docs/design.md: completeness) and ``topk_accuracy``;
- ``passes``: running a model (``predict_logits``) or a method (``compute_attributions``) over
  images in batches.

Probabilities are ``sigmoid(logit)`` for B-cos models (trained with binary cross-entropy) and the
softmax probability for standard models; ``is_bcos=None`` reads ``model.is_bcos``. Every function
works on whole batches (``batch_size`` bounds how many images go through the model at once; the
defaults are the 32 that ``bcosvit evaluate`` uses) and runs the model in eval mode
(``bcosvit.layers.detach.attribution_state``), restoring its state afterwards. Results are
dataclasses (``GridResult``, ``CurveResult``, ``CompletenessStats``, ``TopkAccuracy``) with a
``to_dict()`` for JSON.
"""

from .faithfulness import CurveResult, concat_curves, deletion_insertion
from .passes import AttributionMethod, compute_attributions, predict_logits, target_probabilities
from .pointing import (
    GridResult,
    Grids,
    assemble_grids,
    confident_images_by_class,
    confident_indices_by_class,
    grid_cell_scores,
    grid_pointing_game,
    make_grids,
    positive_mass_per_cell,
    sample_grids,
    score_grid_cells,
    tile_grids,
)
from .statistics import CompletenessStats, Summary, TopkAccuracy, completeness_stats, mean_ci95, topk_accuracy

__all__ = [
    "AttributionMethod",
    "CompletenessStats",
    "CurveResult",
    "GridResult",
    "Grids",
    "Summary",
    "TopkAccuracy",
    "assemble_grids",
    "completeness_stats",
    "compute_attributions",
    "concat_curves",
    "confident_images_by_class",
    "confident_indices_by_class",
    "deletion_insertion",
    "grid_cell_scores",
    "grid_pointing_game",
    "make_grids",
    "mean_ci95",
    "positive_mass_per_cell",
    "predict_logits",
    "sample_grids",
    "score_grid_cells",
    "target_probabilities",
    "tile_grids",
    "topk_accuracy",
]
