"""Running an evaluation: ``evaluate_test_set`` measures models on a test set streamed from a dataset
and writes ``metrics.json``, the figures and ``report.html``; ``evaluate_models`` does so on images
held in memory, and ``evaluate_dataset``, what ``bcosvit evaluate`` calls, on a dataset's test split
after checking that the models fit it. Under ``torchrun`` every process measures its shard and rank 0
alone logs and writes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from ...errors import DataError
from ...fileio import ensure_writable_dir, write_json
from ...models.vit import VisionTransformer
from ..report import write_report
from ..training.distributed import is_main_process
from .dataset import load_test_set
from .figures import save_figures
from .protocol import EvalConfig, measure_models
from .runtime import EvalRuntime, drop_line, leave_runtime, start_runtime
from .samples import selection
from .sections import report_meta, report_sections
from .stream import tensor_test_set


def runtime_summary(runtime: EvalRuntime) -> dict[str, Any]:
    """Where the measurements ran, as ``metrics.json`` records it: the device, the precision of the
    accuracy pass (and why) and of the other passes, the processes and the workers of each."""
    return {
        "device": runtime.device.type,
        "precision": {
            "accuracy": runtime.precision.precision,
            "reason": runtime.precision.reason,
            "attributions_curves_completeness": "fp32",
        },
        "processes": runtime.world_size,
        "workers_per_process": runtime.workers,
    }


def evaluate_test_set(
    models: dict[str, VisionTransformer],
    data: Dataset,
    out: str | Path,
    config: EvalConfig,
    dataset: str = "",
    log: Callable[[str], None] = print,
    sources: dict[str, str] | None = None,
    runtime: EvalRuntime | None = None,
) -> dict[str, Any]:
    """Evaluate every model on the test set ``data`` (``(image, label)`` items, read item by item;
    ``measure_model``), write ``metrics.json``, figures and ``report.html`` to ``out``.

    ``sources``: where each model (by its key in ``models``) came from, e.g. its checkpoint path;
    stored with its results. ``runtime``: where to run (default: ``start_runtime`` with
    ``config.device``, ``config.precision`` and ``config.workers``, in the ``torchrun`` job this
    process belongs to; the process group is left joined for the caller). Every process returns the
    results; rank 0 alone logs and writes.

    Returns:
        what ``metrics.json`` holds.
    """
    config.validate(num_classes=min((model.num_classes for model in models.values()), default=None))
    out = ensure_writable_dir(out, "output folder (--out)")
    if len(data) == 0:
        raise DataError("the test set holds no images")
    runtime = runtime or start_runtime(config.device, config.precision, config.workers, data)
    log = runtime.main_log(log)
    where = runtime_summary(runtime)
    log(
        f"on {runtime.device} in {runtime.world_size} process(es), {runtime.workers} data worker(s) each; "
        f"accuracy pass in {runtime.precision}, the other passes in fp32"
    )
    chosen = selection(config.faithfulness_images, len(data), config.seed, "test images")
    log(f"faithfulness and completeness on {chosen}")
    started = time.perf_counter()
    results = measure_models(models, data, config, runtime, log, sources)
    summary = {
        "dataset": dataset,
        "num_test_images": len(data),
        "config": asdict(config),
        **where,
        "models": [r.to_dict() for r in results],
    }
    if not runtime.is_main:
        return {**summary, "seconds": time.perf_counter() - started}
    paths = save_figures(models, data, results, config, out, runtime)
    summary["seconds"] = time.perf_counter() - started
    write_json(out / "metrics.json", summary)
    write_report(
        out / "report.html",
        "bcosvit evaluation",
        report_sections(results, config, paths),
        meta=report_meta(dataset, len(data), config, summary["seconds"], runtime),
    )
    log(f"\nwrote {out}/metrics.json, report.html and {len(paths)} figures in {summary['seconds']:.0f}s")
    return summary


def evaluate_models(
    models: dict[str, VisionTransformer],
    images: Tensor,
    labels: Tensor,
    out: str | Path,
    config: EvalConfig,
    dataset: str = "",
    log: Callable[[str], None] = print,
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``evaluate_test_set`` on images ``(N, C, H, W)`` in [0, 1] (or uint8) and labels ``(N,)`` held
    in memory."""
    return evaluate_test_set(models, tensor_test_set(images, labels), out, config, dataset, log, sources)


def evaluate_dataset(
    models: dict[str, VisionTransformer],
    dataset: str,
    data_dir: str | Path | None,
    out: str | Path,
    config: EvalConfig,
    sources: dict[str, str] | None = None,
    trained_with: Callable[[str], str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``evaluate_test_set`` on the test split of ``dataset`` (a name of ``bcosvit.app.data.DATASETS``,
    read from ``data_dir``): all of it, or ``config.test_subset`` images drawn stratified by class
    with ``config.seed``.

    Checks first, in this order: the settings, that ``out`` can be written, that the models read the
    images alike and, once the split is listed, that every model fits it; a model that does not is
    named with its source (``sources``: label -> where it came from; default: the label) and, when
    ``trained_with(source)`` says, the ``--dataset``/``--data-dir`` options it was trained with.

    Returns:
        what ``metrics.json`` holds.
    """
    config.validate()
    ensure_writable_dir(out, "output folder (--out)")
    log = log if is_main_process() else drop_line  # one copy of each line under torchrun
    sources = sources or {name: name for name in models}
    for label, source in sources.items():
        log(f"model {label}: {source}")
    data = load_test_set(models, dataset, data_dir, sources, config.test_subset, config.seed, trained_with, log)
    runtime = start_runtime(config.device, config.precision, config.workers, data)
    try:
        return evaluate_test_set(models, data, out, config, dataset=dataset, log=log, sources=sources, runtime=runtime)
    finally:
        leave_runtime(runtime)
