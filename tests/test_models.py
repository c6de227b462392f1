"""Models and registry: published shapes, training steps, input handling and clear errors (docs/design.md: input
encoding to published architectures)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcosvit
from bcosvit.layers import BcosConv2d, BcosLayerNorm, BcosLayerNorm2d, BcosLinear, LayerNorm2d
from bcosvit.models import Capture, twin_name

BCOS_MODELS = bcosvit.list_models("bcos_*")
SMALL_MODELS = [n for n in bcosvit.list_models() if n.endswith(("_28", "_32", "_64"))]

# docs/design.md, published architectures: parameter counts of the published code, millions (B-cos, standard).
PUBLISHED_PARAMS = {
    "vit_tiny_patch16_224": (5.80, 5.67),
    "vit_small_patch16_224": (22.22, 21.96),
    "vit_base_patch16_224": (86.90, 86.38),
    "vit_large_patch16_224": (178.79, 178.10),
    "vitc_tiny_224": (5.32, 5.33),
    "vitc_small_224": (20.88, 20.91),
    "vitc_base_224": (81.33, 81.39),
    "vitc_large_224": (167.44, 167.54),
}
# docs/design.md, published architectures: dim, depth, heads, MLP width, conv-stem widths (None: 16×16 patches).
PUBLISHED_ARCH = {
    "vit_tiny_patch16_224": (192, 12, 3, 768, None),
    "vit_small_patch16_224": (384, 12, 6, 1536, None),
    "vit_base_patch16_224": (768, 12, 12, 3072, None),
    "vit_large_patch16_224": (1024, 14, 16, 4096, None),
    "vitc_tiny_224": (192, 11, 3, 768, [24, 48, 96, 192]),
    "vitc_small_224": (384, 11, 6, 1536, [48, 96, 192, 384]),
    "vitc_base_224": (768, 11, 12, 3072, [64, 128, 128, 256, 256, 512]),
    "vitc_large_224": (1024, 13, 16, 4096, [64, 128, 128, 256, 256, 512]),
}


def _meta_model(name: str) -> bcosvit.VisionTransformer:
    with torch.device("meta"):
        return bcosvit.create_model(name)


# --- Registry --------------------------------------------------------------------------------


def test_registry_has_required_names_each_with_its_standard_twin():
    names = set(bcosvit.list_models())
    for base in PUBLISHED_PARAMS:
        assert {base, "bcos_" + base} <= names
    for name in BCOS_MODELS:
        assert twin_name(name) in names and twin_name(twin_name(name)) == name
    assert all(n.startswith("bcos_") for n in BCOS_MODELS) and len(BCOS_MODELS) * 2 == len(names)
    assert bcosvit.list_models("*_28") == sorted(bcosvit.list_models("*_28"), key=lambda n: not n.startswith("bcos_"))
    assert any(n.endswith(("_28", "_32", "_64")) for n in BCOS_MODELS)


@pytest.mark.parametrize("base", sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts_within_half_a_percent(base):
    for name, published in ((f"bcos_{base}", PUBLISHED_PARAMS[base][0]), (base, PUBLISHED_PARAMS[base][1])):
        count = sum(p.numel() for p in _meta_model(name).parameters()) / 1e6
        assert abs(count - published) / published < 0.005, f"{name}: {count:.3f}M vs published {published}M"


@pytest.mark.parametrize("base", sorted(PUBLISHED_ARCH))
def test_published_architectures_have_the_published_shapes_and_layers(base):
    dim, depth, heads, mlp, stem = PUBLISHED_ARCH[base]
    for name in (f"bcos_{base}", base):
        model = _meta_model(name)
        bcos = name.startswith("bcos_")
        assert (model.num_features, len(model.blocks), model.image_size, model.patch_size) == (dim, depth, 224, 16)
        assert (model.num_classes, model.in_chans, model.is_bcos) == (1000, 3, bcos)
        block = model.blocks[0]
        assert block.attn.num_heads == heads and block.mlp.fc1.out_features == mlp
        # as the reference's models: no attention biases in either family, biases in the twin's stem
        assert type(block.attn.qkv) is nn.Linear and block.attn.qkv.bias is None
        assert getattr(block.attn.proj, "bias", None) is None
        linear, norm = (BcosLinear, BcosLayerNorm) if bcos else (nn.Linear, nn.LayerNorm)
        assert all(isinstance(m, linear) for m in (block.attn.proj, block.mlp.fc1, block.mlp.fc2, model.head))
        assert all(type(m) is norm for m in (block.norm1, block.norm2, model.norm))
        assert isinstance(block.mlp.act, nn.Identity if bcos else nn.GELU)
        assert (model.pos_embed is not None) and not model.pos_embed.learned  # sin-cos, added
        channels = 6 if bcos else 3
        tokens, grid = model.tokenizer(torch.empty(1, channels, 224, 224, device="meta"))
        assert grid == (14, 14) and tokens.shape == (1, 196, dim)
        if stem is None:
            assert isinstance(model.tokenizer.proj, linear)
            assert model.tokenizer.proj.in_features == channels * 256
        else:
            convs = [m for m in model.tokenizer.stages if isinstance(m, BcosConv2d | nn.Conv2d)]
            norms = [m for m in model.tokenizer.stages if isinstance(m, BcosLayerNorm2d | LayerNorm2d)]
            assert [c.out_channels for c in convs] == [*stem, dim]
            assert [c.kernel_size if bcos else c.kernel_size[0] for c in convs] == [3] * len(stem) + [1]
            assert len(norms) == len(stem)
            assert all((getattr(c, "bias", None) is not None) == (not bcos) for c in convs)
            assert all(isinstance(n, BcosLayerNorm2d if bcos else LayerNorm2d) for n in norms)
            stages = list(model.tokenizer.stages)
            for i, conv in enumerate(convs[:-1]):  # every stem conv is followed by its LayerNorm
                assert stages[stages.index(conv) + 1] is norms[i]
        if bcos:
            assert not any(n.endswith("bias") for n, _ in model.named_parameters())
            assert model.logit_bias_value == pytest.approx(-6.9067547786, abs=1e-9)  # log(1/999)


# --- Forward passes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("bcos_vit_nano_patch4_28", {}),
        ("bcos_vit_nano_patch4_28", {"pos_embed": "learned"}),
        ("bcos_vit_nano_patch4_28", {"pos_embed": "rope"}),
        ("bcos_vit_nano_patch4_28", {"pos_embed": "none"}),
        ("bcos_vitc_micro_28", {}),
    ],
    ids=["patch-sincos", "patch-learned", "patch-rope", "patch-none", "convstem-sincos"],
)
def test_explanation_mode_forward_equals_normal_forward(build, images, name, overrides):
    model = build(name, depth=2, **overrides)
    x = images(3, 1, 28)
    normal = model(x)
    with bcosvit.explanation_mode(model):
        detached = model(x)
    assert not bcosvit.layers.is_explanation_mode(model)
    torch.testing.assert_close(detached, normal, rtol=1e-12, atol=1e-12)
    assert normal.shape == (3, 10)


def _training_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train()
    logits = model(x)
    targets = F.one_hot(torch.arange(x.shape[0]) % model.num_classes, model.num_classes).to(logits.dtype)
    F.binary_cross_entropy_with_logits(logits, targets).backward()
    return logits


def _assert_every_parameter_trained(model: nn.Module, logits: torch.Tensor) -> None:
    assert torch.isfinite(logits).all()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_training_step_gives_every_parameter_a_finite_nonzero_gradient(build, images, name):
    model = build(name, dtype=torch.float32)
    x = images(2, model.in_chans, model.image_size, dtype=torch.float32)
    _assert_every_parameter_trained(model, _training_step(model, x))


@pytest.mark.parametrize(
    "name", ["bcos_vit_tiny_patch16_224", "vit_tiny_patch16_224", "bcos_vitc_tiny_224", "vitc_tiny_224"]
)
def test_training_step_of_published_config_at_small_image_size(build, images, name):
    model = build(name, dtype=torch.float32, image_size=32, num_classes=5)
    x = images(2, 3, 32, dtype=torch.float32)
    logits = _training_step(model, x)
    assert logits.shape == (2, 5)
    _assert_every_parameter_trained(model, logits)


def test_learned_positional_embedding_is_trained(build, images):
    model = build("bcos_vit_nano_patch4_28", dtype=torch.float32, depth=1, pos_embed="learned")
    assert isinstance(model.pos_embed.weight, nn.Parameter)
    _assert_every_parameter_trained(model, _training_step(model, images(2, 1, 28, dtype=torch.float32)))


@pytest.mark.parametrize("name", ["bcos_vit_nano_patch4_28", "vitc_micro_28"])
def test_gradient_checkpointing_gives_same_outputs_and_gradients(build, images, name, monkeypatch):
    import bcosvit.models.vit as vit

    model = build(name, depth=2)
    x = images(2, 1, 16)

    def run():
        model.zero_grad(set_to_none=True)
        logits = _training_step(model, x)
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_logits, plain_grads = run()
    calls = []
    original = vit.checkpoint
    monkeypatch.setattr(vit, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.set_grad_checkpointing(True)
    ckpt_logits, ckpt_grads = run()
    assert len(calls) == 2  # one per block: the flag is really used
    torch.testing.assert_close(ckpt_logits, plain_logits, rtol=1e-13, atol=1e-13)
    assert ckpt_grads.keys() == plain_grads.keys()
    for n in plain_grads:
        torch.testing.assert_close(ckpt_grads[n], plain_grads[n], rtol=1e-11, atol=1e-13, msg=n)
    with torch.no_grad():  # no checkpointing without autograd
        calls.clear()
        torch.testing.assert_close(model(x), plain_logits, rtol=1e-13, atol=1e-13)
        assert not calls


# --- Capturing forward pass ------------------------------------------------------------------


def _blocks_by_hand(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Tokens after each layer (0: embedded) and each block's attention maps, block by block."""
    tokens, grid = model.forward_tokens(x)
    layers, maps = [tokens], []
    for block in model.blocks:
        maps.append(block.attn(block.norm1(tokens), grid, return_attn=True)[1])
        tokens = block(tokens, grid)
        layers.append(tokens)
    return layers, maps


