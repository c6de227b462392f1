"""Datasets are read from local files; missing or damaged files give errors that say what to do."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision.transforms import v2

from bcosvit.app.data import (
    DATASETS,
    ChannelsLastRandomResizedCrop,
    TensorImageDataset,
    batch_to_device,
    build_transforms,
    dataset_labels,
    evaluation_split,
    first_images_per_class,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    read_cifar10_batch,
    read_folder_image,
    read_idx,
    stratified_indices,
)
from bcosvit.errors import DataError
from bcosvit.weights.imagenet import imagenet_wnids

from .imagenet_tree import make_imagenet_tree

SUBSET = Path(__file__).parent / "data" / "fashion-mnist"


def test_fashion_mnist_subset_reads_real_images_and_labels():
    ds = load_fashion_mnist("test", SUBSET)
    assert len(ds) == 1000
    image, label = ds[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and int(image.max()) > 128
    assert label == 9  # the first Fashion-MNIST test image is an ankle boot
    assert sorted(set(ds.labels.tolist())) == list(range(10))


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_truncated_idx_file_is_reported(tmp_path):
    path = tmp_path / "bad-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_non_idx_file_is_reported(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"hello world")
    with pytest.raises(DataError, match="not an unsigned-byte idx file"):
        read_idx(path)


def test_train_transforms_pad_and_crop_keep_size_and_stay_uint8():
    transform = build_transforms(True, 28, 28, randaugment=5, flip=True)
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    out = transform(image)
    assert out.shape == (1, 28, 28) and out.dtype == torch.uint8 and not torch.equal(out, image)


def test_transforms_without_augmentation_give_the_image_as_it_is():
    transform = build_transforms(True, 28, 28, flip=False, crop_padding=0)
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    assert torch.equal(transform(image), image)


def _image_folder_tree(root: Path) -> Path:
    """``root/{train,val}/{cat,dog}/a.jpg``: 60x40 JPEGs of random pixels."""
    from PIL import Image

    for split in ("train", "val"):
        for k, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            pixels = np.random.default_rng(k).integers(0, 256, (40, 60, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / cls / "a.jpg")
    return root


def _cifar10_batches(root: Path) -> Path:
    """The six python-format CIFAR-10 batches in ``root``, 4 random images each."""
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    return root


@pytest.mark.parametrize("train", [True, False], ids=["train", "evaluation"])
@pytest.mark.parametrize(
    ("name", "size", "shape"),
    [("fashion-mnist", None, (1, 28, 28)), ("cifar10", 32, (3, 32, 32)), ("folder", 24, (3, 24, 24))],
)
def test_every_dataset_yields_plain_uint8_channels_first_tensors(tmp_path, name, size, shape, train):
    # one item format across the DataLoader workers' pipe: uint8 (C, H, W); floats are made on the device
    roots = {"fashion-mnist": lambda: SUBSET, "cifar10": lambda: _cifar10_batches(tmp_path)}
    root = roots.get(name, lambda: _image_folder_tree(tmp_path))()
    ds, _ = load_dataset(name, "train", root, size, train, randaugment=9 if train else 0)
    image, label = ds[0]
    assert type(image) is torch.Tensor and image.dtype == torch.uint8 and image.shape == shape
    assert isinstance(label, int)


def test_folder_training_augmentation_is_a_function_of_torch_s_seed(tmp_path):
    ds, _ = load_dataset("folder", "train", _image_folder_tree(tmp_path), 24, True, randaugment=9)
    draws = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        draws.append(ds[0][0])
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_the_channels_last_crop_gives_torchvision_s_random_resized_crop_in_interleaved_memory_from_pil_or_tensor():
    from PIL import Image

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    image = v2.functional.to_image(picture)  # (C, H, W) view of (H, W, C) memory, as images from files are
    for seed, given in [(seed, given) for seed in range(4) for given in (image, picture)]:
        torch.manual_seed(seed)
        ours = ChannelsLastRandomResizedCrop(32, antialias=True)(given)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        reference = v2.RandomResizedCrop(32, antialias=True)(image)
        assert torch.equal(ours, reference) and torch.equal(torch.rand(1), after_ours)  # same pixels, same draws
        assert ours.permute(1, 2, 0).is_contiguous()  # interleaved: to PIL and into a batch without a transpose


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK"])
def test_folder_images_are_read_as_torchvision_s_loader_reads_them(tmp_path, mode):
    from PIL import Image
    from torchvision.datasets.folder import default_loader

    pixels = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(
        tmp_path / "image.jpg" if mode in ("RGB", "CMYK") else tmp_path / "image.png"
    )
    path = str(next(tmp_path.iterdir()))
    image = read_folder_image(path)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(default_loader(path)))


def test_cifar10_batches_are_read(tmp_path):
    train = load_cifar10("train", _cifar10_batches(tmp_path))
    assert len(train) == 20 and train[0][0].shape == (3, 32, 32)
    ds, spec = load_dataset("cifar10", "test", tmp_path)
    assert len(ds) == 4 and spec.in_chans == 3 and spec.num_classes == 10


def test_cifar10_batches_in_the_original_python2_format_are_read(tmp_path):
    # the published files are protocol-2 pickles that name numpy.core.multiarray (numpy 1.x)
    batch = {"batch_label": "testing batch 1 of 1", "labels": [9, 0], "data": np.ones((2, 3072), np.uint8)}
    batch["filenames"] = ["a.png", "b.png"]
    raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "test_batch").write_bytes(raw)
    ds = load_cifar10("test", tmp_path)
    assert len(ds) == 2 and ds.labels.tolist() == [9, 0] and ds.images.dtype == torch.uint8


class _WritesAMarker:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_cifar10_batch_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": _WritesAMarker(marker)}, f)
    with pytest.raises(DataError, match="refused to load builtins.exec"):
        load_cifar10("test", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([1, 2], "'data' as uint8 rows"),
        ({"data": np.zeros((1, 3072), np.float32), "labels": [0]}, "'data' as uint8 rows"),
        ({"data": np.zeros((1, 3072), np.uint8), "labels": [10]}, "'labels' as 1 integers in \\[0, 9\\]"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "'labels' as 2 integers"),
    ],
    ids=["not a dict", "float data", "label out of range", "too few labels"],
)
def test_cifar10_batch_with_foreign_contents_is_reported(tmp_path, batch, message):
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=message):
        load_cifar10("test", tmp_path)


def test_missing_cifar10_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_cifar10("train", tmp_path)


def test_image_folder_tree_is_read(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            pixels = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / "a.png")  # a greyscale file becomes RGB
    ds, spec = load_dataset("folder", "val", tmp_path, image_size=32)
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and spec.classes == ["cat", "dog"] and spec.num_classes == 2


def test_models_are_tested_on_the_test_split_or_on_a_folder_tree_s_val_split(tmp_path):
    assert {name: evaluation_split(name) for name in DATASETS} == {
        "fashion-mnist": "test",
        "cifar10": "test",
        "folder": "val",
    }
    ds, _ = load_dataset("fashion-mnist", evaluation_split("fashion-mnist"), SUBSET)
    assert len(ds) == 1000  # the committed subset of the test split


def test_missing_image_folder_is_reported(tmp_path):
    with pytest.raises(DataError, match="expected .*train,val"):
        load_image_folder("train", tmp_path)


def test_image_folder_without_class_folders_is_reported(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="find any class folder.*Expected .*/train/<class>/<image files>"):
        load_image_folder("train", tmp_path)


def test_image_folder_class_without_images_is_reported(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no valid file for the classes cat"):
        load_image_folder("train", tmp_path)


def test_corrupt_image_in_a_folder_is_named_when_read(tmp_path):
    from PIL import Image

    folder = tmp_path / "val" / "cat"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ds, _ = load_dataset("folder", "val", tmp_path, image_size=8)
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"cannot read image .*b\.png"):
        ds[1]


def test_a_folder_of_class_folders_is_its_own_val_split_but_never_a_train_split(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / "a.png")
    ds, spec = load_dataset("folder", "val", tmp_path, image_size=32)
    assert ds.root == str(tmp_path) and spec.classes == ["cat", "dog"] and ds[1][0].shape == (3, 32, 32)
    with pytest.raises(DataError, match=r"train not found; expected .*/\{train,val\}/<class>.*or for evaluation"):
        load_dataset("folder", "train", tmp_path, image_size=32)


def test_folder_evaluation_resizes_the_shorter_side_to_resize_size_then_crops_the_centre():
    image = torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8)
    reference = v2.Compose([v2.Resize(36, antialias=True), v2.CenterCrop(32)])
    assert torch.equal(build_transforms(False, 32, None, resize_size=36)(image), reference(image))
    # resize_size is the evaluation of folder datasets only: training and native-size datasets ignore it
    assert repr(build_transforms(True, 28, 28, resize_size=36)) == repr(build_transforms(True, 28, 28))
    assert repr(build_transforms(True, 32, None, resize_size=36)) == repr(build_transforms(True, 32, None))


def test_a_folder_dataset_holds_its_file_list_as_numpy_arrays_and_knows_labels_without_decoding(tmp_path):
    tree = make_imagenet_tree(tmp_path, num_classes=4, train_per_class=3, splits=("train",))
    ds, _ = load_dataset("folder", "train", tree, 16)
    assert isinstance(ds.paths, np.ndarray) and ds.paths.dtype.kind == "S" and ds.targets.dtype == np.int64
    assert dataset_labels(ds).tolist() == [0] * 3 + [250] * 3 + [500] * 3 + [750] * 3
    assert Path(ds.path(4)).parent.name == imagenet_wnids()[250] and ds[4][1] == 250
    assert dataset_labels(Subset(ds, [11, 0])).tolist() == [750, 0]


@pytest.mark.parametrize("count", [10, 37, 100])
def test_stratified_subsets_keep_every_class_s_share_and_depend_on_the_seed_only(count):
    labels = np.repeat(np.arange(10), 20)  # 200 items in class order, as a folder lists them
    picked = stratified_indices(labels, count, seed=3)
    per_class = np.bincount(labels[picked], minlength=10)
    assert len(picked) == len(set(picked.tolist())) == count and np.all(np.diff(picked) > 0)
    assert per_class.min() >= count // 10 and per_class.max() <= -(-count // 10)  # floor or ceil of the share
    assert picked.tolist() == stratified_indices(labels, count, seed=3).tolist()
    assert picked.tolist() != stratified_indices(labels, count, seed=4).tolist()
    assert stratified_indices(labels, 500).tolist() == list(range(200))


def test_first_images_per_class_spread_over_the_classes_without_decoding():
    labels = torch.arange(40).repeat_interleave(2)  # 80 images, 40 classes
    ds = TensorImageDataset(torch.zeros(80, 1, 4, 4, dtype=torch.uint8), labels, [str(k) for k in range(40)])
    picked = first_images_per_class(ds, max_classes=16)
    assert len(picked) == 16 and picked[0] == 0 and picked[-1] == 78
    assert len(set(labels[picked].tolist())) == 16
    assert first_images_per_class(ds, max_classes=100) == list(range(0, 80, 2))


def test_uint8_batches_become_float_images_on_the_device():
    batch = torch.tensor([[[[0, 51, 255]]]], dtype=torch.uint8)
    images = batch_to_device(batch, "cpu")
    assert images.dtype == torch.float32 and torch.equal(images.flatten(), torch.tensor([0.0, 0.2, 1.0]))
    floats = torch.rand(1, 1, 2, 2)
    assert batch_to_device(floats, "cpu") is floats
    channels_last = torch.randint(0, 256, (2, 4, 5, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # (N, C, H, W)
    images = batch_to_device(channels_last, "cpu")
    assert images.is_contiguous() and torch.equal(images, channels_last.float() / 255)


def test_folder_evaluation_crops_an_extreme_aspect_ratio_before_resizing(tmp_path):
    # the shorter side resized to 256 whole would ask for 157 GB; the centre part is what is kept anyway
    (tmp_path / "val" / "thin").mkdir(parents=True)
    Image.fromarray(np.full((1, 200_000, 3), 90, np.uint8)).save(tmp_path / "val" / "thin" / "a.png")
    ds, _ = load_dataset("folder", "val", tmp_path, image_size=224, resize_size=256)
    image, _ = ds[0]
    assert image.shape == (3, 224, 224) and int(image.min()) == int(image.max()) == 90


def test_a_fifo_in_a_folder_dataset_is_named_not_waited_on(tmp_path):
    (tmp_path / "val" / "cat").mkdir(parents=True)
    os.mkfifo(tmp_path / "val" / "cat" / "pipe.png")
    ds, _ = load_dataset("folder", "val", tmp_path, image_size=8)
    with pytest.raises(DataError, match=r"pipe.png: .*named pipe \(FIFO\)"):
        ds[0]


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte.gz", "data_batch_1"])
def test_dataset_files_that_are_fifos_are_refused_without_blocking(tmp_path, name):
    os.mkfifo(tmp_path / name)
    reader = read_idx if name.endswith(".gz") else read_cifar10_batch
    with pytest.raises(DataError, match=r"named pipe \(FIFO\)"):
        reader(tmp_path / name)
