"""``bcosvit explain``: explain image files with a B-cos model and write one figure per image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, InputError
from .explain import explain, resolve_target
from .imageio import LoadedImage, load_image
from .models.vit import VisionTransformer
from .visualize import explanation_figure, save_figure


@dataclass
class FileExplanation:
    path: Path
    figure: Path
    classes: list[int]
    probabilities: list[float]
    completeness_error: float


def explain_files(
    model: VisionTransformer,
    paths: list[str | Path],
    out: str | Path,
    target: str | None = None,
    topk: int = 2,
    batch_size: int = 32,
) -> tuple[list[FileExplanation], list[tuple[Path, str]]]:
    """Explain each readable image in ``paths``; returns the explanations and the (path, error)
    pairs of files that could not be read. Prints what it did for every file."""
    if not model.is_bcos:
        raise ConfigError("bcosvit explain needs a B-cos model; standard models get post-hoc attributions in evaluate")
    if topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {topk}")
    names = model.config.class_names or [str(i) for i in range(model.num_classes)]
    topk = min(topk, model.num_classes)
    fixed = resolve_target(target, model.config.class_names, model.num_classes) if target is not None else None
    loaded: list[LoadedImage] = []
    failed: list[tuple[Path, str]] = []
    for path in paths:
        try:
            loaded.append(load_image(path, model.in_chans, model.image_size))
        except InputError as exc:
            failed.append((Path(path), str(exc)))
            print(f"skipped {path}: {exc}")
    out = Path(out)
    results: list[FileExplanation] = []
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        images = torch.stack([item.tensor for item in chunk])
        with torch.no_grad():
            logits = model(images)
        targets = torch.full((len(chunk), 1), fixed) if fixed is not None else logits.topk(topk, dim=1).indices
        expl = explain(model, images, target=targets)
        probabilities = expl.probabilities.gather(1, targets)
        for i, item in enumerate(chunk):
            figure = explanation_figure(images[i : i + 1], expl[i], class_names=names)
            figure.suptitle(item.path.name)
            path = save_figure(figure, out / f"{item.path.stem}.png")
            classes = targets[i].tolist()
            probs = probabilities[i].tolist()
            error = float(expl.completeness_error[i].max())
            results.append(FileExplanation(item.path, path, classes, probs, error))
            notes = f" ({'; '.join(item.notes)})" if item.notes else ""
            ranked = ", ".join(f"{names[c]} {p:.3f}" for c, p in zip(classes, probs))
            print(f"{item.path}{notes}: {ranked} | completeness error {error:.1e} | {path}")
    return results, failed
