"""The named training recipes: TOML files that fill in ``TrainConfig`` (``Recipe``, ``Stage``,
``load_recipe``, ``list_recipes``, ``build_recipe``, ``parse_settings`` for ``--set``).

A recipe is a TOML file: ``recipes/<name>.toml`` beside this module (``bcosvit train --list-recipes``)
or a user's copy. Its tables, each a set of ``TrainConfig`` options, apply in this order, later
ones winning:

- ``[train]``: every stage;
- ``[bcos]`` or ``[standard]``: only models of that family (B-cos models are named ``bcos_*``);
- ``[models."PATTERN"]``: only models whose name matches the shell-style pattern;
- ``[stages.NAME]``: one stage, in file order, each a run of its own in the sub-folder ``NAME`` of
  the run folder; ``init_from_stage = "EARLIER"`` starts it from that earlier stage's weights (as
  ``init_from``, or, in a fine-tuning recipe, as its ``finetune_from``: e.g. a linear probe, then
  the whole model). A recipe without stages is one run straight into the run folder;
- the command line: ``--model``, ``--epochs``, ... and ``--set KEY=VALUE`` for every stage, then
  ``--set STAGE.KEY=VALUE`` for one.

A table's option replaces the value of an earlier table (``model_options`` as a whole). With
``finetune_from`` and no ``model`` in any table, the model is the source's (``finetune_model_name``).
A top-level ``description`` says in one line what the recipe is for. Options left "auto"
(optimizer, loss, clip, clip_value, precision) are resolved when a run starts and stored, resolved,
in its folder (``config.json``).

The module ``recipes`` and the data folder ``recipes/`` (no ``__init__.py``) share a name: Python
imports this module, and ``RECIPES`` reads the folder through ``importlib.resources``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from .config import TrainConfig, finetune_source, is_bcos_model
from .teacher import resolve_teacher_settings

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
        of the stage it starts from (its ``finetune_from`` in a fine-tuning recipe: that stage's model,
        head and classes included, with the weights it brings)."""
        out = Path(out)
        runs = []
        for stage in self.stages:
            config = stage.config
            if stage.init_from_stage is not None:
                earlier = str(out / stage.init_from_stage)
                if config.finetune_from is not None:
                    config = dataclasses.replace(
                        config, finetune_from=earlier, finetune_pretrained="auto", finetune_weights=None
                    )
                else:
                    config = dataclasses.replace(config, init_from=earlier)
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


def finetune_model_name(source: str) -> str:
    """The model of a run fine-tuning ``source`` (``TrainConfig.finetune_from``): a registered name
    itself, a run folder's or weights file's ``model_name``; ``ConfigError`` for no such file or name
    (``finetune_source``)."""
    return finetune_source(source).model_name


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
        except RecursionError:
            raise ConfigError(f"--set {key.strip()}: the value is nested too deeply to be a setting") from None
        stage, _, key = key.strip().rpartition(".")
        (stage_settings.setdefault(stage, {}) if stage else settings)[key] = value
    return settings, stage_settings


def _recipe_path(source: str) -> Traversable:
    """The file of a packaged recipe's name, or ``source`` itself where it names a ``.toml`` file."""
    if source.endswith(".toml") or "/" in source:
        path = Path(source)
        if path.is_dir():
            raise ConfigError(f"--recipe {source} is a folder; pass a recipe's name or the path of a .toml file")
        if not path.exists():
            raise ConfigError(f"recipe file {source} not found")
        if not path.is_file():
            raise ConfigError(f"--recipe {source} is not a regular file; pass the path of a .toml file")
        return path
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
    except RecursionError:
        raise ConfigError(f"{label}: not a valid recipe (nested too deeply)") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot be read ({exc.strerror or exc})") from None


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
    finetune = next((layer["finetune_from"] for layer in reversed(chosen) if "finetune_from" in layer), None)
    try:
        named = next((layer["model"] for layer in reversed(chosen) if "model" in layer), None)
        model = named or (finetune_model_name(finetune) if finetune is not None else TrainConfig.model)
        family = "bcos" if is_bcos_model(model) else "standard"
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    patterns = [table for pattern, table in tables.get("models", {}).items() if fnmatchcase(model, pattern)]
    merged: dict[str, Any] = {"model": model}
    for layer in (chosen[0], tables.get(family, {}), *patterns, *last):
        merged.update(layer)
    try:
        # a timm teacher as the run records it (its weights file's path and SHA-256), and its input size
        config = TrainConfig.from_dict(resolve_teacher_settings(merged))
        config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return config
