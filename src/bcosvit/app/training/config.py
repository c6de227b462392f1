"""One typed training configuration (``TrainConfig``) and the named recipes that fill it in.

A recipe is a TOML file: ``recipes/<name>.toml`` in this package (``bcosvit train --list-recipes``)
or a user's copy. Its tables, each a set of ``TrainConfig`` options, apply in this order, later
ones winning:

- ``[train]``: every stage;
- ``[bcos]`` or ``[standard]``: only models of that family (B-cos models are named ``bcos_*``);
- ``[models."PATTERN"]``: only models whose name matches the shell-style pattern;
- ``[stages.NAME]``: one stage, in file order, each a run of its own in the sub-folder ``NAME`` of
  the run folder; ``init_from_stage = "EARLIER"`` starts it from that earlier stage's weights. A
  recipe without stages is one run straight into the run folder;
- the command line: ``--model``, ``--epochs``, ... and ``--set KEY=VALUE`` for every stage, then
  ``--set STAGE.KEY=VALUE`` for one.

A table's option replaces the value of an earlier table (``model_options`` as a whole).
A top-level ``description`` says in one line what the recipe is for. Options left "auto"
(optimizer, loss, clip, clip_value, precision) are resolved when a run starts and stored, resolved,
in its folder (``config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...models.registry import model_config
from ...models.vit import ViTConfig
from ..data import DATASETS
from ..precision import PRECISIONS


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored, with every "auto" resolved, in the run folder."""

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
    # B-cosification (Arya et al., NeurIPS 2024): the model is bcosify(this standard ViT: a run folder or a
    # name with shipped weights); over the first bcosify_warmup_epochs B rises from 1 to 2 and the biases
    # shrink linearly to 0, then the saved model is bias-free (0: B = 2 and no biases from the start)
    bcosify_from: str | None = None
    bcosify_warmup_epochs: float = 1.0
    # alignment (ALOE, Maser et al., CVPR 2026): train the model to match this frozen teacher's tokens
    # (run folder or shipped name) by cosine distance, without labels
    align_to: str | None = None
    train_head_only: bool = False  # a linear probe: only the classifier head trains (e.g. after alignment)
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
                "energy_loss acts on mosaic canvases only: set mosaic to a probability > 0 "
                "or energy_canvases to a count > 0",
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
        self._validate_teachers()
        if self.energy_loss and not self.is_bcos:
            raise ConfigError(
                f"energy_loss trains on the exact B-cos explanation; {self.model} is a standard model "
                "(use a bcos_* model or energy_loss = 0)"
            )

    def _validate_teachers(self) -> None:
        """``ConfigError`` for B-cosification or alignment settings that do not go together."""
        if self.bcosify_warmup_epochs < 0:
            raise ConfigError(f"bcosify_warmup_epochs must be >= 0, got {self.bcosify_warmup_epochs}")
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

    @property
    def is_bcos(self) -> bool:
        return model_config(self.model, **self.model_options).bcos

    def resolved(self) -> TrainConfig:
        """A copy with the "auto" optimizer, loss and clipping replaced by the published recipe's choice
        for the model's family (B-cos: Adam, BCE, adaptive clipping 0.01; standard: AdamW, cross-entropy,
        grad-norm clipping 1.0). ``precision`` depends on the device: ``loop.resolve_config`` resolves it."""
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

    @staticmethod
    def check_options(data: dict) -> None:
        """Raise ``ConfigError`` naming the first unknown option or value of the wrong type in ``data``
        (option name -> value, some or all options). Ranges are ``validate``'s job."""
        if not isinstance(data, dict):
            raise ConfigError(f"a training config must be a mapping of option names to values, got {data!r:.60}")
        unknown = sorted(set(data) - {f.name for f in fields(TrainConfig)}, key=str)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}")
        hints = typing.get_type_hints(TrainConfig)
        for name, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
            kinds = typing.get_args(hints[name]) or (hints[name],)
            if not any(_fits(value, kind) for kind in kinds):
                expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise ConfigError(f"training option {name} must be {expected}, got {value!r:.60}")
        _check_model_option_names(data.get("model_options", {}))

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """A config from stored values (a run's ``config.json``, ``model.json`` or ``state.pt``, a
        recipe's merged tables); ``ConfigError`` as ``check_options`` says. Whole numbers given for
        float options (``energy_loss = 1``) become floats, so a config is stored the same either way."""
        cls.check_options(data)
        hints = typing.get_type_hints(cls)
        floats = {name for name, hint in hints.items() if float in (typing.get_args(hint) or (hint,))}
        return cls(**{k: float(v) if k in floats and type(v) is int else v for k, v in data.items()})


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


