"""ImageNet-1k's 1000 classes, shipped with the package (``imagenet_classes.json``).

Class ``k`` of an ImageNet model is the ``k``-th WordNet id in sorted order (the order of
ImageNet's class folders ``n01440764`` ... ``n15075141``); ``imagenet_wnids()[k]`` is its id and
``imagenet_class_names()[k]`` a readable name (torchvision's: "tench", ..., "toilet tissue").
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources

from ..errors import DataError

IMAGENET_NUM_CLASSES = 1000
_FILE = "imagenet_classes.json"
_WNID = re.compile(r"n\d{8}")


def is_wnid(name: str) -> bool:
    """Whether ``name`` has the form of a WordNet noun id, ``n`` and eight digits (``n01440764``)."""
    return _WNID.fullmatch(name) is not None


def imagenet_wnids() -> list[str]:
    """The 1000 WordNet ids of ImageNet-1k in class-index order (sorted), e.g. ``[0] == "n01440764"``."""
    return [wnid for wnid, _ in _classes()]


def imagenet_class_names() -> list[str]:
    """Readable names of ImageNet-1k's 1000 classes in class-index order, e.g. ``[0] == "tench"``."""
    return [name for _, name in _classes()]


@cache
def _classes() -> tuple[tuple[str, str], ...]:
    """``(wnid, name)`` per class from the packaged file, read and validated once."""
    try:
        text = resources.files(__package__).joinpath(_FILE).read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"the packaged ImageNet class list {_FILE} cannot be read ({exc}); reinstall bcosvit") from exc
    return parse_classes(text, _FILE)


def parse_classes(text: str, source: str = _FILE) -> tuple[tuple[str, str], ...]:
    """``(wnid, name)`` pairs from the JSON ``text`` of an ImageNet class list (``{"classes": [[wnid,
    name], ...]}``), checked: 1000 entries, distinct WordNet ids ``n########`` in sorted order and
    non-empty names. ``DataError`` naming ``source`` and the first problem otherwise."""
    try:
        entries = json.loads(text).get("classes")
    except (ValueError, AttributeError) as exc:
        raise DataError(f"{source} is not an ImageNet class list ({exc}); reinstall bcosvit") from exc
    if not isinstance(entries, list) or len(entries) != IMAGENET_NUM_CLASSES:
        count = len(entries) if isinstance(entries, list) else "no"
        raise DataError(f"{source} lists {count} classes, expected {IMAGENET_NUM_CLASSES}; reinstall bcosvit")
    for k, entry in enumerate(entries):
        valid = isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) and v for v in entry)
        if not valid or not is_wnid(entry[0]):
            raise DataError(f"{source}: class {k} is {entry!r:.60}, expected [WordNet id n########, name]")
    wnids = [wnid for wnid, _ in entries]
    if wnids != sorted(set(wnids)):
        raise DataError(f"{source}: the WordNet ids are not distinct and sorted (ImageNet's class order)")
    return tuple((wnid, name) for wnid, name in entries)
