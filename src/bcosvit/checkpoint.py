"""Weights on disk: safetensors for tensors, a JSON file for everything else.

A run folder (or the package's ``weights/`` folder) holds ``<stem>.safetensors`` and
``<stem>.json`` (model name, architecture, class names, epoch, metrics). Every file is written to
a temporary name and renamed, so an interrupted write never leaves a half-written file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError
from .fileio import atomic_write, write_json
from .models.registry import list_pretrained, model_config, weights_dir
from .models.vit import VisionTransformer, ViTConfig


def save_weights(model: VisionTransformer, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Save ``model``'s weights to ``path`` (``.safetensors``) and ``metadata`` plus the model's
    name and architecture to the ``.json`` beside it."""
    path = Path(path).with_suffix(".safetensors")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    info = {"architecture": model.config.to_dict(), **metadata}
    write_json(path.with_suffix(".json"), info)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata stored beside a ``.safetensors`` weights file (or a run folder's model)."""
    path = resolve_weights(path).with_suffix(".json")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"metadata file {path} is missing; it is written beside the weights by training") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"metadata file {path} is corrupt ({exc}); re-train or restore it") from exc


def resolve_weights(path: str | Path) -> Path:
    """Accept a run folder (uses its ``model.safetensors``) or a weights file path."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.exists():
        raise CheckpointError(
            f"no weights at {path}; pass a run folder written by `bcosvit train` or a .safetensors file"
        )
    return path


def load_state_dict(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors file into ``model``, failing clearly on corrupt files or mismatches."""
    path = resolve_weights(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"weights file {path} is corrupt or unreadable ({exc}); re-train or restore it") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if wrong:
            details.append(
                "shape mismatch "
                + ", ".join(
                    f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:5]
                )
            )
        raise CheckpointError(f"weights in {path} do not match the model: {'; '.join(details)}")
    model.load_state_dict(tensors)


def load_model(path: str | Path, **overrides) -> VisionTransformer:
    """Rebuild the model stored at ``path`` (run folder or ``.safetensors``) and load its weights.

    ``overrides`` may change the input size only (``image_size``); the architecture comes from the file.
    """
    meta = read_metadata(path)
    arch = dict(meta.get("architecture") or {})
    if not arch:
        raise CheckpointError(f"metadata of {path} has no 'architecture'; it was not written by bcosvit")
    allowed = {"image_size"}
    bad = sorted(k for k, v in overrides.items() if v is not None and k not in allowed and arch.get(k) != v)
    if bad:
        raise ConfigError(f"cannot override {bad} of a trained model (only {sorted(allowed)} may change)")
    arch.update({k: v for k, v in overrides.items() if k in allowed and v is not None})
    try:
        config = ViTConfig(**arch)
    except TypeError as exc:
        raise CheckpointError(f"metadata of {path} has an invalid architecture ({exc})") from exc
    model = VisionTransformer(config)
    load_state_dict(model, path)
    model.eval()
    return model


def load_pretrained(name: str, num_classes: int | None = None, **overrides) -> VisionTransformer:
    """The shipped weights of ``name`` (see ``list_pretrained()``), loaded offline."""
    model_config(name)  # unknown names fail with a suggestion
    if name not in list_pretrained():
        raise ConfigError(
            f"no shipped weights for {name!r}; models with weights: {list_pretrained() or 'none'}. "
            "Train one with `bcosvit train` and load it with bcosvit.load_model(run_folder)"
        )
    path = weights_dir() / f"{name}.safetensors"
    if num_classes is not None and num_classes != read_metadata(path)["architecture"]["num_classes"]:
        model = load_model(path, **overrides)
        model.reset_classifier(num_classes)
        return model
    return load_model(path, **overrides)


def ship_weights(run: str | Path, name: str | None = None, dest: str | Path | None = None) -> Path:
    """Copy a finished run's weights into the package (``bcosvit/weights/<name>.safetensors`` + ``.json``)
    so ``create_model(name, pretrained=True)`` loads them offline. Returns the weights path."""
    source = resolve_weights(run)
    meta = read_metadata(source)
    name = name or meta.get("model_name")
    model_config(name)  # must be a registered name
    model = load_model(source)  # proves the files load before they are shipped
    folder = Path(dest) if dest is not None else weights_dir()
    keep = {k: meta[k] for k in ("model_name", "classes", "epoch", "metrics", "ema", "train_config") if k in meta}
    return save_weights(model, folder / f"{name}.safetensors", {**keep, "model_name": name, "shipped_from": str(run)})
