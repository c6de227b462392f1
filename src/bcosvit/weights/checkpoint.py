"""Weights on disk: safetensors for tensors, a JSON file for everything else.

A run folder (or the package's ``weights/shipped/`` folder) holds ``<stem>.safetensors`` and
``<stem>.json`` (model name, architecture, class names, epoch, metrics). Every file is written to
a temporary name and renamed, so an interrupted write never leaves a half-written file; both files
carry the id of the save that wrote them, so a pair mixed by an interrupted save is detected.
Files from elsewhere are untrusted: the metadata is validated and compared with the weights'
header before a model is built.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError, InputError
from ..fileio import atomic_write, open_regular_file, write_json
from ..models.vit import MAX_DEPTH, MAX_MODEL_VALUES, VisionTransformer, ViTConfig
from ..validation import check_fields

# Bounds on what a checkpoint may ask for (the architecture's, models.vit.MAX_MODEL_VALUES and
# MAX_DEPTH, far above every published ViT: ViT-L/16 has 0.3 G values in 24 blocks), checked again
# exactly on a model built on the "meta" device (no memory) before anything is allocated.
MAX_METADATA_BYTES = 16 * 2**20
# The safetensors header entry and the model.json field that tie a weights file to its metadata file
# (the same random id in both, written by one save_weights call).
WEIGHTS_ID_KEY = "bcosvit_weights_id"
# model.json fields and their types (bool is no int here); "architecture" is always written
METADATA_FIELDS: dict[str, type] = {
    "architecture": dict,
    "weights_id": str,
    "model_name": str,
    "classes": list,
    "epoch": int,
    "metrics": dict,
    "ema": bool,
    "precision": str,
    "train_config": dict,  # the application's record of the run; bcosvit.app validates it where it reads it
    "shipped_from": str,
    "converted_from": str,  # a model converted from a published checkpoint: its URL or file (bcosvit.weights.hub)
    "source_sha256": str,  # ... and that file's SHA-256
    "conversion_version": int,  # ... and bcosvit.weights.convert.CONVERSION_VERSION of the conversion
}


def save_weights(model: VisionTransformer, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Save ``model``'s weights to ``path`` (``.safetensors``) and ``metadata`` plus the model's
    name and architecture to the ``.json`` beside it.

    ``metadata`` may hold the fields of ``METADATA_FIELDS`` (``model_name``, ``classes``, ``epoch``,
    ...). Both files carry the same new ``weights_id``, so a reader can tell a pair written by one
    call from one mixed by an interrupted save (the weights are renamed into place first).
    """
    path = Path(path).with_suffix(".safetensors")
    weights_id = uuid.uuid4().hex
    info = {**metadata, "architecture": model.config.to_dict(), "weights_id": weights_id}
    check_metadata(info, path.with_suffix(".json"))
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={WEIGHTS_ID_KEY: weights_id}))
    write_json(path.with_suffix(".json"), info)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checked JSON metadata stored beside a ``.safetensors`` weights file (or a run folder's model)."""
    path = resolve_weights(path).with_suffix(".json")
    if not path.exists():
        raise CheckpointError(f"metadata file {path} is missing; it is written beside the weights by training")
    meta = read_json_file(path, "metadata file", "model.json", "re-train or restore it")
    try:
        check_metadata(meta, path)
    except InputError as exc:
        raise CheckpointError(f"cannot read metadata: {exc}") from exc
    return meta


def read_json_file(path: Path, what: str, name: str, remedy: str) -> Any:
    """The JSON value in ``path``, a bcosvit file of kind ``name`` (``model.json``, a hub
    ``config.json``): a regular file of at most ``MAX_METADATA_BYTES``, no key repeated in an object;
    ``CheckpointError`` naming ``what`` and ``path`` otherwise, corrupt files with ``remedy``."""
    try:
        with open_regular_file(path, what) as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_METADATA_BYTES:
                raise CheckpointError(
                    f"{what} {path} is {size} bytes, more than the {MAX_METADATA_BYTES} a bcosvit {name} "
                    "can need; it was not written by bcosvit"
                )
            text = file.read()
    except InputError as exc:
        raise CheckpointError(f"cannot read the {what}: {exc}") from exc
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_refuse_repeated_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is corrupt ({exc}); {remedy}") from exc
    except RecursionError:  # JSON nested thousands deep: no bcosvit file is
        raise CheckpointError(f"{what} {path} is corrupt (nested too deeply for a bcosvit {name}); {remedy}") from None
    except CheckpointError as exc:  # a repeated key
        raise CheckpointError(f"{what} {path}: {exc}") from exc


def _refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` hook: a key given twice in one object is an error (json would keep the last silently)."""
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise CheckpointError(f"metadata repeats the field(s) {repeated}; each may appear once")
    return dict(pairs)


def check_metadata(meta: Any, path: Path) -> None:
    """Raise ``CheckpointError`` naming the first field of a ``model.json`` that bcosvit would not
    have written: unknown fields, wrong types, an invalid architecture or training config, or
    ``classes`` that are not one string per class. The one place the metadata is validated."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"metadata file {path} must hold a JSON object, got {type(meta).__name__}")
    check_fields(meta, METADATA_FIELDS, f"metadata file {path}", error=CheckpointError)
    if "architecture" not in meta:
        raise CheckpointError(f"metadata file {path} has no 'architecture'; it was not written by bcosvit")
    try:
        config = ViTConfig.from_dict(meta["architecture"])
    except ConfigError as exc:
        raise CheckpointError(f"metadata file {path}: invalid 'architecture': {exc}") from exc
    classes = meta.get("classes")
    if classes is not None and (len(classes) != config.num_classes or not all(isinstance(c, str) for c in classes)):
        raise CheckpointError(
            f"metadata file {path}: 'classes' must be {config.num_classes} strings (num_classes), got {classes!r:.80}"
        )
    if meta.get("epoch", 0) < 0:
        raise CheckpointError(f"metadata file {path}: 'epoch' must be >= 0, got {meta['epoch']}")
    metrics = meta.get("metrics", {})
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise CheckpointError(f"metadata file {path}: 'metrics' must map names to numbers, got {metrics!r:.80}")


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


def read_weights_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensor shapes and the string metadata of a safetensors file, read from its header alone
    (no tensor is loaded); only a regular file is opened (a FIFO would block)."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is not a regular file; pass a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"weights file {path} is corrupt or unreadable ({exc}); re-train or restore it") from exc


def check_shapes(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], path: Path, subject: str = "the model"
) -> None:
    """Raise ``CheckpointError`` listing missing, unexpected and differently shaped tensors
    (``expected``: what ``subject`` needs; ``found``: what the weights file ``path`` holds)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if wrong:
            details.append(
                "shape mismatch "
                + ", ".join(f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}" for k in wrong[:5])
            )
        raise CheckpointError(f"weights in {path} do not match {subject}: {'; '.join(details)}")


def load_state_dict(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors file into ``model``, failing clearly on corrupt files or mismatches
    (the shapes are compared from the file's header before any tensor is read)."""
    path = resolve_weights(path)
    shapes, _ = read_weights_header(path)
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"weights file {path} is corrupt or unreadable ({exc}); re-train or restore it") from exc
    model.load_state_dict(tensors)


def _check_same_save(meta: dict[str, Any], header: dict[str, str], path: Path) -> None:
    """Raise ``CheckpointError`` when the weights and their metadata come from different saves
    (files from before weights ids existed carry none on either side and pass)."""
    if meta.get("weights_id") != header.get(WEIGHTS_ID_KEY):
        raise CheckpointError(
            f"{path} and {path.with_suffix('.json')} come from different saves (a save was interrupted, or one "
            "file was replaced); for a run folder, continue it with `bcosvit train --resume` to rewrite both, "
            "or restore the two files together"
        )


def _meta_model(config: ViTConfig, path: Path, tensors_in_file: int) -> VisionTransformer:
    """The model ``config`` describes, built on the "meta" device: shapes without memory."""
    if config.depth > min(MAX_DEPTH, tensors_in_file):
        raise CheckpointError(
            f"the architecture in {path.with_suffix('.json')} asks for depth {config.depth}, but the weights file "
            f"holds {tensors_in_file} tensors (and at most {MAX_DEPTH} blocks are accepted); the files do not match"
        )
    with torch.device("meta"):
        return VisionTransformer(config)


def _check_model_size(skeleton: VisionTransformer, path: Path) -> None:
    """Raise ``CheckpointError`` when a model would hold more than ``MAX_MODEL_VALUES`` values."""
    values = sum(t.numel() for t in [*skeleton.parameters(), *skeleton.buffers()])
    if values > MAX_MODEL_VALUES:
        config = skeleton.config
        raise CheckpointError(
            f"the architecture in {path.with_suffix('.json')} needs {values:,} values, more than the "
            f"{MAX_MODEL_VALUES:,} a checkpoint may ask for (embed_dim {config.embed_dim}, depth {config.depth}, "
            f"image_size {config.image_size}); the metadata was edited or is not from bcosvit"
        )


# What may differ between a trained model's architecture and the model it is loaded into.
MAY_CHANGE_WHEN_TRAINED = ("image_size",)


def trained_config(architecture: dict[str, Any], overrides: dict[str, Any]) -> ViTConfig:
    """The validated architecture of trained weights with ``overrides`` applied: only
    ``MAY_CHANGE_WHEN_TRAINED`` (the input size; the weights do not depend on it) may change; an
    override equal to the stored value, or None, changes nothing."""
    fixed = {k: v for k, v in overrides.items() if v is not None and k not in MAY_CHANGE_WHEN_TRAINED}
    bad = sorted(k for k, v in fixed.items() if architecture.get(k) != v)
    if bad:
        raise ConfigError(f"cannot override {bad} of a trained model (only {list(MAY_CHANGE_WHEN_TRAINED)} may change)")
    changed = {k: v for k, v in overrides.items() if k in MAY_CHANGE_WHEN_TRAINED and v is not None}
    return ViTConfig.from_dict({**architecture, **changed})


def load_model(path: str | Path, **overrides) -> VisionTransformer:
    """Rebuild the model stored at ``path`` (run folder or ``.safetensors``) and load its weights.

    ``overrides`` may change the input size only (``image_size``); the architecture comes from the file.
    The metadata is checked against the weights file's header (shapes, and the id of the save) before
    the model is built, so an edited or mismatched file fails fast without allocating the model.
    """
    weights = resolve_weights(path)
    meta = read_metadata(weights)
    config = trained_config(meta["architecture"], overrides)
    shapes, header = read_weights_header(weights)
    _check_same_save(meta, header, weights)
    skeleton = _meta_model(config, weights, len(shapes))
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    check_shapes(expected, shapes, weights, f"the architecture in {weights.with_suffix('.json').name}")
    _check_model_size(skeleton, weights)
    model = VisionTransformer(config)
    load_state_dict(model, weights)
    model.eval()
    return model
