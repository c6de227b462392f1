"""The figures of ``bcosvit evaluate``: every method's maps of a few test images
(``examples_figure``) and of a grid (``grid_figure``), the pointing game scores
(``localisation_figure``) and the deletion and insertion curves (``curves_figure``), and
``save_figures``, which draws and writes all five as the report shows them."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from ...metrics import make_grids, predict_logits
from ...models.vit import VisionTransformer
from ...visualize import contribution_map, save_figure, to_display_image
from .protocol import EvalConfig, ModelResult, curve_rows, method_fn


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
    """One panel per grid size: every (model, method)'s mean pointing game score and its 95% CI."""
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
    images: Tensor,
    labels: Tensor,
    results: list[ModelResult],
    config: EvalConfig,
    out: Path,
) -> dict[str, Path]:
    """Draw every figure, then write each to ``out`` as PNG; file name -> the path written."""
    figures = {
        "examples.png": examples_figure(models, images, config),
        "grid_examples.png": grid_figure(models, images, labels, config),
        "localisation.png": localisation_figure(results, config),
        "deletion.png": curves_figure(results, "deletion", config),
        "insertion.png": curves_figure(results, "insertion", config),
    }
    return {name: save_figure(fig, out / name) for name, fig in figures.items()}
