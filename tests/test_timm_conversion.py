"""from_timm and bcosify on the timm ViT families people start from: the same function in float64,
complete explanations in the final configuration, each new part needed, and refusals by name.

Random initialisation only (nothing downloads), the published widths, two blocks and small images."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bcosvit
from bcosvit import timm_conversion
from bcosvit.bcosification import bcosify, remove_biases, set_b
from bcosvit.errors import ConfigError
from bcosvit.timm_conversion import check_same_function, from_timm

from .eva_tables import exact_rope_table

timm = pytest.importorskip("timm")

# name -> (image size, extra timm kwargs, the bcosvit config it must become)
FAMILIES = {
    "vit_tiny_patch16_224": (32, {}, {"class_token": True, "global_pool": "token"}),
    "deit_small_patch16_224": (32, {}, {"input_mean": [0.485, 0.456, 0.406]}),
    "deit3_small_patch16_224": (32, {}, {"layer_scale": True}),
    "vit_small_patch14_dinov2": (28, {}, {"layer_scale": True, "num_classes": 0}),
    "vit_small_patch14_reg4_dinov2": (28, {}, {"layer_scale": True, "reg_tokens": 4, "num_classes": 0}),
    "vit_small_patch16_224.dino": (32, {"num_classes": 0}, {"num_classes": 0}),
    "vit_medium_patch16_gap_256": (32, {}, {"layer_scale": True, "qkv_bias": False, "global_pool": "avg"}),
    "vit_base_patch16_reg4_gap_256": (32, {}, {"reg_tokens": 4, "final_norm": "pooled"}),
    "vit_betwixt_patch16_reg4_gap_256": (32, {}, {"reg_tokens": 4, "layer_scale": True, "global_pool": "avg"}),
    "vit_base_patch16_clip_224": (32, {}, {"pre_norm": True, "norm_eps": 1e-5}),
    "vit_base_patch16_clip_quickgelu_224": (32, {}, {"pre_norm": True, "act": "quick_gelu"}),
    "vit_base_patch16_siglip_224": (32, {}, {"global_pool": "map", "num_classes": 0}),
    "vit_base_patch16_siglip_gap_224": (32, {}, {"global_pool": "avg", "final_norm": "tokens"}),
    "vit_qk_norm_silu": (32, {}, {"qk_norm": True, "act": "silu"}),
}
RELATIVE = 1e-9


def timm_model(name: str) -> nn.Module:
    """The timm family ``name`` at random init, two blocks, every 1-D parameter random (so a misplaced
    norm scale, bias or LayerScale shows), in float64."""
    size, kwargs, _ = FAMILIES[name]
    torch.manual_seed(0)
    if name == "vit_qk_norm_silu":
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=size, depth=2, qk_norm=True, act_layer=nn.SiLU
        )
    else:
        model = timm.create_model(name, pretrained=False, img_size=size, depth=2, **kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1 or param.shape[:2] == (1, 1) or param.ndim == 3:  # scales, biases, tokens
                param.copy_(torch.rand(param.shape, generator=generator) - 0.5 + (param.ndim == 1))
    return model.double().eval()


def timm_outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"], dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=images.dtype).view(1, -1, 1, 1)
    with torch.no_grad():
        return model((images - mean) / std)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def images_for(model: bcosvit.VisionTransformer, n: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.rand(n, 3, model.image_size, model.image_size, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_converts_to_the_same_function_and_then_to_a_complete_b_cos_model(name):
    original = timm_model(name)
    twin = from_timm(original)
    for key, value in FAMILIES[name][2].items():
        assert getattr(twin.config, key) == value, key
    images = images_for(twin)
    expected = timm_outputs(original, images)
    with torch.no_grad():
        assert relative(twin(images), expected) < RELATIVE
        converted = bcosify(twin)
        assert relative(converted(images), expected) < RELATIVE
    set_b(converted, 2.0)
    final = remove_biases(converted)
    expl = bcosvit.explain(final, images)
    assert expl.completeness_error.max() < RELATIVE
    rows = final.image_size // final.patch_size
    contributions = bcosvit.token_contributions(final, images)
    assert contributions.shape == (3, 1, rows, rows)  # class and register tokens are off the grid
    unit = bcosvit.explain_unit(final, images, layer=1, token=final.num_prefix_tokens, channel="max")
    assert unit.completeness_error.max() < RELATIVE


def test_a_headless_backbone_returns_pooled_features_and_takes_a_head():
    twin = from_timm(timm_model("vit_small_patch14_dinov2"))
    images = images_for(twin)
    with torch.no_grad():
        features = twin(images)
        tokens = twin.forward_features(images)
        torch.testing.assert_close(twin.forward_head(tokens, pre_logits=True), features)
    assert features.shape == (3, twin.embed_dim) and twin.num_classes == 0
    student = remove_biases(bcosify(twin))
    student.reset_classifier(10)
    assert student(images).shape == (3, 10) and student.logit_bias_value == pytest.approx(-2.1972, abs=1e-4)


@pytest.mark.parametrize(
    ("name", "broken"),
    [
        ("deit3_small_patch16_224", "layer_scale"),
        ("vit_small_patch14_reg4_dinov2", "registers"),
        ("vit_base_patch16_clip_224", "pre_norm"),
        ("vit_base_patch16_clip_quickgelu_224", "activation"),
        ("vit_qk_norm_silu", "qk_norm"),
        ("vit_base_patch16_siglip_224", "map_mlp"),
        ("vit_base_patch16_siglip_gap_224", "final_norm"),
    ],
)
def test_each_new_part_is_needed(name, broken):
    """A negative control per part: the converted twin with that part left out no longer computes
    the timm model's function, and the probe comparison says so."""
    original = timm_model(name)
    twin = copy.deepcopy(from_timm(original))
    with torch.no_grad():
        if broken == "layer_scale":
            for block in twin.blocks:
                block.ls1 = block.ls2 = nn.Identity()
        elif broken == "registers":
            twin.reg_token.zero_()
        elif broken == "pre_norm":
            twin.norm_pre = nn.Identity()
        elif broken == "activation":
            for block in twin.blocks:
                block.mlp.act = nn.GELU()
        elif broken == "qk_norm":
            for block in twin.blocks:
                block.attn.q_norm = block.attn.k_norm = nn.Identity()
        elif broken == "map_mlp":
            twin.attn_pool.mlp.fc2.weight.zero_()
            twin.attn_pool.mlp.fc2.bias.zero_()
        elif broken == "final_norm":
            twin.config.final_norm = "pooled"
    cfg = original.pretrained_cfg
    with pytest.raises(ConfigError, match="relative difference is"):
        check_same_function(twin, original, cfg["mean"], cfg["std"])


