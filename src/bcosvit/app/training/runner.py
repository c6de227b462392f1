"""The recipe runner: the stages of a recipe one after the other (``run_recipe``), each a training
run followed by what a user wants to see: test accuracy and explanations of test images (``run_training``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from ...weights.checkpoint import load_model
from ..data import batch_to_device, evaluation_split, first_images_per_class
from .builders import run_dataset_loader
from .config import TrainConfig
from .distributed import is_main_process
from .loop import train
from .recipes import Recipe
from .run_folder import finished_epochs

# classes the end-of-training figure shows at most (one image each, explained in one batch)
FIGURE_CLASSES = 16


def figure_images(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The first image of each of up to ``FIGURE_CLASSES`` classes of ``dataset``, spread over its
    classes and found from its labels (``first_images_per_class``: only these images are decoded):
    images ``(K, C, H, W)`` float in [0, 1], labels ``(K,)``."""
    items = [dataset[i] for i in first_images_per_class(dataset, FIGURE_CLASSES)]
    images = batch_to_device(torch.stack([image for image, _ in items]), "cpu")
    return images, torch.tensor([label for _, label in items])


def write_explanation_figure(run: Path, config: TrainConfig) -> Path | None:
    """Explain one test image of each of up to ``FIGURE_CLASSES`` classes with the trained B-cos
    model (top-2 classes each) and save ``explanations.png`` in the run folder. Returns None for
    standard models."""
    from ... import explain
    from ...targets import TopK
    from ...visualize import explanation_figure, save_figure

    model = load_model(run)
    if not model.is_bcos:
        return None
    split = evaluation_split(config.dataset)
    # at the trained model's input size (a fine-tuned model's is its source's where image_size is unset)
    test_ds, spec = run_dataset_loader(config)(config.dataset, split, config.data_dir, model.image_size)
    images, labels = figure_images(test_ds)
    expl = explain(model, images, target=TopK(2))
    true = [f"true: {spec.classes[int(y)]}" for y in labels]
    fig = explanation_figure(images, expl, class_names=spec.classes, row_labels=true)
    shown = "One test image per class" if len(images) == spec.num_classes else f"Test images of {len(images)} classes"
    fig.suptitle(f"{shown}: the two most likely classes, colour explanation and contributions")
    print(
        f"explained {len(images)} test images: max completeness error "
        f"{float(expl.completeness_error.max()):.2e} (logit units)"
    )
    return save_figure(fig, run / "explanations.png")


def run_training(
    config: TrainConfig,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    keep_process_group: bool = False,
) -> dict:
    """Train, then (on the main process) print the test accuracy and write the explanation figure."""
    started = time.perf_counter()
    metrics = train(config, out, resume, progress, stop_after, keep_process_group)  # the run's own dataset loader
    if not is_main_process() or not metrics:
        return metrics
    finished = metrics.get("epoch") == config.epochs
    figure = write_explanation_figure(out, config) if config.explain_examples and finished else None
    print(f"\nDone in {time.perf_counter() - started:.0f}s. {_test_accuracy(metrics, config)}")
    print(f"Run folder {out}:")
    print('  config.json                     the configuration as run (every "auto" resolved)')
    print("  model.safetensors, model.json   weights and metadata (load with bcosvit.load_model)")
    print("  metrics.jsonl, curves.png       per-epoch metrics and their plot")
    print("  state.pt                        optimizer state for --resume")
    if figure is not None:
        print(f"  {figure.name:32s}explanations of test images, one per class (at most {FIGURE_CLASSES})")
    return metrics


def _test_accuracy(metrics: dict, config: TrainConfig) -> str:
    """The sentence on the test accuracy after the run's last epoch (which ``eval_every`` may
    have left unvalidated when the run stopped early, ``stop_after``)."""
    after = f"after epoch {metrics['epoch']}/{config.epochs}"
    if "test_top1" not in metrics:
        return f"Not validated {after} (eval_every {config.eval_every}; the last epoch always is)."
    return f"Test top-1 accuracy: {metrics['test_top1']:.2f}% (top-5 {metrics['test_top5']:.2f}%) {after}."


def run_recipe(
    recipe: Recipe,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    resume_command: str | None = None,
) -> dict:
    """Run the stages of ``recipe`` in order (``run_training``), each into its folder under ``out``
    (``Recipe.runs``); returns the last stage's metrics.

    ``resume``: a finished stage is skipped, an interrupted one continues, the next ones start.
    ``stop_after``: end this invocation after that many epochs, counted over all its stages.
    ``resume_command``: the line that says how to continue an unfinished recipe.
    """
    resume_command = resume_command or f"bcosvit train --out {out} --resume (plus the same options)"
    budget = stop_after
    metrics: dict = {}
    runs = recipe.runs(out)
    for i, (folder, config) in enumerate(runs):
        done = finished_epochs(folder, config) if resume else 0  # refuses a stage run with other settings
        if done >= config.epochs:
            if is_main_process():
                print(f"stage {folder.name}: finished ({done} epochs in {folder}), skipped")
            continue
        if len(runs) > 1 and is_main_process():
            print(f"\nstage {folder.name} ({i + 1} of {len(runs)}): {folder}")
        # the first stage resumes as asked (and says so if there is nothing to resume); a later stage
        # without a state.pt has not started yet
        # one process group for all stages of a torchrun job, closed below
        metrics = run_training(config, folder, resume and (i == 0 or done > 0), progress, budget, True)
        reached = metrics.get("epoch", done)
        if budget is not None:
            budget -= reached - done
        if reached < config.epochs or (budget == 0 and i + 1 < len(runs)):
            if is_main_process():
                print(f"Continue with: {resume_command}")
            break
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics
