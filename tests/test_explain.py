"""Exact explanations: completeness, Jacobian equality, batching, holistic views (docs/design.md: completeness,
beyond the published system)."""

from __future__ import annotations

import gc

import pytest
import torch

import bcosvit
from bcosvit.explanation import dynamic_linear_weights
from bcosvit.layers.detach import attribution_state
from bcosvit.models import Capture, model_config

BCOS_MODELS = bcosvit.list_models("bcos_*")


def _encoded(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, 1 - x], dim=1)


def _assert_complete(model, x, e, rel=1e-10):
    """Completeness both as reported and recomputed from an ordinary forward pass."""
    assert (e.completeness_error / e.outputs.abs()).max() < rel
    logits = model(x)  # normal mode, independent of the explanation pass
    assert e.target.ndim == 2 and e.weights.shape[:2] == e.target.shape == e.outputs.shape == e.positional.shape
    expected = logits.gather(1, e.target)
    total = (e.weights * _encoded(x)[:, None]).flatten(2).sum(-1) + e.positional + e.logit_bias
    assert ((expected - total).abs() / expected.abs()).max() < rel
    torch.testing.assert_close(e.outputs, expected, rtol=1e-12, atol=0)


# --- Completeness ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if "base" in n or "large" in n else n for n in BCOS_MODELS]
)
def test_every_registered_bcos_model_is_complete_in_float64(build, images, name):
    patch = model_config(name).patch_size
    model = build(name, image_size=2 * patch)  # published depth and width, 2×2 tokens
    x = images(2, model.in_chans, 2 * patch)
    e = bcosvit.explain(model, x)
    assert e.weights.shape == (2, 1, 2 * model.in_chans, 2 * patch, 2 * patch)
    _assert_complete(model, x, e)
    assert (e.positional.abs() > 1e-6).all()  # published models add a sin-cos embedding
    assert e.logit_bias == pytest.approx(model.logit_bias_value)
    del model, e
    gc.collect()


@pytest.mark.parametrize("pos", ["sincos", "learned", "rope", "none"])
def test_each_positional_scheme_is_complete_and_reports_its_positional_term(build, images, pos):
    model = build("bcos_vit_nano_patch4_28", pos_embed=pos, image_size=12)
    x = images(3, 1, 12)
    e = bcosvit.explain(model, x)
    _assert_complete(model, x, e)
    if pos in ("rope", "none"):
        assert (e.positional == 0).all()
    else:
        assert (e.positional.abs() > 1e-4).all()


def test_distance_penalty_leaves_the_explanation_complete_without_positional_term(build, images):
    model = build("bcos_vit_nano_patch4_28", pos_embed="rope", attn_distance_penalty=0.8, image_size=12)
    x = images(3, 1, 12)
    e = bcosvit.explain(model, x)
    _assert_complete(model, x, e)
    assert (e.positional == 0).all()


def test_conv_stem_model_is_complete(build, images):
    model = build("bcos_vitc_micro_28", image_size=12)
    x = images(3, 1, 12)
    e = bcosvit.explain(model, x)
    _assert_complete(model, x, e)
    assert (e.positional != 0).all()


def test_float32_completeness_error_is_small(build, images):
    model = build("bcos_vit_mini_patch4_32", dtype=torch.float32)
    x = images(4, 3, 32, dtype=torch.float32)
    e = bcosvit.explain(model, x)
    reported = e.relative_completeness_error
    torch.testing.assert_close(reported, e.completeness_error / e.outputs.abs())
    # The reported error is computed in float32 next to the large logit bias and rounds to ~0;
    # recompute it in float64 from the float32 parts to see the real error.
    residual = (
        e.outputs.double()
        - (e.weights.double() * e.inputs.double()[:, None]).flatten(2).sum(2)
        - e.positional.double()
        - e.logit_bias
    ).abs()
    relative = residual / e.outputs.double().abs()
    explained = residual / (e.outputs.double() - e.logit_bias).abs()
    print(
        f"\nfloat32 completeness, bcos_vit_mini_patch4_32: reported max {reported.max().item():.2e}, "
        f"float64 recomputation max {relative.max().item():.2e} of |logit|, "
        f"{explained.max().item():.2e} of |logit - logit_bias|"
    )
    assert reported.max() < 1e-4 and relative.max() < 1e-4
    assert explained.max() < 1e-3


@pytest.mark.parametrize("chans", [1, 3, 4])
def test_explanations_for_any_channel_count(build, images, chans):
    model = build("bcos_vit_nano_patch4_28", depth=2, in_chans=chans, image_size=8)
    x = images(2, chans, 8, 12)
    e = bcosvit.explain(model, x)
    assert e.inputs.shape == (2, 2 * chans, 8, 12) and e.weights.shape == (2, 1, 2 * chans, 8, 12)
    assert e.contributions.shape == (2, 1, 8, 12)
    torch.testing.assert_close(e.inputs, _encoded(x), rtol=0, atol=0)
    torch.testing.assert_close(e.contributions, (e.weights * e.inputs[:, None]).sum(2), rtol=1e-13, atol=1e-15)
    _assert_complete(model, x, e)


