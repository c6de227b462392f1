"""``bcosvit evaluate``: accuracy, localisation, faithfulness and completeness of trained models,
with the post-hoc baselines run through the same code, written as JSON, PNG figures and HTML.

By job, in sub-modules whose public names are all re-exported here:

- ``protocol``: what is measured (``EvalConfig``; the protocols are described there), which models
  fit a dataset (``dataset_mismatch``), the measurements of each model and method
  (``evaluate_model``, ``evaluate_method``, ``measure_models``) and their results (``ModelResult``,
  ``MethodResult``);
- ``dataset``: the test images: the checks that the models read a dataset alike and fit it, and
  its test split as tensors (``load_test_images``);
- ``figures``: the figures of the report (``save_figures`` draws and writes them);
- ``sections``: the report's sections and title line, for ``bcosvit.app.report``;
- ``run``: ``evaluate_models`` (measure, then write ``metrics.json``, the figures and
  ``report.html``) and ``evaluate_dataset``, the command's entry point.
"""

from .dataset import check_models_fit_dataset, check_same_preprocessing, load_test_images, stack_images
from .figures import curves_figure, examples_figure, grid_figure, localisation_figure, save_figures
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
    measure_models,
    method_fn,
)
from .run import evaluate_dataset, evaluate_models
from .sections import report_meta, report_sections

__all__ = [
    "POST_HOC",
    "REFERENCE_METHODS",
    "Curves",
    "EvalConfig",
    "MethodResult",
    "ModelResult",
    "baseline_value",
    "check_models_fit_dataset",
    "check_same_preprocessing",
    "curve_rows",
    "curves_figure",
    "dataset_mismatch",
    "evaluate_dataset",
    "evaluate_method",
    "evaluate_model",
    "evaluate_models",
    "examples_figure",
    "grid_figure",
    "load_test_images",
    "localisation_figure",
    "measure_models",
    "method_fn",
    "report_meta",
    "report_sections",
    "save_figures",
    "stack_images",
]
