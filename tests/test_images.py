"""A model's preprocessing as library API: ``bcosvit.transforms(model)`` and ``bcosvit.load_image(path, model)``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import bcosvit
from bcosvit.errors import ConfigError
from bcosvit.images import read_image


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_both_are_reached_from_the_package():
    assert bcosvit.transforms is bcosvit.images.transforms
    assert bcosvit.load_image is bcosvit.images.load_image
    assert {"transforms", "load_image"} <= set(dir(bcosvit))


def test_transforms_equal_load_image_on_the_same_file(tmp_path):
    model = bcosvit.create_model("bcos_vit_micro_patch4_32")
    pixels = _photo(45, 70)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    from_file = bcosvit.load_image(tmp_path / "photo.png", model).tensor
    from_pil = bcosvit.transforms(model)(Image.fromarray(pixels))
    from_tensor = bcosvit.transforms(model)(torch.from_numpy(pixels).permute(2, 0, 1))
    assert from_file.shape == from_pil.shape == (3, 32, 32)
    torch.testing.assert_close(from_pil, from_file, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_tensor, from_file, rtol=0, atol=1e-6)


def test_an_imagenet_model_resizes_the_shorter_side_to_256_then_crops_224():
    with torch.device("meta"):
        model = bcosvit.create_model("bcos_vit_tiny_patch16_224")  # only its config is read
    image = torch.from_numpy(_photo(300, 500)).permute(2, 0, 1)
    out = bcosvit.transforms(model)(image)
    resized = v2.functional.resize(image.float() / 255, 256, antialias=True).clamp(0, 1)
    assert tuple(resized.shape[1:]) == (256, 426)
    torch.testing.assert_close(out, v2.functional.center_crop(resized, [224]), rtol=0, atol=1e-6)


def test_channels_follow_the_model():
    grey = bcosvit.create_model("bcos_vitc_micro_28")
    colour = bcosvit.create_model("bcos_vit_micro_patch4_32")
    rgb = torch.from_numpy(_photo(28, 28)).permute(2, 0, 1)
    assert bcosvit.transforms(grey)(rgb).shape == (1, 28, 28)
    assert bcosvit.transforms(colour)(rgb[:1]).shape == (3, 32, 32)
    # greyscale of a grey image is the image itself (the luma weights sum to 0.9999)
    flat = torch.full((3, 28, 28), 128, dtype=torch.uint8)
    torch.testing.assert_close(bcosvit.transforms(grey)(flat), torch.full((1, 28, 28), 128 / 255), rtol=0, atol=1e-4)


def test_a_colour_photo_for_a_greyscale_model_matches_the_file_reader(tmp_path):
    model = bcosvit.create_model("bcos_vitc_micro_28")
    pixels = _photo(28, 28, seed=1)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    from_file = bcosvit.load_image(tmp_path / "photo.png", model).tensor  # Pillow's integer luma
    from_pil = bcosvit.transforms(model)(Image.fromarray(pixels))
    torch.testing.assert_close(from_pil, from_file, rtol=0, atol=1.5 / 255)


def test_the_transform_batches_and_keeps_values_in_range():
    model = bcosvit.create_model("bcos_vit_micro_patch4_32")
    batch = torch.rand(4, 3, 40, 48)
    out = bcosvit.transforms(model)(batch)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_read_image_is_the_reader_behind_load_image(tmp_path):
    model = bcosvit.create_model("bcos_vitc_micro_28")
    Image.fromarray(_photo(40, 30)).save(tmp_path / "x.png")
    loaded = bcosvit.load_image(tmp_path / "x.png", model)
    direct = read_image(tmp_path / "x.png", 1, 28)
    assert torch.equal(loaded.tensor, direct.tensor) and loaded.notes == direct.notes


def test_something_other_than_a_bcosvit_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="expected a bcosvit VisionTransformer"):
        bcosvit.transforms(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="expected a bcosvit VisionTransformer"):
        bcosvit.load_image(tmp_path / "missing.png", torch.nn.Linear(2, 2))


@pytest.mark.parametrize("size", [(1, 200_000), (4000, 1)])
def test_a_tiny_file_of_extreme_aspect_ratio_is_resized_in_bounded_memory(tmp_path, size):
    # 470 and 95 bytes: resized whole to a shorter side of 256, they asked for 157 GB and 3 GB
    Image.fromarray(np.full(size[::-1], 200, np.uint8)).save(tmp_path / "thin.png")
    item = read_image(tmp_path / "thin.png", 3, 224, resize_size=256)
    assert item.tensor.shape == (3, 224, 224) and torch.allclose(item.tensor, torch.tensor(200 / 255))
    assert "aspect ratio above 4:1" in " ".join(item.notes)


def test_images_up_to_the_aspect_ratio_bound_are_resized_whole(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 120, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    item = read_image(tmp_path / "a.png", 3, 24, resize_size=28)
    whole = v2.functional.to_dtype(v2.functional.to_image(Image.open(tmp_path / "a.png")), scale=True)
    expected = v2.functional.center_crop(v2.functional.resize(whole, 28, antialias=True), [24]).clamp(0, 1)
    torch.testing.assert_close(item.tensor, expected, rtol=0, atol=1e-6)
