"""The published ImageNet weights of the B-cos-v2 ViTs: fetched once, verified, converted once, cached.

``create_model(name, pretrained="imagenet")`` calls ``convert_published``. The weights come from the
first of these that exists:

1. ``weights=PATH``: a published ``.pth`` file the caller already has (or a folder holding it under
   its published name); its SHA-256 is checked against the published one;
2. the converted model in torch.hub's cache (below), written by an earlier call;
3. ``$BCOSVIT_WEIGHTS_DIR/<published file name>``: a folder of published files, e.g. on a machine
   without network access (hash checked);
4. torch.hub's own cache of downloads, ``checkpoints/<published file name>`` (hash checked; a file
   that does not match is removed and downloaded again);
5. a download from the B-cos-v2 release into that cache, with a progress bar on stderr.

Cache layout, under ``torch.hub.get_dir()`` (``$TORCH_HOME/hub``, by default ``~/.cache/torch/hub``)::

    checkpoints/bcos_simple_vit_ti_patch16_224-4b0824b1c1.pth   the published file (torch.hub's convention)
    bcosvit/bcos_vit_tiny_patch16_224-imagenet.safetensors       the converted model (bcosvit.weights.checkpoint)
    bcosvit/bcos_vit_tiny_patch16_224-imagenet.json              its metadata, with the source's SHA-256

Every file lands under its final name only once complete and verified (downloads: torch.hub writes
``<name>.<uuid>.partial`` and renames it after the hash check; the converted model: ``save_weights``
writes to temporary names and renames), so an interrupted download or save never leaves a file
that a later call trusts.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch.hub import download_url_to_file

from ..errors import CheckpointError
from ..models.vit import VisionTransformer
from . import convert
from .checkpoint import load_model, read_metadata, read_weights_header, save_weights
from .published import IMAGENET, PUBLISHED, PublishedCheckpoint, published

WEIGHTS_DIR_ENV = "BCOSVIT_WEIGHTS_DIR"
_CHUNK = 2**20


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of the file at ``path``, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hub_checkpoint_path(entry: PublishedCheckpoint) -> Path:
    """Where torch.hub keeps the downloaded file: ``torch.hub.get_dir()/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / entry.file_name


def converted_path(name: str) -> Path:
    """Where the converted model of ``name`` is cached: ``torch.hub.get_dir()/bcosvit/<name>-imagenet.safetensors``."""
    return Path(torch.hub.get_dir()) / "bcosvit" / f"{name}-{IMAGENET}.safetensors"


def weights_dir() -> Path | None:
    """The folder ``$BCOSVIT_WEIGHTS_DIR`` names, or None when the variable is not set.

    Raises:
        CheckpointError: when it is set to something that is not a folder (a typo would otherwise
            be ignored and the weights downloaded).
    """
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if not folder:
        return None
    path = Path(folder).expanduser()
    if not path.is_dir():
        what = "a file" if path.exists() else "missing"
        raise CheckpointError(
            f"{WEIGHTS_DIR_ENV} is set to {folder}, which is not a folder ({what}); point it at the folder "
            "that holds the published .pth files, or unset it"
        )
    return path


def weights_dir_path(entry: PublishedCheckpoint) -> Path | None:
    """``$BCOSVIT_WEIGHTS_DIR/<file name>``, or None when the variable is not set (``weights_dir``)."""
    folder = weights_dir()
    return folder / entry.file_name if folder is not None else None


def verify_checkpoint(path: str | Path, entry: PublishedCheckpoint) -> Path:
    """Raise ``CheckpointError`` unless the file at ``path`` is the published file of ``entry``
    (its SHA-256 starts with the prefix in the published name). Returns the path."""
    path = Path(path)
    try:
        digest = sha256_of(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not digest.startswith(entry.sha256_prefix):
        raise CheckpointError(
            f"{path} is not the published {entry.file_name}: its SHA-256 is {digest[:16]}..., the published file's "
            f"starts with {entry.sha256_prefix}. It is damaged or a different file; download it again from "
            f"{entry.url}, or convert other weights with `bcosvit convert FILE.pth --out DIR`"
        )
    return path


def _user_file(weights: str | Path, entry: PublishedCheckpoint) -> Path:
    """The file ``weights=`` names: a file, or a folder holding the published file by its name."""
    path = Path(weights).expanduser()
    if path.is_dir():
        path = path / entry.file_name
    if not path.is_file():
        raise CheckpointError(
            f"no file at {path}; weights= must name the published {entry.file_name} (or a folder holding it), "
            f"downloaded from {entry.url}"
        )
    return verify_checkpoint(path, entry)


def _offline_help(entry: PublishedCheckpoint, cached: Path) -> str:
    env = os.environ.get(WEIGHTS_DIR_ENV)
    searched = f" (now {env}, which holds no {entry.file_name})" if env else ""
    return (
        f"Without network access, download {entry.url} elsewhere and put it at {cached} (torch.hub's cache), "
        f"or pass weights=PATH (command line: --weights PATH), or put it in the folder that the environment "
        f"variable {WEIGHTS_DIR_ENV} names{searched}."
    )


def download_checkpoint(entry: PublishedCheckpoint, progress: bool = True) -> Path:
    """Download the published file into torch.hub's cache (``hub_checkpoint_path``), verifying its
    hash before it gets its final name; nothing is left under that name when the download fails."""
    dst = hub_checkpoint_path(entry)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create torch.hub's cache folder {dst.parent} ({exc.strerror or exc}); set TORCH_HOME to a "
            f"folder you can write to, or pass weights=PATH"
        ) from exc
    try:
        download_url_to_file(entry.url, str(dst), hash_prefix=entry.sha256_prefix, progress=progress)
    except RuntimeError as exc:  # torch.hub's hash check: the temporary file is already removed
        raise CheckpointError(
            f"the file downloaded from {entry.url} is not the published one ({exc}); nothing was kept. "
            f"Try again later. {_offline_help(entry, dst)}"
        ) from exc
    except (URLError, HTTPException) as exc:  # no network, HTTP error, connection closed early
        reason = getattr(exc, "reason", None) or exc
        raise CheckpointError(
            f"cannot download the ImageNet weights of {entry.name} from {entry.url} ({reason}). "
            f"{_offline_help(entry, dst)}"
        ) from exc
    except OSError as exc:  # writing the file
        raise CheckpointError(
            f"cannot write {dst} ({exc.strerror or exc}); free some space or set TORCH_HOME to another folder, "
            "or pass weights=PATH"
        ) from exc
    return dst


