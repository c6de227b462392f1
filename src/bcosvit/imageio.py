"""Reading image files of any colour mode and size into what a model expects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import v2

from .errors import InputError

SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass
class LoadedImage:
    """An image converted for a model: ``tensor`` ``(C, S, S)`` in [0, 1] and what was done to it."""

    path: Path
    tensor: Tensor
    original_mode: str
    original_size: tuple[int, int]  # (width, height)
    notes: list[str] = field(default_factory=list)


def load_image(path: str | Path, in_chans: int, image_size: int) -> LoadedImage:
    """Read ``path`` and convert it to ``in_chans`` channels and ``image_size``×``image_size``.

    Colour modes are converted with Pillow (greyscale, RGB or RGBA for 1, 3 or 4 channels); the
    shorter side is resized to ``image_size`` and the centre cropped. Every change is recorded in
    ``notes``. Raises ``InputError`` for directories, missing, unreadable or unsupported files.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; pass image files (e.g. {path}/*.png)")
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if in_chans not in _MODES:
        raise InputError(f"cannot convert image files to {in_chans} channels (supported: 1, 3, 4)")
    try:
        with Image.open(path) as image:
            image.load()
            mode, size = image.mode, image.size
            converted = image.convert(_MODES[in_chans])
    except UnidentifiedImageError as exc:
        raise InputError(
            f"{path} is not an image format Pillow can read (supported: {', '.join(SUPPORTED_SUFFIXES)})"
        ) from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    notes = []
    if mode != converted.mode:
        notes.append(f"converted colour mode {mode} -> {converted.mode}")
    array = np.asarray(converted, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if size != (image_size, image_size):
        tensor = v2.functional.center_crop(v2.functional.resize(tensor, image_size, antialias=True), [image_size])
        notes.append(f"resized {size[0]}x{size[1]} -> {image_size}x{image_size} (shorter side, centre crop)")
    return LoadedImage(path, tensor.float() / 255, mode, size, notes)
