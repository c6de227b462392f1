"""What a run is built from: the model (``build_model``; a fine-tuned one: ``finetune_model``), the
data (``build_data``, ``TrainData``, read by ``run_dataset_loader``), the optimizer
(``build_optimizer``, with ``lr_scales`` and ``layer_decay_scales``), the loss (``loss_function``),
the linear probe's frozen features (``freeze_all_but_head``) and the DDP wrapper (``wrap_model``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ...errors import ConfigError
from ...models import registry
from ...models.vit import VisionTransformer
from ...weights import create_model, load_model
from ..data import DataSpec, evaluation_split, load_dataset, subset
from ..loading import SeededItems, SeededSampler, ShardSampler, collate_images, pins_memory
from .config import FinetuneSource, TrainConfig, finetune_source
from .distributed import Runtime
from .losses import bce_uniform_off_labels, soft_cross_entropy
from .teacher import bcos_student, bcosified_teacher, is_timm_source, teacher_input

VALIDATION_BATCH = 256  # test images per validation batch

# ``bcosvit.app.data.load_dataset``'s signature: (name, split, root, image_size, train_transforms,
# randaugment, flip, crop_padding) -> (dataset, spec)
DatasetLoader = Callable[..., tuple[Dataset, DataSpec]]


def run_dataset_loader(config: TrainConfig) -> DatasetLoader:
    """What reads the datasets of a run of ``config``: ``load_dataset``, with the channels of its timm
    teacher (``bcosify_from``, else ``align_to``) or of its fine-tuning source (``finetune_from``)
    where it has one, so that Fashion-MNIST's grey images reach a model that reads RGB as RGB (their
    size is the teacher's or the source's: ``config.image_size``, resolved); a source's evaluation
    resize (``resize_size``) is kept where the images keep its input size."""
    if config.finetune_from is not None:
        source = finetune_source(config.finetune_from, config.finetune_pretrained, config.finetune_weights)
        arch = source.architecture
        same_size = config.image_size in (None, arch.image_size)
        return partial(load_dataset, in_chans=arch.in_chans, resize_size=arch.resize_size if same_size else None)
    teachers = [source for source in (config.bcosify_from, config.align_to) if is_timm_source(source)]
    if not teachers:
        return load_dataset
    return partial(load_dataset, in_chans=teacher_input(teachers[0])[0])


def build_model(config: TrainConfig, spec: DataSpec) -> VisionTransformer:
    """The model a new run starts from: ``config.model`` with fresh weights, the B-cosified
    ``bcosify_from`` (with its biases and B = 1 for a warmup, else bias-free with B = 2), or the
    trained ``finetune_from`` (``finetune_model``)."""
    if config.finetune_from is not None:
        return finetune_model(config, spec)
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


def load_finetune_source(config: TrainConfig) -> tuple[FinetuneSource, VisionTransformer]:
    """The fine-tuning source of ``config`` (``finetune_source``) and its trained model, at the run's
    input size (``config.image_size``; the weights do not depend on it)."""
    source = finetune_source(config.finetune_from, config.finetune_pretrained, config.finetune_weights)
    size = config.image_size
    if source.path is not None:
        model = load_model(source.path, image_size=size)
    else:
        model = create_model(source.model_name, pretrained=source.pretrained, weights=source.weights, image_size=size)
    return source, model


def needs_new_head(config: TrainConfig, classes: list[str], source_classes: list[str] | None, count: int) -> bool:
    """Whether a fine-tuning run gives its model a new head for the dataset's ``classes``: as
    ``finetune_new_head`` says, or (None) where the source's head has another number of classes
    (``count``) or other class names (``source_classes``, where it records them)."""
    if config.finetune_new_head is not None:
        return config.finetune_new_head
    return count != len(classes) or (source_classes is not None and list(source_classes) != list(classes))


def finetune_model(config: TrainConfig, spec: DataSpec) -> VisionTransformer:
    """The model a fine-tuning run starts from: ``config.finetune_from`` with its weights and
    architecture, and (``needs_new_head``) a new head for the dataset's classes (``reset_classifier``:
    a B-cos model's logit bias becomes log(1/(C-1)) for C classes, so every class starts at the
    probability 1/C that the B-cos BCE's off-labels ask for, and the first gradients are bounded; a
    standard model trained with BCE gets that value as its head's bias). The dataset's class names are
    recorded (and its evaluation resize, for a folder dataset). ``ConfigError`` where the data does
    not fit the source, or where the source's head is kept (``finetune_new_head = false``) and has
    another number of classes."""
    source, model = load_finetune_source(config)
    if spec.in_chans != model.in_chans:
        raise ConfigError(
            f"finetune_from {config.finetune_from!r} reads {model.in_chans}-channel images, but {config.dataset} gives "
            f"{spec.in_chans}-channel ones"
        )
    classes = list(spec.classes)
    if needs_new_head(config, classes, model.config.class_names, model.num_classes):
        model.reset_classifier(spec.num_classes)
        if not model.is_bcos and config.loss == "bce":
            nn.init.constant_(model.head.bias, math.log(1 / (spec.num_classes - 1)))
    elif model.num_classes != spec.num_classes:
        raise ConfigError(
            f"finetune_new_head = false keeps the head of {config.finetune_from!r}, which has {model.num_classes} "
            f"classes, but {config.dataset} has {spec.num_classes}: leave finetune_new_head unset for a new head"
        )
    model.config.class_names = classes
    if spec.resize_size is not None:
        model.config.resize_size = spec.resize_size  # evaluate, explain and serve read images as validation does
    return model.train()


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


# the parameters of a VisionTransformer before its blocks: layer_decay gives them decay^(depth + 1)
EMBEDDING_PARAMETERS = ("encode", "tokenizer", "pos_embed", "cls_token", "reg_token", "norm_pre")


def layer_decay_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """The learning-rate factors of layer-wise decay (BEiT's, ``config.layer_decay``) by parameter-name
    prefix, for every ``VisionTransformer`` in ``model`` (the model itself, or an alignment's student):
    block k (0-based) of L gets ``decay^(L - k)``, the parameters before the blocks
    (``EMBEDDING_PARAMETERS``) ``decay^(L + 1)``; the final norm, pooling and head keep 1 (no prefix)."""
    scales: dict[str, float] = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, VisionTransformer):
            continue
        at = f"{prefix}." if prefix else ""
        depth = len(module.blocks)
        scales.update({f"{at}blocks.{k}": decay ** (depth - k) for k in range(depth)})
        scales.update({f"{at}{name}": decay ** (depth + 1) for name in EMBEDDING_PARAMETERS})
    return scales


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The resolved ``config``'s optimizer over ``model``'s trainable parameters; no weight decay on
    norms, biases and positional embeddings. Each parameter group carries its ``lr_scale``, the factor
    the step's schedule multiplies its learning rate by: that of ``config.lr_scales`` times that of
    ``config.layer_decay`` (``layer_decay_scales``), both by longest prefix (``lr_scale_of``);
    ``ConfigError`` for a prefix in ``lr_scales`` that names no trainable parameter."""
    decayed = lambda name, p: p.ndim > 1 and "pos_embed" not in name  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for prefix in config.lr_scales:
        if not any(_under(n, prefix) for n, _ in named):
            tops = sorted({n.split(".")[0] for n, _ in named})
            raise ConfigError(f"lr_scales prefix {prefix!r} names no trainable parameter (their names begin {tops})")
    by_depth = layer_decay_scales(model, config.layer_decay) if config.layer_decay is not None else {}
    scale_of = {n: lr_scale_of(n, config.lr_scales) * lr_scale_of(n, by_depth) for n, _ in named}
    groups = []
    for scale in sorted(set(scale_of.values()), reverse=True):
        scaled = [(n, p) for n, p in named if scale_of[n] == scale]
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
