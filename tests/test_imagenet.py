"""ImageNet: the packaged class list, and evaluation of 1000-class models on ImageNet-layout folders."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from bcosvit.app.cli import main
from bcosvit.app.data import batch_to_device, build_transforms, load_dataset
from bcosvit.errors import ConfigError, DataError
from bcosvit.images import read_image
from bcosvit.models.vit import VisionTransformer, ViTConfig
from bcosvit.weights.checkpoint import save_weights
from bcosvit.weights.imagenet import imagenet_class_names, imagenet_wnids, is_wnid, parse_classes

from .imagenet_tree import make_imagenet_tree

ROOT = Path(__file__).resolve().parents[1]


def test_the_packaged_list_holds_1000_distinct_sorted_wordnet_ids_with_names():
    wnids, names = imagenet_wnids(), imagenet_class_names()
    assert len(wnids) == len(names) == 1000
    assert len(set(wnids)) == 1000 and wnids == sorted(wnids) and all(is_wnid(w) for w in wnids)
    assert all(isinstance(name, str) and name for name in names)


@pytest.mark.parametrize(
    ("index", "wnid", "name"),
    [
        (0, "n01440764", "tench"),
        (1, "n01443537", "goldfish"),
        (134, "n02012849", "crane bird"),  # the two cranes and the two maillots have distinct names
        (207, "n02099601", "golden retriever"),
        (517, "n03126707", "crane"),
        (999, "n15075141", "toilet tissue"),
    ],
)
def test_known_classes_sit_at_their_imagenet_index(index, wnid, name):
    assert imagenet_wnids()[index] == wnid and imagenet_class_names()[index] == name


def test_callers_get_their_own_lists():
    imagenet_wnids().clear()
    imagenet_class_names()[0] = "changed"
    assert imagenet_wnids()[0] == "n01440764" and imagenet_class_names()[0] == "tench"


def test_the_class_list_ships_as_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "weights/imagenet_classes.json" in config["tool"]["setuptools"]["package-data"]["bcosvit"]


def _class_list(entries) -> str:
    return json.dumps({"classes": entries})


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([["n00000001", "a"]] * 999, "lists 999 classes, expected 1000"),
        ([[f"n{i:08d}", "x"] for i in range(999)] + [["dog", "x"]], "class 999 is .*expected \\[WordNet id"),
        ([[f"n{i:08d}", "x"] for i in range(999)] + [["n00000998", ""]], "class 999"),
        ([[f"n{999 - i:08d}", "x"] for i in range(1000)], "not distinct and sorted"),
        ([[f"n{min(i, 998):08d}", "x"] for i in range(1000)], "not distinct and sorted"),
    ],
    ids=["too few", "not a wnid", "empty name", "unsorted", "repeated"],
)
def test_a_damaged_class_list_is_refused_naming_the_problem(entries, message):
    with pytest.raises(DataError, match=message):
        parse_classes(_class_list(entries), "list.json")
    with pytest.raises(DataError, match="not an ImageNet class list"):
        parse_classes("[1, 2]", "list.json")


# --- evaluation on an ImageNet-layout folder -----------------------------------------------------

# class index -> WordNet id of the tiny validation folder: first, a middle and the last class
CLASSES = {0: "n01440764", 207: "n02099601", 517: "n03126707", 999: "n15075141"}
SIZES = ((40, 30), (50, 64))  # (width, height): landscape and portrait files of different sizes


def _write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _image_folder(root: Path, names: list[str]) -> Path:
    """``root/<name>/{a.jpg, b.png}`` for each class folder name (random pixels of ``SIZES``)."""
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        _write_image(root / name / "a.jpg", SIZES[0], 2 * k)
        _write_image(root / name / "b.png", SIZES[1], 2 * k + 1)
    return root


@pytest.fixture
def val_folder(tmp_path) -> Path:
    """An ImageNet-style validation folder: WordNet-id class folders directly under it (no val/)."""
    return _image_folder(tmp_path / "imagenet-val", list(CLASSES.values()))


def _tiny_imagenet_model(**options) -> VisionTransformer:
    """A one-block 1000-class model for 32x32 inputs read from a 36-pixel shorter side."""
    config = dict(image_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=1000, resize_size=36)
    config.update(class_names=imagenet_class_names(), **options)
    return VisionTransformer(ViTConfig(**config)).eval()


def _fit_head(model: VisionTransformer, images: torch.Tensor, labels: torch.Tensor, logit: float = 12.0) -> None:
    """Set the standard model's head so it predicts ``labels`` for ``images`` with confidence (least
    squares on the pooled features; every other class gets the logit 0)."""
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)  # (N, D)
        classes = sorted(set(labels.tolist()))
        targets = logit * (labels[:, None] == torch.tensor(classes)[None]).to(features.dtype)  # (N, K)
        design = torch.cat([features, torch.ones(len(features), 1)], dim=1)  # (N, D + 1)
        solution = torch.linalg.lstsq(design, targets).solution  # (D + 1, K)
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[classes] = solution[:-1].T
        model.head.bias[classes] = solution[-1]


def _save_run(model: VisionTransformer, folder: Path) -> Path:
    save_weights(model, folder / "model.safetensors", {"model_name": "tiny", "classes": imagenet_class_names()})
    return folder


def _out(tmp_path: Path) -> list[str]:
    return ["--out", str(tmp_path / "evaluation")]


def test_wordnet_id_folders_take_their_imagenet_class_indices(val_folder):
    ds, spec = load_dataset("folder", "val", val_folder, 32, resize_size=36)
    assert ds.root == str(val_folder)  # no val/ sub-folder: the class folders sit in the folder itself
    assert ds.targets.tolist() == [k for k in CLASSES for _ in SIZES]
    assert spec.num_classes == 1000 and spec.classes == imagenet_class_names() and ds.classes == spec.classes
    image, label = ds[2]
    assert image.shape == (3, 32, 32) and label == 207


def test_wordnet_id_folders_are_imagenet_classes_for_training_too(tmp_path):
    # the same tree means the same classes to every command: train reads ImageNet's indices and
    # names, and the model it builds records them (and the evaluation resize it was trained for)
    from bcosvit.app.training.builders import build_model
    from bcosvit.app.training.config import TrainConfig

    tree = make_imagenet_tree(tmp_path, num_classes=5, sizes=(20, 30))
    train, spec = load_dataset("folder", "train", tree, 16)
    val, _ = load_dataset("folder", "val", tree, 16)
    assert spec.num_classes == 1000 and train.classes == val.classes == imagenet_class_names()
    assert train.targets.tolist() == val.targets.tolist() == [0, 200, 400, 600, 800]
    model = build_model(TrainConfig(model="bcos_vit_nano_patch4_28", dataset="folder"), spec)
    assert model.config.class_names == imagenet_class_names() and model.config.resize_size == 18


def test_a_folder_that_is_no_imagenet_wordnet_id_is_refused_by_name(val_folder):
    for name in ("cats", "n99999999"):
        _image_folder(val_folder.parent / "other", [name])
        (val_folder.parent / "other" / name).rename(val_folder / name)
    with pytest.raises(DataError, match=r"class folder\(s\) cats, n99999999 in .* are not ImageNet WordNet ids"):
        load_dataset("folder", "val", val_folder, 32)


def test_a_folder_with_train_but_no_val_is_not_read_as_class_folders(val_folder):
    (val_folder / "train").mkdir()
    with pytest.raises(DataError, match=r"imagenet-val/val not found; expected .*\{train,val\}.*or for evaluation"):
        load_dataset("folder", "val", val_folder, 32)


def test_resize_then_centre_crop_is_what_torchvision_s_resize_and_center_crop_give(tmp_path):
    _write_image(tmp_path / "wide.png", (300, 200), 0)
    item = read_image(tmp_path / "wide.png", 3, 32, resize_size=36)
    original = v2.functional.to_dtype(v2.functional.to_image(Image.open(tmp_path / "wide.png")), scale=True)
    expected = v2.Compose([v2.Resize(36, antialias=True), v2.CenterCrop(32)])(original).clamp(0, 1)
    torch.testing.assert_close(item.tensor, expected, rtol=0, atol=1e-6)
    assert item.notes == ["resized 300x200 -> 54x36 (shorter side 36), centre crop 32x32"]
    # evaluation on a folder reads the same pixels (there uint8 all the way: within rounding)
    folder = build_transforms(False, 32, None, resize_size=36)(
        v2.functional.to_image(Image.open(tmp_path / "wide.png"))
    )
    assert (
        folder.dtype == torch.uint8 and float((batch_to_device(folder, "cpu") - item.tensor).abs().max()) <= 1.5 / 255
    )


def test_without_resize_size_images_are_read_as_before(tmp_path):
    _write_image(tmp_path / "wide.png", (300, 200), 0)
    item = read_image(tmp_path / "wide.png", 3, 32)
    original = v2.functional.to_dtype(v2.functional.to_image(Image.open(tmp_path / "wide.png")), scale=True)
    expected = v2.Compose([v2.Resize(32, antialias=True), v2.CenterCrop(32)])(original).clamp(0, 1)
    torch.testing.assert_close(item.tensor, expected, rtol=0, atol=1e-6)
    assert item.notes == ["resized 300x200 -> 32x32 (shorter side, centre crop)"]
    # a folder dataset's default evaluation resize is 1/0.875 (256 for 224); models trained on it record it
    resize, crop = (op for op in build_transforms(False, 224, None).transforms if hasattr(op, "size"))
    assert resize.size == [256] and crop.size == (224, 224)
    resizes = [op for op in build_transforms(False, 224, None, resize_size=240).transforms if hasattr(op, "size")]
    assert resizes[0].size == [240]


def test_an_image_of_the_resize_size_is_only_cropped_and_a_bad_resize_size_is_refused(tmp_path):
    _write_image(tmp_path / "square.png", (36, 36), 0)
    item = read_image(tmp_path / "square.png", 3, 32, resize_size=36)
    assert item.notes == ["centre crop 32x32"]
    with pytest.raises(ConfigError, match="resize_size must be at least image_size"):
        read_image(tmp_path / "square.png", 3, 32, resize_size=30)


def test_explain_reads_files_with_the_model_s_resize_size(tmp_path, capsys):
    _write_image(tmp_path / "wide.png", (300, 200), 0)
    for resize_size, note in ((36, "300x200 -> 54x36 (shorter side 36), centre crop 32x32"), (None, "-> 32x32")):
        run = _save_run(_tiny_imagenet_model(resize_size=resize_size), tmp_path / f"run{resize_size}")
        code = main(["explain", str(tmp_path / "wide.png"), "--checkpoint", str(run), "--out", str(tmp_path / "out")])
        out = capsys.readouterr().out
        assert code == 0 and note in out


def test_evaluate_on_an_imagenet_validation_folder(val_folder, tmp_path, capsys):
    # a standard model whose head is fitted to predict each folder's ImageNet class from the images as
    # the folder dataset reads them: 100% accuracy below means every label was the right ImageNet index
    model = _tiny_imagenet_model(bcos=False)
    dataset, _ = load_dataset("folder", "val", val_folder, 32, resize_size=36)
    images = batch_to_device(torch.stack([dataset[i][0] for i in range(len(dataset))]), "cpu")
    _fit_head(model, images, torch.tensor([k for k in CLASSES for _ in SIZES]))
    run = _save_run(model, tmp_path / "run")
    out = tmp_path / "evaluation"
    settings = ["--grid-sizes", "2", "--grids", "2", "--faithfulness-images", "4", "--methods", "gradient"]
    code = main(
        ["evaluate", "--checkpoint", str(run), "--dataset", "folder", "--data-dir", str(val_folder), "--out", str(out)]
        + settings
        + ["--baselines", "zero"]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert f"on 8 folder val images from {val_folder}" in text and "top-1 100.00%, top-5 100.00%" in text
    result = json.loads((out / "metrics.json").read_text())["models"][0]
    assert result["accuracy"]["top1"] == 100.0 and result["accuracy"]["top5"] == 100.0
    gradient = result["methods"]["gradient"]
    assert gradient["grid2"]["num_grids"] == 2 and 0 <= gradient["grid2"]["mean"] <= 1
    assert gradient["deletion"]["zero"]["num_images"] == 4 and (out / "report.html").exists()


def test_evaluate_refuses_a_non_wordnet_id_folder_for_an_imagenet_model(val_folder, tmp_path, capsys):
    run = _save_run(_tiny_imagenet_model(), tmp_path / "run")
    _image_folder(val_folder.parent / "other", ["cats"])
    (val_folder.parent / "other" / "cats").rename(val_folder / "cats")
    code = main(
        ["evaluate", "--checkpoint", str(run), "--dataset", "folder", "--data-dir", str(val_folder), *_out(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "class folder(s) cats in" in err and "not ImageNet WordNet ids" in err


def test_evaluate_refuses_a_folder_of_other_classes_for_an_imagenet_model(tmp_path, capsys):
    run = _save_run(_tiny_imagenet_model(), tmp_path / "run")
    shapes = _image_folder(tmp_path / "shapes", ["circle", "square", "triangle"])
    code = main(
        ["evaluate", "--checkpoint", str(run), "--dataset", "folder", "--data-dir", str(shapes), *_out(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "has 1000 classes but the dataset has 3" in err and "class folders named by WordNet id" in err


def test_evaluate_refuses_models_that_resize_images_differently(val_folder, tmp_path, capsys):
    runs = [_save_run(_tiny_imagenet_model(resize_size=size), tmp_path / f"run{size}") for size in (36, 40)]
    code = main(
        [
            "evaluate",
            "--checkpoint",
            *map(str, runs),
            "--dataset",
            "folder",
            "--data-dir",
            str(val_folder),
            *_out(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "resize images differently" in err and "run36: 36, run40: 40" in err