@pytest.mark.parametrize(
    ("name", "pos"),
    [("bcos_vit_nano_patch4_28", "sincos"), ("bcos_vitc_micro_28", "rope"), ("vit_nano_patch4_28", "learned")],
)
def test_capture_records_the_tokens_of_the_ordinary_pass(build, images, name, pos):
    model = build(name, depth=3, pos_embed=pos, image_size=12)
    x = images(2, 1, 12, 16)  # a 3×4 token grid
    logits, record = model(x, capture=Capture(layers=(0, 2, -1, 3)))
    assert torch.equal(logits, model(x))
    assert record.grid == (3, 4) and record.inputs.shape == (2, 2 if model.is_bcos else 1, 12, 16)
    assert record.inputs.is_leaf and record.inputs.requires_grad
    assert torch.equal(record.inputs, model.encode(x))
    layers, _ = _blocks_by_hand(model, x)
    assert list(record.tokens) == [0, 2, -1, 3] and record.tokens[-1] is record.tokens[3]
    assert record.tokens[0] is record.embedded
    assert all(torch.equal(record.tokens[layer], layers[layer]) for layer in (0, 2, 3))
    assert torch.equal(record.tokens[-1], model.forward_features(x))
    if pos == "rope":
        assert record.positional is None
    else:
        assert record.positional.shape == (12, model.embed_dim)
        assert torch.equal(record.positional, model.pos_embed.embedding((3, 4)))


