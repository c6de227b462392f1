"""convert_official: the published B-cos-v2 ViTs (reference package ``bcos`` 0.1.3) as bcosvit models.

Equivalence is checked against the reference implementation itself: a randomly initialised
reference model (its norm scales and biases randomised too, so that a swapped norm or bias shows),
converted, then both run in float64 on the same images.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch

import bcosvit
from bcosvit.errors import CheckpointError, ConfigError
from bcosvit.models.vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer
from bcosvit.weights import convert, published

pretrained = pytest.importorskip("bcos.models.pretrained")

# reference entry point -> whether the pair is expensive (ViT-B/L: seconds each; run with --all)
ENTRIES = {
    "simple_vit_ti_patch16_224": False,
    "simple_vit_s_patch16_224": False,
    "simple_vit_b_patch16_224": True,
    "simple_vit_l_patch16_224": True,
    "vitc_ti_patch1_14": False,
    "vitc_s_patch1_14": False,
    "vitc_b_patch1_14": True,
    "vitc_l_patch1_14": True,
}
FAMILY_CASES = [
    pytest.param(entry, standard, id=("standard_" if standard else "bcos_") + entry, marks=[pytest.mark.slow] * slow)
    for entry, slow in ENTRIES.items()
    for standard in (False, True)
]
RTOL = 1e-9


@contextlib.contextmanager
def float64_default():
    """The reference computes its sin-cos table in the default dtype: float64 for a float64 comparison."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def reference_model(entry: str, standard: bool, seed: int = 0) -> torch.nn.Module:
    """A reference model (float32, as published) with every parameter random, norm scales included."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(pretrained, ("standard_" if standard else "") + entry)(pretrained=False)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # norm scales and biases: ones/zeros at init would hide a swap
                param.uniform_(0.5, 1.5)
    return model.eval()


def reference_input(images: torch.Tensor, standard: bool) -> torch.Tensor:
    """The reference's model input: ``[x, 1 - x]`` (B-cos) or ImageNet-normalised images (standard),
    with the constants in the images' dtype, as its torchvision ``Normalize`` does (``as_tensor(mean,
    dtype=images.dtype)``: exact in float64)."""
    if not standard:
        return torch.cat([images, 1 - images], dim=1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def relative_difference(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return float((expected - actual).abs().max() / expected.abs().max())


def compare(
    reference: torch.nn.Module, model: VisionTransformer, standard: bool, image_size: int = 64
) -> tuple[float, float | None]:
    """Max relative logit difference and (B-cos) explanation difference, float64, on 2 random images."""
    reference, model = reference.double(), model.double()
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, image_size, image_size, dtype=torch.float64, generator=generator)
    inputs = reference_input(images, standard)
    with torch.no_grad(), float64_default():
        expected = reference(inputs)
    with torch.no_grad():
        logits = model(images)
    logit_diff = relative_difference(expected, logits)
    if standard:
        return logit_diff, None
    target = int(expected[0].argmax())
    leaf = inputs[:1].clone().requires_grad_()
    with float64_default(), reference.explanation_mode():
        reference(leaf)[0, target].backward()
    weights = bcosvit.explain(model, images[:1], target=target).weights[:, 0]
    return logit_diff, relative_difference(leaf.grad, weights)


@pytest.mark.parametrize(("entry", "standard"), FAMILY_CASES)
def test_converted_model_computes_the_reference_function(entry, standard):
    reference = reference_model(entry, standard)
    model = convert.convert_official(reference.state_dict())
    name = published.OFFICIAL_NAMES[entry]
    assert model.config == bcosvit.models.registry.model_config(name if not standard else name[len("bcos_") :])
    logit_diff, explanation_diff = compare(reference, model, standard)
    assert logit_diff < RTOL
    if explanation_diff is not None:
        assert explanation_diff < RTOL


def test_swapping_two_keys_in_the_converter_breaks_the_equivalence(monkeypatch):
    """Negative control: a converter that maps the two norms of each block the wrong way round
    (same shapes, so it loads) must fail the comparison above."""
    swapped = dict(convert._BLOCK_PARTS, norm1="ff.net.norm", norm2="attn.norm")
    monkeypatch.setattr(convert, "_BLOCK_PARTS", swapped)
    reference = reference_model("simple_vit_ti_patch16_224", standard=False)
    logit_diff, explanation_diff = compare(reference, convert.convert_official(reference.state_dict()), False)
    assert logit_diff > 1e-3 and explanation_diff > 1e-3


def _shapes_only(name: str) -> dict[str, torch.Tensor]:
    """A state dict of empty meta tensors with the reference's names and shapes for ``name``."""
    with torch.device("meta"):
        model = bcosvit.create_model(name)
    return {k: torch.empty(shape, device="meta") for k, shape in convert.official_shapes(model).items()}