def test_resized_learned_embedding_is_complete_on_other_image_sizes(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=2, pos_embed="learned")
    x = images(2, 1, 36, 20)
    e = bcosvit.explain(model, x)
    assert e.weights.shape == (2, 1, 2, 36, 20)
    _assert_complete(model, x, e)
    assert (e.positional.abs() > 1e-6).all()


# --- The explanation is the Jacobian of the explanation-mode function ------------------------


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("bcos_vit_nano_patch4_28", {"pos_embed": "sincos"}),
        ("bcos_vit_nano_patch4_28", {"pos_embed": "learned"}),
        ("bcos_vit_nano_patch4_28", {"pos_embed": "rope"}),
        ("bcos_vitc_micro_28", {"stem_channels": [4, 8], "pos_embed": "sincos"}),
    ],
    ids=["sincos", "learned", "rope", "convstem"],
)
@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_explanation_equals_jacobian_row_of_explanation_mode_function(build, images, name, overrides):
    model = build(name, image_size=8, depth=1, embed_dim=16, num_heads=2, **overrides)
    x = images(2, 1, 8)
    z = _encoded(x)
    grid = model.tokenizer(z)[1]
    if model.pos_embed is not None:
        pos = model.pos_embed.embedding(grid).detach().clone()
    else:
        pos = torch.zeros(4, 16, dtype=torch.float64)

    def logits_of(z, p):
        tokens, grid = model.tokenizer(z)
        if model.pos_embed is not None:
            tokens = tokens + p
        for block in model.blocks:
            tokens = block(tokens, grid)
        return model.forward_head(tokens)

    with bcosvit.explanation_mode(model):
        jac_z, jac_p = torch.func.jacrev(logits_of, argnums=(0, 1))(z, pos)  # (N, K, N, 2C, H, W), (N, K, L, D)
        torch.testing.assert_close(logits_of(z, pos), model(x), rtol=1e-13, atol=1e-13)

    target = torch.tensor([3, 7])
    e = bcosvit.explain(model, x, target=target)
    for n in range(2):
        torch.testing.assert_close(e.weights[n, 0], jac_z[n, target[n], n], rtol=1e-10, atol=1e-10)
        other = 1 - n  # an image's logit does not depend on the other images of the batch
        assert jac_z[n, :, other].abs().max() == 0
        positional = (jac_p[n, target[n]] * pos).sum()
        torch.testing.assert_close(e.positional[n, 0], positional, rtol=1e-10, atol=1e-12)
    if overrides["pos_embed"] == "rope":
        assert jac_p.abs().max() == 0 and (e.positional == 0).all()


# --- Batching and several targets ------------------------------------------------------------