@pytest.mark.parametrize("name", ["bcos_vit_nano_patch4_28", "vit_nano_patch4_28"])
def test_captured_attention_maps_are_each_blocks_softmax_rows(build, images, name):
    model = build(name, depth=3, image_size=12)
    x = images(2, 1, 12, 16)
    logits, record = model(x, capture=Capture(layers=(2,), attention=True))
    # The maps come from the explicit softmax, the ordinary pass from the fused kernel: equal up to rounding.
    torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)
    layers, maps = _blocks_by_hand(model, x)
    torch.testing.assert_close(record.tokens[2], layers[2], rtol=1e-12, atol=1e-12)
    assert len(record.attentions) == 3
    for captured, by_hand in zip(record.attentions, maps, strict=True):
        assert captured.shape == (2, model.blocks[0].attn.num_heads, 12, 12)
        torch.testing.assert_close(captured, by_hand, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(captured.sum(-1), torch.ones_like(captured[..., 0]), rtol=1e-13, atol=1e-13)


def test_capture_keeps_only_what_it_is_asked_for(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8)
    logits, record = model(images(2, 1, 8), capture=Capture())
    assert record.tokens == {} and record.attentions == []
    assert record.embedded.shape == (2, 4, model.embed_dim)


def test_gradient_at_the_captured_input_in_explanation_mode_is_the_explanation(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8)
    x = images(3, 1, 8)
    target = torch.tensor([1, 4, 7])
    with bcosvit.explanation_mode(model):
        logits, record = model(x, capture=Capture())
    (weights,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), record.inputs)
    torch.testing.assert_close(weights, bcosvit.explain(model, x, target).weights[:, 0], rtol=0, atol=0)