def test_the_probe_refuses_a_broken_weight_mapping(monkeypatch):
    real = timm_conversion._timm_state

    def registers_dropped(model, twin):
        state = real(model, twin)
        state["reg_token"] = torch.zeros_like(state["reg_token"])
        return state

    monkeypatch.setattr(timm_conversion, "_timm_state", registers_dropped)
    with pytest.raises(ConfigError, match=r"relative difference is .*, above the tolerance 1e-06"):
        from_timm(timm_model("vit_small_patch14_reg4_dinov2"))


def test_bcosify_refuses_a_conversion_that_changes_the_function(monkeypatch):
    from bcosvit import bcosification

    real = bcosification._bcos_state

    def layer_scale_lost(standard, converted):
        state = real(standard, converted)
        state["blocks.1.ls2.gamma"] = torch.ones_like(state["blocks.1.ls2.gamma"])
        return state

    monkeypatch.setattr(bcosification, "_bcos_state", layer_scale_lost)
    with pytest.raises(ConfigError, match="standard model's outputs"):
        bcosify(timm_model("deit3_small_patch16_224"))


def test_imagenet_normalisation_is_exact_in_float64():
    """DeiT's mean 0.485 is not a float32 number: the constants must not pass through float32."""
    original = timm_model("deit_small_patch16_224")
    cfg = original.pretrained_cfg
    twin = from_timm(original)
    assert check_same_function(twin, original, cfg["mean"], cfg["std"]) < 1e-13
    images = images_for(twin)
    with torch.no_grad():
        assert relative(bcosify(twin)(images), timm_outputs(original, images)) < 1e-13


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"act_layer": "gelu_tanh"}, r"MLP activation GELUTanh .every block."),
        ({"dynamic_img_size": True}, "dynamic_img_size"),
        ({"norm_layer": "rmsnorm"}, r"norms other than LayerNorm \(every block\)"),
        ({"attn_layer": "diff"}, "an attention of kind DiffAttention"),
        ({"global_pool": "max"}, "global_pool='max'"),
    ],
)
def test_timm_features_without_a_counterpart_are_refused_by_name(kwargs, named):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, **kwargs)
    with pytest.raises(ConfigError, match=named):
        bcosify(model)


def test_a_refusal_names_the_model_class():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, act_layer="gelu_tanh")
    with pytest.raises(ConfigError, match="this timm VisionTransformer has"):
        from_timm(model)


# --- timm's Eva class: RoPE ViTs, EVA-02, DINOv3 -------------------------------------------------

