"""ImageNet-layout trees made on the spot: ``<root>/{train,val}/<WordNet id>/<id>_<k>.JPEG``.

The tests (and ``benchmarks/imagenet_scale.py``) need trees shaped like ImageNet's (WordNet-id class
folders, JPEGs of varied sizes and aspect ratios, many classes) without committing or downloading
bulk data. Each class has its own colour and stripe frequency, so a model can learn the classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bcosvit.weights.imagenet import imagenet_wnids


def make_imagenet_tree(
    root: str | Path,
    num_classes: int = 1000,
    train_per_class: int = 1,
    val_per_class: int = 1,
    sizes: tuple[int, int] = (24, 48),
    seed: int = 0,
    splits: tuple[str, ...] = ("train", "val"),
) -> Path:
    """Write JPEGs of the first ``num_classes`` ImageNet classes (spread over the 1000: every
    ``1000 // num_classes``-th WordNet id) into ``root/<split>/<wnid>/``; returns ``root``.

    Each image's width and height are drawn from ``sizes`` (inclusive), so aspect ratios vary.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = imagenet_wnids()[:: max(1, 1000 // num_classes)][:num_classes]
    counts = {"train": train_per_class, "val": val_per_class}
    for split in splits:
        for k, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts.get(split, val_per_class)):
                width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
                class_image(k, width, height, rng).save(folder / f"{wnid}_{i}.JPEG", quality=85)
    return root


def class_image(k: int, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image of class ``k``: a colour and stripe frequency of its own, plus noise."""
    colour = np.array([(k * 37) % 256, (k * 91) % 256, (k * 53) % 256], dtype=np.float64)
    x = np.arange(width)[None, :, None]
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * x * (1 + k % 7) / max(width, 1))
    pixels = colour * stripes + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