def test_forward_without_capture_returns_the_logits_of_the_blocks_by_hand(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8)
    x = images(2, 1, 8)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)
    assert torch.equal(logits, model.forward_head(_blocks_by_hand(model, x)[0][-1]))
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(leaf)[:, 2].sum(), leaf)  # no capture: nothing cuts the images off
    assert grad.abs().sum() > 0


def test_capture_goes_through_a_wrapper_that_forwards_keyword_arguments(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8)
    wrapper = nn.DataParallel(model)  # on the CPU it calls the model with the same arguments
    x = images(2, 1, 8)
    logits, record = wrapper(x, capture=Capture(layers=(1,)))
    assert torch.equal(logits, model(x)) and set(record.tokens) == {1}
    record.tokens[1].sum().backward()
    assert model.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0 and model.head.weight.grad is None


def test_capture_with_gradient_checkpointing_records_the_same_tensors(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8)
    x = images(2, 1, 8)
    plain_logits, plain = model(x, capture=Capture(layers=(1,), attention=True))
    model.set_grad_checkpointing(True)
    logits, record = model(x, capture=Capture(layers=(1,), attention=True))
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)
    torch.testing.assert_close(record.tokens[1], plain.tokens[1], rtol=0, atol=0)
    for a, b in zip(record.attentions, plain.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(logits[:, 3].sum(), record.inputs)
    (plain_grad,) = torch.autograd.grad(plain_logits[:, 3].sum(), plain.inputs)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("layer", [3, -4])
def test_capturing_a_layer_the_model_does_not_have_is_a_clear_config_error(build, images, layer):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8)
    with pytest.raises(bcosvit.ConfigError, match=rf"layer must lie in \[0, 2\] .*got {layer}"):
        model(images(1, 1, 8), capture=Capture(layers=(layer,)))


def test_bcos_model_encodes_inverse_and_standard_model_normalises(build, images):
    bcos = build("bcos_vit_nano_patch4_28", depth=1)
    std = build("vit_mini_patch4_32", depth=1)
    x = images(1, 3, 8)
    torch.testing.assert_close(bcos.encode(x[:, :1]), torch.cat([x[:, :1], 1 - x[:, :1]], dim=1))
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    sd = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(std.encode(x), (x - mean) / sd, rtol=1e-6, atol=1e-6)
    grey = build("vit_nano_patch4_28", depth=1)
    torch.testing.assert_close(grey.encode(x[:, :1]), (x[:, :1] - 0.5) / 0.5)


@pytest.mark.parametrize("family", ["bcos_", ""])
@pytest.mark.parametrize("chans", [1, 3, 4])
def test_any_channel_count_works(build, images, family, chans):
    model = build(f"{family}vit_nano_patch4_28", depth=1, in_chans=chans)
    assert model.in_chans == chans
    logits = model(images(2, chans, 12))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    first = model.tokenizer.proj
    assert first.in_features == (2 if family else 1) * chans * 16


@pytest.mark.parametrize(
    ("name", "pos"),
    [
        ("bcos_vit_nano_patch4_28", "learned"),
        ("vit_nano_patch4_28", "learned"),
        ("bcos_vit_nano_patch4_28", "sincos"),
        ("bcos_vitc_micro_28", "sincos"),
        ("vitc_micro_28", "rope"),
    ],
)
def test_any_image_size_divisible_by_patch_size_works(build, images, name, pos):
    model = build(name, depth=1, pos_embed=pos)
    assert model.image_size == 28
    x = images(2, 1, 36, 20)
    tokens, grid = model.forward_tokens(x)
    assert grid == (9, 5) and tokens.shape == (2, 45, model.num_features)
    if pos == "learned":
        assert model.pos_embed.weight.shape == (49, model.num_features)
        assert model.pos_embed.embedding(grid).shape == (45, model.num_features)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_reset_classifier_replaces_head_and_logit_bias(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=1)
    model.reset_classifier(4)
    assert model.num_classes == 4 and model.logit_bias_value == pytest.approx(-1.0986122886681098)
    assert model(images(1, 1, 8)).shape == (1, 4)
    assert model.head.weight.dtype == torch.float64


# --- Errors ----------------------------------------------------------------------------------


def test_error_classes_are_value_errors():
    assert issubclass(bcosvit.InputError, ValueError) and issubclass(bcosvit.ConfigError, ValueError)


@pytest.mark.parametrize("family", ["bcos_", ""])
def test_wrong_channel_count_is_a_clear_input_error(build, images, family):
    model = build(f"{family}vit_nano_patch4_28", depth=1)
    with pytest.raises(bcosvit.InputError, match="expected 1 input channels, got 3") as info:
        model(images(2, 3, 8))
    assert "in_chans=3" in str(info.value)


