"""Images as a model expects them: its preprocessing as a torchvision transform, and image files
of any colour mode, bit depth and size read into it.

    preprocess = bcosvit.transforms(model)          # PIL images or uint8/float tensors -> (C, S, S) in [0, 1]
    image = bcosvit.load_image("photo.jpg", model).tensor

A model's preprocessing is its ``config``: ``in_chans`` channels, the shorter side resized to
``resize_size`` (None: ``image_size``), bilinear with antialiasing, then the centre
``image_size`` × ``image_size`` crop (ImageNet models: 256, then 224). No mean/std normalisation:
models take images in [0, 1] and normalise (standard twins) or encode ``[x, 1 - x]`` (B-cos) themselves.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn
from torchvision.transforms import v2

from . import fileio
from .errors import ConfigError, InputError

SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Pillow's own default, used when a program has switched its limit off (MAX_IMAGE_PIXELS = None)
_DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


@dataclass
class LoadedImage:
    """An image converted for a model: ``tensor`` ``(C, S, S)`` in [0, 1] and what was done to it."""

    path: Path
    tensor: Tensor
    original_mode: str
    original_size: tuple[int, int]  # (width, height)
    notes: list[str] = field(default_factory=list)


def read_image(
    path: str | Path,
    in_chans: int,
    image_size: int,
    background: float | Sequence[float] = 0.0,
    resize_size: int | None = None,
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> LoadedImage:
    """Read ``path`` and convert it to ``in_chans`` channels and ``image_size``×``image_size``.

    * Only regular files are opened (a FIFO or device would block or never end); files of more than
      ``max_bytes`` bytes are refused before they are read, and images with more pixels than
      ``max_pixels`` (None: ``PIL.Image.MAX_IMAGE_PIXELS``) before they are decoded.
    * The EXIF orientation is applied (a photo taken upright shows upright).
    * High bit depths keep their levels: 16-bit greyscale is divided by 65535; float images (mode
      ``F``) are used as they are when their values lie in [0, 1], otherwise min-max scaled.
    * Transparent pixels (RGBA, LA, palette or greyscale with a transparent colour) are composited
      on ``background`` unless the model takes 4 channels (RGBA), which keep their alpha.
    * Colour modes are converted with Pillow (greyscale, RGB or RGBA for 1, 3 or 4 channels); the
      shorter side is resized to ``resize_size`` (a model's ``config.resize_size``; None:
      ``image_size``) and the centre ``image_size``×``image_size`` cropped, as ImageNet models are
      evaluated (Resize(256) then CenterCrop(224), bilinear with antialiasing).

    Every change is recorded in ``notes``.

    Args:
        path: an image file Pillow can read.
        in_chans: 1, 3 or 4 channels.
        image_size: the side of the square output.
        background: what transparent pixels show, a grey level or an RGB triple in [0, 1]; the
            default black is what the shipped Fashion-MNIST models expect (light objects on black).
        resize_size: the shorter side before the centre crop, at least ``image_size``; None resizes
            the shorter side to ``image_size``.
        max_pixels: the most pixels (width × height, read from the header) an image may have; None:
            Pillow's ``MAX_IMAGE_PIXELS``. A server bounds what one upload may cost with it.
        max_bytes: the largest file size accepted; None: no bound.

    Raises:
        InputError: for directories, missing, non-regular, oversized, unreadable or unsupported files.
        ConfigError: for an unsupported ``in_chans``, a ``background`` outside [0, 1] or a
            ``resize_size`` below ``image_size``.
    """
    path = Path(path)
    if in_chans not in _MODES:
        raise InputError(f"cannot convert image files to {in_chans} channels (supported: 1, 3, 4)")
    if resize_size is not None and resize_size < image_size:
        raise ConfigError(f"resize_size must be at least image_size ({image_size}), got {resize_size}")
    fill = background_rgb(background)
    with warnings.catch_warnings():
        # oversized images are refused below with a message; Pillow's warning would only repeat it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with open_regular_file(path) as file:
                _check_file_size(path, os.fstat(file.fileno()).st_size, max_bytes)
                with Image.open(file) as image:
                    _check_pixel_count(path, image.size, max_pixels)
                    image.load()
                    mode, size = image.mode, image.size
                    upright, notes = _apply_orientation(image)
                    array, conversion_notes = _to_array(upright, _MODES[in_chans], fill)
        except InputError:
            raise
        except UnidentifiedImageError as exc:
            raise InputError(
                f"{path} is not an image format Pillow can read (supported: {', '.join(SUPPORTED_SUFFIXES)})"
            ) from exc
        except Image.DecompressionBombError as exc:
            raise InputError(f"{path} is too large to read safely: {exc}") from exc
        except Exception as exc:  # a damaged file can fail anywhere in Pillow's decoders
            raise InputError(f"cannot read {path}: {exc}") from exc
    notes += conversion_notes
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    tensor, resize_note = resize_and_crop(tensor, image_size, resize_size)
    return LoadedImage(path, tensor, mode, size, notes + ([resize_note] if resize_note else []))


def load_image(
    path: str | Path,
    model: nn.Module,
    background: float | Sequence[float] = 0.0,
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> LoadedImage:
    """Read ``path`` as ``model`` takes its images: ``read_image`` with the model's ``in_chans``,
    ``image_size`` and ``config.resize_size`` (``model``: a bcosvit ``VisionTransformer``); the
    result's ``tensor`` is ``(in_chans, image_size, image_size)`` in [0, 1], its ``notes`` say
    what was converted. ``background``, ``max_pixels``, ``max_bytes``: as ``read_image``'s."""
    config = _preprocessing_config(model)
    size, resize = config.image_size, config.resize_size
    return read_image(path, config.in_chans, size, background, resize, max_pixels=max_pixels, max_bytes=max_bytes)


