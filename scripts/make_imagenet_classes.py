"""Write ``src/bcosvit/imagenet_classes.json``: ImageNet-1k's WordNet ids and readable names.

    python scripts/make_imagenet_classes.py imagenet_class_index.json

The WordNet ids come from the widely copied ``imagenet_class_index.json`` (``{"0": [wnid,
keras_name], ...}``, first published with Keras' ImageNet models); the readable names from
torchvision's weights metadata (``torchvision.models._meta._IMAGENET_CATEGORIES``, 1000 names in
class-index order, which tell apart the two "crane" and the two "maillot" classes). The class
order is ImageNet's: the sorted WordNet ids, which the script checks.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from torchvision.models._meta import _IMAGENET_CATEGORIES

OUT = Path(__file__).resolve().parents[1] / "src" / "bcosvit" / "imagenet_classes.json"
DESCRIPTION = (
    "ImageNet-1k (ILSVRC 2012) classes in class-index order, which is the sorted WordNet ids: "
    "[WordNet id, readable name]. Ids from Keras' imagenet_class_index.json, names from torchvision's "
    "weights metadata; written by scripts/make_imagenet_classes.py."
)


def read_wnids(path: Path) -> list[str]:
    """The 1000 WordNet ids of ``imagenet_class_index.json`` in class-index order, checked."""
    index = json.loads(path.read_text())
    if sorted(index, key=int) != [str(i) for i in range(1000)]:
        raise SystemExit(f"{path}: expected the keys '0' ... '999'")
    wnids = [index[str(i)][0] for i in range(1000)]
    if not all(re.fullmatch(r"n\d{8}", w) for w in wnids) or wnids != sorted(set(wnids)):
        raise SystemExit(f"{path}: expected 1000 distinct WordNet ids n######## in sorted order")
    return wnids


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    wnids = read_wnids(Path(argv[0]))
    names = list(_IMAGENET_CATEGORIES)
    if len(names) != 1000:
        raise SystemExit(f"torchvision lists {len(names)} ImageNet names, expected 1000")
    rows = ",\n".join(f"    {json.dumps([w, n], ensure_ascii=False)}" for w, n in zip(wnids, names))
    OUT.write_text(f'{{\n  "description": {json.dumps(DESCRIPTION)},\n  "classes": [\n{rows}\n  ]\n}}\n')
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1:])
