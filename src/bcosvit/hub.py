"""The published ImageNet weights of the B-cos-v2 ViTs: fetched once, verified, converted once, cached.

``create_model(name, pretrained="imagenet")`` calls ``load_published``. The weights come from the
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
    bcosvit/bcos_vit_tiny_patch16_224-imagenet.safetensors       the converted model (bcosvit.checkpoint)
    bcosvit/bcos_vit_tiny_patch16_224-imagenet.json              its metadata, with the source's SHA-256

Every file lands under its final name only once complete and verified (downloads: torch.hub writes
``<name>.<uuid>.partial`` and renames it after the hash check; the converted model: ``save_weights``
writes to temporary names and renames), so an interrupted download or save never leaves a file
that a later call trusts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.error import URLError
from urllib.parse import unquote, urlparse

import torch
from torch.hub import download_url_to_file

from .errors import CheckpointError, ConfigError
from .models.vit import VisionTransformer, ViTConfig

BASE_URL = "https://github.com/B-cos/B-cos-v2/releases/download/v0.0.1-weights"
WEIGHTS_DIR_ENV = "BCOSVIT_WEIGHTS_DIR"
IMAGENET = "imagenet"
SHIPPED = "shipped"
# torch.hub's rule for the hash in a file name (torch.hub.HASH_REGEX): "<stem>-<sha256 prefix>.<ext>"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
_CHUNK = 2**20


@dataclass(frozen=True)
class PublishedCheckpoint:
    """One published file of the reference (``bcos.models.pretrained``, ``URLS["vit_final"]``).

    Attributes:
        name: the bcosvit model name.
        reference: the reference's entry point (``bcos.models.pretrained.<reference>``).
        url: where the file is published; its name ends in the prefix of its SHA-256.
        top1, top5: the published ImageNet validation accuracy (%), from the reference's docstrings.
    """

    name: str
    reference: str
    url: str
    top1: float
    top5: float

    @property
    def file_name(self) -> str:
        """The published file's name (the URL's last part), as torch.hub caches it."""
        return Path(unquote(urlparse(self.url).path)).name

    @property
    def sha256_prefix(self) -> str:
        """The hex digits after the file name's last ``-``: the start of the file's SHA-256."""
        match = _HASH_IN_NAME.search(self.file_name)
        if match is None:
            raise ConfigError(f"published file {self.file_name} carries no hash (<stem>-<sha256 prefix>.pth)")
        return match.group(1)


def _published(name: str, reference: str, file: str, top1: float, top5: float) -> PublishedCheckpoint:
    return PublishedCheckpoint(name, reference, f"{BASE_URL}/{file}", top1, top5)


# bcosvit name -> published file; the names map as docs/design.md#published-checkpoints says
# (simple_vit_{ti,s,b,l}_patch16_224 -> vit_{tiny,...}_patch16_224, vitc_*_patch1_14 -> vitc_*_224).
PUBLISHED: dict[str, PublishedCheckpoint] = {
    entry.name: entry
    for entry in (
        _published("bcos_vit_tiny_patch16_224", "simple_vit_ti_patch16_224",
                   "bcos_simple_vit_ti_patch16_224-4b0824b1c1.pth", 59.960, 81.838),
        _published("bcos_vit_small_patch16_224", "simple_vit_s_patch16_224",
                   "bcos_simple_vit_s_patch16_224-75e99d1f73.pth", 69.246, 88.096),
        _published("bcos_vit_base_patch16_224", "simple_vit_b_patch16_224",
                   "bcos_simple_vit_b_patch16_224-1fc4750806.pth", 74.408, 91.156),
        _published("bcos_vit_large_patch16_224", "simple_vit_l_patch16_224",
                   "bcos_simple_vit_l_patch16_224-9613b2ad0a.pth", 75.060, 91.378),
        _published("bcos_vitc_tiny_224", "vitc_ti_patch1_14", "bcos_vitc_ti_patch1_14-ddd6193a77.pth", 67.260, 86.774),
        _published("bcos_vitc_small_224", "vitc_s_patch1_14", "bcos_vitc_s_patch1_14-cf55c88f0c.pth", 74.504, 91.288),
        _published("bcos_vitc_base_224", "vitc_b_patch1_14", "bcos_vitc_b_patch1_14-a13c46397b.pth", 77.152, 92.926),
        _published("bcos_vitc_large_224", "vitc_l_patch1_14", "bcos_vitc_l_patch1_14-8739e18b8d.pth", 77.782, 92.966),
        _published("vit_tiny_patch16_224", "standard_simple_vit_ti_patch16_224",
                   "standard_simple_vit_ti_patch16_224-2ae8c65a39.pth", 70.230, 89.380),
        _published("vit_small_patch16_224", "standard_simple_vit_s_patch16_224",
                   "standard_simple_vit_s_patch16_224-f2934fcdcf.pth", 74.470, 91.226),
        _published("vit_base_patch16_224", "standard_simple_vit_b_patch16_224",
                   "standard_simple_vit_b_patch16_224-87074200ed.pth", 75.300, 91.026),
        _published("vit_large_patch16_224", "standard_simple_vit_l_patch16_224",
                   "standard_simple_vit_l_patch16_224-62dc536e03.pth", 75.710, 90.050),
        _published("vitc_tiny_224", "standard_vitc_ti_patch1_14",
                   "standard_vitc_ti_patch1_14-a5d6bded37.pth", 72.590, 90.788),
        _published("vitc_small_224", "standard_vitc_s_patch1_14",
                   "standard_vitc_s_patch1_14-34ecd7288e.pth", 75.756, 91.994),
        _published("vitc_base_224", "standard_vitc_b_patch1_14",
                   "standard_vitc_b_patch1_14-4d374b0220.pth", 76.790, 92.024),
        _published("vitc_large_224", "standard_vitc_l_patch1_14",
                   "standard_vitc_l_patch1_14-560e48f246.pth", 77.866, 92.298),
    )
}  # fmt: skip


def published(name: str) -> PublishedCheckpoint:
    """The published checkpoint of ``name``; ``ConfigError`` listing the names that have one."""
    if name not in PUBLISHED:
        raise ConfigError(f"no published ImageNet weights for {name!r}; models with them: {list(PUBLISHED)}")
    return PUBLISHED[name]


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


def weights_dir_path(entry: PublishedCheckpoint) -> Path | None:
    """``$BCOSVIT_WEIGHTS_DIR/<file name>``, or None when the variable is not set."""
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(folder).expanduser() / entry.file_name if folder else None


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


def _load_cached(name: str, entry: PublishedCheckpoint) -> VisionTransformer | None:
    """The converted model of ``name`` from the cache, or None when there is none that matches the
    published file (a damaged or outdated cache entry is converted again)."""
    from .checkpoint import load_model, read_metadata
    from .convert import CONVERSION_VERSION

    path = converted_path(name)
    if not path.is_file():
        return None
    try:
        meta = read_metadata(path)
        if meta.get("model_name") != name or not str(meta.get("source_sha256", "")).startswith(entry.sha256_prefix):
            return None
        if meta.get("conversion_version") != CONVERSION_VERSION:
            return None  # written by a bcosvit whose conversion differs
        return load_model(path)
    except CheckpointError as exc:
        warnings.warn(f"ignoring the cached conversion {path}: {exc}", stacklevel=3)
        return None


def _save_cached(model: VisionTransformer, name: str, entry: PublishedCheckpoint, source: Path) -> None:
    """Cache the converted model (atomic writes); a cache that cannot be written only costs a warning."""
    from .checkpoint import save_weights
    from .convert import CONVERSION_VERSION

    path = converted_path(name)
    meta = {
        "model_name": name,
        "converted_from": entry.url,
        "source_sha256": sha256_of(source),
        "conversion_version": CONVERSION_VERSION,
    }
    try:
        save_weights(model, path, meta)
    except OSError as exc:
        message = f"cannot cache the converted model at {path} ({exc}); it is converted again next time"
        warnings.warn(message, stacklevel=3)


def convert_published(name: str, weights: str | Path | None = None, progress: bool = True) -> VisionTransformer:
    """The converted ImageNet model ``name``: from the cache, or fetched, converted and cached."""
    from .convert import convert_official

    entry = published(name)
    given = _user_file(weights, entry) if weights is not None else None  # checked even when the cache answers
    model = _load_cached(name, entry)
    if model is not None:
        return model
    source = given or fetch_checkpoint(name, progress=progress)
    model = convert_official(source, name)
    _save_cached(model, name, entry, source)
    return model


def load_published(
    name: str,
    weights: str | Path | None = None,
    progress: bool = True,
    num_classes: int | None = None,
    **overrides,
) -> VisionTransformer:
    """The published ImageNet model ``name`` (eval mode, float32, ImageNet class names).

    Args:
        name: one of ``PUBLISHED`` (the 8 B-cos ViTs and their standard twins).
        weights: a published ``.pth`` file you already have (or a folder holding it); checked
            against the published SHA-256.
        progress: show a progress bar while downloading.
        num_classes: replace the head with a new one for this many classes (fine-tuning).
        **overrides: ``image_size`` alone (the weights fix the rest of the architecture).
    """
    unknown = sorted(k for k, v in overrides.items() if v is not None and k != "image_size")
    if unknown:
        raise ConfigError(f"cannot override {unknown} of a pretrained model (only ['image_size'] may change)")
    model = convert_published(name, weights, progress)
    image_size = overrides.get("image_size")
    if image_size is not None and image_size != model.config.image_size:
        model = _resized(model, image_size)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def _resized(model: VisionTransformer, image_size: int) -> VisionTransformer:
    """``model`` for inputs of ``image_size`` pixels (the weights do not depend on the input size)."""
    config = ViTConfig.from_dict({**model.config.to_dict(), "image_size": image_size})
    resized = VisionTransformer(config)
    resized.load_state_dict(model.state_dict())
    return resized.eval()


@dataclass(frozen=True)
class PretrainedWeights:
    """A model with weights to load, and where they are.

    Attributes:
        name: the model name.
        weights: ``"shipped"`` (inside the package) or ``"imagenet"`` (published); pass it as
            ``create_model(name, pretrained=weights)``.
        status: ``"shipped"``, ``"cached"`` (on this machine: converted, or the published file in
            torch.hub's cache or ``$BCOSVIT_WEIGHTS_DIR``) or ``"downloadable"``.
        location: the file that would be read (the URL for ``"downloadable"``).
        top1, top5: the published ImageNet accuracy (%); None for shipped weights.
    """

    name: str
    weights: str
    status: str
    location: str
    top1: float | None = None
    top5: float | None = None


def _published_status(entry: PublishedCheckpoint) -> PretrainedWeights:
    local = weights_dir_path(entry)
    candidates = [converted_path(entry.name), *([local] if local else []), hub_checkpoint_path(entry)]
    found = next((path for path in candidates if path.is_file()), None)
    status, location = ("cached", str(found)) if found else ("downloadable", entry.url)
    return PretrainedWeights(entry.name, IMAGENET, status, location, entry.top1, entry.top5)


def list_pretrained_weights(pattern: str = "*") -> list[PretrainedWeights]:
    """Every model whose name matches ``pattern`` with weights, shipped or published, and whether
    they are on this machine (no file is read or hashed: the check happens when they are loaded)."""
    from .models.registry import list_pretrained, weights_dir

    shipped = [
        PretrainedWeights(name, SHIPPED, SHIPPED, str(weights_dir() / f"{name}.safetensors"))
        for name in list_pretrained()
    ]
    records = shipped + [_published_status(entry) for entry in PUBLISHED.values()]
    return [record for record in records if fnmatch.fnmatch(record.name, pattern)]


__all__ = [
    "IMAGENET",
    "PUBLISHED",
    "SHIPPED",
    "WEIGHTS_DIR_ENV",
    "PretrainedWeights",
    "PublishedCheckpoint",
    "convert_published",
    "converted_path",
    "download_checkpoint",
    "fetch_checkpoint",
    "hub_checkpoint_path",
    "list_pretrained_weights",
    "load_published",
    "published",
    "sha256_of",
    "verify_checkpoint",
]