def transforms(model: nn.Module) -> v2.Compose:
    """``model``'s preprocessing as a torchvision v2 transform, e.g. for ``ImageFolder(root, transform=...)``.

    Takes a PIL image or an image tensor ``(C, H, W)`` (uint8 in [0, 255] or float in [0, 1]; or a
    batch ``(N, C, H, W)``) and returns float32 ``(in_chans, image_size, image_size)`` in [0, 1]:
    greyscale and RGB converted to the model's channel count (1 or 3), the shorter side resized to
    ``config.resize_size`` (None: ``image_size``; bilinear, antialiased), the centre crop taken —
    the same steps, in the same order, as ``load_image``.
    """
    config = _preprocessing_config(model)
    ops: list = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]  # in float, so greyscale does not round
    if config.in_chans == 1:
        ops.append(v2.Grayscale(num_output_channels=1))
    elif config.in_chans == 3:
        ops.append(v2.RGB())
    ops.append(ResizeCrop(config.image_size, config.resize_size))
    return v2.Compose(ops)


class ResizeCrop(nn.Module):
    """``resize_and_crop`` as a transform: float images ``(..., C, H, W)`` in [0, 1] -> ``(..., C, S, S)``."""

    def __init__(self, image_size: int, resize_size: int | None = None) -> None:
        super().__init__()
        if resize_size is not None and resize_size < image_size:
            raise ConfigError(f"resize_size must be at least image_size ({image_size}), got {resize_size}")
        self.image_size, self.resize_size = image_size, resize_size

    def forward(self, image: Tensor) -> Tensor:
        return resize_and_crop(image, self.image_size, self.resize_size)[0]

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, resize_size={self.resize_size}"


def _preprocessing_config(model: nn.Module):
    config = getattr(model, "config", None)
    if not all(hasattr(config, name) for name in ("in_chans", "image_size", "resize_size")):
        raise ConfigError(
            "expected a bcosvit VisionTransformer (its config says how images are prepared), "
            f"got {type(model).__name__}"
        )
    return config


