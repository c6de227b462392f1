"""Post-hoc attribution baselines on B-cos models and standard twins (docs/design.md: post-hoc baselines)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import bcosvit
from bcosvit.attribution import (
    ATTRIBUTION_METHODS,
    METHODS,
    attention_rollout,
    attribute,
    transformer_attribution_matrix,
)
from bcosvit.layers.detach import is_explanation_mode
from bcosvit.models import Capture

NANO = ["bcos_vit_nano_patch4_28", "vit_nano_patch4_28"]
CASES = [(name, m) for name in NANO for m in METHODS if m != "bcos" or name.startswith("bcos_")]
GRADIENT_BASED = [m for m in METHODS if m != "rollout"]


def _float32_model(name: str, **overrides) -> bcosvit.VisionTransformer:
    return bcosvit.create_model(name, **overrides).train()  # train mode: attribution must restore it


def _targets() -> torch.Tensor:
    return torch.tensor([0, 3, 7])


def test_registry_and_method_names():
    assert set(METHODS) == {
        "input_x_gradient",
        "integrated_gradients",
        "gradient",
        "gradcam",
        "rollout",
        "transformer_attribution",
        "bcos",
    }
    assert tuple(ATTRIBUTION_METHODS) == METHODS
    assert all(callable(fn) for fn in ATTRIBUTION_METHODS.values())


@pytest.mark.parametrize("name,method", CASES)
def test_maps_have_input_resolution_and_leave_the_model_untouched(name, method):
    model = _float32_model(name)
    x = torch.rand(3, 1, 28, 28)
    maps = attribute(method, model, x, _targets())
    assert maps.shape == (3, 28, 28)
    assert maps.dtype == torch.float32 and not maps.requires_grad and maps.device == x.device
    assert torch.isfinite(maps).all()
    assert (maps != 0).flatten(1).any(dim=1).all(), "every image gets a non-zero map"
    assert model.training, "train mode must be restored"
    assert all(p.grad is None for p in model.parameters()), "parameter .grad must stay None"
    assert not is_explanation_mode(model)


@pytest.mark.parametrize("name,method", [c for c in CASES if c[1] in GRADIENT_BASED])
def test_gradient_based_maps_depend_on_the_target(name, method):
    model = _float32_model(name)
    x = torch.rand(3, 1, 28, 28)
    a = attribute(method, model, x, _targets())
    b = attribute(method, model, x, _targets() + 1)
    # Compared with each map's spatial variation, not its level: at initialisation the standard twin's
    # transformer attribution is the identity's uniform 1/L plus a small gradient-weighted part.
    variation = (a - a.mean(dim=(1, 2), keepdim=True)).abs().amax(dim=(1, 2))
    change = (a - b).abs().amax(dim=(1, 2))
    assert (change > 0.1 * variation).all(), f"{method} ignores the target: {change} vs {variation}"


@pytest.mark.parametrize("name", NANO)
def test_rollout_is_class_agnostic(name):
    model = _float32_model(name)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(attribute("rollout", model, x, [0, 1]), attribute("rollout", model, x, [5, 9]))


@pytest.mark.parametrize("method", METHODS)
def test_conv_stem_model(method):
    model = _float32_model("bcos_vitc_micro_28")
    x = torch.rand(2, 1, 28, 28)
    maps = attribute(method, model, x, [1, 2])
    assert maps.shape == (2, 28, 28) and torch.isfinite(maps).all() and (maps != 0).any()
    assert model.training and all(p.grad is None for p in model.parameters())


def test_existing_parameter_gradients_are_left_as_they_were():
    model = _float32_model("vit_nano_patch4_28")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    for method in METHODS[:-1]:
        attribute(method, model, torch.rand(2, 1, 28, 28), [1, 2])
    assert all((p.grad == 0.5).all() for p in model.parameters())


def test_none_target_explains_the_predicted_class(build, images):
    model = build("vit_nano_patch4_28")
    x = images(3, 1, 28)
    predicted = model(x).argmax(dim=1)
    for method in ("gradient", "transformer_attribution"):
        torch.testing.assert_close(attribute(method, model, x), attribute(method, model, x, predicted))


def test_explanation_mode_is_switched_off_during_attribution_and_restored(build, images):
    model = build("bcos_vit_nano_patch4_28")
    x = images(2, 1, 28)
    expected = attribute("gradient", model, x, [1, 2], abs=False)
    with bcosvit.explanation_mode(model):
        inside = attribute("gradient", model, x, [1, 2], abs=False)
        assert is_explanation_mode(model)
    torch.testing.assert_close(inside, expected)


# --- Method-specific properties ----------------------------------------------------------------


@pytest.mark.parametrize("name", NANO)
def test_input_x_gradient_matches_autograd(build, images, name):
    model = build(name, in_chans=3, image_size=16)  # RGB: the map sums over the channels
    x = images(3, 3, 16).requires_grad_(True)
    target = _targets()
    (grad,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
    expected = (grad * x).sum(dim=1).detach().float()
    torch.testing.assert_close(attribute("input_x_gradient", model, x.detach(), target), expected)


def test_signed_gradient_and_absolute_saliency(build, images):
    model = build("vit_nano_patch4_28")
    x = images(2, 1, 28).requires_grad_(True)
    target = torch.tensor([4, 6])
    (grad,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
    torch.testing.assert_close(attribute("gradient", model, x.detach(), target, abs=False), grad.sum(1).float())
    torch.testing.assert_close(attribute("gradient", model, x.detach(), target), grad.abs().sum(1).float())


@pytest.mark.parametrize("baseline", [None, 0.4, "per-channel"])
def test_integrated_gradients_are_complete_on_the_standard_twin(build, images, baseline):
    model = build("vit_nano_patch4_28", in_chans=3)  # float64
    x = images(3, 3, 28)
    target = _targets()
    if baseline == "per-channel":
        baseline = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)[:, None, None]
    options = {} if baseline is None else {"baseline": baseline}
    maps = attribute("integrated_gradients", model, x, target, n_steps=64, **options)
    reference = torch.as_tensor(0.0 if baseline is None else baseline, dtype=x.dtype).expand_as(x)
    with torch.no_grad():
        expected = (model(x) - model(reference)).gather(1, target[:, None])[:, 0]
    total = maps.double().flatten(1).sum(dim=1)
    assert ((total - expected).abs() / expected.abs()).max() < 0.02, (total, expected)


def test_integrated_gradients_internal_batching_does_not_change_the_result(build, images):
    model = build("vit_nano_patch4_28")
    x = images(3, 1, 28)
    whole = attribute("integrated_gradients", model, x, _targets(), n_steps=8, internal_batch_size=None)
    chunked = attribute("integrated_gradients", model, x, _targets(), n_steps=8, internal_batch_size=4)
    torch.testing.assert_close(chunked, whole)


def test_attention_rollout_rows_sum_to_one_and_identity_attention_rolls_out_to_identity(build, images):
    model = build("vit_nano_patch4_28")
    _, record = model(images(2, 1, 28), capture=Capture(attention=True))
    rollout = attention_rollout([a.detach() for a in record.attentions])
    assert rollout.shape == (2, 49, 49)
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(2, 49, dtype=torch.float64))
    assert (rollout >= 0).all()
    identity = torch.eye(5, dtype=torch.float64).expand(2, 3, 5, 5)
    torch.testing.assert_close(attention_rollout([identity] * 4), torch.eye(5, dtype=torch.float64).expand(2, 5, 5))


def test_rollout_and_transformer_attribution_compose_blocks_in_order():
    # Two blocks of random row-stochastic attention (they do not commute) and signed "gradients".
    attn = [torch.softmax(torch.randn(2, 3, 4, 4, dtype=torch.float64) * 2, dim=-1) for _ in range(2)]
    grads = [torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in range(2)]
    eye = torch.eye(4, dtype=torch.float64)
    a1, a2 = ((a.mean(dim=1) + eye) / 2 for a in attn)  # rows of A + I sum to 2
    torch.testing.assert_close(attention_rollout(attn), a2 @ a1)
    b1, b2 = ((g * a).clamp_min(0).mean(dim=1) for g, a in zip(grads, attn))
    r1 = eye + b1
    torch.testing.assert_close(transformer_attribution_matrix(attn, grads), r1 + b2 @ r1)
    assert not torch.allclose(a1 @ a2, a2 @ a1) and not torch.allclose(b2 @ r1, r1 @ b2)


@pytest.mark.parametrize("name", NANO)
def test_rollout_of_uniform_attention_is_uniform(build, images, name):
    model = build(name)
    with torch.no_grad():
        for block in model.blocks:  # zero queries and keys: every attention row is uniform
            block.attn.qkv.weight[: 2 * model.embed_dim] = 0
            if block.attn.qkv.bias is not None:
                block.attn.qkv.bias.zero_()
    maps = attribute("rollout", model, images(2, 1, 28), [0, 1])
    torch.testing.assert_close(maps, torch.full((2, 28, 28), 1 / 49))
    # Sanity check of the contrary: a real model's rollout is not uniform.
    assert attribute("rollout", build(name), images(2, 1, 28)).std() > 1e-5


@pytest.mark.parametrize("name", NANO)
def test_gradcam_is_non_negative(name):
    model = _float32_model(name)
    maps = attribute("gradcam", model, torch.rand(4, 1, 28, 28), torch.tensor([0, 2, 5, 9]))
    assert (maps >= 0).all()


@pytest.mark.parametrize("name", NANO)
def test_gradcam_matches_the_formula_on_the_last_blocks_tokens(build, images, name):
    model = build(name, depth=2, image_size=12)  # 3×3 tokens
    x = images(2, 1, 12)
    target = torch.tensor([2, 8])
    tokens = model.forward_features(x)
    (grads,) = torch.autograd.grad(model.forward_head(tokens).gather(1, target[:, None]).sum(), tokens)
    cam = torch.relu((grads.mean(dim=1, keepdim=True) * tokens).sum(dim=-1)).detach()
    expected = F.interpolate(cam.view(2, 1, 3, 3), size=(12, 12), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(attribute("gradcam", model, x, target), expected.float())


@pytest.mark.parametrize("name", NANO)
def test_transformer_attribution_of_a_one_block_model_matches_the_formula(build, images, name):
    model = build(name, depth=1, image_size=12)  # 3×3 tokens
    x = images(2, 1, 12)
    target = torch.tensor([2, 8])

    # Forward pass with the attention matrix as a leaf, so ∂logit/∂A is read off independently.
    tokens, grid = model.forward_tokens(x)
    block = model.blocks[0]
    qkv = F.linear(block.norm1(tokens), block.attn.qkv.weight, block.attn.qkv.bias)
    q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=block.attn.num_heads) for t in qkv.chunk(3, dim=-1))
    attn = torch.softmax(q @ k.transpose(-2, -1) * block.attn.scale, dim=-1).detach().requires_grad_(True)
    h = tokens + block.attn.proj(rearrange(attn @ v, "n h l d -> n l (h d)"))
    h = h + block.mlp(block.norm2(h))
    logits = model.forward_head(h)
    torch.testing.assert_close(logits, model(x))
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), attn)

    a_bar = (grad * attn).detach().clamp_min(0).mean(dim=1)  # (N, L, L)
    relevance_matrix = torch.eye(9, dtype=torch.float64) + a_bar  # R = I + Ā · I
    # mean over output tokens (no class token) of R without its class-independent identity
    relevance = (relevance_matrix - torch.eye(9, dtype=torch.float64)).mean(dim=1)
    expected = F.interpolate(relevance.view(2, 1, 3, 3), size=(12, 12), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(attribute("transformer_attribution", model, x, target), expected.float())

    matrix = transformer_attribution_matrix([attn.detach()], [grad])
    torch.testing.assert_close(matrix, relevance_matrix)


def test_bcos_method_equals_the_exact_explanation(build, images):
    model = build("bcos_vit_nano_patch4_28")
    x = images(3, 1, 28)
    expected = bcosvit.explain(model, x, _targets()).contributions[:, 0]  # (N, 1, H, W): one target per image
    torch.testing.assert_close(attribute("bcos", model, x, _targets()), expected.float(), rtol=0, atol=0)


@pytest.mark.parametrize("baseline", [0.0, 0.3, "per-channel"])
def test_bcos_method_relative_to_a_baseline_sums_to_the_logit_minus_the_map_at_the_baseline(build, images, baseline):
    model = build("bcos_vit_nano_patch4_28", in_chans=3)
    x = images(3, 3, 28)
    if baseline == "per-channel":
        baseline = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)[:, None, None]
    b = torch.as_tensor(baseline, dtype=x.dtype).expand(x.shape[1:])
    x[0, :, :5, :] = b[:, :5, :]  # pixels already at the baseline: nothing to take away
    expl = bcosvit.explain(model, x, _targets())
    weights, positional, outputs = expl.weights[:, 0], expl.positional[:, 0], expl.outputs[:, 0]
    encoded_baseline = torch.cat([b, 1 - b])
    at_baseline = (weights * encoded_baseline).flatten(1).sum(1) + positional + expl.logit_bias

    maps = attribute("bcos", model, x, _targets(), baseline=baseline)

    torch.testing.assert_close(maps.double().flatten(1).sum(1), outputs - at_baseline, rtol=1e-5, atol=1e-5)
    assert (maps[0, :5] == 0).all()
    plain = expl.contributions[:, 0].float()
    assert (maps - plain).abs().max() > 0.1 * plain.abs().max(), "the baseline must change the map"


def test_bcos_method_rejects_a_baseline_of_the_wrong_shape(build, images):
    with pytest.raises(bcosvit.InputError, match="broadcastable to \\(C, H, W\\)"):
        attribute("bcos", build("bcos_vit_nano_patch4_28"), images(1, 1, 28), [0], baseline=torch.zeros(3, 1, 1))


def test_bcos_method_refuses_a_standard_model():
    with pytest.raises(bcosvit.ConfigError, match="standard model.*integrated_gradients"):
        attribute("bcos", _float32_model("vit_nano_patch4_28"), torch.rand(1, 1, 28, 28), [0])


def test_bcos_method_with_a_baseline_is_explain_with_that_baseline(build, images):
    model = build("bcos_vit_nano_patch4_28")
    x = images(3, 1, 28)
    expected = bcosvit.explain(model, x, _targets(), baseline=0.4).contributions[:, 0]
    torch.testing.assert_close(attribute("bcos", model, x, _targets(), baseline=0.4), expected.float())


# --- Inputs from other toolkits ----------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_attribute_computes_float64_numpy_images_in_the_models_dtype(method):
    model = _float32_model("bcos_vit_nano_patch4_28")  # Quantus and Captum's metrics pass float64 numpy arrays
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    expected = attribute(method, model, x.float(), _targets())
    maps = attribute(method, model, x.numpy(), _targets())
    assert isinstance(maps, torch.Tensor) and maps.dtype == torch.float32 and maps.shape == (3, 28, 28)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attribute(method, model, x, _targets()), expected, rtol=1e-5, atol=1e-6)


def test_attribute_scales_uint8_images_and_refuses_floats_in_0_255():
    model = _float32_model("vit_nano_patch4_28")
    pixels = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    expected = attribute("gradient", model, pixels.float() / 255, [1, 2])
    torch.testing.assert_close(attribute("gradient", model, pixels, [1, 2]), expected, rtol=0, atol=0)
    with pytest.raises(bcosvit.InputError, match="divide 8-bit images .* by 255"):
        attribute("integrated_gradients", model, pixels.float(), [1, 2])


def test_attribute_accepts_class_names_when_the_model_has_them():
    names = [f"class {i}" for i in range(10)]
    model = _float32_model("vit_nano_patch4_28", class_names=names)
    x = torch.rand(2, 1, 28, 28)
    expected = attribute("input_x_gradient", model, x, [3, 7])
    torch.testing.assert_close(attribute("input_x_gradient", model, x, ["class 3", "Class 7"]), expected)
    with pytest.raises(bcosvit.InputError, match="no class names"):
        attribute("gradient", _float32_model("vit_nano_patch4_28"), x, "class 3")


def test_gradient_methods_under_inference_mode_say_they_need_autograd():
    model = _float32_model("vit_nano_patch4_28")
    x = torch.rand(2, 1, 28, 28)
    with torch.inference_mode():
        with pytest.raises(bcosvit.ConfigError, match="need autograd"):
            attribute("integrated_gradients", model, x, [1, 2])
        maps = attribute("rollout", model, x)  # attention maps only: no gradients needed
    assert maps.shape == (2, 28, 28)


# --- Errors --------------------------------------------------------------------------------------


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(bcosvit.ConfigError) as info:
        attribute("lime", _float32_model("vit_nano_patch4_28"), torch.rand(1, 1, 28, 28), [0])
    message = str(info.value)
    assert "'lime'" in message and all(m in message for m in METHODS)


def test_unknown_option_and_bad_inputs_are_reported():
    model = _float32_model("vit_nano_patch4_28")
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(bcosvit.ConfigError, match="n_step"):
        attribute("integrated_gradients", model, x, [0, 1], n_step=5)
    with pytest.raises(bcosvit.ConfigError, match="no options"):
        attribute("rollout", model, x, [0, 1], abs=True)
    with pytest.raises(bcosvit.InputError, match="input channels"):
        attribute("gradient", model, torch.rand(2, 3, 28, 28), [0, 1])
    with pytest.raises(bcosvit.InputError, match="shape"):
        attribute("gradcam", model, x, [0, 1, 2])
    with pytest.raises(bcosvit.InputError, match=r"\[0, 9\]"):
        attribute("input_x_gradient", model, x, [0, 10])
    assert model.training