# --- Recipes ----------------------------------------------------------------------------------
RECIPES = resources.files(__package__).joinpath("recipes")  # the packaged recipe files
_FAMILY_TABLES = ("bcos", "standard")
_RECIPE_KEYS = ("description", "train", *_FAMILY_TABLES, "models", "stages")
_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a folder name, and no "." (STAGE.KEY)


@dataclass(frozen=True)
class Stage:
    """One run of a recipe.

    ``name`` is its sub-folder of the run folder ("" for a recipe without stages: it runs straight
    into the run folder); ``init_from_stage`` names the earlier stage whose weights it starts from.
    """

    name: str
    config: TrainConfig
    init_from_stage: str | None = None


@dataclass(frozen=True)
class Recipe:
    """Named stages, run in order; see the module docstring for the file format."""

    name: str
    description: str
    stages: tuple[Stage, ...]

    def runs(self, out: str | Path) -> list[tuple[Path, TrainConfig]]:
        """Each stage's run folder under ``out`` and its config, whose ``init_from`` is the run folder
        of the stage it starts from."""
        out = Path(out)
        runs = []
        for stage in self.stages:
            config = stage.config
            if stage.init_from_stage is not None:
                config = dataclasses.replace(config, init_from=str(out / stage.init_from_stage))
            runs.append((out / stage.name, config))
        return runs


def list_recipes() -> dict[str, str]:
    """Name -> one-line description of every packaged recipe."""
    return {
        path.name.removesuffix(".toml"): _read_recipe_file(path)[1].get("description", "")
        for path in sorted(RECIPES.iterdir(), key=lambda p: p.name.removesuffix(".toml"))
        if path.name.endswith(".toml")
    }


def load_recipe(
    source: str, settings: dict[str, Any] | None = None, stage_settings: dict[str, dict[str, Any]] | None = None
) -> Recipe:
    """The recipe ``source`` (a packaged recipe's name or the path of a ``.toml`` file) with
    ``settings`` applied to every stage and ``stage_settings[stage]`` to one (the command line's).

    Raises ``ConfigError`` naming the file, the stage (or table) and the option for an unknown
    option, a value of the wrong type or out of range.
    """
    label, tables = _read_recipe_file(_recipe_path(source))
    return build_recipe(Path(source).stem, tables, label, settings, stage_settings)


def build_recipe(
    name: str,
    tables: dict[str, Any],
    label: str = "the command line",
    settings: dict[str, Any] | None = None,
    stage_settings: dict[str, dict[str, Any]] | None = None,
) -> Recipe:
    """A recipe from a recipe file's parsed ``tables`` (``{}``: one run of ``TrainConfig``'s defaults);
    ``label`` names the file in error messages. ``settings`` and ``stage_settings`` as in ``load_recipe``."""
    settings, stage_settings = settings or {}, stage_settings or {}
    _check_tables(tables, label)
    _check_layer(settings, "the command line")
    stage_tables = tables.get("stages") or {"": {}}
    for stage, values in stage_settings.items():
        if stage not in stage_tables or not stage:
            names = [name for name in stage_tables if name] or "none"
            raise ConfigError(f"--set {stage}.KEY: {label} has no stage {stage!r} (stages: {names})")
        _check_layer(values, f"--set {stage}.KEY")
    stages: list[Stage] = []
    for stage, table in stage_tables.items():
        where = label + (f", stage {stage}" if stage else "")
        table = dict(table)
        start = table.pop("init_from_stage", None)
        if start is not None and not isinstance(start, str):
            raise ConfigError(f"{where}: init_from_stage must be the name of an earlier stage, got {start!r:.60}")
        _check_layer(table, where)
        command_line = {**settings, **stage_settings.get(stage, {})}
        merged_where = where + (" with the command line's options" if command_line else "")
        config = _merge(tables, [table, command_line], merged_where)
        if start is not None:
            earlier = [s.name for s in stages]
            if start not in earlier:
                raise ConfigError(f"{where}: init_from_stage {start!r} is no earlier stage (earlier: {earlier})")
            if config.init_from is not None:
                raise ConfigError(
                    f"{where}: starts from stage {start} (init_from_stage) and from init_from {config.init_from!r}; "
                    f"set init_from for the first stage only (--set {stages[0].name}.init_from=...)"
                )
        stages.append(Stage(stage, config, start))
    return Recipe(name, tables.get("description", ""), tuple(stages))