def resize_and_crop(image: Tensor, image_size: int, resize_size: int | None = None) -> tuple[Tensor, str | None]:
    """``image`` ``(..., C, H, W)`` in [0, 1] with its shorter side resized to ``resize_size`` (None:
    ``image_size``; bilinear, antialiased) and its centre ``(..., C, image_size, image_size)`` cropped,
    and a note saying what was done (None when nothing was).

    An image more elongated than ``MAX_ASPECT_RATIO`` : 1 is first centre-cropped along its long side
    to that ratio: the output (the centre square) is the same region, and the resize never asks
    for more than ``MAX_ASPECT_RATIO × resize_size²`` pixels (a 1×200000 PNG of 470 bytes would
    otherwise be resized to 256×51 200 000, 157 GB)."""
    image, crop_note = crop_to_aspect_ratio(image)
    out, note = _resize_and_crop(image, image_size, resize_size)
    return out, ", ".join(n for n in (crop_note, note) if n) or None


# The most elongated image resized whole; beyond it only the centre part (of this ratio) is resized.
MAX_ASPECT_RATIO = 4


def crop_to_aspect_ratio(image: Tensor) -> tuple[Tensor, str | None]:
    """``image`` ``(..., C, H, W)`` centre-cropped along its long side to at most
    ``MAX_ASPECT_RATIO`` : 1, and a note when it was."""
    height, width = image.shape[-2:]
    short, long = min(height, width), max(height, width)
    if long <= MAX_ASPECT_RATIO * short:
        return image, None
    keep = MAX_ASPECT_RATIO * short
    size = [height, keep] if width > height else [keep, width]
    cropped = v2.functional.center_crop(image, size)
    return (
        cropped,
        f"centre part {size[1]}x{size[0]} of {width}x{height} kept (aspect ratio above {MAX_ASPECT_RATIO}:1)",
    )


def _resize_and_crop(image: Tensor, image_size: int, resize_size: int | None) -> tuple[Tensor, str | None]:
    height, width = image.shape[-2:]
    if resize_size is None:
        if (width, height) == (image_size, image_size):
            return image, None
        resized = v2.functional.resize(image, image_size, antialias=True)
        out = v2.functional.center_crop(resized, [image_size]).clamp(0.0, 1.0)
        return out, f"resized {width}x{height} -> {image_size}x{image_size} (shorter side, centre crop)"
    steps = []
    if min(height, width) != resize_size:
        image = v2.functional.resize(image, resize_size, antialias=True).clamp(0.0, 1.0)
        steps.append(f"resized {width}x{height} -> {image.shape[-1]}x{image.shape[-2]} (shorter side {resize_size})")
    if tuple(image.shape[-2:]) != (image_size, image_size):
        image = v2.functional.center_crop(image, [image_size])
        steps.append(f"centre crop {image_size}x{image_size}")
    return image, ", ".join(steps) or None


def background_rgb(background: float | Sequence[float]) -> tuple[int, int, int]:
    """A grey level or RGB triple in [0, 1] as 8-bit RGB."""
    values = [background] * 3 if isinstance(background, int | float) else list(background)
    if len(values) != 3 or not all(isinstance(v, int | float) and 0.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"background must be a grey level or an (R, G, B) triple in [0, 1], got {background!r}")
    return tuple(round(float(v) * 255) for v in values)


