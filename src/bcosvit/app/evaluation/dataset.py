"""The test images of ``bcosvit evaluate``: the rules that the models read a dataset alike
(``check_same_preprocessing``) and fit it (``check_models_fit_dataset``), and its test split as a
dataset read item by item (``load_test_set``; a subset is drawn stratified by class)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from ...errors import ConfigError, DataError
from ...models.vit import VisionTransformer
from ...weights.imagenet import IMAGENET_NUM_CLASSES
from ..data import DataSpec, evaluation_split, load_dataset, subset
from .protocol import dataset_mismatch


def check_same_preprocessing(models: dict[str, VisionTransformer], dataset: str) -> None:
    """Raise ``ConfigError`` when the models read a folder dataset's images differently (their
    ``config.resize_size``): the images are read once, with the first model's preprocessing."""
    sizes = {label: model.config.resize_size for label, model in models.items()}
    if dataset == "folder" and len(set(sizes.values())) > 1:
        listed = ", ".join(f"{label}: {size}" for label, size in sizes.items())
        raise ConfigError(
            f"the models resize images differently before the centre crop (resize_size {listed}); "
            "evaluate them in separate runs"
        )


def check_models_fit_dataset(
    models: dict[str, VisionTransformer],
    sources: dict[str, str],
    spec: DataSpec,
    dataset: str,
    data_dir: str | Path | None,
    trained_with: Callable[[str], str] | None = None,
) -> None:
    """Raise ``ConfigError`` for the first model that does not fit the dataset (classes, channels, size),
    saying which ``--dataset``/``--data-dir`` it was trained with: ``trained_with(source)`` (its
    options, "" when unknown) for the model's source in ``sources``."""
    for label, model in models.items():
        problem = dataset_mismatch(model, spec)
        if problem:
            data = dataset + (f" in {data_dir}" if data_dir else "")
            trained = trained_with(sources[label]) if trained_with is not None else ""
            fix = f"it was trained with {trained}" if trained else "pass the --dataset and --data-dir it was trained on"
            if model.num_classes == IMAGENET_NUM_CLASSES and dataset == "folder":
                fix += (
                    " (an ImageNet model reads class folders named by WordNet id, n01440764 ... n15075141, "
                    "as in ImageNet's val/ folder)"
                )
            raise ConfigError(f"model {label} ({sources[label]}) {problem}: it does not fit {data}; {fix}")


def load_test_set(
    models: dict[str, VisionTransformer],
    dataset: str,
    data_dir: str | Path | None,
    sources: dict[str, str],
    test_subset: int | None = None,
    seed: int = 0,
    trained_with: Callable[[str], str] | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """The test split of ``dataset`` (``evaluation_split``), read as the first model reads images,
    after checking that every model reads them alike and fits them (``check_same_preprocessing``,
    ``check_models_fit_dataset``): all of it, or ``test_subset`` images drawn stratified by class
    with ``seed`` (``bcosvit.app.data.subset``). Nothing is decoded here but what the checks need.

    Returns:
        a dataset of ``(image, label)`` items (``bcosvit.app.data``'s format).
    """
    check_same_preprocessing(models, dataset)
    first = next(iter(models.values()))
    split = evaluation_split(dataset)
    data, spec = load_dataset(
        dataset,
        split,
        data_dir,
        first.image_size,
        resize_size=first.config.resize_size or first.image_size,  # as bcosvit.load_image reads files
    )
    check_models_fit_dataset(models, sources, spec, dataset, data_dir, trained_with)
    if len(data) == 0:
        raise DataError(f"the {dataset} {split} split holds no images; check --data-dir")
    chosen = subset(data, test_subset, seed)
    images = f"{dataset} {split} images"
    if len(chosen) < len(data):
        images = f"{len(chosen)} of {len(data)} {images}, stratified by class (seed {seed}),"
    else:
        images = f"{len(data)} {images}"
    where = f" from {data.root}" if dataset == "folder" else ""
    log(f"evaluating {', '.join(models)} on {images}{where}".rstrip(","))
    return chosen