def test_batched_explanation_equals_one_image_at_a_time(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=12)
    x = images(4, 1, 12)
    batch = bcosvit.explain(model, x)
    assert batch.target.shape == (4, 1)
    torch.testing.assert_close(batch.target[:, 0], model(x).argmax(1))
    for n in range(4):
        single = bcosvit.explain(model, x[n : n + 1])
        assert single.target.item() == batch.target[n].item()
        torch.testing.assert_close(batch.weights[n], single.weights[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(batch.positional[n], single.positional[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(batch.logits[n], single.logits[0], rtol=0, atol=1e-10)


def test_multi_target_explanation_equals_separate_single_target_explanations(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8)
    x = images(2, 1, 8)
    target = torch.tensor([[0, 3, 9], [5, 5, 1]])
    multi = bcosvit.explain(model, x, target=target)
    assert multi.weights.shape == (2, 3, 2, 8, 8)
    assert multi.contributions.shape == (2, 3, 8, 8)
    assert multi.positional.shape == multi.outputs.shape == multi.completeness_error.shape == (2, 3)
    _assert_complete(model, x, multi)
    for t in range(3):
        single = bcosvit.explain(model, x, target=target[:, t].tolist())
        torch.testing.assert_close(multi.weights[:, t : t + 1], single.weights, rtol=0, atol=1e-12)
        torch.testing.assert_close(multi.contributions[:, t : t + 1], single.contributions, rtol=0, atol=1e-12)
        torch.testing.assert_close(multi.positional[:, t : t + 1], single.positional, rtol=0, atol=1e-12)
        torch.testing.assert_close(multi.outputs[:, t : t + 1], single.outputs, rtol=0, atol=0)
    # Different classes of one image have different explanations.
    assert (multi.weights[0, 0] - multi.weights[0, 1]).abs().max() > 1e-6


def test_target_forms_int_list_nested_list_and_tensor_agree(tiny, images):
    x = images(2, 1, 8)
    as_int = bcosvit.explain(tiny, x, target=4)
    as_list = bcosvit.explain(tiny, x, target=[4, 4])
    as_nested = bcosvit.explain(tiny, x, target=[[4], [4]])
    as_scalar = bcosvit.explain(tiny, x, target=torch.tensor(4))
    assert as_int.target.tolist() == [[4], [4]]
    for other in (as_list, as_nested, as_scalar):
        assert other.target.tolist() == [[4], [4]]
        torch.testing.assert_close(other.weights, as_int.weights, rtol=0, atol=0)


# --- Holistic views --------------------------------------------------------------------------


def _tokens_at(model, x, layer):
    tokens, grid = model.forward_tokens(x)
    blocks = list(model.blocks)
    for block in blocks[: layer % (len(blocks) + 1)]:
        tokens = block(tokens, grid)
    return tokens


@pytest.mark.parametrize("pos", ["sincos", "none"])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_explain_unit_is_complete_for_intermediate_tokens(build, images, layer, pos):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8, pos_embed=pos)
    x = images(2, 1, 8)
    token, channel = [1, 3], [5, 60]
    e = bcosvit.explain_unit(model, x, layer, token, channel)
    values = _tokens_at(model, x, layer)[torch.arange(2), torch.tensor(token), torch.tensor(channel)][:, None]
    torch.testing.assert_close(e.outputs, values, rtol=1e-12, atol=1e-13)
    assert e.logit_bias == 0 and e.weights.shape == (2, 1, 2, 8, 8) and e.target.tolist() == [[5], [60]]
    total = (e.weights * _encoded(x)[:, None]).flatten(2).sum(2) + e.positional
    assert ((total - values).abs() / values.abs()).max() < 1e-10
    assert (e.completeness_error / values.abs()).max() < 1e-10
    if layer == 0 and pos == "sincos":  # the embedded token carries the embedding unchanged
        emb = model.pos_embed.embedding((2, 2))
        torch.testing.assert_close(e.positional, emb[token, channel][:, None], rtol=1e-12, atol=1e-13)
    if pos == "none":
        assert (e.positional == 0).all()


def test_explain_unit_with_several_channels_per_token(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8)
    x = images(2, 1, 8)
    channels = torch.tensor([[0, 7], [8, 9]])
    e = bcosvit.explain_unit(model, x, 1, 2, channels)
    assert e.weights.shape == (2, 2, 2, 8, 8) and e.outputs.shape == (2, 2)
    for t in range(2):
        single = bcosvit.explain_unit(model, x, 1, 2, channels[:, t])
        torch.testing.assert_close(e.weights[:, t : t + 1], single.weights, rtol=0, atol=1e-12)
    assert (e.completeness_error / e.outputs.abs()).max() < 1e-10


def test_explain_unit_max_explains_the_largest_channel_and_norm_the_tokens_norm(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8, pos_embed="learned")
    x = images(2, 1, 8)
    _, record = model(x, capture=Capture(layers=(1,)))
    token = record.tokens[1][:, 3].detach()  # (N, D)
    largest = bcosvit.explain_unit(model, x, 1, 3, "max")
    torch.testing.assert_close(largest.target, token.argmax(dim=1, keepdim=True))
    same = bcosvit.explain_unit(model, x, 1, 3, token.argmax(dim=1))
    torch.testing.assert_close(largest.weights, same.weights, rtol=0, atol=0)
    norm = bcosvit.explain_unit(model, x, 1, 3, "norm")
    assert norm.target.tolist() == [[-1], [-1]] and norm.weights.shape == (2, 1, 2, 8, 8)
    torch.testing.assert_close(norm.outputs, token.norm(dim=1, keepdim=True), rtol=1e-12, atol=1e-12)
    assert (norm.completeness_error / norm.outputs.abs()).max() < 1e-10
    # the norm direction's weights are the direction-weighted sum of the channels' weights
    every = bcosvit.explain_unit(model, x, 1, 3, torch.arange(token.shape[1]).expand(2, -1))
    direction = token / token.norm(dim=1, keepdim=True)
    torch.testing.assert_close(norm.weights[:, 0], torch.einsum("nd,ndchw->nchw", direction, every.weights))


def test_token_contributions_at_several_layers_equal_each_layer_alone(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8, pos_embed="learned")
    x = images(2, 1, 8, 12)
    target = torch.tensor([[1, 2], [4, 0]])
    every = bcosvit.token_contributions(model, x, target=target, layer=range(3))
    assert every.shape == (2, 2, 3, 2, 3)
    for k in range(3):
        torch.testing.assert_close(every[:, :, k], bcosvit.token_contributions(model, x, target=target, layer=k))
    predicted = bcosvit.token_contributions(model, x, layer=[0, -1])
    assert predicted.shape == (2, 1, 2, 2, 3)
    torch.testing.assert_close(predicted[:, :, 1], bcosvit.token_contributions(model, x, layer=-1))


@pytest.mark.parametrize("layer", [0, 1, 2, -1])
def test_token_contributions_sum_to_logit_minus_logit_bias(build, images, layer):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8)
    x = images(2, 1, 8, 12)  # a 2×3 token grid
    logits = model(x)
    single = bcosvit.token_contributions(model, x, target=None, layer=layer)
    assert single.shape == (2, 1, 2, 3)
    expected = logits.gather(1, logits.argmax(1, keepdim=True)) - model.logit_bias_value
    torch.testing.assert_close(single.sum(dim=(2, 3)), expected, rtol=1e-10, atol=1e-12)
    target = torch.tensor([[1, 2, 3], [4, 0, 9]])
    multi = bcosvit.token_contributions(model, x, target=target, layer=layer)
    assert multi.shape == (2, 3, 2, 3)
    torch.testing.assert_close(
        multi.sum(dim=(2, 3)), logits.gather(1, target) - model.logit_bias_value, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("name", ["bcos_vit_nano_patch4_28", "bcos_vitc_micro_28"])
def test_token_contributions_at_layer_zero_are_patch_sums_of_pixel_contributions(build, images, name):
    # Without an additive embedding, a token's contribution is exactly its patch's pixel contributions.
    model = build(name, depth=2, image_size=8, pos_embed="rope")
    x = images(2, 1, 8, 12)
    per_token = bcosvit.token_contributions(model, x, target=[2, 6], layer=0)
    pixels = bcosvit.explain(model, x, target=[2, 6]).contributions
    if name == "bcos_vit_nano_patch4_28":  # non-overlapping patches: exact patch sums in row-major order
        patch_sums = pixels.unflatten(2, (2, 4)).unflatten(4, (3, 4)).sum(dim=(3, 5))
        torch.testing.assert_close(per_token, patch_sums, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_token.sum(dim=(2, 3)), pixels.sum(dim=(2, 3)), rtol=1e-10, atol=1e-12)


# --- The low-level step: dynamic_linear_weights over a capture record ---------------------------


def test_dynamic_linear_weights_of_an_explanation_mode_capture_are_the_explanation(tiny, images):
    x = images(2, 1, 8)
    target = torch.tensor([[1, 2], [3, 4]])
    expected = bcosvit.explain(tiny, x, target)
    with bcosvit.explanation_mode(tiny):
        logits, record = tiny(x, capture=Capture(layers=(1,)))
    outputs = logits.gather(1, target)
    weights, positional, token_grads = dynamic_linear_weights(record, outputs, layer=1)
    assert torch.equal(weights, expected.weights) and torch.equal(positional, expected.positional)
    assert token_grads.shape == (2, 2, 4, 16)
    per_token = (token_grads * record.tokens[1].unsqueeze(1)).sum(dim=-1)
    torch.testing.assert_close(per_token.unflatten(-1, (2, 2)), bcosvit.token_contributions(tiny, x, target, layer=1))


def test_dynamic_linear_weights_switch_no_mode_outside_explanation_mode_they_are_input_gradients(tiny, images):
    x = images(2, 1, 8)
    logits, record = tiny(x, capture=Capture())
    weights, _, _ = dynamic_linear_weights(record, logits[:, [3]])
    assert not bcosvit.layers.is_explanation_mode(tiny)
    leaf = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(tiny(leaf)[:, 3].sum(), leaf)  # through [x, 1 - x]: w_x - w_(1-x)
    torch.testing.assert_close(weights[:, 0, :1] - weights[:, 0, 1:], gradient, rtol=1e-12, atol=1e-14)
    assert (gradient - bcosvit.explain(tiny, x, 3).signed_weights[:, 0]).abs().max() > 1e-6


# --- explain() leaves the model as it found it -----------------------------------------------


def test_explain_leaves_parameter_gradients_untouched(tiny, images):
    x = images(2, 1, 8)
    bcosvit.explain(tiny, x)
    assert all(p.grad is None for p in tiny.parameters())
    tiny(x).sum().backward()
    before = {n: p.grad.clone() for n, p in tiny.named_parameters()}
    bcosvit.explain(tiny, x, target=[[1, 2], [3, 4]])
    bcosvit.token_contributions(tiny, x, layer=1)
    bcosvit.explain_unit(tiny, x, 1, 0, 3)
    for n, p in tiny.named_parameters():
        assert torch.equal(p.grad, before[n]), n


def test_explain_restores_training_mode_explanation_mode_and_checkpointing(tiny, images):
    x = images(2, 1, 8)
    tiny.train()
    tiny.set_grad_checkpointing(True)
    bcosvit.explain(tiny, x)
    assert tiny.training and all(m.training for m in tiny.modules())
    assert tiny.grad_checkpointing
    assert not bcosvit.layers.is_explanation_mode(tiny)
    tiny.eval()
    tiny.set_grad_checkpointing(False)
    bcosvit.explain(tiny, x)
    assert not tiny.training and not tiny.grad_checkpointing


def test_explain_restores_model_state_when_it_raises(tiny, images):
    tiny.train()
    tiny.set_grad_checkpointing(True)
    with pytest.raises(bcosvit.InputError):
        bcosvit.explain(tiny, images(2, 1, 8), target=10)
    assert tiny.training and tiny.grad_checkpointing and not bcosvit.layers.is_explanation_mode(tiny)


def test_explain_returns_tensors_detached_from_autograd(tiny, images):
    e = bcosvit.explain(tiny, images(2, 1, 8), target=[[1, 2], [3, 4]])
    fields = {
        "weights": e.weights,
        "logits": e.logits,
        "outputs": e.outputs,
        "inputs": e.inputs,
        "contributions": e.contributions,
        "positional": e.positional,
        "error": e.completeness_error,
    }
    attached = [name for name, t in fields.items() if t.requires_grad or t.grad_fn is not None]
    assert attached == []


def test_explain_works_under_no_grad_and_returns_detached_tensors(tiny, images):
    x = images(2, 1, 8)
    with torch.no_grad():
        e = bcosvit.explain(tiny, x)
    reference = bcosvit.explain(tiny, x)
    torch.testing.assert_close(e.weights, reference.weights, rtol=0, atol=0)
    assert not any(t.requires_grad for t in (e.weights, e.logits, e.outputs, e.inputs, e.contributions, e.positional))


def test_explanations_record_no_graph_for_the_parameters_and_restore_their_requires_grad(tiny, images):
    x = images(2, 1, 8)
    frozen = tiny.head.weight
    frozen.requires_grad_(False)  # a user's frozen parameter stays frozen, the others trainable
    seen = []
    hook = tiny.blocks[0].attn.proj.register_forward_hook(lambda m, i, o: seen.append(m.weight.requires_grad))
    try:
        bcosvit.explain(tiny, x)
        bcosvit.token_contributions(tiny, x)
        bcosvit.explain(tiny, x, create_graph=True)  # explanation-regularised training needs the graph
    finally:
        hook.remove()
        frozen.requires_grad_(True)
    assert seen == [False, False, True]
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in tiny.named_parameters()}
    with pytest.raises(ZeroDivisionError):  # restored when the pass fails too
        with attribution_state(tiny, input_gradients_only=True):
            assert not any(p.requires_grad for p in tiny.parameters())
            raise ZeroDivisionError
    assert all(p.requires_grad for p in tiny.parameters())


def test_create_graph_lets_a_loss_on_the_weights_train_the_parameters(tiny, images):
    x = images(2, 1, 8)
    e = bcosvit.explain(tiny, x, target=[1, 2], create_graph=True)
    assert e.weights.requires_grad
    assert all(p.grad is None for p in tiny.parameters())
    loss = e.weights.square().sum()
    loss.backward()
    grads = {n: p.grad for n, p in tiny.named_parameters()}
    for n in ("tokenizer.proj.weight", "head.weight", "blocks.0.mlp.fc1.weight", "blocks.0.attn.proj.weight"):
        assert grads[n] is not None and torch.isfinite(grads[n]).all() and grads[n].abs().sum() > 0, n
    # The attention matrix is a constant in explanation mode: the query/key weights get no signal.
    qk = grads["blocks.0.attn.qkv.weight"]
    assert qk is not None and qk[:32].abs().max() == 0 and qk[32:].abs().sum() > 0


# --- Errors ----------------------------------------------------------------------------------


def test_explain_on_standard_model_is_a_clear_config_error(build, images):
    model = build("vit_nano_patch4_28", depth=1)
    for fn in (
        lambda: bcosvit.explain(model, images(1, 1, 8)),
        lambda: bcosvit.token_contributions(model, images(1, 1, 8)),
        lambda: bcosvit.explain_unit(model, images(1, 1, 8), 1, 0, 0),
    ):
        with pytest.raises(bcosvit.ConfigError, match="B-cos models only"):
            fn()
    with pytest.raises(bcosvit.ConfigError, match="needs a bcosvit VisionTransformer"):
        bcosvit.explain(torch.nn.Linear(2, 2), images(1, 1, 8))


@pytest.mark.parametrize("target", [10, -1, [0, 10], [[0, 1], [2, 12]]])
def test_target_out_of_range_is_a_clear_input_error(tiny, images, target):
    with pytest.raises(bcosvit.InputError, match=r"class targets must lie in \[0, 9\]"):
        bcosvit.explain(tiny, images(2, 1, 8), target=target)


@pytest.mark.parametrize(
    "target", [[1, 2, 3], torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, 1, 1, dtype=torch.long)]
)
def test_wrong_target_shape_is_a_clear_input_error(tiny, images, target):
    with pytest.raises(bcosvit.InputError, match=r"one per image.*got shape"):
        bcosvit.explain(tiny, images(2, 1, 8), target=target)


def test_float_target_is_a_clear_input_error(tiny, images):
    with pytest.raises(bcosvit.InputError, match="must be integers"):
        bcosvit.explain(tiny, images(2, 1, 8), target=torch.tensor([1.0, 2.0]))


def test_explain_checks_images_like_the_model(tiny, images):
    with pytest.raises(bcosvit.InputError, match="expected 1 input channels, got 3"):
        bcosvit.explain(tiny, images(2, 3, 8))
    with pytest.raises(bcosvit.InputError, match="contain NaN or Inf"):
        bcosvit.explain(tiny, torch.full((1, 1, 8, 8), float("nan"), dtype=torch.float64))


def test_holistic_views_reject_bad_layer_token_and_channel(tiny, images):
    x = images(2, 1, 8)
    with pytest.raises(bcosvit.ConfigError, match=r"layer must lie in \[0, 1\]"):
        bcosvit.explain_unit(tiny, x, 2, 0, 0)
    with pytest.raises(bcosvit.ConfigError, match=r"layer must lie in \[0, 1\]"):
        bcosvit.token_contributions(tiny, x, layer=-3)
    with pytest.raises(bcosvit.InputError, match=r"token targets must lie in \[0, 3\]"):
        bcosvit.explain_unit(tiny, x, 1, 4, 0)
    with pytest.raises(bcosvit.InputError, match=r"channel targets must lie in \[0, 15\]"):
        bcosvit.explain_unit(tiny, x, 1, 0, 16)
    with pytest.raises(bcosvit.InputError, match="channel is required"):
        bcosvit.explain_unit(tiny, x, 1, 0, None)


def test_wrong_token_shape_message_names_tokens_correctly(tiny, images):
    with pytest.raises(bcosvit.InputError, match=r"a sequence of 2 tokens \(one per image\)"):
        bcosvit.explain_unit(tiny, images(2, 1, 8), 1, [0, 1, 2], 0)


def test_indexing_an_explanation_selects_images_and_keeps_the_batch_axis(tiny, images):
    x = images(3, 1, 8)
    e = bcosvit.explain(tiny, x, target=torch.tensor([[0, 1], [2, 3], [4, 5]]))
    one = e[1]
    assert len(one) == 1 and one.weights.shape == (1, 2, 2, 8, 8)
    torch.testing.assert_close(one.weights[0], e.weights[1])
    assert one.target.tolist() == [[2, 3]] and one.logit_bias == e.logit_bias
    assert len(e[torch.tensor([0, 2])]) == 2 and len(e[-1]) == 1


# --- Inputs: array-likes, dtypes, ranges, class names, autograd --------------------------------


def test_explain_computes_numpy_lists_and_other_dtypes_in_the_models_dtype(build, images):
    model = build("bcos_vit_nano_patch4_28", dtype=torch.float32, image_size=8, depth=1, embed_dim=16, num_heads=2)
    x = images(2, 1, 8)  # float64, as Quantus and Captum's metrics pass them
    reference = bcosvit.explain(model, x.float(), target=[1, 2])
    for given in (x, x.numpy(), x.tolist(), x.half()):
        e = bcosvit.explain(model, given, target=[1, 2])
        assert e.weights.dtype == e.contributions.dtype == e.logits.dtype == torch.float32
        tolerance = 2e-3 if isinstance(given, torch.Tensor) and given.dtype == torch.float16 else 1e-6
        torch.testing.assert_close(e.contributions, reference.contributions, rtol=tolerance, atol=tolerance)
    unit = bcosvit.explain_unit(model, x.numpy(), 1, 0, 3)
    assert unit.weights.dtype == torch.float32
    tokens = bcosvit.token_contributions(model, x.numpy(), target=[1, 2])
    assert tokens.dtype == torch.float32 and tokens.shape == (2, 1, 2, 2)


def test_explain_scales_uint8_images_by_255(tiny):
    pixels = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    from_uint8 = bcosvit.explain(tiny, pixels, target=[1, 2])
    from_floats = bcosvit.explain(tiny, pixels.double() / 255, target=[1, 2])
    torch.testing.assert_close(from_uint8.weights, from_floats.weights, rtol=0, atol=0)
    torch.testing.assert_close(from_uint8.inputs[:, :1], pixels.double() / 255, rtol=0, atol=0)


def test_explain_refuses_float_images_in_0_255_saying_to_divide_by_255(tiny, images):
    with pytest.raises(bcosvit.InputError, match="divide 8-bit images .* by 255"):
        bcosvit.explain(tiny, images(2, 1, 8) * 255)
    with pytest.raises(bcosvit.InputError, match="divide 8-bit images .* by 255"):
        bcosvit.token_contributions(tiny, (images(2, 1, 8) * 255).numpy())


@pytest.mark.parametrize("given", [torch.zeros(1, 1, 8, 8, dtype=torch.long), "images", [[["a"]]]])
def test_images_that_are_not_numbers_in_0_1_are_a_clear_input_error(tiny, given):
    with pytest.raises(bcosvit.InputError, match="expected"):
        bcosvit.explain(tiny, given)


def test_explain_under_inference_mode_says_explanations_need_autograd(tiny, images):
    x = images(2, 1, 8)
    with torch.inference_mode():
        for fn in (
            lambda: bcosvit.explain(tiny, x),
            lambda: bcosvit.explain_unit(tiny, x, 1, 0, 3),
            lambda: bcosvit.token_contributions(tiny, x),
        ):
            with pytest.raises(bcosvit.ConfigError, match=r"need autograd.*outside the inference_mode block"):
                fn()
        made_in_inference_mode = images(2, 1, 8)
    e = bcosvit.explain(tiny, made_in_inference_mode)  # its tensor, used outside the block, is fine
    assert (e.completeness_error / e.outputs.abs()).max() < 1e-10


def test_targets_may_be_class_names_when_the_model_has_them(build, images):
    names = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
    model = build("bcos_vit_nano_patch4_28", image_size=8, depth=1, embed_dim=16, num_heads=2, class_names=names)
    x = images(2, 1, 8)
    by_index = bcosvit.explain(model, x, target=[[8, 4], [8, 4]])
    by_name = bcosvit.explain(model, x, target=[["Bag", "coat"], ["bag", "Coat"]])
    assert by_name.target.tolist() == [[8, 4], [8, 4]]
    torch.testing.assert_close(by_name.weights, by_index.weights, rtol=0, atol=0)
    assert bcosvit.explain(model, x, target="Bag").target.tolist() == [[8], [8]]
    assert bcosvit.token_contributions(model, x, target=["Bag", "Boot"]).shape == (2, 1, 2, 2)
    with pytest.raises(bcosvit.InputError, match=r"unknown class 'Hat'; classes: \['T-shirt'"):
        bcosvit.explain(model, x, target="Hat")


def test_class_name_target_for_a_model_without_class_names_is_a_clear_input_error(tiny, images):
    with pytest.raises(bcosvit.InputError, match=r"'Bag' is a class name, but this model has no class names.*\[0, 9\]"):
        bcosvit.explain(tiny, images(2, 1, 8), target="Bag")


# --- Relative to a baseline; signed weights ---------------------------------------------------


@pytest.mark.parametrize("baseline", [0.0, 0.5, "per-pixel"])
def test_explain_with_a_baseline_contributions_sum_to_the_logit_minus_the_map_at_the_baseline(build, images, baseline):
    model = build("bcos_vit_nano_patch4_28", depth=2, image_size=8, in_chans=3)
    x = images(2, 3, 8)
    if baseline == "per-pixel":
        baseline = images(1, 3, 8)[0]
    b = torch.as_tensor(baseline, dtype=x.dtype).expand(x.shape[1:])
    x[1, :, :4] = b[:, :4]  # pixels already at the baseline contribute nothing
    plain = bcosvit.explain(model, x, target=[[1, 2], [3, 4]])
    relative = bcosvit.explain(model, x, target=[[1, 2], [3, 4]], baseline=baseline)

    encoded_b = _encoded(b[None])[:, None]  # (1, 1, 2C, H, W)
    torch.testing.assert_close(relative.weights, plain.weights, rtol=0, atol=0)
    torch.testing.assert_close(
        relative.contributions, (plain.weights * (_encoded(x)[:, None] - encoded_b)).sum(2), rtol=1e-12, atol=1e-12
    )
    map_at_baseline = (plain.weights * encoded_b).flatten(2).sum(2) + plain.positional + plain.logit_bias
    torch.testing.assert_close(relative.at_baseline, map_at_baseline, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        relative.contributions.flatten(2).sum(2), relative.outputs - map_at_baseline, rtol=1e-10, atol=1e-10
    )
    assert (relative.completeness_error / relative.outputs.abs()).max() < 1e-10
    assert (relative.contributions[1, :, :4] == 0).all()
    torch.testing.assert_close(plain.at_baseline, plain.positional + plain.logit_bias, rtol=0, atol=0)


def test_explain_rejects_a_baseline_that_does_not_fit_the_images(tiny, images):
    with pytest.raises(bcosvit.InputError, match=r"broadcastable to \(C, H, W\)"):
        bcosvit.explain(tiny, images(1, 1, 8), baseline=torch.zeros(3, 1, 1))
    with pytest.raises(bcosvit.InputError, match="divide 8-bit images"):
        bcosvit.explain(tiny, images(1, 1, 8), baseline=128.0)


def test_signed_weights_give_the_change_of_the_linear_map_for_a_change_of_the_image(build, images):
    model = build("bcos_vit_nano_patch4_28", depth=1, image_size=8, in_chans=3)
    x = images(2, 3, 8)
    e = bcosvit.explain(model, x, target=[[1, 2], [3, 4]])
    signed = e.signed_weights
    assert signed.shape == (2, 2, 3, 8, 8)
    torch.testing.assert_close(signed, e.weights[:, :, :3] - e.weights[:, :, 3:], rtol=0, atol=0)
    dx = 1e-3 * torch.randn_like(x)
    linear_change = (e.weights * (_encoded(x + dx) - _encoded(x))[:, None]).flatten(2).sum(2)
    torch.testing.assert_close((signed * dx[:, None]).flatten(2).sum(2), linear_change, rtol=1e-10, atol=1e-15)
    # It is the gradient of the logit with respect to the image when w(x) is held fixed (explanation mode).
    leaf = x.clone().requires_grad_(True)
    with bcosvit.explanation_mode(model):
        (grad,) = torch.autograd.grad(model(leaf)[:, 1].sum(), leaf)
    torch.testing.assert_close(grad[0], signed[0, 0], rtol=1e-10, atol=1e-12)


# --- One shape whatever the target's form; top-k targets; the input checked once -----------------


def _forward_count(model) -> list[int]:
    """A list whose length counts the model's forward passes from now on."""
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize(
    ("target", "num_targets"),
    [
        (None, 1),
        (4, 1),
        ("7", 1),
        ([4, 2, 0], 1),
        (torch.tensor([1, 2, 3]), 1),
        (torch.tensor(5), 1),
        ([[4], [2], [0]], 1),
        (torch.tensor([[0, 1], [2, 3], [4, 5]]), 2),
        (bcosvit.TopK(1), 1),
        (bcosvit.TopK(3), 3),
    ],
    ids=["none", "int", "digits", "list", "tensor", "scalar", "nested", "pairs", "top1", "top3"],
)
def test_every_target_form_keeps_the_target_axis(tiny, images, target, num_targets):
    x = images(3, 1, 8)
    e = bcosvit.explain(tiny, x, target, baseline=0.5)
    t = num_targets
    assert e.target.shape == e.outputs.shape == e.positional.shape == e.at_baseline.shape == (3, t)
    assert e.completeness_error.shape == e.relative_completeness_error.shape == (3, t)
    assert e.weights.shape == (3, t, 2, 8, 8) and e.signed_weights.shape == (3, t, 1, 8, 8)
    assert e.contributions.shape == (3, t, 8, 8) and e.inputs.shape == (3, 2, 8, 8) and e.logits.shape == (3, 10)
    assert e[0].weights.shape == (1, t, 2, 8, 8) and e[1:].target.shape == (2, t)
    assert bcosvit.token_contributions(tiny, x, target, layer=1).shape == (3, t, 2, 2)
    assert bcosvit.token_contributions(tiny, x, target, layer=[0, 1, -1]).shape == (3, t, 3, 2, 2)
    assert bcosvit.token_contributions(tiny, x, target, layer=(1,)).shape == (3, t, 1, 2, 2)


@pytest.mark.parametrize(
    ("channel", "num_targets"),
    [
        (3, 1),
        ("max", 1),
        ("norm", 1),
        ([1, 2, 3], 1),
        (torch.tensor([[1, 2], [3, 4], [5, 6]]), 2),
        (bcosvit.TopK(4), 4),
    ],
    ids=["int", "max", "norm", "list", "pairs", "top4"],
)
def test_every_channel_form_of_explain_unit_keeps_the_target_axis(tiny, images, channel, num_targets):
    e = bcosvit.explain_unit(tiny, images(3, 1, 8), 1, [0, 1, 3], channel)
    assert e.target.shape == e.outputs.shape == e.completeness_error.shape == (3, num_targets)
    assert e.weights.shape == (3, num_targets, 2, 8, 8) and e.contributions.shape == (3, num_targets, 8, 8)


def test_topk_explains_each_images_k_most_likely_classes_from_the_one_forward_pass(tiny, images):
    x = images(4, 1, 8)
    logits = tiny(x)
    top = logits.topk(3, dim=1).indices
    forwards = _forward_count(tiny)
    by_topk = bcosvit.explain(tiny, x, bcosvit.TopK(3))
    assert len(forwards) == 1  # the classes come from the logits of the explained pass
    assert torch.equal(by_topk.target, top)
    assert (by_topk.outputs[:, :-1] >= by_topk.outputs[:, 1:]).all()  # largest logit first
    given = bcosvit.explain(tiny, x, top)
    for name in ("logits", "target", "outputs", "weights", "contributions", "positional", "completeness_error"):
        assert torch.equal(getattr(by_topk, name), getattr(given, name)), name
    forwards.clear()
    tokens = bcosvit.token_contributions(tiny, x, bcosvit.TopK(2), layer=[0, 1])
    assert len(forwards) == 1
    assert torch.equal(tokens, bcosvit.token_contributions(tiny, x, top[:, :2], layer=[0, 1]))
    predicted = bcosvit.explain(tiny, x, bcosvit.TopK(1))
    assert torch.equal(predicted.weights, bcosvit.explain(tiny, x).weights)


def test_topk_channels_of_explain_unit_are_the_tokens_largest_channels(tiny, images):
    x = images(2, 1, 8)
    _, record = tiny(x, capture=Capture(layers=(1,)))
    largest = record.tokens[1][:, 2].detach().topk(3, dim=1).indices
    by_topk = bcosvit.explain_unit(tiny, x, 1, 2, bcosvit.TopK(3))
    assert torch.equal(by_topk.target, largest)
    assert torch.equal(by_topk.weights, bcosvit.explain_unit(tiny, x, 1, 2, largest).weights)


def test_topk_larger_than_the_number_of_classes_or_channels_is_a_clear_input_error(tiny, images):
    x = images(2, 1, 8)
    with pytest.raises(bcosvit.InputError, match=r"TopK\(11\) asks for 11 classes per image, but there are only 10"):
        bcosvit.explain(tiny, x, bcosvit.TopK(11))
    with pytest.raises(bcosvit.InputError, match="only 10"):
        bcosvit.token_contributions(tiny, x, bcosvit.TopK(11))
    with pytest.raises(bcosvit.InputError, match=r"TopK\(17\) asks for 17 channels per image, but there are only 16"):
        bcosvit.explain_unit(tiny, x, 1, 0, bcosvit.TopK(17))
    assert bcosvit.explain(tiny, x, bcosvit.TopK(10)).target.sort(dim=1).values.tolist() == [list(range(10))] * 2


def test_explanations_check_their_input_once_and_the_model_forward_still_checks(tiny, images, monkeypatch):
    checks: list[int] = []
    original = tiny.check_input
    monkeypatch.setattr(tiny, "check_input", lambda x: (checks.append(1), original(x))[1])
    x = images(2, 1, 8)
    for explain in (
        lambda: bcosvit.explain(tiny, x, bcosvit.TopK(2)),
        lambda: bcosvit.explain_unit(tiny, x, 1, 0, "max"),
        lambda: bcosvit.token_contributions(tiny, x, layer=[0, 1]),
    ):
        checks.clear()
        explain()
        assert len(checks) == 1
    checks.clear()
    tiny(x)
    assert len(checks) == 1
    with pytest.raises(bcosvit.InputError, match="divide 8-bit images"):
        tiny(x * 255)
    assert tiny(x * 255, check=False).shape == (2, 10)  # check=False: the caller has checked, nothing raises