def test_image_size_not_divisible_by_patch_size_is_a_clear_input_error(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=1)
    with pytest.raises(bcosvit.InputError, match=r"image size 10×8 is not divisible by the patch size 4"):
        model(images(1, 1, 10, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_images_are_a_clear_input_error_naming_the_image(build, images, bad):
    model = build("bcos_vit_nano_patch4_28", depth=1)
    x = images(3, 1, 8)
    x[1, 0, 2, 3] = bad
    with pytest.raises(bcosvit.InputError, match=r"images \[1\] contain NaN or Inf"):
        model(x)


def test_other_bad_inputs_are_input_errors(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=1)
    with pytest.raises(bcosvit.InputError, match="shape"):
        model(images(1, 1, 8)[0])
    with pytest.raises(bcosvit.InputError, match="dtype"):
        model(images(1, 1, 8, dtype=torch.float32))
    with pytest.raises(bcosvit.InputError, match="floating-point"):
        model(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("family", ["bcos_", ""])
def test_images_in_0_255_are_an_input_error_saying_to_divide_by_255(build, images, family):
    model = build(f"{family}vit_nano_patch4_28", depth=1)
    with pytest.raises(bcosvit.InputError, match=r"expects images in \[0, 1\]: divide 8-bit images .* by 255"):
        model(images(2, 1, 8) * 255)


def test_mean_std_normalised_images_are_an_input_error(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=1)
    with pytest.raises(bcosvit.InputError, match=r"lie in \[-2.1.*without mean/std normalisation"):
        model((images(2, 1, 8) - 0.485) / 0.229 - 0.01)


def test_augmented_images_near_0_1_are_accepted(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=1)
    noisy = images(2, 1, 8) + 0.15 * torch.randn(2, 1, 8, 8, dtype=torch.float64)
    noisy[0, 0, 0, :2] = torch.tensor([-1.0, 2.0])  # the edges of the accepted range
    assert torch.isfinite(model(noisy)).all()


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(
        bcosvit.ConfigError, match="unknown model name 'bcos_vit_tiny_patch16'.*did you mean.*bcos_vit_tiny_patch16_224"
    ):
        bcosvit.create_model("bcos_vit_tiny_patch16")


def test_unknown_option_is_a_config_error_listing_valid_options():
    with pytest.raises(bcosvit.ConfigError, match=r"unknown model option\(s\) \['embed_dims'\].*embed_dim"):
        bcosvit.create_model("bcos_vit_nano_patch4_28", embed_dims=32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embed_dim": 30, "num_heads": 4}, "embed_dim 30 must be divisible by num_heads 4"),
        ({"pos_embed": "alibi"}, "pos_embed must be one of"),
        ({"b": 0.5}, "b must be >= 1, got 0.5"),
        ({"depth": 0}, "depth must be a positive integer, got 0"),
        ({"num_classes": 1}, "num_classes must be at least 2"),
        ({"image_size": 30}, "image_size 30 must be divisible by patch_size 4"),
        ({"embed_dim": 24, "num_heads": 4, "pos_embed": "rope"}, "head dimension divisible by 4, got 6"),
        ({"in_chans": 3, "input_mean": [0.5]}, "input_mean needs 3 values"),
        ({"attn_distance_penalty": -1.0}, "attn_distance_penalty must be a finite number >= 0, got -1.0"),
        ({"attn_distance_penalty": float("nan")}, "attn_distance_penalty must be a finite number >= 0, got nan"),
        ({"attn_distance_penalty": "1"}, "attn_distance_penalty must be a finite number >= 0, got '1'"),
        ({"patch_size": 8}, "conv stem reduces the image by 4, but patch_size is 8"),
    ],
)
def test_invalid_config_values_are_clear_config_errors(overrides, message):
    name = "bcos_vitc_micro_28" if "patch_size" in overrides else "bcos_vit_nano_patch4_28"
    with pytest.raises(bcosvit.ConfigError, match=message.replace("(", r"\(")):
        bcosvit.create_model(name, **overrides)


def test_class_probabilities_are_sigmoid_for_bcos_models_and_softmax_for_standard_ones(build, images):
    from bcosvit.app.serve import views
    from bcosvit.models import class_probabilities

    logits = torch.randn(3, 10, dtype=torch.float64)
    assert torch.equal(class_probabilities(logits, True), torch.sigmoid(logits))
    assert torch.equal(class_probabilities(logits, False), torch.softmax(logits, dim=1))
    classes = torch.tensor([[1, 4], [0, 0], [9, 2]])
    assert torch.equal(class_probabilities(logits, True, classes), torch.sigmoid(logits.gather(1, classes)))
    assert torch.equal(class_probabilities(logits, False, classes), torch.softmax(logits, dim=1).gather(1, classes))
    x = images(2, 1, 8)
    target = torch.tensor([3, 7])
    for name in ("bcos_vit_nano_patch4_28", "vit_nano_patch4_28"):
        model = build(name, image_size=8, depth=1, embed_dim=16, num_heads=2)
        logits = model(x)
        probabilities = model.probabilities(logits)
        assert torch.equal(probabilities, class_probabilities(logits, model.is_bcos))
        # every user of probabilities: the metrics, the explorer, the explanation
        metric = bcosvit.metrics.target_probabilities(logits, target, model.is_bcos)
        assert torch.equal(metric, probabilities[[0, 1], target])
        scores = views.top_classes(model, x[:1], 10)
        alone = model.probabilities(model(x[:1]))[0]
        assert [s.probability for s in scores] == alone[[s.index for s in scores]].tolist()
        if model.is_bcos:
            expl = bcosvit.explain(model, x)
            assert torch.equal(expl.probabilities, model.probabilities(expl.logits))
        else:
            torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_classes": 2**40}, r"needs about [0-9,]+ values \([0-9,]+ GiB in float32\), more than the 2,147,483,648"),
        ({"embed_dim": 16_777_216, "num_heads": 1}, "more than the 2,147,483,648 a bcosvit model may have"),
        ({"depth": 100_000}, "depth 100000 is more than the 1024 blocks"),
    ],
)
def test_architectures_beyond_the_bound_are_refused_before_anything_is_allocated(options, message):
    started = time.perf_counter()
    with pytest.raises(bcosvit.ConfigError, match=message):
        bcosvit.create_model("bcos_vit_nano_patch4_28", **options)
    assert time.perf_counter() - started < 2


