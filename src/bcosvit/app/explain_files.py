"""``bcosvit explain``: explain image files with a B-cos model and write one figure per image.

Figure names: the figure of ``x.png`` is ``<out>/x.explained.png``. When that name is taken it gets
the next free suffix, ``x-2.explained.png``, ``x-3.explained.png``, ...: taken are names already
given to an earlier image of the same call, the input files themselves, and existing files that
bcosvit did not write (PNGs without the ``Software: bcosvit`` text chunk of ``save_figure``, links,
folders). Those are never replaced; an existing bcosvit figure is (a rerun updates its figures).
A stem too long for a file name (with the suffix and a temporary file's, over 255 bytes) is cut
to ``MAX_STEM_BYTES`` and ends with 8 hex digits of its SHA-256, so that long names stay distinct.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import ConfigError, InputError
from ..explanation import explain
from ..fileio import ensure_writable_dir
from ..images import LoadedImage, background_rgb, load_image, open_regular_file
from ..models.vit import VisionTransformer
from ..targets import TopK, resolve_target
from ..visualize import FIGURE_SOFTWARE, explanation_figure, literal_text, save_figure

FIGURE_SUFFIX = ".explained.png"
# A figure's stem, in UTF-8 bytes: with FIGURE_SUFFIX and atomic_write's temporary-file affixes the
# name stays below the 255 bytes file systems allow.
MAX_STEM_BYTES = 180


@dataclass
class FileExplanation:
    path: Path
    figure: Path
    classes: list[int]
    probabilities: list[float]
    completeness_error: float


def figure_paths(images: list[Path], out: Path, inputs: list[Path]) -> list[Path]:
    """Where the figure of each of ``images`` goes under ``out`` (see the module docstring for the
    rule): distinct paths, none of them one of ``inputs`` or a file that bcosvit did not write."""
    protected = _file_identities(inputs)
    taken: set[str] = set()
    paths = []
    for image in images:
        stem = figure_stem(image.stem)
        for n in itertools.count(1):
            candidate = out / f"{stem}{'' if n == 1 else f'-{n}'}{FIGURE_SUFFIX}"
            # casefold: x.png and X.png must not share a figure on case-insensitive file systems
            if candidate.name.casefold() not in taken and _may_hold_a_figure(candidate, protected):
                break
        taken.add(candidate.name.casefold())
        paths.append(candidate)
    return paths


def figure_stem(stem: str) -> str:
    """``stem``, or, beyond ``MAX_STEM_BYTES`` UTF-8 bytes, its start and 8 hex digits of its SHA-256."""
    encoded = stem.encode("utf-8", "surrogateescape")
    if len(encoded) <= MAX_STEM_BYTES:
        return stem
    digest = hashlib.sha256(encoded).hexdigest()[:8]
    start = encoded[: MAX_STEM_BYTES - 9].decode("utf-8", "ignore")  # never half a character
    return f"{start}-{digest}"


def _file_identities(paths: list[Path]) -> set:
    """Resolved paths and (device, inode) pairs of ``paths``, to recognise them under other names."""
    identities: set = set()
    for path in paths:
        identities.add(os.path.realpath(path))
        try:
            info = path.stat()
        except OSError:
            continue
        identities.add((info.st_dev, info.st_ino))
    return identities


def _may_hold_a_figure(path: Path, protected: set) -> bool:
    """True if a figure may be written at ``path``: nothing there, or a bcosvit figure that is not protected."""
    if os.path.realpath(path) in protected:  # realpath, unlike resolve, accepts symlink loops
        return False
    if not os.path.lexists(path):
        return True
    if not written_by_bcosvit(path):  # also false for links, folders and whatever else is not ours
        return False
    info = path.stat()
    return (info.st_dev, info.st_ino) not in protected  # an input hard-linked under this name


def written_by_bcosvit(path: Path) -> bool:
    """True for a regular file (not a link) that is a PNG with the ``Software: bcosvit`` text chunk."""
    if path.is_symlink():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_regular_file(path) as file, Image.open(file, formats=["PNG"]) as image:
                return image.info.get("Software") == FIGURE_SOFTWARE  # read from the header, nothing decoded
    except Exception:  # unreadable, not a PNG, too large, a folder, ...: not one of ours
        return False


def explain_files(
    model: VisionTransformer,
    paths: list[str | Path],
    out: str | Path,
    target: str | None = None,
    topk: int = 2,
    batch_size: int = 32,
    background: float = 0.0,
) -> tuple[list[FileExplanation], list[tuple[Path, str]]]:
    """Explain each readable image in ``paths``; returns the explanations and the (path, error)
    pairs of files that could not be read. Prints what it did for every file. Transparent pixels
    are composited on the grey level ``background`` in [0, 1]; images are resized and centre-cropped
    as the model's ``config.resize_size`` says (see ``load_image``)."""
    if not model.is_bcos:
        raise ConfigError("bcosvit explain needs a B-cos model; standard models get post-hoc attributions in evaluate")
    if topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {topk}")
    names = model.config.class_names or [str(i) for i in range(model.num_classes)]
    # the one class asked for, or each image's topk most likely ones (picked in explain's own forward)
    targets = (
        TopK(min(topk, model.num_classes))
        if target is None
        else resolve_target(target, model.config.class_names, model.num_classes)
    )
    background_rgb(background)  # a bad value fails before the output folder is created
    out = ensure_writable_dir(out, "output folder (--out)")
    loaded: list[LoadedImage] = []
    failed: list[tuple[Path, str]] = []
    for path in paths:
        try:
            loaded.append(load_image(path, model, background))
        except InputError as exc:
            failed.append((Path(path), str(exc)))
            print(f"skipped {path}: {exc}")
    figures = figure_paths([item.path for item in loaded], out, [Path(p) for p in paths])
    results: list[FileExplanation] = []
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        images = torch.stack([item.tensor for item in chunk])
        expl = explain(model, images, target=targets)  # target (N, T): T = topk, or 1 for --target
        probabilities = expl.probabilities.gather(1, expl.target)
        for i, item in enumerate(chunk):
            figure = explanation_figure(images[i : i + 1], expl[i], class_names=names)
            figure.suptitle(literal_text(item.path.name))
            try:
                path = save_figure(figure, figures[start + i])
            except OSError as exc:  # one figure that cannot be written must not lose the others
                failed.append((item.path, f"cannot write {figures[start + i]}: {exc.strerror or exc}"))
                print(f"skipped {item.path}: cannot write its figure ({exc.strerror or exc})")
                continue
            classes = expl.target[i].tolist()
            probs = probabilities[i].tolist()
            error = float(expl.completeness_error[i].max())
            results.append(FileExplanation(item.path, path, classes, probs, error))
            notes = f" ({'; '.join(item.notes)})" if item.notes else ""
            ranked = ", ".join(f"{names[c]} {p:.3f}" for c, p in zip(classes, probs))
            print(f"{item.path}{notes}: {ranked} | completeness error {error:.1e} | {path}")
    return results, failed
