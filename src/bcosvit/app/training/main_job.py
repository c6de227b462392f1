"""Training followed by what a user wants to see: test accuracy and explanations of test images."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ...checkpoint import load_model
from ..data import evaluation_split, load_dataset
from .config import TrainConfig
from .loop import is_main_process, train


def one_image_per_class(dataset, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first image of every class in ``dataset``: images ``(K, C, H, W)``, labels ``(K,)``."""
    picked: dict[int, torch.Tensor] = {}
    for i in range(len(dataset)):
        image, label = dataset[i]
        if label not in picked:
            picked[label] = image
            if len(picked) == num_classes:
                break
    labels = sorted(picked)
    return torch.stack([picked[c] for c in labels]), torch.tensor(labels)


def write_explanation_figure(run: Path, config: TrainConfig) -> Path | None:
    """Explain one test image per class with the trained B-cos model (top-2 classes each) and
    save ``explanations.png`` in the run folder. Returns None for standard models."""
    from ... import explain
    from ...visualize import explanation_figure, save_figure

    model = load_model(run)
    if not model.is_bcos:
        return None
    test_ds, spec = load_dataset(
        config.dataset, evaluation_split(config.dataset), config.data_dir, config.image_size
    )
    images, labels = one_image_per_class(test_ds, spec.num_classes)
    with torch.no_grad():
        top2 = model(images).topk(2, dim=1).indices
    expl = explain(model, images, target=top2)
    true = [f"true: {spec.classes[int(y)]}" for y in labels]
    fig = explanation_figure(images, expl, class_names=spec.classes, row_labels=true)
    fig.suptitle("One test image per class: the two most likely classes, colour explanation and contributions")
    print(
        f"explained {len(images)} test images: max completeness error "
        f"{float(expl.completeness_error.max()):.2e} (logit units)"
    )
    return save_figure(fig, run / "explanations.png")


def run_training(
    config: TrainConfig, out: Path, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> dict:
    """Train, then (on the main process) print the test accuracy and write the explanation figure."""
    started = time.perf_counter()
    metrics = train(config, out, resume=resume, progress=progress, stop_after=stop_after)
    if not is_main_process() or not metrics:
        return metrics
    finished = metrics.get("epoch") == config.epochs
    figure = write_explanation_figure(out, config) if config.explain_examples and finished else None
    print(
        f"\nDone in {time.perf_counter() - started:.0f}s. Test top-1 accuracy: {metrics['test_top1']:.2f}% "
        f"(top-5 {metrics['test_top5']:.2f}%) after epoch {metrics['epoch']}/{config.epochs}."
    )
    print(f"Run folder {out}:")
    print("  model.safetensors, model.json   weights and metadata (load with bcosvit.load_model)")
    print("  metrics.jsonl, curves.png       per-epoch metrics and their plot")
    print("  state.pt                        optimizer state for --resume")
    if figure is not None:
        print(f"  {figure.name:32s}explanations of one test image per class")
    if not finished:
        print(f"Continue with: bcosvit train --out {out} --resume (plus the same preset/options)")
    return metrics