# --- timm's model contract (issue 28 item 4) ---------------------------------------------------


def _prefixed(build, **overrides) -> bcosvit.VisionTransformer:
    """A 3-block float64 B-cos model with a class token and two register tokens, 3×4 token grids."""
    options = {"depth": 3, "image_size": 12, "class_token": True, "reg_tokens": 2, **overrides}
    return build("bcos_vit_nano_patch4_28", **options)


@pytest.mark.parametrize("indices", [None, 1, 3, [0, 2], [-1, 0], [2, 0, 2], (1,)])
def test_forward_intermediates_take_the_blocks_timm_takes(build, images, indices):
    timm_features = pytest.importorskip("timm.models._features")
    model = _prefixed(build)
    x = images(2, 1, 12, 16)
    blocks, _ = timm_features.feature_take_indices(3, indices)
    layers = tuple(sorted(set(blocks)))  # timm's order: block order, each block once
    _, record = model(x, capture=Capture(layers=tuple(k + 1 for k in layers)))
    final, taken = model.forward_intermediates(x, indices, output_fmt="NLC")
    assert torch.equal(final, model.forward_features(x)) and torch.equal(model.forward_head(final), model(x))
    assert len(taken) == len(layers)
    for y, k in zip(taken, layers, strict=True):
        assert torch.equal(y, record.tokens[k + 1][:, 3:])  # the patch tokens: (N, 12, D)
    maps = model.forward_intermediates(x, indices, intermediates_only=True)
    assert all(m.shape == (2, model.embed_dim, 3, 4) for m in maps)  # NCHW: (N, D, rows, cols)
    assert all(torch.equal(m.flatten(2).transpose(1, 2), y) for m, y in zip(maps, taken, strict=True))
    pairs = model.forward_intermediates(x, indices, return_prefix_tokens=True, intermediates_only=True)
    for (patches, prefix), k in zip(pairs, layers, strict=True):
        assert patches.shape == (2, model.embed_dim, 3, 4) and torch.equal(prefix, record.tokens[k + 1][:, :3])


def test_forward_intermediates_options_as_timm(build, images):
    model = _prefixed(build)
    x = images(2, 1, 12, 16)
    _, record = model(x, capture=Capture(layers=(2,)))
    final, taken = model.forward_intermediates(x, [1], stop_early=True)
    assert torch.equal(final, record.tokens[2])  # no block after the last one asked for
    out = model.forward_intermediates(x, 2, return_prefix_tokens=True, output_dict=True)
    assert set(out) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
    assert [p.shape for p in out["image_intermediates_prefix"]] == [(2, 3, model.embed_dim)] * 2
    assert set(model.forward_intermediates(x, output_dict=True, intermediates_only=True)) == {"image_intermediates"}
    plain = build("bcos_vit_nano_patch4_28", depth=2, image_size=8)
    (only,) = plain.forward_intermediates(images(1, 1, 8), [0], return_prefix_tokens=True, intermediates_only=True)
    assert isinstance(only, torch.Tensor)  # no prefix tokens: no pairs, as in timm


