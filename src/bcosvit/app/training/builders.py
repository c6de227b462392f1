"""What a run is built from: the model (``build_model``), the data (``build_data``, ``TrainData``),
the optimizer (``build_optimizer``), the loss (``loss_function``), the linear probe's frozen features
(``freeze_all_but_head``) and the DDP wrapper (``wrap_model``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ...errors import ConfigError
from ...models import registry
from ...models.vit import VisionTransformer
from ..data import DataSpec, evaluation_split, load_dataset, subset
from ..loading import SeededItems, SeededSampler, ShardSampler, collate_images, pins_memory
from .config import TrainConfig
from .distributed import Runtime
from .losses import bce_uniform_off_labels, soft_cross_entropy
from .teacher import bcos_student, bcosified_teacher

VALIDATION_BATCH = 256  # test images per validation batch

# ``bcosvit.app.data.load_dataset``'s signature: (name, split, root, image_size, train_transforms,
# randaugment, flip, crop_padding) -> (dataset, spec)
DatasetLoader = Callable[..., tuple[Dataset, DataSpec]]


def build_model(config: TrainConfig, spec: DataSpec) -> VisionTransformer:
    """The model a new run starts from: ``config.model`` with fresh weights, or the B-cosified
    ``bcosify_from`` (with its biases and B = 1 for a warmup, else bias-free with B = 2)."""
    if config.bcosify_from is not None:
        if config.bcosify_warmup_epochs > 0:
            return bcosified_teacher(config.bcosify_from, spec.num_classes)
        return bcos_student(config.bcosify_from, spec.num_classes)
    options = dict(config.model_options)
    options.setdefault("in_chans", spec.in_chans)
    options.setdefault("image_size", spec.image_size)
    if spec.resize_size is not None:
        options.setdefault("resize_size", spec.resize_size)  # evaluate, explain and serve read images so
    if not config.is_bcos:
        options.setdefault("input_mean", list(spec.mean))
        options.setdefault("input_std", list(spec.std))
    return registry.build_model(config.model, num_classes=spec.num_classes, class_names=list(spec.classes), **options)


def loss_function(config: TrainConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """``(logits, soft_targets) -> loss`` for the resolved config."""
    if config.loss == "bce":
        return bce_uniform_off_labels
    return lambda logits, targets: soft_cross_entropy(logits, targets, config.label_smoothing)


@dataclasses.dataclass
class TrainData:
    """The loaders of a run, the train sampler (reshuffled per epoch), the dataset spec and sizes."""

    train_loader: DataLoader
    test_loader: DataLoader
    sampler: SeededSampler
    spec: Any
    num_train: int
    num_test: int


def build_data(config: TrainConfig, rt: Runtime, dataset_loader: DatasetLoader = load_dataset) -> TrainData:
    """Loaders over local files; the sampler shards the data over processes and reshuffles per epoch.
    ``dataset_loader`` reads each split (``bcosvit.app.data.load_dataset``, or one that wraps it)."""
    train_ds, spec = dataset_loader(
        config.dataset,
        "train",
        config.data_dir,
        config.image_size,
        True,
        config.randaugment,
        config.flip,
        config.crop_padding,
    )
    test_split = evaluation_split(config.dataset)
    test_ds, _ = dataset_loader(config.dataset, test_split, config.data_dir, config.image_size)
    labelled = config.align_to is None  # alignment reads no labels, not even to draw its subset
    train_ds = subset(train_ds, config.train_subset, config.seed, stratified=labelled)
    test_ds = subset(test_ds, config.test_subset, config.seed)
    shuffled = DistributedSampler(
        train_ds, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    sampler = SeededSampler(shuffled, config.seed)  # augmentation by (seed, epoch, index): same after --resume
    train_loader = DataLoader(
        SeededItems(train_ds),
        config.batch_size // rt.world_size,
        sampler=sampler,
        num_workers=config.num_workers,
        drop_last=True,
        persistent_workers=config.num_workers > 0,
        pin_memory=pins_memory(rt.device),
        collate_fn=collate_images,
    )
    if len(train_loader) == 0:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the {len(train_ds)} training images")
    test_loader = DataLoader(
        test_ds,
        VALIDATION_BATCH,
        sampler=ShardSampler(len(test_ds), rt.rank, rt.world_size, VALIDATION_BATCH),  # each process its shard
        num_workers=config.num_workers,
        pin_memory=pins_memory(rt.device),
        collate_fn=collate_images,
    )
    return TrainData(train_loader, test_loader, sampler, spec, len(train_ds), len(test_ds))


def _under(name: str, prefix: str) -> bool:
    """Whether the parameter ``name`` lies under ``prefix``: all of it, or its part up to a ``.``."""
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def lr_scale_of(name: str, scales: dict[str, float]) -> float:
    """The learning-rate factor of the parameter ``name`` (``config.lr_scales``): that of the longest
    prefix in ``scales`` that ``name`` lies under (``blocks.1`` covers ``blocks.1.mlp.fc1.weight``,
    not ``blocks.10...``), else 1."""
    matching = [prefix for prefix in scales if _under(name, prefix)]
    return float(scales[max(matching, key=len)]) if matching else 1.0


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The resolved ``config``'s optimizer over ``model``'s trainable parameters; no weight decay on
    norms, biases and positional embeddings. Each parameter group carries its ``lr_scale``
    (``config.lr_scales``), the factor the step's schedule multiplies its learning rate by;
    ``ConfigError`` for a prefix in ``lr_scales`` that names no trainable parameter."""
    decayed = lambda name, p: p.ndim > 1 and "pos_embed" not in name  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for prefix in config.lr_scales:
        if not any(_under(n, prefix) for n, _ in named):
            tops = sorted({n.split(".")[0] for n, _ in named})
            raise ConfigError(f"lr_scales prefix {prefix!r} names no trainable parameter (their names begin {tops})")
    groups = []
    for scale in sorted({lr_scale_of(n, config.lr_scales) for n, _ in named}, reverse=True):
        scaled = [(n, p) for n, p in named if lr_scale_of(n, config.lr_scales) == scale]
        groups += [
            {"params": [p for n, p in scaled if decayed(n, p)], "weight_decay": config.weight_decay, "lr_scale": scale},
            {"params": [p for n, p in scaled if not decayed(n, p)], "weight_decay": 0.0, "lr_scale": scale},
        ]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)


def wrap_model(model: nn.Module, rt: Runtime) -> nn.Module:
    """What the training batches go through: DDP over several processes, else ``model`` itself
    (the loop compiles it where asked: ``loop.compile_from_step``)."""
    if rt.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def freeze_all_but_head(model: VisionTransformer) -> None:
    """Leave only the classifier head trainable (a linear probe on frozen features)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head."))
