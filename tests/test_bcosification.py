"""bcosify: a trained standard ViT as a B-cos model that starts as the same function (Arya et al. 2024)."""

from __future__ import annotations

import pytest
import torch

import bcosvit
from bcosvit.bcosification import bcosify, from_timm, remove_biases, scale_biases, set_b
from bcosvit.errors import ConfigError
from bcosvit.layers import BcosLinear, DynamicActivation

timm = pytest.importorskip("timm")

TIMM_VARIANTS = {
    "class_token": {},
    "class_token_avg_pool": {"global_pool": "avg"},
    "mean_pool": {"class_token": False, "global_pool": "avg"},
}


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every 1-D parameter random too (norm scales, biases), so that a misplaced one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            low, high = (-0.5, 0.5) if name.endswith("bias") else (0.5, 1.5)
            if param.ndim == 1:
                param.copy_(torch.rand(param.shape, generator=generator) * (high - low) + low)
    return model.eval()


def timm_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomised(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)).double()


def timm_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The timm model on images in [0, 1], normalised as its pretrained_cfg says."""
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"], dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=images.dtype).view(1, -1, 1, 1)
    with torch.no_grad():
        return model((images - mean) / std)


IMAGES = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("variant", TIMM_VARIANTS)
def test_a_converted_timm_vit_starts_with_the_original_logits(variant):
    original = timm_vit(**TIMM_VARIANTS[variant])
    converted = bcosify(original)
    assert converted.is_bcos and converted.config.b == 1 and converted.config.bias
    with torch.no_grad():
        torch.testing.assert_close(converted(IMAGES), timm_logits(original, IMAGES), rtol=0, atol=1e-5)
        torch.testing.assert_close(from_timm(original)(IMAGES), timm_logits(original, IMAGES), rtol=0, atol=1e-5)


def test_a_converted_standard_twin_starts_with_the_original_logits():
    twin = bcosvit.create_model("vitc_micro_28", pretrained=True).double()  # conv stem, RoPE, distance penalty
    randomised(twin)
    converted = bcosify(twin)
    images = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(images), twin(images), rtol=0, atol=1e-5)
    assert isinstance(converted.blocks[0].mlp.act, DynamicActivation) and converted.blocks[0].mlp.act.kind == "gelu"
    assert all(not m.weight_norm for m in converted.modules() if isinstance(m, BcosLinear))


def test_one_perturbed_weight_breaks_the_equality():
    """Negative control: the comparison above notices a single changed weight."""
    original = timm_vit()
    converted = bcosify(original)
    with torch.no_grad():
        converted.blocks[5].mlp.fc1.weight[3, 7] += 0.5
        difference = (converted(IMAGES) - timm_logits(original, IMAGES)).abs().max()
    assert difference > 1e-5


def test_the_final_configuration_is_a_bias_free_b_cos_model_with_complete_explanations():
    converted = bcosify(timm_vit(global_pool="avg"))
    set_b(converted, 2.0)
    final = remove_biases(converted)
    assert final.config.b == 2 and not final.config.bias
    assert all(not name.endswith(".bias") for name, _ in final.named_parameters())
    expl = bcosvit.explain(final, IMAGES)
    assert expl.completeness_error.max() < 1e-9
    assert final.config.class_token and expl.positional.abs().max() > 0  # the class token's share


def test_the_conversion_step_is_explainable_but_its_biases_leave_a_remainder():
    converted = bcosify(timm_vit())
    expl = bcosvit.explain(converted, IMAGES)
    assert expl.weights.shape == (2, 1, 6, 224, 224) and torch.isfinite(expl.weights).all()
    assert expl.completeness_error.max() > 1e-3  # biases are not part of w(x)·x


def test_scaling_biases_to_zero_then_removing_them_keeps_the_function():
    converted = bcosify(timm_vit(class_token=False, global_pool="avg"))
    set_b(converted, 2.0)
    scale_biases(converted, 0.0)
    assert all(p.abs().max() == 0 for n, p in converted.named_parameters() if n.endswith(".bias"))
    with torch.no_grad():
        expected = converted(IMAGES)
        torch.testing.assert_close(remove_biases(converted)(IMAGES), expected, rtol=0, atol=1e-12)


def test_set_b_reaches_every_b_cos_layer_and_the_config():
    converted = bcosify(timm_vit())
    set_b(converted, 1.5)
    assert {m.b for m in converted.modules() if hasattr(m, "b") and isinstance(m.b, float)} == {1.5}
    assert converted.config.b == 1.5
    with pytest.raises(ConfigError, match=">= 1"):
        set_b(converted, 0.5)


def test_a_b_cos_model_or_another_module_is_refused():
    with pytest.raises(ConfigError, match="already a B-cos model"):
        bcosify(bcosvit.create_model("bcos_vitc_micro_28"))
    with pytest.raises(ConfigError, match="timm VisionTransformer"):
        bcosify(torch.nn.Linear(3, 3))


@pytest.mark.parametrize(
    ("name", "named"),
    [
        ("vit_relpos_small_patch16_224", r"this is timm\.models\.vision_transformer_relpos\.VisionTransformerRelPos"),
        ("deit_tiny_distilled_patch16_224", r"VisionTransformerDistilled \(a distillation token\)"),
    ],
)
def test_timm_models_of_other_classes_are_refused_naming_the_class(name, named):
    model = timm.create_model(name, pretrained=False)
    with pytest.raises(ConfigError, match=named):
        bcosify(model)
