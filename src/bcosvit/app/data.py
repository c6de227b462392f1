"""Datasets read from local files only (nothing is downloaded) and their transforms.

One item format for every dataset: ``(image, label)`` with ``image`` a uint8 ``(C, H, W)`` tensor
(a quarter of float32's bytes across the DataLoader workers' pipe and the host-device bus);
``batch_to_device`` makes a batch float in [0, 1] on the device, and each model owns its input
encoding (normalisation) from there.

- Fashion-MNIST: the four idx ``.gz`` files of Debian's ``dataset-fashion-mnist`` package.
- CIFAR-10: the standard python-format batches (``data_batch_1`` ... ``test_batch``).
- Any ImageNet-style folder tree ``<root>/{train,val}/<class>/<image>`` (``FolderDataset``; for
  evaluation also a single folder of class folders); WordNet-id class folders are ImageNet's
  classes in every command.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision.transforms import v2

from ..errors import DataError, InputError
from ..fileio import open_regular_file
from ..images import crop_to_aspect_ratio
from ..weights.imagenet import imagenet_class_names, imagenet_wnids, is_wnid

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("fashion-mnist", "cifar10", "folder")


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into a numpy array of its stored shape."""
    try:
        with open_regular_file(path, "idx file") as raw:
            data = (gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw).read()
    except InputError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}; reinstall the dataset") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file; reinstall the dataset")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(shape))} values for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


class TensorImageDataset(Dataset):
    """Images held in memory as uint8 ``(N, C, H, W)`` with integer labels; yields ``(image, label)``.

    ``transform`` receives a uint8 ``(C, H, W)`` tensor; without one, images come out as they are held.
    """

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str], transform=None) -> None:
        self.images, self.labels, self.classes, self.transform = images, labels, classes, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        image = self.transform(image) if self.transform is not None else image
        return image, int(self.labels[index])


def load_fashion_mnist(split: str, root: str | Path | None = None, transform=None) -> TensorImageDataset:
    """Fashion-MNIST ``split`` ("train" or "test") from the idx ``.gz`` files under ``root``."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k", "val": "t10k"}[split]
    files = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found: missing {', '.join(missing)}. Install it with "
            f"'sudo apt-get install dataset-fashion-mnist' (puts the files in {FASHION_MNIST_DIR}) "
            "or pass --data-dir pointing to a folder with the four idx .gz files"
        )
    images = torch.from_numpy(read_idx(files[0]).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(files[1]).astype(np.int64))
    if len(images) != len(labels):
        raise DataError(f"{files[0]} has {len(images)} images but {files[1]} has {len(labels)} labels")
    return TensorImageDataset(images, labels, list(FASHION_MNIST_CLASSES), transform)


def _plain_dtype(*args) -> np.dtype:
    """``numpy.dtype`` for the unpickler, refusing dtypes that hold Python objects."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"an array of Python objects ({dtype}) is no CIFAR-10 data")
    return dtype


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: a str to latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


# The globals a CIFAR-10 batch pickle refers to (numpy's array reconstruction under either module
# name); taken from numpy itself so they match the installed version.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{(m, "_reconstruct"): np.empty(0).__reduce__()[0] for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): np.empty(0).__reduce_ex__(5)[0] for m in ("numpy.core.numeric", "numpy._core.numeric")},
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain values and numpy arrays only; any other global (code) is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only arrays")
        return _CIFAR_GLOBALS[module, name]


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """One python-format CIFAR-10 batch: uint8 images ``(N, 3, 32, 32)`` and labels in [0, 9].

    The file is a pickle: it is read with an unpickler that rebuilds only dicts, lists, strings,
    numbers and numpy arrays, so a crafted file cannot run code; anything else is a ``DataError``.
    """
    try:
        with open_regular_file(path, "CIFAR-10 batch") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except InputError as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc}") from exc
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc}; re-extract cifar-10-python.tar.gz") from exc
    if isinstance(batch, dict):
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path} is not a CIFAR-10 batch: expected 'data' as uint8 rows of 3072 pixels")
    valid_labels = isinstance(labels, list) and len(labels) == len(data)
    if not valid_labels or not all(type(v) is int and 0 <= v < len(CIFAR10_CLASSES) for v in labels):
        raise DataError(f"{path} is not a CIFAR-10 batch: expected 'labels' as {len(data)} integers in [0, 9]")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(split: str, root: str | Path, transform=None) -> TensorImageDataset:
    """CIFAR-10 ``split`` from the python-format batches in ``root`` (``cifar-10-batches-py``)."""
    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise DataError(
            f"CIFAR-10 batches {missing} not found in {root}; download 'cifar-10-python.tar.gz' from "
            "https://www.cs.toronto.edu/~kriz/cifar.html on a connected machine, unpack it and pass "
            "--data-dir .../cifar-10-batches-py"
        )
    images, labels = [], []
    for name in names:
        batch_images, batch_labels = read_cifar10_batch(root / name)
        images.append(batch_images)
        labels.extend(batch_labels)
    return TensorImageDataset(
        torch.from_numpy(np.concatenate(images)), torch.tensor(labels), list(CIFAR10_CLASSES), transform
    )


