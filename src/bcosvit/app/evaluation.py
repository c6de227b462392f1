"""``bcosvit evaluate``: accuracy, localisation, faithfulness and completeness of trained models,
with the post-hoc baselines run through the same code, written as JSON, PNG figures and HTML.

Protocols (all seeded):
- accuracy: top-1 / top-5 on the whole test set;
- localisation: the grid pointing game (docs/design.md: grid pointing game) on 2×2 and 3×3 grids of test images;
- faithfulness: deletion and insertion curves (``bcosvit.metrics.deletion_insertion``) on the first
  ``faithfulness_images`` test images, explaining the predicted class, for each replacement value in
  ``baselines``: ``"zero"`` (black; the Fashion-MNIST background, and the reference point of
  integrated gradients) and ``"mean"`` (the per-channel mean of the test images). Both are reported
  because a pixel already at the replacement value cannot be removed: with zero, the evidence a
  model draws from *dark* pixels (a B-cos model sees them through the ``1 - x`` channel) is never
  deleted, and methods that give dark pixels no attribution are favoured. Methods with a
  reference image (integrated gradients, and the exact B-cos explanation, whose contributions
  ``w(x)·[x, 1 - x]`` are relative to the encoded input 0) are measured a second time with the
  reference at each replacement value ``b`` (``relative`` in the results): integrated gradients
  from the all-``b`` image, and ``w(x)·([x, 1 - x] - [b, 1 - b])``, the explanation's own account of
  what the replacement removes;
- completeness: distribution of ``|logit - w·x - positional - bias|`` for B-cos models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from ..attribution import METHODS, attribute
from ..errors import ConfigError
from ..explanation import explain
from ..fileio import ensure_writable_dir, write_json
from ..metrics import (
    CompletenessStats,
    CurveResult,
    GridResult,
    TopkAccuracy,
    completeness_stats,
    compute_attributions,
    confident_images_by_class,
    deletion_insertion,
    grid_pointing_game,
    make_grids,
    predict_logits,
    topk_accuracy,
)
from ..models.vit import VisionTransformer
from ..visualize import contribution_map, save_figure, to_display_image
from .data import DataSpec
from .report import Section, Table, write_report

POST_HOC = tuple(m for m in METHODS if m != "bcos")
# Methods with a reference image (their ``baseline`` option), and its default: their curves are
# measured a second time with the reference at each replacement value ("relative to the baseline").
REFERENCE_METHODS: dict[str, float | None] = {"integrated_gradients": 0.0, "bcos": None}


@dataclass
class EvalConfig:
    """What ``evaluate_models`` measures and how much of it."""

    grids: tuple[int, ...] = (2, 3)
    num_grids: int = 30
    faithfulness_images: int = 256
    steps: int = 20
    ig_steps: int = 10
    methods: tuple[str, ...] = METHODS
    # Images per pass through a model (attributions, curves, accuracy); integrated gradients run one
    # quadrature step of this many images per pass. On two CPU cores, integrated gradients on the
    # 3x3 canvases take 0.80x (B-cos) and 0.96x (twin) the time at 64 (benchmarks/eval_batch_size.py).
    batch_size: int = 32
    seed: int = 0
    baselines: tuple[str, ...] = ("zero", "mean")  # deletion/insertion replacement values (or numbers)
    test_subset: int | None = None  # the command evaluates the first N test images (None: all of them)

    def validate(self, num_classes: int | None = None) -> None:
        """Raise ``ConfigError`` naming the first invalid value; with ``num_classes`` (the models'), also
        for grids with more cells than there are classes (each cell shows a different class)."""
        for name in self.baselines:
            if name not in ("zero", "mean"):
                try:
                    number = float(name)
                except ValueError:
                    raise ConfigError(f"deletion baseline must be 'zero', 'mean' or a number, got {name!r}") from None
                if not math.isfinite(number):
                    raise ConfigError(f"deletion baseline must be a finite number, got {name!r}")
        if not self.baselines:
            raise ConfigError("give at least one deletion baseline ('zero', 'mean' or a number)")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
        if any(g < 2 for g in self.grids):
            raise ConfigError(f"grid sizes must be >= 2, got {list(self.grids)}")
        for name in ("num_grids", "faithfulness_images", "steps", "ig_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_with_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.test_subset is not None and self.test_subset < 1:
            raise ConfigError(
                f"{_with_flag('test_subset')} must be >= 1 (or unset for the whole test set), got {self.test_subset}"
            )
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"{_with_flag('seed')} must lie in [0, 2**32), got {self.seed}")
        if num_classes is not None and max(self.grids, default=0) ** 2 > num_classes:
            g = max(self.grids)
            raise ConfigError(
                f"a {g}x{g} grid (--grid-sizes) needs {g * g} distinct classes but the models have {num_classes}; "
                f"use grid sizes up to {math.isqrt(num_classes)}"
            )


# The ``bcosvit evaluate`` flag of each EvalConfig field that has one (named in error messages).
_FLAGS = {
    "num_grids": "--grids",
    "faithfulness_images": "--faithfulness-images",
    "ig_steps": "--ig-steps",
    "test_subset": "--test-subset",
    "seed": "--seed",
}


def _with_flag(name: str) -> str:
    """``"num_grids (--grids)"``: a field's name and its command-line flag, if it has one."""
    return f"{name} ({_FLAGS[name]})" if name in _FLAGS else name


def dataset_mismatch(model: VisionTransformer, spec: DataSpec) -> str | None:
    """Why ``model`` cannot be evaluated on the dataset described by ``spec`` (None when it can):
    a different number of classes, other class names (when the model stores them), channels or size."""
    if model.num_classes != spec.num_classes:
        return f"has {model.num_classes} classes but the dataset has {spec.num_classes}"
    names = model.config.class_names
    if names and list(names) != list(spec.classes):
        return f"was trained on the classes {list(names)} but the dataset's are {list(spec.classes)}"
    if model.in_chans != spec.in_chans:
        return f"takes {model.in_chans}-channel images but the dataset's have {spec.in_chans}"
    if model.image_size != spec.image_size:
        return f"takes {model.image_size}x{model.image_size} images but the dataset is read at {spec.image_size}"
    return None


# Deletion and insertion curves of one method: mode ("deletion", "insertion") -> replacement value -> curves.
Curves = dict[str, dict[str, CurveResult]]


def _curves_dict(curves: Curves) -> dict[str, dict[str, Any]]:
    return {mode: {base: curve.to_dict() for base, curve in by_base.items()} for mode, by_base in curves.items()}


@dataclass
class MethodResult:
    """One attribution method's measurements on one model.

    Attributes:
        grids: grid size -> its pointing game.
        curves: the deletion and insertion curves of the method's maps.
        relative: for methods with a reference image (``REFERENCE_METHODS``), the curves with the
            reference at each replacement value; None for the others.
        seconds: how long the measurements took.
    """

    grids: dict[int, GridResult]
    curves: Curves
    relative: Curves | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``grid<size>`` (without per-cell scores), ``deletion``, ``insertion``, ``relative``
        (when measured) and ``seconds``."""
        out: dict[str, Any] = {f"grid{grid}": game.to_dict(include_scores=False) for grid, game in self.grids.items()}
        out.update(_curves_dict(self.curves))
        if self.relative is not None:
            out["relative"] = _curves_dict(self.relative)
        out["seconds"] = self.seconds
        return out


@dataclass
class ModelResult:
    """Every measurement of one model."""

    name: str
    is_bcos: bool
    accuracy: TopkAccuracy
    source: str = ""  # where the model came from: a checkpoint path or a shipped model's name
    methods: dict[str, MethodResult] = field(default_factory=dict)
    completeness: CompletenessStats | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as ``metrics.json`` stores it under ``models``."""
        return {
            "name": self.name,
            "is_bcos": self.is_bcos,
            "accuracy": self.accuracy.to_dict(),
            "source": self.source,
            "methods": {method: result.to_dict() for method, result in self.methods.items()},
            "completeness": self.completeness.to_dict() if self.completeness is not None else None,
            "seconds": self.seconds,
        }


def baseline_value(name: str, images: Tensor) -> float | Tensor:
    """The replacement value named ``name``: 0, the per-channel mean ``(C, 1, 1)`` of ``images``, or a number."""
    if name == "zero":
        return 0.0
    if name == "mean":
        return images.mean(dim=(0, 2, 3))[:, None, None]
    return float(name)


def method_fn(name: str, config: EvalConfig, **options):
    """``(model, images, target) -> (N, H, W)`` for the named attribution method (``options``: its keywords)."""
    if name == "integrated_gradients":
        options = {"n_steps": config.ig_steps, "internal_batch_size": config.batch_size, **options}
    return partial(_attribute, name, options)


def _attribute(name: str, options: dict, model, images: Tensor, target: Tensor) -> Tensor:
    return attribute(name, model, images, target, **options)


def _curves(
    model: VisionTransformer,
    images: Tensor,
    target: Tensor,
    maps: dict[str, Tensor],
    baselines: dict[str, float | Tensor],
    config: EvalConfig,
) -> Curves:
    """``{"deletion": {baseline: curve}, "insertion": {...}}`` of ``maps[baseline]`` for each baseline in ``maps``."""
    return {
        mode: {
            base: deletion_insertion(
                model,
                images,
                target,
                base_maps,
                steps=config.steps,
                baseline=baselines[base],
                mode=mode,
                batch_size=config.batch_size,
            )
            for base, base_maps in maps.items()
        }
        for mode in ("deletion", "insertion")
    }


def _relative_curves(
    method: str,
    curves: Curves,
    model: VisionTransformer,
    images: Tensor,
    target: Tensor,
    baselines: dict[str, float | Tensor],
    config: EvalConfig,
) -> Curves:
    """Curves of ``method`` recomputed with its reference at each replacement value.

    Where the replacement value is the method's own reference (black, for integrated gradients)
    its ``curves`` are reused.
    """
    own = REFERENCE_METHODS[method]
    maps = {
        base: compute_attributions(model, images, target, method_fn(method, config, baseline=value), config.batch_size)
        for base, value in baselines.items()
        if not (own is not None and isinstance(value, float) and value == own)
    }
    relative = _curves(model, images, target, maps, baselines, config)
    return {mode: {b: relative[mode].get(b, curves[mode][b]) for b in config.baselines} for mode in relative}


def evaluate_model(
    name: str,
    model: VisionTransformer,
    images: Tensor,
    labels: Tensor,
    config: EvalConfig,
    log=print,
    source: str = "",
) -> ModelResult:
    """Every measurement for one model; post-hoc methods for any model, ``bcos`` for B-cos models.
    Each measurement runs ``model`` in eval mode and restores its state (``attribution_state``)."""
    started = time.perf_counter()
    logits = predict_logits(model, images, config.batch_size)
    result = ModelResult(name, model.is_bcos, topk_accuracy(logits, labels), source)
    log(f"{name}: top-1 {result.accuracy.top1:.2f}%, top-5 {result.accuracy.top5:.2f}%")
    subset = images[: config.faithfulness_images]
    predicted = logits[: config.faithfulness_images].argmax(dim=1)
    methods = [m for m in config.methods if m != "bcos" or model.is_bcos]
    confident = confident_images_by_class(model, images, labels, logits=logits)
    baselines = {name: baseline_value(name, images) for name in config.baselines}
    for method in methods:
        t0 = time.perf_counter()
        fn = method_fn(method, config)
        games = {
            grid: grid_pointing_game(
                model,
                images,
                labels,
                fn,
                grid=grid,
                num_grids=config.num_grids,
                seed=config.seed,
                batch_size=config.batch_size,
                confident=confident,
            )
            for grid in config.grids
        }
        maps = compute_attributions(model, subset, predicted, fn, config.batch_size)
        entry = MethodResult(
            games, _curves(model, subset, predicted, dict.fromkeys(config.baselines, maps), baselines, config)
        )
        if method in REFERENCE_METHODS:
            entry.relative = _relative_curves(method, entry.curves, model, subset, predicted, baselines, config)
        entry.seconds = time.perf_counter() - t0
        result.methods[method] = entry
        scores = ", ".join(f"{g}x{g} {entry.grids[g].mean:.3f}" for g in config.grids)
        log(f"  {method:24s} pointing game {scores} | {_aucs(entry.curves, config)} | {entry.seconds:.0f}s")
        if entry.relative is not None:
            log(f"  {'  relative to the baseline':24s} {_aucs(entry.relative, config)}")
    if model.is_bcos:
        expl = explain(model, subset, target=predicted)
        result.completeness = completeness_stats(expl.completeness_error, expl.outputs)
        log(
            f"  completeness error: max {result.completeness.absolute.max:.2e}, "
            f"median {result.completeness.absolute.median:.2e} (logit units)"
        )
    result.seconds = time.perf_counter() - started
    return result


def _aucs(curves: Curves, config: EvalConfig) -> str:
    """``deletion AUC a/b | insertion AUC c/d (zero/mean)`` for a log line."""
    aucs = " | ".join(
        f"{mode} AUC " + "/".join(f"{curves[mode][b].mean_auc:.3f}" for b in config.baselines)
        for mode in ("deletion", "insertion")
    )
    return f"{aucs} ({'/'.join(config.baselines)})"


# --- figures ---------------------------------------------------------------------------------


def _method_row(axes, model: VisionTransformer, x: Tensor, target: Tensor, title: str, config: EvalConfig) -> None:
    """One figure row: the input ``x`` ``(1, C, H, W)``, then every method's map for ``target``."""
    axes[0].imshow(to_display_image(x[0]))
    axes[0].set_title(title, fontsize=7)
    axes[0].axis("off")
    for ax, method in zip(axes[1:], config.methods):
        ax.axis("off")
        if method == "bcos" and not model.is_bcos:
            continue
        ax.imshow(contribution_map(method_fn(method, config)(model, x, target)[0]))
        ax.set_title(method, fontsize=8)


def examples_figure(models: dict[str, VisionTransformer], images: Tensor, config: EvalConfig, n: int = 4) -> Figure:
    """Rows: test images × models; columns: the input and every method's map (predicted class)."""
    rows = [(name, model, i) for i in range(n) for name, model in models.items()]
    fig = Figure(figsize=(1.5 * (len(config.methods) + 1), 1.6 * len(rows)))
    axes = fig.subplots(len(rows), len(config.methods) + 1, squeeze=False)
    for r, (name, model, i) in enumerate(rows):
        x = images[i : i + 1]
        target = predict_logits(model, x).argmax(dim=1)
        _method_row(axes[r], model, x, target, f"{name}\nclass {int(target)}", config)
    fig.tight_layout()
    return fig


def grid_figure(models: dict[str, VisionTransformer], images: Tensor, labels: Tensor, config: EvalConfig) -> Figure:
    """The first 2×2 grid and each method's map for its first cell's class, per model."""
    fig = Figure(figsize=(1.7 * (len(config.methods) + 1), 1.9 * len(models)))
    axes = fig.subplots(len(models), len(config.methods) + 1, squeeze=False)
    for r, (name, model) in enumerate(models.items()):
        grids = make_grids(model, images, labels, grid=2, num_grids=1, seed=config.seed, batch_size=config.batch_size)
        x, target = grids.images[:1], grids.classes[:1, 0]
        _method_row(axes[r], model, x, target, f"{name}\ntarget: top-left class {int(target)}", config)
    fig.tight_layout()
    return fig


def localisation_figure(results: list[ModelResult], config: EvalConfig) -> Figure:
    fig = Figure(figsize=(5 * len(config.grids), 3.6))
    axes = fig.subplots(1, len(config.grids), squeeze=False)[0]
    for ax, grid in zip(axes, config.grids):
        labels, means, errors = [], [], []
        for res in results:
            for method, entry in res.methods.items():
                game = entry.grids[grid]
                labels.append(f"{res.name}\n{method}")
                means.append(game.mean)
                errors.append([game.mean - game.ci95[0], game.ci95[1] - game.mean])
        y = np.arange(len(labels))
        ax.barh(
            y,
            means,
            xerr=np.array(errors).T,
            color=["tab:orange" if "bcos" in lbl.split("\n")[1] else "tab:blue" for lbl in labels],
        )
        ax.set_yticks(y, labels, fontsize=6)
        ax.axvline(1 / grid**2, color="grey", linestyle="--", linewidth=1)
        ax.set(xlim=(0, 1), xlabel="pointing game score (mean, 95% CI)", title=f"{grid}x{grid} grids")
        ax.invert_yaxis()
    fig.tight_layout()
    return fig


def _curve_rows(res: ModelResult) -> Iterator[tuple[str, str, Curves]]:
    """``(method, label, curves)`` for every method's curves, then its curves relative to the baseline."""
    for method, entry in res.methods.items():
        yield method, method, entry.curves
        if entry.relative is not None:
            yield method, f"{method} relative to the baseline", entry.relative


def curves_figure(results: list[ModelResult], mode: str, config: EvalConfig) -> Figure:
    """One panel per baseline: mean curve of every (model, method), AUC in the legend."""
    fig = Figure(figsize=(6 * len(config.baselines), 4))
    axes = fig.subplots(1, len(config.baselines), squeeze=False)[0]
    colours = matplotlib.colormaps["tab20"]  # up to 20 distinguishable curves per panel
    for ax, base in zip(axes, config.baselines):
        rows = [(res, label, curves) for res in results for _, label, curves in _curve_rows(res)]
        for i, (res, label, curves) in enumerate(rows):
            curve = curves[mode][base]
            style = "-" if res.is_bcos else "--"
            label = f"{res.name} {label} ({curve.mean_auc:.3f})"
            ax.plot(curve.fractions.tolist(), curve.mean_curve.tolist(), style, color=colours(i % 20), label=label)
        ax.set(
            xlabel=f"fraction of pixels {'removed' if mode == 'deletion' else 'inserted'} (most relevant first)",
            ylabel="probability of the class",
            title=f"{mode} curves, baseline {base} (AUC in brackets)",
        )
        ax.legend(fontsize=5)
    fig.tight_layout()
    return fig


# --- report ----------------------------------------------------------------------------------


def evaluate_models(
    models: dict[str, VisionTransformer],
    images: Tensor,
    labels: Tensor,
    out: str | Path,
    config: EvalConfig,
    dataset: str = "",
    log=print,
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluate every model, write ``metrics.json``, figures and ``report.html`` to ``out``.

    ``sources``: where each model (by its key in ``models``) came from, e.g. its checkpoint path;
    stored with its results.
    """
    config.validate(num_classes=min((model.num_classes for model in models.values()), default=None))
    out = ensure_writable_dir(out, "output folder (--out)")
    sources = sources or {}
    started = time.perf_counter()
    results = [
        evaluate_model(name, model, images, labels, config, log, source=sources.get(name, ""))
        for name, model in models.items()
    ]
    figures = {
        "examples.png": examples_figure(models, images, config),
        "grid_examples.png": grid_figure(models, images, labels, config),
        "localisation.png": localisation_figure(results, config),
        "deletion.png": curves_figure(results, "deletion", config),
        "insertion.png": curves_figure(results, "insertion", config),
    }
    paths = {name: save_figure(fig, out / name) for name, fig in figures.items()}
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
        _sections(results, config, paths),
        meta=f"{dataset}: {len(images)} test images; {config.num_grids} grids per size (seed {config.seed}); "
        f"faithfulness on {min(config.faithfulness_images, len(images))} images; "
        f"{summary['seconds']:.0f}s",
    )
    log(f"\nwrote {out}/metrics.json, report.html and {len(paths)} figures in {summary['seconds']:.0f}s")
    return summary


def _sections(results: list[ModelResult], config: EvalConfig, paths: dict[str, Path]) -> list[Section]:
    accuracy = Table(
        ["model", "source", "family", "top-1 (%)", "top-5 (%)"],
        [
            [r.name, r.source, "B-cos" if r.is_bcos else "standard", r.accuracy.top1, r.accuracy.top5]
            for r in results
        ],
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
        for method, label, curves in _curve_rows(r):
            grids = r.methods[method].grids
            games = [
                f"{grids[g].mean:.3f} [{grids[g].ci95[0]:.3f}, {grids[g].ci95[1]:.3f}]"
                if curves is r.methods[method].curves
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
