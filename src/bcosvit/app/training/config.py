"""The typed training configuration, ``TrainConfig``: every option of a run, its checks
(``check_options`` for names and types, ``validate`` for values) and the choices "auto" resolves to.

The named recipes that fill it in from TOML files: ``recipes``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from ...errors import ConfigError
from ...models.registry import model_config
from ...models.vit import ViTConfig
from ...validation import check_fields, schema_of
from ...weights.checkpoint import read_metadata, resolve_weights
from ...weights.imagenet import imagenet_class_names
from ...weights.published import IMAGENET, PUBLISHED
from ...weights.shipped import SHIPPED, list_pretrained, shipped_path
from ..data import DATASETS
from ..precision import PRECISIONS
from .teacher import TEACHER_FAMILY_PREFIX, TIMM_PREFIX, TimmSource, is_timm_source, teacher_classes, teacher_features

# DataLoader worker processes per training process: each is a process with its own copy of the
# transforms; 1000 of them (a typo) would fork 1000 processes before the first step.
MAX_WORKERS = 64


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored, with every "auto" resolved, in the run folder."""

    model: str = "bcos_vit_micro_patch4_28"
    model_options: dict = field(default_factory=dict)  # ViTConfig overrides, e.g. {"pos_embed": "rope"}
    dataset: str = "fashion-mnist"
    data_dir: str | None = None  # None: the dataset's default location (Fashion-MNIST only)
    image_size: int | None = None  # None: the dataset's native size
    train_subset: int | None = None  # use only N training images, drawn stratified by class with the seed
    test_subset: int | None = None
    epochs: int = 10
    batch_size: int = 128  # global batch, split over processes
    lr: float = 1e-3
    # learning-rate factors by parameter-name prefix, the longest matching prefix winning, 1 for the rest,
    # e.g. { tokenizer = 0.3, blocks = 0.3 }: a lower rate for pre-trained layers than for the head, or with
    # align_to { student = 0.3 } against the new projections; each prefix must name a trainable parameter
    lr_scales: dict = field(default_factory=dict)
    weight_decay: float = 0.0
    optimizer: str = "auto"  # auto: Adam for B-cos, AdamW for standard (published recipe)
    loss: str = "auto"  # auto: BCE with off-labels 1/C for B-cos, cross-entropy for standard
    clip: str = "auto"  # auto: adaptive (unit-wise) for B-cos, grad-norm for standard; or "none"
    clip_value: float | None = None  # None: 0.01 for adaptive clipping, 1.0 for grad-norm clipping
    agc_eps: float = 1e-3
    warmup_steps: int = 500
    min_lr: float = 0.0
    randaugment: int = 0  # RandAugment magnitude; 0 disables it
    flip: bool = True
    crop_padding: int | None = None  # pad-and-crop for small datasets; None: image_size // 8, 0: off
    mixup: float = 0.0  # mixup alpha; 0 disables it
    mosaic: float = 0.0  # probability that a batch is tiled into grid x grid canvases (multi-label)
    mosaic_grid: int = 2  # mosaic canvases hold k x k images, k drawn uniformly from 2..mosaic_grid
    energy_loss: float = 0.0  # weight of the energy loss on mosaics (B-cos only): keeps explanations in their cell
    # > 0: every batch that is not a mosaic batch is still classified as single images, and up to
    # this many canvases tiled from its images carry the energy loss alone
    energy_canvases: int = 0
    init_from: str | None = None  # start from these weights (run folder or .safetensors), e.g. a stage-1 run
    # fine-tuning (``FinetuneSource``): start from the trained model finetune_from names (a run folder, a
    # .safetensors file, or a registered name with shipped or published weights), its architecture and
    # input size included (the images are resized to it, Fashion-MNIST's read as RGB for a 3-channel
    # model; model is the source's, image_size its input size unless set), with a new head for the
    # dataset's classes (the B-cos logit bias log(1/(C-1)) for the new count)
    finetune_from: str | None = None
    # which weights of a registered name: "shipped" (inside the package), "imagenet" (the published ones,
    # downloaded once into torch.hub's cache) or "auto" (shipped where they ship, else the published ones);
    # a run folder or weights file brings its own ("auto")
    finetune_pretrained: str = "auto"
    finetune_weights: str | None = None  # with "imagenet": the published .pth file you already have (hash checked)
    # None: a new head where the dataset's classes differ from the source's (their number, or their names
    # where both record them), else the source's head trains on; true: always a new head; false: never
    finetune_new_head: bool | None = None
    # layer-wise learning-rate decay (BEiT): block k (0-based) of L at lr x layer_decay^(L-k), the tokenizer,
    # positions and prefix tokens at lr x layer_decay^(L+1), the final norm and head at lr; multiplies
    # lr_scales; None: off
    layer_decay: float | None = None
    # B-cosification (Arya et al., NeurIPS 2024): the model is bcosify(this standard ViT: a run folder, a
    # name with shipped weights or a timm model "timm:NAME", teacher.TimmSource); over the first
    # bcosify_warmup_epochs B rises from 1 to 2 and the biases shrink linearly to 0, then the saved model
    # is bias-free (0: B = 2 and no biases from the start)
    bcosify_from: str | None = None
    bcosify_warmup_epochs: float = 1.0
    # the epochs over which the biases of every layer but the norms shrink linearly to 0 (None: those of B,
    # bcosify_warmup_epochs; longer: the biases decay more slowly than B rises)
    bcosify_bias_epochs: float | None = None
    # the same for the norms' (LayerNorm) biases (None: bcosify_bias_epochs; longer: the norms keep their
    # biases after the other biases are gone); the EMA averages from the end of the longest of the three
    bcosify_norm_bias_epochs: float | None = None
    # alignment (ALOE, Maser et al., CVPR 2026): train the model to match this frozen teacher's tokens
    # (run folder, shipped name or "timm:NAME") by cosine distance, without labels
    align_to: str | None = None
    train_head_only: bool = False  # a linear probe: only the classifier head trains (e.g. after alignment)
    label_smoothing: float = 0.0  # standard models only
    ema: float = 0.0  # EMA decay per step; 0 disables it
    precision: str = "auto"  # "auto" (bf16 where the hardware has it natively, else fp32), "fp32" or "bf16"
    compile: bool = False  # torch.compile the model for training (skipped with a message where it cannot run)
    # recompute each block in the backward pass instead of storing its activations: less memory (e.g. the
    # large models on smaller GPUs) for about one more forward pass per step; the same loss and gradients
    grad_checkpointing: bool = False
    log_every: int = 50  # steps between reads of the running loss on the host (progress bar, non-finite check)
    eval_every: int = 1  # validate every N epochs, and always after the last one
    seed: int = 0
    num_workers: int = 0
    explain_examples: bool = True  # write an explanation figure for test images at the end

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid value."""
        _check_model_option_names(self.model_options)
        is_bcos_model(self.model, self.model_options)  # unknown names/options fail clearly
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        checks = [
            (self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (
                all(isinstance(k, str) and k for k in self.lr_scales),
                f"lr_scales keys must be parameter-name prefixes (non-empty strings), got {list(self.lr_scales)}",
            ),
            (
                all(type(v) in (int, float) and math.isfinite(v) and v > 0 for v in self.lr_scales.values()),
                f"lr_scales factors must be positive numbers, got {self.lr_scales}",
            ),
            (
                self.layer_decay is None or 0 < self.layer_decay <= 1,
                f"layer_decay must lie in (0, 1] (or be unset: no decay), got {self.layer_decay}",
            ),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (
                self.optimizer in ("auto", "adam", "adamw", "sgd"),
                f"optimizer must be auto, adam, adamw or sgd, got {self.optimizer!r}",
            ),
            (self.loss in ("auto", "bce", "ce"), f"loss must be auto, bce or ce, got {self.loss!r}"),
            (self.clip in ("auto", "agc", "norm", "none"), f"clip must be auto, agc, norm or none, got {self.clip!r}"),
            (self.clip_value is None or self.clip_value > 0, f"clip_value must be positive, got {self.clip_value}"),
            (self.agc_eps > 0, f"agc_eps must be positive, got {self.agc_eps}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.min_lr <= self.lr, f"min_lr must lie in [0, lr = {self.lr}], got {self.min_lr}"),
            (0 <= self.randaugment <= 30, f"randaugment magnitude must lie in [0, 30], got {self.randaugment}"),
            (
                self.crop_padding is None or self.crop_padding >= 0,
                f"crop_padding must be >= 0, got {self.crop_padding}",
            ),
            (self.mixup >= 0, f"mixup alpha must be >= 0, got {self.mixup}"),
            (0 <= self.mosaic <= 1, f"mosaic probability must lie in [0, 1], got {self.mosaic}"),
            (self.mosaic_grid >= 2, f"mosaic_grid must be >= 2, got {self.mosaic_grid}"),
            (self.energy_loss >= 0, f"energy_loss must be >= 0, got {self.energy_loss}"),
            (self.energy_canvases >= 0, f"energy_canvases must be >= 0, got {self.energy_canvases}"),
            (
                not self.energy_loss or self.mosaic > 0 or self.energy_canvases > 0,
                "energy_loss acts on mosaic canvases only: set mosaic to a probability > 0 "
                "or energy_canvases to a count > 0",
            ),
            (0 <= self.ema < 1, f"ema decay must lie in [0, 1), got {self.ema}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must lie in [0, 1), got {self.label_smoothing}"),
            (self.precision in PRECISIONS, f"precision must be auto, fp32 or bf16, got {self.precision!r}"),
            (
                0 <= self.num_workers <= MAX_WORKERS,
                f"num_workers must lie in [0, {MAX_WORKERS}] (DataLoader worker processes per training process), "
                f"got {self.num_workers}",
            ),
            (self.log_every >= 1, f"log_every must be >= 1 step, got {self.log_every}"),
            (
                self.eval_every >= 1,
                f"eval_every must be >= 1 epoch (the last epoch is always validated), got {self.eval_every}",
            ),
            (
                self.train_subset is None or self.train_subset >= 1,
                f"train_subset must be >= 1, got {self.train_subset}",
            ),
            (
                self.test_subset is None or self.test_subset >= 1,
                f"test_subset must be >= 1 (or unset for the whole test set), got {self.test_subset}",
            ),
            (
                self.image_size is None or self.image_size >= 1,
                f"image_size must be >= 1 (or unset for the dataset's own size), got {self.image_size}",
            ),
            (0 <= self.seed < 2**32, f"seed must lie in [0, 2**32), got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._validate_teachers()
        self._validate_finetune()
        if self.grad_checkpointing and self.energy_loss:
            raise ConfigError(
                "grad_checkpointing recomputes each block in the backward pass, where the energy loss's "
                "explanation graph cannot be recomputed as it was built: set energy_loss = 0 or "
                "grad_checkpointing = false"
            )
        if self.energy_loss and not self.is_bcos:
            raise ConfigError(
                f"energy_loss trains on the exact B-cos explanation; {self.model} is a standard model "
                "(use a bcos_* model or energy_loss = 0)"
            )

    def _validate_teachers(self) -> None:
        """``ConfigError`` for B-cosification or alignment settings that do not go together."""
        if self.bcosify_warmup_epochs < 0:
            raise ConfigError(f"bcosify_warmup_epochs must be >= 0, got {self.bcosify_warmup_epochs}")
        for name in ("bcosify_bias_epochs", "bcosify_norm_bias_epochs"):
            value = getattr(self, name)
            if value is None:
                continue
            if value <= 0:
                raise ConfigError(f"{name} must be > 0 (or unset: the schedule before it), got {value}")
            if self.bcosify_from is None or self.bcosify_warmup_epochs == 0:
                raise ConfigError(
                    f"{name} schedules the biases of a B-cosification warmup: it needs bcosify_from and "
                    f"bcosify_warmup_epochs > 0 (without a warmup the model starts bias-free)"
                )
        if self.bcosify_from is not None:
            if not self.is_bcos:
                raise ConfigError(
                    f"bcosify_from makes a B-cos model; model must name its B-cos family (bcos_*), got {self.model}"
                )
            if self.model_options:
                raise ConfigError(
                    f"bcosify_from takes the architecture from {self.bcosify_from}; leave model_options empty "
                    f"(got {self.model_options})"
                )
        if self.align_to is not None:
            labelled = [name for name in ("mixup", "mosaic", "energy_loss", "label_smoothing") if getattr(self, name)]
            if self.train_head_only:
                labelled.append("train_head_only")
            if labelled:
                raise ConfigError(
                    f"alignment (align_to) trains without labels; {labelled} need labels: leave them off "
                    "in the alignment stage"
                )
            if not self.is_bcos:
                raise ConfigError(f"alignment trains a B-cos student; model must be a bcos_* model, got {self.model}")
        self._validate_timm_teacher()

    def _validate_timm_teacher(self) -> None:
        """``ConfigError`` where a timm teacher and the model it gives do not go together: a timm
        ``bcosify_from`` makes the model ``bcos_timm:NAME`` (no registered name: the architecture is the
        converted teacher's), and only it does; a headless one (``num_classes=0``) has no logits to
        B-cosify: it is used for its features alone (``features=true``, ``bcosvit align --teacher-features``)."""
        timm_teacher = is_timm_source(self.bcosify_from)
        # a fine-tuning run of a B-cosified timm teacher's run is checked by _validate_finetune
        twin_named = self.model.startswith(TEACHER_FAMILY_PREFIX) and self.finetune_from is None
        if twin_named or timm_teacher:
            twin = TEACHER_FAMILY_PREFIX + TimmSource.parse(self.bcosify_from).name if timm_teacher else None
            if self.model != twin:
                raise ConfigError(
                    f"model {self.model} and bcosify_from {self.bcosify_from} do not go together: the B-cos model "
                    f"of a timm teacher {TIMM_PREFIX}NAME is {TEACHER_FAMILY_PREFIX}NAME (the teacher's architecture), "
                    f"and only bcosify_from = '{TIMM_PREFIX}NAME' builds it"
                )
        if timm_teacher and not teacher_features(self.bcosify_from) and teacher_classes(self.bcosify_from) == 0:
            raise ConfigError(
                f"bcosify_from {TimmSource.parse(self.bcosify_from).label} is a headless backbone (no classifier "
                "head): B-cosifying it needs its logits. Align a B-cos student to its features instead: bcosvit "
                "align --teacher ... --teacher-features"
            )

    def _validate_finetune(self) -> None:
        """``ConfigError`` for fine-tuning settings that do not go together or a source that cannot be
        fine-tuned (``finetune_source``: found from its metadata or name, no weights read)."""
        if self.finetune_pretrained not in FINETUNE_PRETRAINED:
            raise ConfigError(
                f"finetune_pretrained must be one of {FINETUNE_PRETRAINED}, got {self.finetune_pretrained!r}"
            )
        if self.finetune_from is None:
            unset = {"finetune_pretrained": "auto", "finetune_weights": None, "finetune_new_head": None}
            given = [name for name, value in unset.items() if getattr(self, name) != value]
            if given:
                raise ConfigError(f"{given[0]} chooses how finetune_from is read; set finetune_from (or leave it out)")
            return
        others = [name for name in ("init_from", "bcosify_from", "align_to") if getattr(self, name) is not None]
        if others:
            raise ConfigError(
                f"finetune_from {self.finetune_from!r} starts the model from its weights, and {others[0]} "
                f"{getattr(self, others[0])!r} from others: give one of them (init_from continues a model of this "
                "run's own architecture; a later stage starts from an earlier one with init_from_stage)"
            )
        if self.model_options:
            raise ConfigError(
                f"finetune_from takes the architecture from {self.finetune_from!r}; leave model_options empty "
                f"(got {self.model_options})"
            )
        source = finetune_source(self.finetune_from, self.finetune_pretrained, self.finetune_weights)
        if self.model != source.model_name:
            raise ConfigError(
                f"finetune_from {self.finetune_from!r} is a {source.model_name} model: model must be "
                f"{source.model_name}, got {self.model} (leave model out of the recipe and the command line: "
                "it is taken from the source)"
            )
        if source.architecture.num_classes == 0 and self.finetune_new_head is not True:
            raise ConfigError(
                f"finetune_from {self.finetune_from!r} is a headless backbone (num_classes 0: no head, its outputs "
                "are features): nothing of a classifier is fine-tuned. Set finetune_new_head = true to train a new "
                "head on its features (with train_head_only = true: a linear probe)"
            )

    @property
    def is_bcos(self) -> bool:
        return is_bcos_model(self.model, self.model_options)

    def resolved(self) -> TrainConfig:
        """A copy with the "auto" optimizer, loss and clipping replaced by the published recipe's choice
        for the model's family (B-cos: Adam, BCE, adaptive clipping 0.01; standard: AdamW, cross-entropy,
        grad-norm clipping 1.0). ``precision`` depends on the device: ``loop.resolve_config`` resolves it."""
        bcos = self.is_bcos

        def pick(value: str, for_bcos: str, for_standard: str) -> str:
            return value if value != "auto" else (for_bcos if bcos else for_standard)

        clip = pick(self.clip, "agc", "norm")
        default_clip_value = 0.01 if clip == "agc" else 1.0
        resolved = dataclasses.replace(
            self,
            optimizer=pick(self.optimizer, "adam", "adamw"),
            loss=pick(self.loss, "bce", "ce"),
            clip=clip,
            clip_value=self.clip_value if self.clip_value is not None else default_clip_value,
        )
        if self.finetune_from is None:
            return resolved
        # a fine-tuning source: which weights of a name, and its input size (read only where unset)
        source = finetune_source(self.finetune_from, self.finetune_pretrained, self.finetune_weights)
        return dataclasses.replace(
            resolved,
            finetune_pretrained=source.pretrained,
            image_size=self.image_size if self.image_size is not None else source.architecture.image_size,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def check_options(data: dict) -> None:
        """Raise ``ConfigError`` naming the first unknown option or value of the wrong type in ``data``
        (option name -> value, some or all options). Ranges are ``validate``'s job."""
        if not isinstance(data, dict):
            raise ConfigError(f"a training config must be a mapping of option names to values, got {data!r:.60}")
        unknown = sorted(set(data) - {f.name for f in fields(TrainConfig)}, key=str)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}")
        for name, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        check_fields(data, schema_of(TrainConfig), "training options")
        _check_model_option_names(data.get("model_options", {}))

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """A config from stored values (a run's ``config.json``, ``model.json`` or ``state.pt``, a
        recipe's merged tables); ``ConfigError`` as ``check_options`` says. Whole numbers given for
        float options (``energy_loss = 1``) become floats, so a config is stored the same either way."""
        cls.check_options(data)
        floats = {name for name, kinds in schema_of(cls).items() if float in kinds}
        return cls(**{k: float(v) if k in floats and type(v) is int else v for k, v in data.items()})