def load_image_folder(split: str, root: str | Path, transform=None) -> FolderDataset:
    """A folder of class folders: ``root/<split>/<class>/<image>``, or for the evaluation split
    "val", ``root/<class>/<image>`` when ``root`` has neither ``train`` nor ``val``
    (``FolderDataset``: WordNet-id class folders are ImageNet classes, in every command)."""
    return FolderDataset(_split_folder(split, Path(root)), transform)


def _split_folder(split: str, root: Path) -> Path:
    """``root/split``, or ``root`` itself for the "val" split of a folder without ``train``/``val``."""
    if (root / split).is_dir():
        return root / split
    if split == "val" and root.is_dir() and not any((root / name).exists() for name in ("train", "val")):
        return root
    raise DataError(
        f"image folder {root / split} not found; expected {root}/{{train,val}}/<class>/<image files>, "
        f"or for evaluation a folder of class folders {root}/<class>/<image files> (e.g. ImageNet's val/)"
    )


def imagenet_class_indices(class_folders: list[str], folder: Path) -> dict[str, int] | None:
    """``{folder name: ImageNet class index}`` when ``class_folders`` are ImageNet WordNet ids; None
    when none of them looks like a WordNet id (an ordinary folder dataset).

    Raises:
        DataError: naming the folders that are not ImageNet WordNet ids when some of them are.
    """
    index = {wnid: k for k, wnid in enumerate(imagenet_wnids())}
    if not any(is_wnid(name) for name in class_folders):
        return None
    unknown = [name for name in class_folders if name not in index]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DataError(
            f"class folder(s) {shown} in {folder} are not ImageNet WordNet ids; class folders named by "
            "WordNet id (n01440764 ... n15075141, ImageNet's layout) are read as ImageNet's 1000 classes, "
            "so all of them must be ImageNet-1k ids: rename or remove the others"
        )
    return {name: index[name] for name in class_folders}