@pytest.mark.parametrize("final_norm", ["tokens", "pooled"])
def test_forward_intermediates_norm_is_the_token_norm_only(build, images, final_norm):
    """timm's ``norm=True`` applies its token norm; a model normed after pooling (timm's fc_norm) has none."""
    model = _prefixed(build, final_norm=final_norm)
    x = images(2, 1, 12, 16)
    raw = model.forward_intermediates(x, [2], output_fmt="NLC", intermediates_only=True)[0]
    normed = model.forward_intermediates(x, [2], norm=True, output_fmt="NLC", intermediates_only=True)[0]
    if final_norm == "tokens":
        assert torch.equal(normed, model.norm(model.forward_features(x))[:, 3:])
    else:
        assert torch.equal(normed, raw)


@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", "vit_base_patch16_reg4_gap_256", "vit_base_patch16_siglip_gap_224"]
)
def test_forward_intermediates_equal_timms_on_a_converted_model(name):
    """Class token and token norm; registers and fc_norm; no prefix and a token norm: float64, 1e-9."""
    timm = pytest.importorskip("timm")
    from bcosvit.timm_conversion import from_timm

    original = timm.create_model(name, pretrained=False, img_size=32, depth=3, embed_dim=64, num_heads=2)
    original = original.double().eval()
    twin = from_timm(original).eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    cfg = original.pretrained_cfg
    mean, std = (torch.tensor(cfg[k], dtype=torch.float64).view(1, 3, 1, 1) for k in ("mean", "std"))
    close = {"rtol": 1e-9, "atol": 1e-9}
    with torch.no_grad():
        for indices in (None, 2, [0, -1]):
            for norm in (False, True):
                options = {"indices": indices, "norm": norm, "return_prefix_tokens": True}
                theirs_final, theirs = original.forward_intermediates((x - mean) / std, **options)
                ours_final, ours = twin.forward_intermediates(x, **options)
                assert len(ours) == len(theirs)
                for a, b in zip(ours, theirs, strict=True):
                    for a_part, b_part in zip(*((a, b) if isinstance(a, tuple) else ((a,), (b,))), strict=True):
                        assert a_part.shape == b_part.shape
                        torch.testing.assert_close(a_part, b_part, **close)
                # timm's final tokens carry its token norm; ours are forward_features' (forward_head applies it)
                token_norm = twin.norm if twin.config.final_norm == "tokens" else nn.Identity()
                torch.testing.assert_close(token_norm(ours_final), theirs_final, **close)
                torch.testing.assert_close(
                    twin.forward_head(ours_final, pre_logits=True),
                    original.forward_head(theirs_final, pre_logits=True),
                    **close,
                )


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (0, "last 0 blocks"),
        (4, "last 4 blocks"),
        ([3], r"\[3\] lie outside \[-3, 2\]"),
        ([-4], "outside"),
        ("1", "must be None, an int"),
        ([], "non-empty"),
        (True, "must be None"),
    ],
)
def test_forward_intermediates_refuse_indices_outside_the_blocks(build, images, indices, message):
    model = build("bcos_vit_nano_patch4_28", depth=3, image_size=8)
    with pytest.raises(bcosvit.ConfigError, match=message):
        model.forward_intermediates(images(1, 1, 8), indices)
    with pytest.raises(bcosvit.ConfigError, match="output_fmt must be 'NCHW' or 'NLC'"):
        model.forward_intermediates(images(1, 1, 8), output_fmt="NHWC")


