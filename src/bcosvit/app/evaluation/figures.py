"""The figures of ``bcosvit evaluate``: every method's maps of a few test images
(``examples_figure``) and of a grid (``grid_figure``), the pointing game scores
(``localisation_figure``) and the deletion and insertion curves (``curves_figure``), and
``save_figures``, which draws and writes all five as the report shows them. They read a fixed
number of test images (``EXAMPLES`` and one 2×2 grid per model) by index, never the test set."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.data import Dataset

from ...metrics import predict_logits, tile_grids
from ...models.vit import VisionTransformer
from ...visualize import contribution_map, literal_text, save_figure, to_display_image
from ..data import first_images_per_class
from .protocol import EvalConfig, ModelResult, curve_rows, method_fn
from .runtime import EvalRuntime
from .stream import load_images

EXAMPLES = 4  # test images in examples.png


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


def _class_label(model: VisionTransformer, k: int) -> str:
    """``"class 207"``, with the model's name for it when it has class names: ``"class 207 (golden retriever)"``."""
    names = model.config.class_names
    return f"class {k}" + (f" ({literal_text(names[k])})" if names else "")


def examples_figure(
    models: dict[str, VisionTransformer], images: Tensor, config: EvalConfig, n: int = EXAMPLES
) -> Figure:
    """Rows: test images ``images[:n]`` ``(n, C, H, W)`` × models; columns: the input and every
    method's map (predicted class)."""
    rows = [(name, model, i) for i in range(min(n, len(images))) for name, model in models.items()]
    fig = Figure(figsize=(1.5 * (len(config.methods) + 1), 1.6 * len(rows)))
    axes = fig.subplots(len(rows), len(config.methods) + 1, squeeze=False)
    for r, (name, model, i) in enumerate(rows):
        x = images[i : i + 1]
        target = predict_logits(model, x).argmax(dim=1)
        _method_row(axes[r], model, x, target, f"{name}\n{_class_label(model, int(target))}", config)
    fig.tight_layout()
    return fig


def grid_figure(
    models: dict[str, VisionTransformer], grids: dict[str, tuple[Tensor, Tensor]], config: EvalConfig
) -> Figure:
    """Per model, a 2×2 grid and each method's map for its first cell's class; ``grids``: model ->
    (the grid image ``(1, C, 2H, 2W)``, its cells' classes ``(4,)``), e.g. ``figure_grids``; a model
    without one (too few classes with confident images) gets an empty row that says so."""
    fig = Figure(figsize=(1.7 * (len(config.methods) + 1), 1.9 * len(models)))
    axes = fig.subplots(len(models), len(config.methods) + 1, squeeze=False)
    for r, (name, model) in enumerate(models.items()):
        if name not in grids:
            for ax in axes[r]:
                ax.axis("off")
            axes[r][0].set_title(f"{name}\nno 2x2 grid: too few classes\nwith confident images", fontsize=7)
            continue
        x, classes = grids[name]
        target = classes[:1].to(x.device)
        title = f"{name}\ntarget: top-left {_class_label(model, int(target))}"
        _method_row(axes[r], model, x, target, title, config)
    fig.tight_layout()
    return fig


def figure_grids(
    results: list[ModelResult], data: Dataset, runtime: EvalRuntime, batch_size: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Model -> (image ``(1, C, 2H, 2W)``, classes ``(4,)``) of its first 2×2 grid
    (``ModelResult.figure_grid``), its four images loaded from ``data``."""
    grids = {}
    for res in (res for res in results if res.figure_grid is not None):
        classes, image_indices = res.figure_grid
        cells = load_images(data, image_indices.tolist(), runtime, batch_size)
        grids[res.name] = (tile_grids(cells, 2), classes)
    return grids


def localisation_figure(results: list[ModelResult], config: EvalConfig) -> Figure:
    """One panel per grid size: every (model, method)'s mean pointing game score and its 95% CI."""
    fig = Figure(figsize=(5 * len(config.grids), 3.6))
    axes = fig.subplots(1, len(config.grids), squeeze=False)[0]
    for ax, grid in zip(axes, config.grids):
        labels, means, errors = [], [], []
        for res in results:
            for method, entry in res.methods.items():
                if grid not in entry.grids:
                    continue
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


def curves_figure(results: list[ModelResult], mode: str, config: EvalConfig) -> Figure:
    """One panel per baseline: mean curve of every (model, method), AUC in the legend."""
    fig = Figure(figsize=(6 * len(config.baselines), 4))
    axes = fig.subplots(1, len(config.baselines), squeeze=False)[0]
    colours = matplotlib.colormaps["tab20"]  # up to 20 distinguishable curves per panel
    for ax, base in zip(axes, config.baselines):
        rows = [(res, label, curves) for res in results for _, label, curves in curve_rows(res)]
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


def save_figures(
    models: dict[str, VisionTransformer],
    data: Dataset,
    results: list[ModelResult],
    config: EvalConfig,
    out: Path,
    runtime: EvalRuntime | None = None,
) -> dict[str, Path]:
    """Draw every figure, then write each to ``out`` as PNG; file name -> the path written. Reads
    ``EXAMPLES`` images of the test set ``data`` (the first of as many classes, spread over them:
    a folder tree lists its files in class order) and each model's first 2×2 grid."""
    runtime = runtime or EvalRuntime()
    examples = load_images(data, first_images_per_class(data, EXAMPLES), runtime, config.batch_size)
    figures = {
        "examples.png": examples_figure(models, examples, config),
        "grid_examples.png": grid_figure(models, figure_grids(results, data, runtime, config.batch_size), config),
        "localisation.png": localisation_figure(results, config),
        "deletion.png": curves_figure(results, "deletion", config),
        "insertion.png": curves_figure(results, "insertion", config),
    }
    return {name: save_figure(fig, out / name) for name, fig in figures.items()}