def fetch_checkpoint(name: str, weights: str | Path | None = None, progress: bool = True) -> Path:
    """The verified published ``.pth`` file of ``name``: ``weights`` when given, else the one in
    ``$BCOSVIT_WEIGHTS_DIR``, else torch.hub's cached download, else a new download."""
    entry = published(name)
    if weights is not None:
        return _user_file(weights, entry)
    local = weights_dir_path(entry)
    if local is not None and local.is_file():
        return verify_checkpoint(local, entry)
    cached = hub_checkpoint_path(entry)
    if cached.is_file():
        try:
            return verify_checkpoint(cached, entry)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; removing it and downloading it again", stacklevel=2)
            cached.unlink(missing_ok=True)
    return download_checkpoint(entry, progress)


def conversion_metadata(name: str, source: str, digest: str) -> dict[str, Any]:
    """The provenance a converted model's ``model.json`` records: its name, the file or URL it was
    converted from, that file's SHA-256 and the ``CONVERSION_VERSION`` that converted it."""
    return {
        "model_name": name,
        "converted_from": source,
        "source_sha256": digest,
        "conversion_version": convert.CONVERSION_VERSION,
    }


def _load_cached(name: str, entry: PublishedCheckpoint) -> VisionTransformer | None:
    """The converted model of ``name`` from the cache, or None when there is none that matches the
    published file (a damaged or outdated cache entry is converted again)."""
    path = converted_path(name)
    try:
        return load_model(path) if _cached_conversion_fits(name, entry) else None
    except CheckpointError as exc:
        warnings.warn(f"ignoring the cached conversion {path}: {exc}", stacklevel=3)
        return None


def _cached_conversion_fits(name: str, entry: PublishedCheckpoint) -> bool:
    """Whether the cache holds a conversion of the published file of ``name`` by this bcosvit's
    conversion (its metadata says so); ``CheckpointError`` for a damaged metadata file."""
    path = converted_path(name)
    if not path.is_file():
        return False
    meta = read_metadata(path)
    read_weights_header(path)  # the weights file beside it is readable
    if meta.get("model_name") != name or not str(meta.get("source_sha256", "")).startswith(entry.sha256_prefix):
        return False
    return meta.get("conversion_version") == convert.CONVERSION_VERSION  # else converted by another version


def _save_cached(model: VisionTransformer, name: str, entry: PublishedCheckpoint, source: Path) -> None:
    """Cache the converted model (atomic writes); a cache that cannot be written only costs a warning."""
    path = converted_path(name)
    try:
        save_weights(model, path, conversion_metadata(name, entry.url, sha256_of(source)))
    except OSError as exc:
        message = f"cannot cache the converted model at {path} ({exc}); it is converted again next time"
        warnings.warn(message, stacklevel=3)


def convert_published(name: str, weights: str | Path | None = None, progress: bool = True) -> VisionTransformer:
    """The converted ImageNet model ``name``: from the cache, or fetched, converted and cached."""
    entry = published(name)
    given = _user_file(weights, entry) if weights is not None else None  # checked even when the cache answers
    model = _load_cached(name, entry)
    if model is not None:
        return model
    source = given or fetch_checkpoint(name, progress=progress)
    model = convert.convert_official(source, name)
    _save_cached(model, name, entry, source)
    return model


def published_location(entry: PublishedCheckpoint) -> Path | None:
    """The first file on this machine that holds ``entry``'s weights, checked as loading would check
    it: the converted model (its metadata), the file in ``$BCOSVIT_WEIGHTS_DIR`` or torch.hub's
    download (their SHA-256); None when there is none. A damaged file is passed over."""
    try:
        if _cached_conversion_fits(entry.name, entry):
            return converted_path(entry.name)
    except CheckpointError:
        pass  # loading would convert the published file again
    local = weights_dir_path(entry)
    for path in [*([local] if local else []), hub_checkpoint_path(entry)]:
        if path.is_file():
            try:
                return verify_checkpoint(path, entry)
            except CheckpointError:
                continue
    return None


__all__ = [
    "IMAGENET",
    "PUBLISHED",
    "WEIGHTS_DIR_ENV",
    "conversion_metadata",
    "convert_published",
    "converted_path",
    "download_checkpoint",
    "fetch_checkpoint",
    "hub_checkpoint_path",
    "published_location",
    "sha256_of",
    "verify_checkpoint",
]
