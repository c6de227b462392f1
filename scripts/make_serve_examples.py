"""Write the example images of ``bcosvit serve``: ``src/bcosvit/app/serve/examples/*.png``.

    python scripts/make_serve_examples.py [FASHION_MNIST_DIR]

The first test image of each Fashion-MNIST class (Xiao, Rasul & Vollgraf 2017, MIT licence), the
dataset the shipped models were trained on, as 28x28 greyscale PNGs named ``<test index>-<class>.png``.
FASHION_MNIST_DIR defaults to Debian's ``/usr/share/datasets/fashion-mnist``; ``tests/data/fashion-mnist``
(the first 1000 test images) gives the same files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from bcosvit.app.data import read_idx

OUT = Path(__file__).resolve().parents[1] / "src" / "bcosvit" / "app" / "serve" / "examples"
CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle-boot"]


def main(folder: str = "/usr/share/datasets/fashion-mnist") -> None:
    images = read_idx(Path(folder) / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(Path(folder) / "t10k-labels-idx1-ubyte.gz")
    OUT.mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(CLASSES):
        index = int((labels == label).nonzero()[0][0])
        path = OUT / f"{index:04d}-{name}.png"
        Image.fromarray(images[index], mode="L").save(path, optimize=True)
        print(path)


if __name__ == "__main__":
    main(*sys.argv[1:])