def open_regular_file(path: Path) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file (``bcosvit.fileio.open_regular_file``);
    ``InputError`` saying what it is otherwise."""
    return fileio.open_regular_file(path, "image file", f"pass image files (e.g. {path}/*.png)")


def _check_file_size(path: Path, size: int, limit: int | None) -> None:
    """Refuse files of more than ``limit`` bytes (None: any size), before anything is read."""
    if limit is not None and size > limit:
        raise InputError(f"{path} is {size} bytes, more than the {limit} allowed; shrink the image first")


def _check_pixel_count(path: Path, size: tuple[int, int], limit: int | None = None) -> None:
    """Refuse images above ``limit`` pixels (None: Pillow's ``MAX_IMAGE_PIXELS``), read from the
    header, before decoding."""
    where = "" if limit is not None else "PIL.Image.MAX_IMAGE_PIXELS; "
    limit = limit if limit is not None else (Image.MAX_IMAGE_PIXELS or _DEFAULT_MAX_PIXELS)
    width, height = size
    if width * height > limit:
        raise InputError(
            f"{path} is {width}x{height} = {width * height} pixels, more than the {limit} allowed "
            f"({where}a decompression bomb?); shrink the image first"
        )


def _apply_orientation(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """The image turned upright by its EXIF orientation tag (a copy) and a note if it was turned."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    upright = ImageOps.exif_transpose(image)
    if orientation in range(2, 9):
        return upright, [f"rotated/flipped upright by its EXIF orientation {orientation}"]
    return upright, []


def _to_array(image: Image.Image, target: str, fill: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """``image`` as ``float32`` ``(H, W, C)`` in [0, 1] with the channels of mode ``target``, and notes."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        grey, notes = _high_depth_grey(image)
        if target != "L":
            notes.append(f"converted colour mode {image.mode} -> {target}")
        channels = [grey] * (3 if target != "L" else 1) + ([np.ones_like(grey)] if target == "RGBA" else [])
        return np.stack(channels, axis=-1), notes
    converted, notes = _composite_transparency(image, fill) if target != "RGBA" else (image, [])
    if image.mode != target:
        notes.insert(0, f"converted colour mode {image.mode} -> {target}")
    array = np.asarray(converted.convert(target), dtype=np.float32) / 255.0
    return (array[..., None] if array.ndim == 2 else array), notes


def _high_depth_grey(image: Image.Image) -> tuple[np.ndarray, list[str]]:
    """A 16-bit, 32-bit integer or float greyscale image as ``float32`` ``(H, W)`` in [0, 1], and notes."""
    values = np.asarray(image).astype(np.float64)
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and values.min() >= 0 and values.max() <= 65535):
        return (values / 65535.0).astype(np.float32), [f"16-bit greyscale ({image.mode}) scaled by 1/65535"]
    if not np.isfinite(values).all():
        raise ValueError("it holds NaN or infinite values; save it with finite values")  # load_image adds the path
    low, high = float(values.min()), float(values.max())
    if image.mode == "F" and 0.0 <= low and high <= 1.0:
        return values.astype(np.float32), []
    kind = "float" if image.mode == "F" else "32-bit integer"
    if high == low:
        clipped = float(np.clip(low, 0.0, 1.0))
        return np.full(values.shape, clipped, np.float32), [f"constant {kind} image {low:g} clipped to {clipped:g}"]
    scaled = ((values - low) / (high - low)).astype(np.float32)
    return scaled, [f"{kind} greyscale ({image.mode}) values in [{low:g}, {high:g}] min-max scaled to [0, 1]"]


def _composite_transparency(image: Image.Image, fill: tuple[int, int, int]) -> tuple[Image.Image, list[str]]:
    """``image`` with its transparent pixels composited on ``fill`` (RGB), and a note if any were."""
    if image.mode not in _ALPHA_MODES and "transparency" not in image.info:
        return image, []
    rgba = image.convert("RGBA")
    if rgba.getextrema()[3][0] == 255:  # fully opaque: nothing to composite
        return image, []
    composited = Image.alpha_composite(Image.new("RGBA", rgba.size, (*fill, 255)), rgba).convert("RGB")
    name = {(0, 0, 0): "black", (255, 255, 255): "white"}.get(fill, f"RGB {fill}")
    return composited, [f"transparency composited on a {name} background"]
