"""Running an evaluation: ``evaluate_models`` measures models on images and writes
``metrics.json``, the figures and ``report.html``; ``evaluate_dataset``, what ``bcosvit evaluate``
calls, does so on a dataset's test split after checking that the models fit it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor

from ...fileio import ensure_writable_dir, write_json
from ...models.vit import VisionTransformer
from ..report import write_report
from .dataset import load_test_images
from .figures import save_figures
from .protocol import EvalConfig, measure_models
from .sections import report_meta, report_sections


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
    """Evaluate every model, write ``metrics.json``, figures and ``report.html`` to ``out``.

    ``sources``: where each model (by its key in ``models``) came from, e.g. its checkpoint path;
    stored with its results.
    """
    config.validate(num_classes=min((model.num_classes for model in models.values()), default=None))
    out = ensure_writable_dir(out, "output folder (--out)")
    started = time.perf_counter()
    results = measure_models(models, images, labels, config, log, sources)
    paths = save_figures(models, images, labels, results, config, out)
    summary = {
        "dataset": dataset,
        "num_test_images": len(images),
        "config": asdict(config),
        "models": [r.to_dict() for r in results],
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "metrics.json", summary)
    write_report(
        out / "report.html",
        "bcosvit evaluation",
        report_sections(results, config, paths),
        meta=report_meta(dataset, len(images), config, summary["seconds"]),
    )
    log(f"\nwrote {out}/metrics.json, report.html and {len(paths)} figures in {summary['seconds']:.0f}s")
    return summary


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
    """``evaluate_models`` on the test split of ``dataset`` (a name of ``bcosvit.app.data.DATASETS``,
    read from ``data_dir``), its first ``config.test_subset`` images or all of them.

    Checks first, in this order: the settings, that ``out`` can be written, that the models read the
    images alike and, once the split is read, that every model fits it; a model that does not is
    named with its source (``sources``: label -> where it came from; default: the label) and, when
    ``trained_with(source)`` says, the ``--dataset``/``--data-dir`` options it was trained with.

    Returns:
        what ``metrics.json`` holds.
    """
    config.validate()
    ensure_writable_dir(out, "output folder (--out)")
    sources = sources or {name: name for name in models}
    for label, source in sources.items():
        log(f"model {label}: {source}")
    images, labels = load_test_images(models, dataset, data_dir, sources, config.test_subset, trained_with, log)
    return evaluate_models(models, images, labels, out, config, dataset=dataset, log=log, sources=sources)