# name -> (image size, the bcosvit config it must become)
EVA_FAMILIES = {
    "vit_small_patch16_rope_224": (64, {"class_token": True, "layer_scale": True, "global_pool": "token"}),
    "vit_small_patch16_rope_mixed_224": (64, {"layer_scale": True}),
    "vit_base_patch16_rope_reg1_gap_256": (64, {"class_token": False, "reg_tokens": 1, "global_pool": "avg"}),
    "vit_small_patch16_dinov3": (64, {"reg_tokens": 4, "num_classes": 0, "final_norm": "tokens"}),
    "eva02_tiny_patch14_224": (56, {"mlp_gate": "silu", "pos_embed": "learned", "num_classes": 0}),
    "eva02_base_patch14_224.mim_in22k": (56, {"mlp_gate": "silu", "mlp_norm": True}),
}


def eva_model(name: str, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """The Eva family ``name`` at random init, two blocks, every 1-D parameter random, float64, and
    computing its rope tables in float64 (timm's own are float32 even then: ~1e-9 in the logits)."""
    size, _ = EVA_FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=size, depth=2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.ndim == 1 or "gamma" in param_name or param_name.endswith("_token"):
                param.copy_(torch.rand(param.shape, generator=generator) - 0.5 + (param.ndim == 1))
    model = model.double().eval()
    if not model.rope_mixed:
        grid = tuple(model.patch_embed.grid_size)
        table = exact_rope_table(model, grid, 0)
        monkeypatch.setattr(model.rope, "get_embed", lambda shape=None: table)
    return model


@pytest.mark.parametrize("name", EVA_FAMILIES)
def test_each_eva_family_converts_to_the_same_function_and_then_to_a_complete_b_cos_model(name, monkeypatch):
    original = eva_model(name, monkeypatch)
    twin = from_timm(original)
    assert twin.config.rotary is not None
    for key, value in EVA_FAMILIES[name][1].items():
        assert getattr(twin.config, key) == value, key
    images = images_for(twin)
    expected = timm_outputs(original, images)
    with torch.no_grad():
        assert relative(twin(images), expected) < RELATIVE
        converted = bcosify(twin)
        assert relative(converted(images), expected) < RELATIVE
    set_b(converted, 2.0)
    final = remove_biases(converted)
    expl = bcosvit.explain(final, images)
    assert expl.completeness_error.max() < RELATIVE
    rows = final.image_size // final.patch_size
    assert bcosvit.token_contributions(final, images).shape == (3, 1, rows, rows)
    unit = bcosvit.explain_unit(final, images, layer=2, token=final.num_prefix_tokens + 1, channel="norm")
    assert unit.completeness_error.max() < RELATIVE


@pytest.mark.parametrize(
    ("name", "broken"),
    [
        ("vit_small_patch16_rope_224", "rotary"),
        ("vit_small_patch16_rope_mixed_224", "rotary"),
        ("vit_small_patch16_dinov3", "registers"),
        ("eva02_tiny_patch14_224", "gate"),
        ("eva02_base_patch14_224.mim_in22k", "mlp_norm"),
    ],
)
def test_each_eva_part_is_needed(name, broken, monkeypatch):
    original = eva_model(name, monkeypatch)
    twin = copy.deepcopy(from_timm(original))
    with torch.no_grad():
        for block in twin.blocks:
            if broken == "rotary":
                block.attn.rotary = None
            elif broken == "gate":
                block.mlp.fc1.weight[: block.mlp.fc1.out_features // 2] *= 0.5  # the gate's half only
            elif broken == "mlp_norm":
                block.mlp.norm = nn.Identity()
        if broken == "registers":
            twin.reg_token.zero_()
    cfg = original.pretrained_cfg
    with pytest.raises(ConfigError, match="relative difference is"):
        check_same_function(twin, original, cfg["mean"], cfg["std"])


def test_eva_conversion_meets_the_probe_against_timms_own_float32_rope_tables(monkeypatch):
    """timm's float32 rope tables alone separate the functions, by far less than the tolerance."""
    model = eva_model("vit_small_patch16_dinov3", monkeypatch)
    monkeypatch.undo()  # timm's own tables again
    cfg = model.pretrained_cfg
    assert check_same_function(from_timm(model), model, cfg["mean"], cfg["std"]) < 1e-7


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"use_post_norm": True}, "EvaBlockPostNorm block"),
        ({"scale_attn_inner": True}, "an attention inner norm"),
        ({"dynamic_img_size": True}, "dynamic_img_size with learned positions"),
    ],
)
def test_eva_parts_without_a_counterpart_are_refused_by_name(kwargs, named):
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, depth=2, **kwargs)
    with pytest.raises(ConfigError, match=named):
        from_timm(model)
