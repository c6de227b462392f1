"""``bcosvit evaluate``: accuracy, localisation, faithfulness and completeness of trained models,
with the post-hoc baselines run through the same code, written as JSON, PNG figures and HTML.

The test set is streamed (nothing holds it), on a CPU or a GPU, in one process or sharded over the
processes of a ``torchrun`` job. By job, in sub-modules whose public names are all re-exported here:

- ``protocol``: what is measured (``EvalConfig``; the protocols are described there), which models
  fit a dataset (``dataset_mismatch``), the measurements of each model and method
  (``measure_model``, ``evaluate_model`` on images in memory, ``evaluate_method``,
  ``measure_models``) and their results (``ModelResult``, ``MethodResult``);
- ``runtime``: where it runs (``EvalRuntime``: device, precision, workers, the shard of each
  process; ``start_runtime``);
- ``stream``: the pass of a model over the test set (``predict_test_set``, ``Predictions``,
  ``PixelSums``) and the few images loaded by index (``load_images``);
- ``samples``: which test images the grid pointing game and the faithfulness protocols use
  (``load_grid_cells``, ``load_faithfulness``, ``faithfulness_indices``);
- ``dataset``: the test images: the checks that the models read a dataset alike and fit it, and
  its test split as a dataset (``load_test_set``; subsets stratified by class);
- ``figures``: the figures of the report (``save_figures`` draws and writes them);
- ``sections``: the report's sections and title line, for ``bcosvit.app.report``;
- ``run``: ``evaluate_test_set`` (measure, then write ``metrics.json``, the figures and
  ``report.html``), ``evaluate_models`` (images in memory) and ``evaluate_dataset``, the command's
  entry point.
"""

from .dataset import check_models_fit_dataset, check_same_preprocessing, load_test_set
from .figures import curves_figure, examples_figure, figure_grids, grid_figure, localisation_figure, save_figures
from .protocol import (
    POST_HOC,
    REFERENCE_METHODS,
    Curves,
    EvalConfig,
    MethodResult,
    ModelResult,
    baseline_value,
    curve_rows,
    dataset_mismatch,
    evaluate_method,
    evaluate_model,
    measure_completeness,
    measure_model,
    measure_models,
    method_fn,
)
from .run import evaluate_dataset, evaluate_models, evaluate_test_set, runtime_summary
from .runtime import DEVICES, EvalRuntime, default_workers, resolve_device, start_runtime
from .samples import (
    DrawnGrids,
    FaithfulnessImages,
    GridCells,
    faithfulness_indices,
    load_faithfulness,
    load_grid_cells,
)
from .sections import report_meta, report_sections
from .stream import PixelSums, Predictions, load_images, predict_test_set, tensor_test_set

__all__ = [
    "DEVICES",
    "POST_HOC",
    "REFERENCE_METHODS",
    "Curves",
    "DrawnGrids",
    "EvalConfig",
    "EvalRuntime",
    "FaithfulnessImages",
    "GridCells",
    "MethodResult",
    "ModelResult",
    "PixelSums",
    "Predictions",
    "baseline_value",
    "check_models_fit_dataset",
    "check_same_preprocessing",
    "curve_rows",
    "curves_figure",
    "dataset_mismatch",
    "default_workers",
    "evaluate_dataset",
    "evaluate_method",
    "evaluate_model",
    "evaluate_models",
    "evaluate_test_set",
    "examples_figure",
    "faithfulness_indices",
    "figure_grids",
    "grid_figure",
    "load_faithfulness",
    "load_grid_cells",
    "load_images",
    "load_test_set",
    "localisation_figure",
    "measure_completeness",
    "measure_model",
    "measure_models",
    "method_fn",
    "predict_test_set",
    "report_meta",
    "report_sections",
    "resolve_device",
    "runtime_summary",
    "save_figures",
    "start_runtime",
    "tensor_test_set",
]