# set from the dataset when the model is built, so a run may not choose them
DATASET_MODEL_OPTIONS = ("num_classes", "class_names")
# finetune_pretrained: "auto" resolves to SHIPPED or IMAGENET for a registered name, stays for a file
FINETUNE_PRETRAINED = ("auto", SHIPPED, IMAGENET)


@dataclass(frozen=True)
class FinetuneSource:
    """The trained model a fine-tuning run starts from (``TrainConfig.finetune_from``), found without
    reading its weights.

    Attributes:
        source: as given: a run folder or ``.safetensors`` file, or a registered name.
        path: the weights file (``resolve_weights``), None for a registered name.
        pretrained: which weights of a name: ``"shipped"`` or ``"imagenet"`` (``"auto"`` for a file).
        weights: with ``"imagenet"``, the published ``.pth`` file given (else None: torch.hub's cache).
        model_name: the registered name (a file's ``model_name``), the run's ``model``.
        architecture: the weights' ``ViTConfig``: input size and channels, classes and their names.
    """

    source: str
    path: Path | None
    pretrained: str
    weights: str | None
    model_name: str
    architecture: ViTConfig


def _stored_architecture(meta: dict) -> ViTConfig:
    """The ``ViTConfig`` of checked weights metadata (``read_metadata``), with its class names where it
    records them."""
    architecture = ViTConfig.from_dict(meta["architecture"])
    if meta.get("classes") is not None:
        architecture.class_names = list(meta["classes"])
    return architecture