@pytest.mark.parametrize("name", published.CONVERTIBLE)
def test_the_configuration_is_inferred_from_the_tensor_shapes(name):
    assert convert.match_official(_shapes_only(name)) == name


def test_a_checkpoint_that_fits_no_configuration_names_the_keys_and_shapes_that_differ():
    state = _shapes_only("bcos_vit_small_patch16_224")
    del state["0.transformer.encoder_3.attn.to_qkv.weight"]
    state["0.linear_head.norm.weight"] = torch.empty(380, device="meta")
    state["0.extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointError) as info:
        convert.match_official(state)
    message = str(info.value)
    assert "bcos_vit_small_patch16_224" in message
    assert "0.transformer.encoder_3.attn.to_qkv.weight" in message and "0.extra.weight" in message
    assert "(380,)" in message and "(384,)" in message


def test_a_name_that_was_never_published_is_refused():
    with pytest.raises(ConfigError, match="convertible names"):
        convert.match_official(_shapes_only("bcos_vit_small_patch16_224"), name="bcos_vitc_micro_28")


def test_a_fine_tuned_head_keeps_its_class_count_without_imagenet_names():
    reference = reference_model("vitc_ti_patch1_14", standard=False)
    state = reference.state_dict()
    state["0.linear_head.linear.linear.weight"] = torch.randn(10, 192)
    model = convert.convert_official(state)
    assert model.num_classes == 10 and model.config.class_names is None
    assert model.logit_bias_value == pytest.approx(-torch.log(torch.tensor(9.0)).item())


def test_imagenet_models_get_the_imagenet_class_names():
    reference = reference_model("simple_vit_ti_patch16_224", standard=True)
    model = convert.convert_official(reference.state_dict())
    assert len(model.config.class_names) == 1000 and model.config.class_names[0] == "tench"


class Payload:
    """An object only unpickling could rebuild: weights_only refuses it."""


def test_pth_files_are_read_without_pickle_and_bad_files_are_refused(tmp_path):
    reference = reference_model("simple_vit_ti_patch16_224", standard=True)
    good = tmp_path / "standard_simple_vit_ti_patch16_224.pth"
    torch.save(reference.state_dict(), good)
    model = convert.convert_official(good)
    assert torch.equal(model.head.weight, reference.linear_head.linear.weight)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        convert.convert_official(truncated)

    pickled = tmp_path / "pickled.pth"
    torch.save({"weight": Payload()}, pickled)
    with pytest.raises(CheckpointError, match="not a plain PyTorch state dict"):
        convert.convert_official(pickled)

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(CheckpointError, match="not a state dict"):
        convert.convert_official(not_a_state_dict)

    with pytest.raises(CheckpointError, match="cannot read"):
        convert.convert_official(tmp_path / "missing.pth")


def test_a_crafted_head_of_repeated_strides_is_refused_before_anything_is_built(tmp_path):
    # 20 MB on disk, but a (10^8, 192) head: the model built from its shape would need 77 GB
    state = reference_model("vitc_ti_patch1_14", standard=False).state_dict()
    state["0.linear_head.linear.linear.weight"] = torch.randn(1, 192).expand(10**8, 192)
    crafted = tmp_path / "crafted.pth"
    torch.save(state, crafted)
    with pytest.raises(CheckpointError, match=r"claims shape \(100000000, 192\) but stores only 768 bytes"):
        convert.convert_official(crafted)


def test_a_head_too_large_to_build_is_refused_by_its_size(tmp_path):
    state = _shapes_only("bcos_vit_tiny_patch16_224")
    head = next(key for key in state if key.endswith("linear_head.linear.linear.weight"))
    state[head] = torch.empty(2**24, 192, device="meta")
    with pytest.raises(CheckpointError, match="head has 16777216 classes, which bcosvit cannot build: .*values"):
        convert.match_official(state)


def test_a_folder_or_a_fifo_is_refused_as_a_checkpoint_without_blocking(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory; pass the .pth file"):
        convert.read_official_checkpoint(tmp_path)
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"is a named pipe \(FIFO\), not a checkpoint file"):
        convert.read_official_checkpoint(fifo)