def parse_settings(items: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``--set`` arguments ``KEY=VALUE`` (every stage) and ``STAGE.KEY=VALUE`` (one) as
    ``(settings, stage_settings)``; a value is read as JSON where it is JSON (``5e-4``, ``true``,
    ``null``, ``{"pos_embed": "rope"}``), else taken as text (``runs/a``, ``fp32``)."""
    settings: dict[str, Any] = {}
    stage_settings: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE or STAGE.KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        stage, _, key = key.strip().rpartition(".")
        (stage_settings.setdefault(stage, {}) if stage else settings)[key] = value
    return settings, stage_settings


def _recipe_path(source: str) -> Traversable:
    """The file of a packaged recipe's name, or ``source`` itself where it names a ``.toml`` file."""
    if source.endswith(".toml") or "/" in source:
        if not Path(source).is_file():
            raise ConfigError(f"recipe file {source} not found")
        return Path(source)
    path = RECIPES.joinpath(f"{source}.toml")
    if not path.is_file():
        raise ConfigError(
            f"unknown recipe {source!r}; available: {', '.join(list_recipes())} (or the path of a .toml file)"
        )
    return path


def _read_recipe_file(path: Traversable) -> tuple[str, dict[str, Any]]:
    """``(label for messages, parsed tables)`` of a recipe file."""
    label = f"recipe {path}"
    try:
        return label, tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: not a valid TOML file: {exc}") from None


def _check_tables(tables: dict[str, Any], label: str) -> None:
    """Raise ``ConfigError`` for an unknown key or a malformed table of a recipe file."""
    unknown = sorted(set(tables) - set(_RECIPE_KEYS))
    if unknown:
        raise ConfigError(
            f"{label}: unknown key(s) {unknown}; a recipe holds description, [train], [bcos], [standard], "
            '[models."PATTERN"] and [stages.NAME] tables'
        )
    if not isinstance(tables.get("description", ""), str):
        raise ConfigError(f"{label}: description must be text")
    for key in ("train", *_FAMILY_TABLES, "models", "stages"):
        if not isinstance(tables.get(key, {}), dict):
            raise ConfigError(f"{label}: {key} must be a table ([{key}])")
    _check_layer(tables.get("train", {}), f"{label}, [train]")
    named = [(f"[{key}]", tables.get(key, {})) for key in _FAMILY_TABLES]
    named += [(f'[models."{pattern}"]', table) for pattern, table in tables.get("models", {}).items()]
    for where, table in named:
        _check_layer(table, f"{label}, {where}")
        if "model" in table:
            raise ConfigError(f"{label}, {where}: may not set model (the model decides which of these tables apply)")
    for stage, table in tables.get("stages", {}).items():
        if not _STAGE_NAME.fullmatch(stage):
            raise ConfigError(f"{label}: stage name {stage!r} must be letters, digits, '_' and '-'")
        if not isinstance(table, dict):
            raise ConfigError(f"{label}, stage {stage}: must be a table ([stages.{stage}])")


def _check_layer(values: Any, where: str) -> None:
    """``TrainConfig.check_options`` with ``where`` (file and table, or ``--set``) in the message."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a table of training options, got {values!r:.60}")
    try:
        TrainConfig.check_options(values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _merge(tables: dict[str, Any], last: list[dict[str, Any]], where: str) -> TrainConfig:
    """``[train]``, then the family and model-pattern tables that apply to the model, then ``last``
    (the stage's table, the command line), as one validated ``TrainConfig``."""
    chosen = [tables.get("train", {}), *last]
    model = next((layer["model"] for layer in reversed(chosen) if "model" in layer), TrainConfig.model)
    try:
        family = "bcos" if model_config(model).bcos else "standard"
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    patterns = [table for pattern, table in tables.get("models", {}).items() if fnmatchcase(model, pattern)]
    merged: dict[str, Any] = {}
    for layer in (chosen[0], tables.get(family, {}), *patterns, *last):
        merged.update(layer)
    try:
        config = TrainConfig.from_dict(merged)
        config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return config
