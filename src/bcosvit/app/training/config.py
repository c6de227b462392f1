"""One typed training configuration, named presets and command-line overrides."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields

from ...errors import ConfigError
from ...models.registry import list_models, model_config
from ...models.vit import ViTConfig
from ..data import DATASETS
from ..precision import PRECISIONS


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in the run folder."""

    model: str = "bcos_vit_micro_patch4_28"
    model_options: dict = field(default_factory=dict)  # ViTConfig overrides, e.g. {"pos_embed": "rope"}
    dataset: str = "fashion-mnist"
    data_dir: str | None = None  # None: the dataset's default location (Fashion-MNIST only)
    image_size: int | None = None  # None: the dataset's native size
    train_subset: int | None = None  # use only the first N training images (tests, quick runs)
    test_subset: int | None = None
    epochs: int = 10
    batch_size: int = 128  # global batch, split over processes
    lr: float = 1e-3
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
    label_smoothing: float = 0.0  # standard models only
    ema: float = 0.0  # EMA decay per step; 0 disables it
    precision: str = "auto"  # "auto" (bf16 where the hardware has it natively, else fp32), "fp32" or "bf16"
    compile: bool = False  # torch.compile the model for training (skipped with a message where it cannot run)
    seed: int = 0
    num_workers: int = 0
    explain_examples: bool = True  # write an explanation figure for test images at the end

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid value."""
        _check_model_option_names(self.model_options)
        model_config(self.model, **self.model_options)  # unknown names/options fail clearly
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        checks = [
            (self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
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
                "energy_loss acts on mosaic canvases only: set --mosaic to a probability > 0 "
                "or --energy-canvases to a count > 0",
            ),
            (0 <= self.ema < 1, f"ema decay must lie in [0, 1), got {self.ema}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must lie in [0, 1), got {self.label_smoothing}"),
            (self.precision in PRECISIONS, f"precision must be auto, fp32 or bf16, got {self.precision!r}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
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
        if self.energy_loss and not self.is_bcos:
            raise ConfigError(
                f"energy_loss trains on the exact B-cos explanation; {self.model} is a standard model "
                "(use a bcos_* model or --energy-loss 0)"
            )

    @property
    def is_bcos(self) -> bool:
        return model_config(self.model, **self.model_options).bcos

    def resolved(self) -> TrainConfig:
        """A copy with every "auto" choice replaced by the published recipe's (SPEC §2.5)."""
        bcos = self.is_bcos

        def pick(value: str, for_bcos: str, for_standard: str) -> str:
            return value if value != "auto" else (for_bcos if bcos else for_standard)

        clip = pick(self.clip, "agc", "norm")
        default_clip_value = 0.01 if clip == "agc" else 1.0
        return dataclasses.replace(
            self,
            optimizer=pick(self.optimizer, "adam", "adamw"),
            loss=pick(self.loss, "bce", "ce"),
            clip=clip,
            clip_value=self.clip_value if self.clip_value is not None else default_clip_value,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """A config from stored values (a run's ``model.json`` or ``state.pt``); ``ConfigError``
        names the first unknown option or value of the wrong type. Ranges are ``validate``'s job."""
        if not isinstance(data, dict):
            raise ConfigError(f"a training config must be a mapping of option names to values, got {data!r:.60}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)}, key=str)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            kinds = typing.get_args(hints[name]) or (hints[name],)
            if not any(_fits(value, kind) for kind in kinds):
                expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise ConfigError(f"training option {name} must be {expected}, got {value!r:.60}")
        _check_model_option_names(data.get("model_options", {}))
        return cls(**data)


# set from the dataset when the model is built, so a run may not choose them
DATASET_MODEL_OPTIONS = ("num_classes", "class_names")


def _check_model_option_names(options: dict) -> None:
    """Raise ``ConfigError`` for a ``model_options`` key that is no ``ViTConfig`` option a run may set."""
    for key in options:
        if key in DATASET_MODEL_OPTIONS:
            raise ConfigError(
                f"model_options may not set {key}: the dataset decides it (got model_options {options!r:.80})"
            )
        if key not in ViTConfig.option_names() or key == "bcos":
            raise ConfigError(f"unknown model option {key!r} in model_options; the model name decides 'bcos'")


def _fits(value: object, kind: type) -> bool:
    """Whether a stored ``value`` has the field type ``kind`` (bools are not numbers; floats are finite)."""
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


# --- Presets --------------------------------------------------------------------------------
def _fmnist(model: str, **kw) -> TrainConfig:
    """Fashion-MNIST recipe shared by every small model (B-cos or standard: only 'auto' choices differ)."""
    base = dict(
        model=model, dataset="fashion-mnist", epochs=20, batch_size=128, lr=1e-3, warmup_steps=1000, compile=True
    )
    if not model.startswith("bcos_"):
        base["weight_decay"] = 0.05
    return TrainConfig(**{**base, **kw})


def _imagenet(model: str) -> TrainConfig:
    """The published ImageNet recipe (SPEC §2.5) on an ImageNet-style folder."""
    big = any(s in model for s in ("base", "large"))
    bcos = model.startswith("bcos_")
    return TrainConfig(
        model=model,
        dataset="folder",
        image_size=224,
        epochs=90,
        batch_size=1024,
        lr=1e-3,
        weight_decay=0.0 if bcos else 1e-4,
        warmup_steps=50_000 if big else 10_000,
        randaugment=10,
        mixup=0.2,
        compile=True,
        num_workers=8,
    )


def build_presets() -> dict[str, TrainConfig]:
    presets: dict[str, TrainConfig] = {
        # The main job: the small B-cos model with rotary positions, under 15 minutes on 2 CPU cores
        # without native bf16 (compiled float32, batch 64: two epochs; docs/results.md).
        "fmnist-demo": _fmnist(
            "bcos_vitc_micro_28", model_options={"pos_embed": "rope"}, epochs=2, batch_size=64, warmup_steps=300
        ),
    }
    for name in list_models():
        size = model_config(name).image_size
        if size == 28:
            presets[f"fmnist-{name}"] = _fmnist(name)
            # Stage 2: continue from the stage-1 run (its default folder) with half the batches
            # tiled into 2x2 or 3x3 mosaics, so the model learns to find several objects at once.
            presets[f"fmnist-{name}-mosaic"] = _fmnist(
                name, init_from=f"runs/fmnist-{name}", epochs=12, lr=5e-4, warmup_steps=200, mosaic=0.5, mosaic_grid=3
            )
            if name.startswith("bcos_"):
                # Stage 2 with the energy loss: the exact explanation of a cell's class is trained
                # to stay inside that cell (localisation as a training signal, Rao et al. 2023).
                presets[f"fmnist-{name}-energy"] = _fmnist(
                    name,
                    init_from=f"runs/fmnist-{name}",
                    epochs=3,
                    lr=5e-4,
                    warmup_steps=200,
                    mosaic=0.5,
                    mosaic_grid=3,
                    energy_loss=10.0,
                )
        elif size == 32:
            presets[f"cifar10-{name}"] = dataclasses.replace(
                _fmnist(name), dataset="cifar10", epochs=100, randaugment=9
            )
        elif size == 224:
            presets[f"imagenet-{name}"] = _imagenet(name)
    return presets


PRESETS = build_presets()


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name], model_options=dict(PRESETS[name].model_options))


# --- Command-line overrides -------------------------------------------------------------------
def _field_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0]
    return hint


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per ``TrainConfig`` field (``--model-options`` takes JSON)."""
    group = parser.add_argument_group("training options (override the preset)")
    for f in fields(TrainConfig):
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL", dest=f.name)
        elif kind is dict:
            group.add_argument(flag, type=json.loads, default=None, metavar="JSON", dest=f.name)
        else:
            group.add_argument(flag, type=kind, default=None, dest=f.name)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset named by ``args.preset`` (or the defaults) with the given overrides."""
    config = get_preset(args.preset) if getattr(args, "preset", None) else TrainConfig()
    changes = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    config = dataclasses.replace(config, **changes)
    config.validate()
    return config