class FolderDataset(Dataset):
    """The images of a folder of class folders ``folder/<class>/<image>``, yielding
    ``(transform(image), label)`` with ``image`` what ``loader`` reads from the file: by default
    an RGB PIL image (``read_folder_image``; ``load_dataset``'s transforms make it a uint8 tensor).

    Class folders named by ImageNet WordNet id (``n01440764``, all 1000 or any subset) are ImageNet
    classes: their labels are ImageNet's indices and ``classes`` ImageNet's 1000 names, so that a
    tree means the same classes to ``train``, ``align``, ``evaluate``, ``explain`` and ``serve``.
    Other folders' sorted names are the classes.

    The file list is held as two numpy arrays (``paths`` of bytes relative to ``root`` and
    ``targets`` int64), not as Python objects: DataLoader workers share them with their parent
    (copy-on-write pages that reference counting never touches), so 1.28 M files cost about
    50 MB once, not once per worker. Labels are known without decoding anything (``targets``).

    Raises:
        DataError: for no class folders, a class folder without image files, an unreadable folder,
            or class folders that are not all ImageNet WordNet ids when some are.
    """

    def __init__(self, folder: str | Path, transform=None, loader=None) -> None:
        self.root = str(folder)
        self.transform = transform
        self.loader = loader if loader is not None else read_folder_image
        try:
            class_folders = tv_datasets.folder.find_classes(self.root)[0]
            mapping = imagenet_class_indices(class_folders, Path(folder))
            if mapping is None:
                mapping = {name: k for k, name in enumerate(class_folders)}
                self.classes = list(class_folders)
            else:
                self.classes = imagenet_class_names()
            samples = tv_datasets.folder.make_dataset(self.root, mapping, extensions=tv_datasets.folder.IMG_EXTENSIONS)
        except OSError as exc:  # no class folders, a class folder without image files, or an unreadable folder
            raise DataError(
                f"image folder {folder} is unusable: {exc} Expected {folder}/<class>/<image files>"
            ) from exc
        self.class_folders = list(class_folders)
        prefix = len(self.root.rstrip(os.sep)) + 1
        self.paths = np.array([path[prefix:].encode("utf-8", "surrogateescape") for path, _ in samples])
        self.targets = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, index: int) -> str:
        """The file of item ``index``."""
        return os.path.join(self.root, self.paths[index].decode("utf-8", "surrogateescape"))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.loader(self.path(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def read_folder_image(path: str) -> Image.Image:
    """The RGB PIL image in file ``path``, as torchvision's loader reads it but without its copy of
    images that are RGB already; a ``DataError`` names a file that cannot be decoded (a folder
    dataset reads each file only when its item is loaded)."""
    try:
        with open_regular_file(path, "image file") as file:  # a FIFO named x.JPEG would block a worker
            image = Image.open(file)
            image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except InputError as exc:
        raise DataError(f"cannot read image {path}: {exc}; remove or replace the file") from exc
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's errors for damaged files
        raise DataError(f"cannot read image {path} ({exc}); remove or replace the file") from exc


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The labels ``(N,)`` int64 of ``dataset``, read without decoding any image: a dataset of this
    module, a ``Subset`` of one, or any dataset with torchvision's ``targets`` attribute.

    Raises:
        DataError: for a dataset that does not say its labels.
    """
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, TensorImageDataset):
        return dataset.labels.numpy()
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise DataError(
            f"cannot read the labels of a {type(dataset).__name__} without decoding it; give it a "
            "'targets' attribute (torchvision's convention) to draw subsets from it"
        )
    return np.asarray(targets, dtype=np.int64)


def stratified_indices(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` indices into ``labels`` drawn without replacement so that every class keeps its
    share (each class gets ``floor`` or ``ceil`` of ``count * n_class / N``; the classes whose
    share has the largest remainder get the extra ones, ties broken by the seeded draw), in
    increasing order. ``count >= len(labels)``: all indices.

    A subset of ImageNet's validation set taken this way covers every class once ``count`` reaches
    the number of classes, where the first ``count`` files (in class order) cover a few classes.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    quota = count * sizes / len(labels)
    take = np.floor(quota).astype(np.int64)
    remainder = quota - take
    extra = count - int(take.sum())
    # the largest remainders get one more; a random key breaks ties between equal remainders
    order = np.lexsort((rng.random(len(classes)), -remainder))
    take[order[:extra]] += 1
    chosen = []
    for k in range(len(classes)):
        members = np.flatnonzero(inverse == k)
        chosen.append(rng.choice(members, size=take[k], replace=False))
    return np.sort(np.concatenate(chosen))


def subset(dataset: Dataset, count: int | None, seed: int = 0, stratified: bool = True) -> Dataset:
    """``dataset``, or a ``Subset`` of ``count`` of its items drawn with ``seed``: stratified by
    class (``stratified_indices``), or, for work that reads no labels (alignment), uniformly."""
    if count is None or count >= len(dataset):
        return dataset
    if stratified:
        indices = stratified_indices(dataset_labels(dataset), count, seed)
    else:
        indices = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:count])
    return Subset(dataset, indices.tolist())


def first_images_per_class(dataset: Dataset, max_classes: int = 16) -> list[int]:
    """Indices of the first item of each of up to ``max_classes`` classes of ``dataset``, spread
    evenly over the classes present (read from the labels, nothing decoded)."""
    labels = dataset_labels(dataset)
    classes, first = np.unique(labels, return_index=True)
    if len(classes) > max_classes:
        picked = np.linspace(0, len(classes) - 1, max_classes).round().astype(np.int64)
        first = first[picked]
    return first.tolist()


def batch_to_device(images: Tensor, device: torch.device | str) -> Tensor:
    """A batch of images as a model takes it, on ``device``: uint8 ``(N, C, H, W)`` (what the
    datasets' loaders yield, 4x narrower across the worker pipe and the bus), in any memory layout
    (``loading.collate_images``), becomes contiguous float32 in [0, 1] there, conversion and
    layout in one pass; float images are moved as they are. ``non_blocking``: a pinned batch
    copies while the host goes on."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        return images.to(torch.float32, memory_format=torch.contiguous_format).div_(255)
    return images


@dataclass
class DataSpec:
    """What a model needs to know about a dataset."""

    in_chans: int
    image_size: int
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_size: int | None = None  # folder datasets: the evaluation resize (a trained model records it)


def build_transforms(
    train: bool,
    image_size: int,
    native_size: int | None,
    randaugment: int = 0,
    flip: bool = True,
    crop_padding: int | None = None,
    resize_size: int | None = None,
) -> v2.Compose:
    """torchvision v2 transforms from an image (a uint8 ``(C, H, W)`` tensor or a PIL image) to a
    uint8 ``(C, image_size, image_size)`` tensor: no float intermediates, no float output
    (``batch_to_device`` converts batches on the device).

    Small datasets with a native size (``native_size``) use pad-and-crop (``crop_padding`` pixels,
    default ``image_size // 8``, 0 disables it); folder datasets random resized crops (train,
    ``folder_train_ops``) and for evaluation the shorter side resized to ``resize_size`` (a model's
    ``config.resize_size``; None: ``round(image_size / 0.875)``) then the centre ``image_size``
    crop, bilinear with antialiasing (ImageNet: Resize(256), CenterCrop(224)). ``resize_size`` is
    used only there. ``flip`` and ``randaugment`` (a magnitude; 0: off) are for training only.
    """
    if native_size is not None:
        ops = native_size_ops(train, image_size, native_size, randaugment, flip, crop_padding)
    elif train:
        ops = folder_train_ops(image_size, randaugment, flip)
    else:
        resize = resize_size if resize_size is not None else folder_resize_size(image_size)
        ops = [v2.ToImage(), BoundedAspectRatio(), v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*ops, v2.ToPureTensor()])


class BoundedAspectRatio:
    """An image tensor ``(C, H, W)`` more elongated than ``bcosvit.images.MAX_ASPECT_RATIO`` : 1
    centre-cropped to that ratio (``crop_to_aspect_ratio``) before the resize of the shorter side,
    which would otherwise ask for memory in proportion to the long side (a 1x200000 image resized
    to a shorter side of 256: 157 GB); the centre crop after the resize keeps the same region."""

    def __call__(self, image: Tensor) -> Tensor:
        return crop_to_aspect_ratio(image)[0]


def native_size_ops(
    train: bool, image_size: int, native_size: int, randaugment: int, flip: bool, crop_padding: int | None
) -> list[v2.Transform]:
    """Fashion-MNIST's and CIFAR-10's transforms on uint8 tensors: resize to ``image_size`` when it
    is not the native size; for training pad-and-crop, flip and RandAugment."""
    ops: list[v2.Transform] = [v2.ToImage()]
    if image_size != native_size:
        ops.append(v2.Resize(image_size, antialias=True))
    padding = image_size // 8 if crop_padding is None else crop_padding
    if train and padding > 0:
        ops.append(v2.RandomCrop(image_size, padding=padding))
    if train and flip:
        ops.append(v2.RandomHorizontalFlip())
    if train and randaugment > 0:
        ops.append(v2.RandAugment(magnitude=randaugment))
    return ops


def folder_train_ops(image_size: int, randaugment: int, flip: bool) -> list[v2.Transform]:
    """A folder dataset's training augmentation, each step where it is cheapest (measured by
    ``benchmarks/input_pipeline.py``, one core): the random resized crop and the flip on the
    uint8 tensor in channels-last memory (``ChannelsLastRandomResizedCrop``: torch's vectorised
    uint8 resize is about 2.5x faster than Pillow's), RandAugment on a PIL image (Pillow's uint8
    operations are 3-4x faster than torchvision's tensor ones, which work in float: a 3x3
    convolution for Sharpness, grid sampling for the affine ones). The image stays uint8 from
    the decoder to the batch; its memory stays interleaved ``(H, W, C)``, as PIL holds pixels.

    Not used: PIL's JPEG draft mode (decoding at 1/2, 1/4 or 1/8 scale), which can serve only
    crops whose shorter side is at least twice ``image_size``: 0.1 % of the crops of images of
    ImageNet's sizes (300-500 px a side) at 224 px.
    """
    ops: list[v2.Transform] = [ChannelsLastRandomResizedCrop(image_size, antialias=True)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    if randaugment > 0:
        ops += [v2.ToPILImage(), v2.RandAugment(magnitude=randaugment), v2.PILToTensor()]
    return ops


class ChannelsLastRandomResizedCrop(v2.RandomResizedCrop):
    """torchvision's ``RandomResizedCrop`` (the same crop drawn from torch's generator, the same
    pixels) from a PIL image or a uint8 tensor to a uint8 ``(C, H, W)`` tensor in ``(H, W, C)``
    (channels-last) memory, resized by torch.

    PIL holds pixels interleaved, and an image made from a PIL image is a ``(C, H, W)`` view of
    ``(H, W, C)`` memory; but a crop of it is contiguous in no layout, and torch's uint8 resize
    then writes a planar ``(C, H, W)`` result, which costs a transpose of every pixel on the way
    to PIL (RandAugment) and into the batch (``loading.collate_images``). Here the crop is copied
    into interleaved memory first (of a PIL image: cropped by PIL, then only the crop converted),
    which keeps the resize on its vectorised channels-last path and the result interleaved.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        if isinstance(inpt, Image.Image):
            interleaved = v2.functional.pil_to_tensor(inpt.crop((left, top, left + width, top + height)))
        else:
            crop = v2.functional.crop(inpt, top, left, height, width)
            interleaved = crop.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # (C, h, w) view of (h, w, C) memory
        return v2.functional.resize(interleaved, self.size, self.interpolation, antialias=self.antialias)


class GreyToRGB:
    """A grey image ``(1, H, W)`` as an RGB one ``(3, H, W)``, the grey level in every channel: how a
    model that reads colour images (a timm teacher, ``load_dataset(in_chans=3)``) sees Fashion-MNIST."""

    def __call__(self, image: Tensor) -> Tensor:
        return image.expand(3, -1, -1).contiguous()


def evaluation_split(name: str) -> str:
    """The split a model trained on dataset ``name`` is tested on: "test", or "val" for a folder tree
    (``<root>/{train,val}``, or a folder of class folders, see ``load_image_folder``)."""
    return "val" if name == "folder" else "test"


def folder_resize_size(image_size: int) -> int:
    """The shorter side a folder dataset's evaluation images are resized to before the centre
    ``image_size`` crop when nothing says otherwise: ``round(image_size / 0.875)`` (256 for 224,
    ImageNet's protocol). A model trained on a folder records it as its ``config.resize_size``."""
    return int(round(image_size / 0.875))


def load_dataset(
    name: str,
    split: str,
    root: str | Path | None,
    image_size: int | None = None,
    train_transforms: bool = False,
    randaugment: int = 0,
    flip: bool = True,
    crop_padding: int | None = None,
    resize_size: int | None = None,
    in_chans: int | None = None,
) -> tuple[Dataset, DataSpec]:
    """Load ``name`` ("fashion-mnist", "cifar10" or "folder") with the train or eval transforms.

    For folder datasets only: ``resize_size`` is the evaluation resize before the centre crop
    (``build_transforms``; None: ``folder_resize_size``), recorded in the spec; WordNet-id class
    folders are ImageNet's classes (``FolderDataset``). ``in_chans``: the channels the images
    must have (None: the dataset's own); 3 reads Fashion-MNIST's grey images as RGB (``GreyToRGB``).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    own = 1 if name == "fashion-mnist" else 3
    if in_chans not in (None, own) and (own, in_chans) != (1, 3):
        raise DataError(f"{name} has {own}-channel images; they cannot be read as {in_chans}-channel ones")
    if name == "fashion-mnist":
        size = image_size or 28
        transform = build_transforms(train_transforms, size, 28, randaugment, flip, crop_padding)
        channels = in_chans or 1
        if channels == 3:
            transform = v2.Compose([transform, GreyToRGB()])
        ds = load_fashion_mnist(split, root, transform)
        mean, std = FASHION_MNIST_MEAN * channels, FASHION_MNIST_STD * channels
        return ds, DataSpec(channels, size, 10, ds.classes, mean, std)
    if root is None:
        raise DataError(f"dataset {name!r} needs --data-dir (nothing is downloaded)")
    if name == "cifar10":
        size = image_size or 32
        ds = load_cifar10(split, root, build_transforms(train_transforms, size, 32, randaugment, flip, crop_padding))
        return ds, DataSpec(3, size, 10, ds.classes, CIFAR10_MEAN, CIFAR10_STD)
    size = image_size or 224
    resize = resize_size if resize_size is not None else folder_resize_size(size)
    transform = build_transforms(train_transforms, size, None, randaugment, flip, crop_padding, resize)
    ds = load_image_folder(split, root, transform)
    spec = DataSpec(3, size, len(ds.classes), list(ds.classes), IMAGENET_MEAN, IMAGENET_STD, resize)
    return ds, spec
