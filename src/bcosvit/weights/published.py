"""The one table of published weights: the B-cos-v2 ImageNet ViTs of the reference code.

Every other view of the published weights derives from ``PUBLISHED``: the names ``convert``
accepts (``CONVERTIBLE``), the reference's entry points (``OFFICIAL_NAMES``), the download
addresses and hashes (``bcosvit.weights.hub``), ``list_pretrained_weights`` and the torch.hub
entry points (``hubconf.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import ConfigError

BASE_URL = "https://github.com/B-cos/B-cos-v2/releases/download/v0.0.1-weights"
IMAGENET = "imagenet"  # create_model(name, pretrained=IMAGENET): these weights
# torch.hub's rule for the hash in a file name (torch.hub.HASH_REGEX): "<stem>-<sha256 prefix>.<ext>"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
_BCOS_PREFIX = "bcos_"


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


# The reference's B-cos entry point -> bcosvit name; the standard twins' entry points are the same
# with "standard_" in front, and their names drop "bcos_" (docs/design.md#published-checkpoints).
OFFICIAL_NAMES: dict[str, str] = {
    entry.reference: entry.name for entry in PUBLISHED.values() if entry.name.startswith(_BCOS_PREFIX)
}
# each B-cos model followed by its standard twin
CONVERTIBLE: tuple[str, ...] = tuple(
    name for bcos in OFFICIAL_NAMES.values() for name in (bcos, bcos[len(_BCOS_PREFIX) :])
)

__all__ = ["BASE_URL", "CONVERTIBLE", "IMAGENET", "OFFICIAL_NAMES", "PUBLISHED", "PublishedCheckpoint", "published"]
