"""``bcosvit.inputs.as_model_input``: the one conversion of images for every model, the one shape check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import bcosvit
from bcosvit import metrics
from bcosvit.inputs import as_model_input, model_tensor


class Buffered(nn.Module):
    """A model without parameters that computes in the dtype of its buffer."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones((), dtype=dtype))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).flatten(1)


def test_any_module_gets_images_in_the_dtype_and_device_of_its_first_floating_parameter(images):
    x = images(2, 1, 8, dtype=torch.float32)
    conv = nn.Conv2d(1, 2, 3).double()
    converted = as_model_input(conv, x)
    assert converted.dtype == torch.float64 and converted.device == conv.weight.device
    assert torch.equal(converted, x.double())
    assert model_tensor(conv) is conv.weight
    assert as_model_input(Buffered(torch.float16), x).dtype == torch.float16  # no parameter: its float buffer
    assert model_tensor(nn.Identity()) is None
    assert as_model_input(nn.Identity(), x) is x  # nothing to follow: unchanged
    assert as_model_input(conv, x.double()) is not x and as_model_input(conv, converted) is converted


def test_arrays_uint8_and_inference_tensors_are_converted_for_any_module(images):
    conv = nn.Conv2d(1, 2, 3).double()
    x = images(2, 1, 8)
    assert torch.equal(as_model_input(conv, x.numpy()), x)
    assert torch.equal(as_model_input(conv, x.tolist()), x.float().double())  # lists are read as float32
    pixels = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(as_model_input(conv, pixels), pixels.double() / 255)
    assert torch.equal(as_model_input(nn.Identity(), pixels), pixels / 255)
    with torch.inference_mode():
        made_there = images(1, 1, 8)
    assert not as_model_input(conv, made_there).is_inference()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (torch.rand(1, 8, 8), r"expected images of shape \(N, C, H, W\), got shape \(1, 8, 8\)"),
        (torch.zeros(1, 1, 8, 8, dtype=torch.long), "expected float images in"),
        ("images", "expected images as a tensor or an array"),
    ],
)
def test_any_module_gets_the_shape_and_dtype_check(given, message):
    with pytest.raises(bcosvit.InputError, match=message):
        as_model_input(nn.Conv2d(1, 2, 3), given)


def test_a_vision_transformer_also_gets_its_own_check_input(tiny, images):
    with pytest.raises(bcosvit.InputError, match="expected 1 input channels, got 3"):
        as_model_input(tiny, images(2, 3, 8))
    with pytest.raises(bcosvit.InputError, match="divide 8-bit images"):
        as_model_input(tiny, images(2, 1, 8) * 255)
    with pytest.raises(bcosvit.InputError, match="not divisible by the patch size"):
        as_model_input(tiny, images(2, 1, 6))
    assert as_model_input(nn.Conv2d(1, 2, 3).double(), images(2, 1, 6) * 255).shape == (2, 1, 6, 6)  # no such check
    assert as_model_input(tiny, images(2, 1, 8).float()).dtype == torch.float64


def test_the_metrics_and_the_explorer_convert_images_with_it(tiny, images):
    x = images(3, 1, 8, dtype=torch.float32)  # a float64 model: the metrics cast every batch
    logits = metrics.predict_logits(tiny, x, batch_size=2)
    torch.testing.assert_close(logits, tiny(x.double()).float(), rtol=0, atol=0)
    with pytest.raises(bcosvit.InputError, match="divide 8-bit images"):
        metrics.predict_logits(tiny, x * 255)
    with pytest.raises(bcosvit.InputError, match=r"expected images of shape \(N, C, H, W\), got shape \(8, 8\)"):
        metrics.predict_logits(tiny, x[0, 0])
    from bcosvit.app.serve import views
    from bcosvit.images import LoadedImage

    loaded = LoadedImage(Path("x.png"), x[0], "L", (8, 8))
    image = views.model_input(loaded, tiny)
    assert image.dtype == torch.float64 and image.shape == (1, 1, 8, 8) and torch.equal(image[0], x[0].double())
    with pytest.raises(bcosvit.InputError, match="divide 8-bit images"):
        views.model_input(LoadedImage(Path("x.png"), x[0] * 255, "L", (8, 8)), tiny)