def test_prune_intermediate_layers_keeps_the_blocks_asked_for(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=4, image_size=8)
    x = images(2, 1, 8)
    before = model.forward_intermediates(x, [1], intermediates_only=True)[0]
    with pytest.raises(bcosvit.ConfigError, match="prune_norm is not supported"):
        model.prune_intermediate_layers([1], prune_norm=True)
    assert model.prune_intermediate_layers([-3, 1]) == [1, 1] and len(model.blocks) == model.config.depth == 2
    assert torch.equal(model.forward_intermediates(x, [1], intermediates_only=True)[0], before)
    assert model.num_classes == 0 and model(x).shape == (2, model.embed_dim)  # headless: the pooled features
    assert torch.equal(model(x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_get_and_reset_classifier_with_timms_signature(build, images):
    model = _prefixed(build, global_pool="token")
    x = images(2, 1, 12, 16)
    assert model.get_classifier() is model.head and model.get_classifier().out_features == 10
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.equal(pooled, model.norm(model.forward_features(x)[:, 0]))  # the class token, normed
    model.reset_classifier(5, "avg")
    assert model.global_pool == model.config.global_pool == "avg" and model.get_classifier().out_features == 5
    tokens = model.forward_features(x)
    assert torch.equal(model.forward_head(tokens, pre_logits=True), model.norm(tokens[:, 3:].mean(1)))
    assert model(x).shape == (2, 5)
    model.reset_classifier(0, global_pool=None)  # timm's headless backbone
    assert isinstance(model.get_classifier(), nn.Identity) and model(x).shape == (2, model.embed_dim)
    plain = build("bcos_vit_nano_patch4_28", depth=1, image_size=8)
    for pool, message in [("token", "needs class_token"), ("map", "needs the attention pool"), ("", "no pooling")]:
        with pytest.raises(bcosvit.ConfigError, match=message):
            plain.reset_classifier(4, pool)
    assert plain.global_pool == "avg" and plain.num_classes == 10  # a refused call changes nothing
    mapped = build("vit_nano_patch4_28", depth=1, image_size=8, global_pool="map")
    mapped.reset_classifier(3, "avg")
    assert mapped.attn_pool is None and "attn_pool" not in "".join(mapped.state_dict())
    assert mapped(images(1, 1, 8)).shape == (1, 3)


@pytest.mark.parametrize(("family", "resize_size"), [("bcos", 50), ("bcos", None), ("standard", 32)])
def test_timm_data_config_and_transform_give_the_images_the_model_reads(family, resize_size):
    timm_data = pytest.importorskip("timm.data")
    from PIL import Image

    name = "bcos_vit_nano_patch4_28" if family == "bcos" else "vit_nano_patch4_28"
    model = bcosvit.create_model(name, in_chans=3, resize_size=resize_size).eval()
    cfg = timm_data.resolve_model_data_config(model)
    crop = 1.0 if resize_size is None else 28 / resize_size
    assert cfg["input_size"] == (3, 28, 28) and cfg["interpolation"] == "bilinear"
    assert cfg["crop_pct"] == pytest.approx(crop, rel=1e-12) and cfg["crop_mode"] == "center"
    assert cfg["mean"] == (0.0,) * 3 and cfg["std"] == (1.0,) * 3  # the model encodes its input itself
    transform = timm_data.create_transform(**cfg)
    resize = next(t for t in transform.transforms if type(t).__name__ == "Resize")
    assert resize.size == (resize_size or 28)  # 28 / 50: timm's floor(28 / crop_pct) must give 50 back
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(70, 90, 3, generator=generator) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    theirs = transform(image)
    assert theirs.shape == (3, 28, 28) and 0 <= theirs.min() and theirs.max() <= 1
    # bcosvit's own pipeline resizes in float, timm's PIL in uint8: within a grey level or two
    torch.testing.assert_close(theirs, bcosvit.transforms(model)(image), rtol=0, atol=2 / 255)
    assert model(theirs[None]).shape == (1, 10)
    pcfg = model.pretrained_cfg
    assert pcfg == model.default_cfg and pcfg["classifier"] == "head" and pcfg["num_classes"] == 10
    assert pcfg["first_conv"] == "tokenizer.proj" and model.get_submodule(pcfg["first_conv"]) is model.tokenizer.proj
    if family == "bcos":
        assert pcfg["input_encoding"] == "[x, 1 - x]" and "input_mean" not in pcfg
    else:
        assert pcfg["input_encoding"] == "(x - mean) / std"
        assert pcfg["input_mean"] == (0.485, 0.456, 0.406) and pcfg["input_std"] == (0.229, 0.224, 0.225)


def test_pretrained_cfg_follows_the_model(build):
    stem = build("bcos_vitc_micro_28", depth=1)
    assert stem.pretrained_cfg["first_conv"] == "tokenizer.stages.0" and stem.pretrained_cfg["input_size"][0] == 1
    model = build("bcos_vit_nano_patch4_28", depth=1, class_names=[f"class {i}" for i in range(10)])
    assert model.pretrained_cfg["label_names"] == tuple(f"class {i}" for i in range(10))
    model.reset_classifier(3)
    assert model.pretrained_cfg["num_classes"] == 3 and "label_names" not in model.pretrained_cfg