def finetune_source(source: str, pretrained: str = "auto", weights: str | None = None) -> FinetuneSource:
    """The fine-tuning source ``source``: an existing run folder or ``.safetensors`` file (its
    ``model.json``, checked), else a registered name with weights of the kind ``pretrained`` asks for
    (``"auto"``: its shipped weights where they ship, else the published ImageNet ones; ``weights``: the
    published file). ``ConfigError`` naming what is wrong: no such file or name, no weights of that kind,
    ``pretrained``/``weights`` for a file, a file that names no model."""
    if Path(source).exists():
        if pretrained != "auto" or weights is not None:
            given = f"finetune_pretrained {pretrained!r}" if pretrained != "auto" else f"finetune_weights {weights!r}"
            raise ConfigError(
                f"finetune_from {source!r} is a run folder or weights file, which brings its own weights; {given} "
                "chooses the weights of a registered name: leave it out"
            )
        path = resolve_weights(source)
        meta = read_metadata(path)
        name = meta.get("model_name")
        if not isinstance(name, str):
            raise ConfigError(f"finetune_from {source!r}: {path.with_suffix('.json')} names no model (model_name)")
        return FinetuneSource(source, path, "auto", None, name, _stored_architecture(meta))
    if "/" in source or source.endswith((".safetensors", ".json")):
        raise ConfigError(
            f"finetune_from {source!r}: no run folder or weights file there; pass the folder of a `bcosvit train` "
            "run, a .safetensors file, or a registered name with weights (bcosvit models)"
        )
    model_config(source)  # an unknown name fails with the closest names
    shipped, published = source in list_pretrained(), source in PUBLISHED
    if weights is not None and pretrained == "auto":
        pretrained = IMAGENET  # the published file implies the published weights
    if pretrained == "auto":
        if not (shipped or published):
            raise ConfigError(
                f"finetune_from {source!r}: no weights ship for it and none are published (models with weights: "
                "bcosvit models); fine-tune a run folder of yours instead"
            )
        pretrained = SHIPPED if shipped else IMAGENET
    if pretrained == SHIPPED and weights is not None:
        raise ConfigError("finetune_weights is the published .pth file of finetune_pretrained = 'imagenet'")
    if pretrained == SHIPPED and not shipped:
        raise ConfigError(
            f"finetune_from {source!r}: no weights for it ship inside the package (shipped: {list_pretrained()})"
            + ("; its published ImageNet weights: finetune_pretrained = 'imagenet'" if published else "")
        )
    if pretrained == IMAGENET and not published:
        raise ConfigError(
            f"finetune_from {source!r}: no published ImageNet weights for it (published: {list(PUBLISHED)})"
        )
    if pretrained == SHIPPED:
        architecture = _stored_architecture(read_metadata(shipped_path(source)))
    else:
        architecture = model_config(source, class_names=imagenet_class_names())
    return FinetuneSource(source, None, pretrained, weights, source, architecture)


def is_bcos_model(model: str, options: dict | None = None) -> bool:
    """Whether the model ``model`` with ``model_options`` ``options`` is a B-cos model: a registered name
    (``ConfigError`` for an unknown one or an invalid option), or ``bcos_timm:NAME``, the B-cos twin of a
    timm teacher (``bcosify_from = "timm:NAME"``), whose architecture is the converted teacher's."""
    if model.startswith(TEACHER_FAMILY_PREFIX):
        return True
    return model_config(model, **(options or {})).bcos


def _check_model_option_names(options: dict) -> None:
    """Raise ``ConfigError`` for a ``model_options`` key that is no ``ViTConfig`` option a run may set."""
    for key in options:
        if key in DATASET_MODEL_OPTIONS:
            raise ConfigError(
                f"model_options may not set {key}: the dataset decides it (got model_options {options!r:.80})"
            )
        if key not in ViTConfig.option_names() or key == "bcos":
            raise ConfigError(f"unknown model option {key!r} in model_options; the model name decides 'bcos'")
