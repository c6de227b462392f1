"""The report of ``bcosvit evaluate``: the sections of ``report.html`` (``report_sections``: tables of
the results and the figures) and the line under its title (``report_meta``), which
``bcosvit.app.report`` renders."""

from __future__ import annotations

from pathlib import Path

from ..report import Section, Table
from .protocol import EvalConfig, ModelResult, curve_rows
from .runtime import EvalRuntime
from .samples import selection


def report_meta(
    dataset: str, num_images: int, config: EvalConfig, seconds: float, runtime: EvalRuntime | None = None
) -> str:
    """The line under the report's title: the data, how much of it each protocol used, where it ran
    (with ``runtime``) and the time taken."""
    where = ""
    if runtime is not None:
        where = f"{runtime.device.type}, {runtime.world_size} process(es), accuracy in {runtime.precision.precision}; "
    return (
        f"{dataset}: {num_images} test images; {config.num_grids} grids per size (seed {config.seed}); "
        f"faithfulness on {selection(config.faithfulness_images, num_images, config.seed)}; "
        f"{where}{seconds:.0f}s"
    )


def report_sections(results: list[ModelResult], config: EvalConfig, paths: dict[str, Path]) -> list[Section]:
    """The sections of ``report.html``: accuracy, localisation and faithfulness, completeness and
    examples, with the figures ``save_figures`` wrote (file name -> path)."""
    accuracy = Table(
        ["model", "source", "family", "top-1 (%)", "top-5 (%)"],
        [[r.name, r.source, "B-cos" if r.is_bcos else "standard", r.accuracy.top1, r.accuracy.top5] for r in results],
        precision=2,
    )
    headers = (
        ["model", "method"]
        + [f"pointing {g}x{g} (95% CI)" for g in config.grids]
        + [f"deletion AUC ↓ ({b})" for b in config.baselines]
        + [f"insertion AUC ↑ ({b})" for b in config.baselines]
    )
    rows = []
    for r in results:
        for method, label, curves in curve_rows(r):
            grids = r.methods[method].grids
            games = [
                f"{grids[g].mean:.3f} [{grids[g].ci95[0]:.3f}, {grids[g].ci95[1]:.3f}]"
                if curves is r.methods[method].curves and g in grids
                else "–"
                for g in config.grids
            ]
            aucs = [curves[mode][b].mean_auc for mode in ("deletion", "insertion") for b in config.baselines]
            rows.append([r.name, label, *games, *aucs])
    completeness = [
        [r.name, r.completeness.absolute.median, r.completeness.absolute.p99, r.completeness.absolute.max]
        for r in results
        if r.completeness
    ]
    return [
        Section("Accuracy", tables=[accuracy]),
        Section(
            "Localisation and faithfulness",
            "Grid pointing game: share of positive attribution inside the cell of the explained class (chance: "
            "1/cells). Deletion/insertion: probability of the predicted class as the most relevant pixels are "
            "removed (set to the baseline value) or inserted into an image of the baseline value; area under the "
            "curve. Baselines: zero = black, mean = the test images' mean pixel value. A pixel already at the "
            "baseline cannot be removed, so with zero the evidence carried by dark pixels is never deleted. "
            "Rows 'relative to the baseline' measure a method with its reference at the replacement value: "
            "integrated gradients from the all-baseline image, and the B-cos weights applied to the change from "
            "it, w(x)·([x, 1-x] - [b, 1-b]), instead of w(x)·[x, 1-x] (relative to the encoded input 0).",
            tables=[Table(headers, rows)],
            figures=[paths["localisation.png"], paths["deletion.png"], paths["insertion.png"]],
        ),
        Section(
            "Completeness of B-cos explanations",
            "|logit - sum(w·x) - positional - logit bias| in logit units.",
            tables=[Table(["model", "median", "99th percentile", "max"], completeness, precision=10)],
        ),
        Section(
            "Examples",
            "Test images explained by every method (red: positive, blue: negative).",
            figures=[paths["examples.png"], paths["grid_examples.png"]],
        ),
    ]
