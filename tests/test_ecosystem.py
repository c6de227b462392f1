"""bcosvit models in the outside tools (``bcosvit.ecosystem``): Quantus' metric classes through
``quantus_explain``, Captum's metrics on ``BcosAttribution`` / ``PosthocAttribution``, and
pytorch-grad-cam with ``gradcam_reshape_transform`` / ``gradcam_target_layers``, all with the real
packages on tiny models.
"""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch
from captum.metrics import infidelity, infidelity_perturb_func_decorator, sensitivity_max
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import bcosvit
from bcosvit.ecosystem import FocusMosaics, exact_channel_maps, patch_quantus_for_numpy2
from bcosvit.metrics import positive_mass_per_cell

TINY = dict(image_size=8, embed_dim=8, depth=1, num_heads=2)  # 8×8 greyscale images, 2×2 tokens
BCOS, TWIN = "bcos_vit_nano_patch4_28", "vit_nano_patch4_28"


@pytest.fixture(scope="module", autouse=True)
def _quantus_on_numpy2() -> None:
    patch_quantus_for_numpy2()  # Quantus 0.6.0 integrates with np.trapz, which numpy 2.4 removed


def _model(name: str = BCOS, dtype: torch.dtype = torch.float32, **overrides) -> bcosvit.VisionTransformer:
    return bcosvit.create_model(name, **{**TINY, **overrides}).to(dtype).eval()


def _batch(n: int = 4, c: int = 1, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Quantus' inputs: float32 numpy images ``(n, c, size, size)`` in [0, 1] and int64 targets ``(n,)``."""
    rng = np.random.default_rng(seed)
    return rng.random((n, c, size, size), dtype=np.float32), rng.integers(0, 10, n)


def _kwargs(model: bcosvit.VisionTransformer) -> dict:
    """The explanation each model has: the exact one for a B-cos model, input × gradient for its twin."""
    return {} if _unwrapped(model).is_bcos else {"method": "input_x_gradient"}


def _unwrapped(model):
    return model.model if isinstance(model, bcosvit.CastInputs) else model


# --- quantus_explain: the contract -------------------------------------------------------------


def test_quantus_explain_returns_float32_numpy_batch_first_shaped_as_quantus_takes_it():
    model = _model(in_chans=3)
    x, y = _batch(3, c=3)
    for inputs in (x, x.astype(np.float64), torch.as_tensor(x)):
        for kind in bcosvit.ecosystem.KINDS:
            reduced = bcosvit.quantus_explain(model, inputs, y, kind=kind)
            per_channel = bcosvit.quantus_explain(model, inputs, y, kind=kind, reduce_channels=False)
            assert isinstance(reduced, np.ndarray) and reduced.dtype == per_channel.dtype == np.float32
            assert reduced.shape == (3, 1, 8, 8) and per_channel.shape == (3, 3, 8, 8)
            np.testing.assert_allclose(per_channel.sum(axis=1, keepdims=True), reduced, rtol=1e-5, atol=1e-6)
    twin = _model(TWIN, in_chans=3)
    maps = bcosvit.quantus_explain(twin, x, y.astype(np.int32), method="integrated_gradients", n_steps=4)
    assert maps.shape == (3, 1, 8, 8) and maps.dtype == np.float32
    expected = bcosvit.attribution.attribute("integrated_gradients", twin, x, y, n_steps=4)
    np.testing.assert_allclose(maps[:, 0], expected.numpy(), rtol=1e-6)
    one_target = bcosvit.quantus_explain(model, x, np.int64(4))
    np.testing.assert_allclose(one_target, bcosvit.quantus_explain(model, x, np.full(3, 4)))


def test_quantus_explain_refuses_what_it_cannot_do():
    x, y = _batch(2)
    with pytest.raises(bcosvit.ConfigError, match="standard model.*method="):
        bcosvit.quantus_explain(_model(TWIN), x, y)
    with pytest.raises(bcosvit.ConfigError, match="summed over channels"):
        bcosvit.quantus_explain(_model(TWIN), x, y, method="gradient", reduce_channels=False)
    with pytest.raises(bcosvit.ConfigError, match="unknown option.*n_steps"):
        bcosvit.quantus_explain(_model(), x, y, n_steps=4)
    with pytest.raises(bcosvit.ConfigError, match="kind must be one of"):
        bcosvit.quantus_explain(_model(), x, y, kind="signed")
    with pytest.raises(bcosvit.ConfigError, match="takes none"):
        bcosvit.quantus_explain(_model(), x, y, kind="weights", baseline=0.5)


def test_contributions_add_up_to_the_logit_minus_positional_and_logit_bias(build):
    model = build(BCOS, **TINY)  # float64: Quantus' float32 inputs are computed in the model's dtype
    x, y = _batch(4)
    maps = bcosvit.quantus_explain(model, x, y)
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float64)).gather(1, torch.as_tensor(y)[:, None])[:, 0]
    positional = bcosvit.explain(model, x, y).positional[:, 0]
    assert model.logit_bias_value < 0 and positional.abs().min() > 1e-3  # both terms are there to subtract
    expected = logits - positional - model.logit_bias_value
    np.testing.assert_allclose(maps.reshape(4, -1).sum(axis=1, dtype=np.float64), expected.numpy(), rtol=1e-5)


def test_channel_maps_fold_the_pairs_of_the_encoding_x_and_1_minus_x(build, images):
    model = build(BCOS, **TINY, in_chans=3)
    x, y = images(3, 3, 8), torch.tensor([2, 5, 7])
    explanation = bcosvit.explain(model, x, y)
    weights = exact_channel_maps(model, x, y, kind="weights")
    contributions = exact_channel_maps(model, x, y)
    w = explanation.weights[:, 0]
    torch.testing.assert_close(weights, w[:, :3] - w[:, 3:])
    torch.testing.assert_close(contributions, w[:, :3] * x + w[:, 3:] * (1 - x))
    torch.testing.assert_close(contributions.sum(dim=1), explanation.contributions[:, 0])
    # the weights are the gradient of the dynamic linear map with respect to the image itself
    with bcosvit.explanation_mode(model):
        leaf = x.clone().requires_grad_()
        (gradient,) = torch.autograd.grad(model(leaf).gather(1, y[:, None]).sum(), leaf)
    torch.testing.assert_close(weights, gradient)
    # relative to a baseline b: (w_x - w_(1-x)) · (x - b), adding up to explain(..., baseline=b)'s contributions
    for baseline in (0.3, torch.rand(3, 1, 1, dtype=torch.float64), torch.rand(3, 3, 8, 8, dtype=torch.float64)):
        relative = exact_channel_maps(model, x, y, baseline=baseline)
        b = torch.as_tensor(baseline, dtype=torch.float64)
        torch.testing.assert_close(relative, weights * (x - b))
        if b.ndim < 4:
            expected = bcosvit.explain(model, x, y, baseline=baseline).contributions[:, 0]
            torch.testing.assert_close(relative.sum(dim=1), expected)


# --- Real Quantus metrics through quantus_explain -----------------------------------------------


@pytest.mark.parametrize("name", [BCOS, TWIN])
def test_quantus_pixel_flipping_areas_are_the_trapezoid_areas_of_its_curves(name):
    model = _model(name)
    x, y = _batch(4)
    args = dict(model=model, x_batch=x, y_batch=y, explain_func=bcosvit.quantus_explain, device="cpu")
    args["explain_func_kwargs"] = _kwargs(model)
    settings = dict(features_in_step=8, perturb_baseline="black", disable_warnings=True)
    curves = quantus.PixelFlipping(**settings)(**args)
    areas = quantus.PixelFlipping(**settings, return_auc_per_sample=True)(**args)
    assert np.asarray(curves).shape == (4, 8) and np.isfinite(curves).all()
    np.testing.assert_allclose(areas, np.trapezoid(np.asarray(curves), axis=1), rtol=1e-6)


def test_the_numpy2_patch_replaces_quantus_integration_only_where_numpy_lacks_trapz():
    from quantus.helpers import utils

    patched = patch_quantus_for_numpy2()
    assert patched == (not hasattr(np, "trapz"))
    assert patch_quantus_for_numpy2() == patched  # idempotent
    assert getattr(utils.calculate_auc, "bcosvit_patch", False) == patched
    curves = np.array([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])
    np.testing.assert_allclose(utils.calculate_auc(curves, batched=True), [2.5, 4.0])
    np.testing.assert_allclose(utils.calculate_auc(curves[0]), 2.5)


def test_quantus_faithfulness_correlation_runs_on_both_families():
    for model in (_model(), _model(TWIN)):
        x, y = _batch(3)
        metric = quantus.FaithfulnessCorrelation(
            nr_runs=5, subset_size=8, perturb_baseline="black", return_aggregate=False, disable_warnings=True
        )
        kwargs = _kwargs(model)
        scores = metric(
            model=model, x_batch=x, y_batch=y, explain_func=bcosvit.quantus_explain, explain_func_kwargs=kwargs
        )
        assert len(scores) == 3 and np.isfinite(scores).all() and all(-1 <= s <= 1 for s in scores)


def test_focus_mosaics_put_two_target_images_where_custom_batch_says():
    images = torch.rand(12, 1, 8, 8, dtype=torch.float64)
    labels = torch.arange(12) % 4
    mosaics = bcosvit.focus_mosaics(images, labels, 6, seed=3)
    assert isinstance(mosaics, FocusMosaics)
    assert mosaics.x_batch.shape == (6, 1, 16, 16) and mosaics.x_batch.dtype == np.float32
    assert mosaics.y_batch.shape == (6,) and mosaics.custom_batch.shape == (6, 4)
    assert (mosaics.custom_batch.sum(axis=1) == 2).all()
    for mosaic, target, positions in zip(*mosaics):
        quadrants = [mosaic[:, :8, :8], mosaic[:, :8, 8:], mosaic[:, 8:, :8], mosaic[:, 8:, 8:]]  # Focus' order
        for quadrant, is_target in zip(quadrants, positions):
            (match,) = [i for i in range(12) if np.allclose(quadrant, images[i].numpy(), atol=1e-7)]
            assert (labels[match] == target) == bool(is_target)
    again = bcosvit.focus_mosaics(images, labels, 6, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(mosaics, again))
    with pytest.raises(bcosvit.InputError, match="class with two images"):
        bcosvit.focus_mosaics(images[:4], labels[:4], 1)


def test_quantus_focus_scores_the_positive_share_of_the_target_quadrants():
    model = _model()
    images, labels = torch.rand(12, 1, 8, 8), torch.arange(12) % 4
    mosaics = bcosvit.focus_mosaics(images, labels, 4)
    scores = quantus.Focus(disable_warnings=True)(
        model=model, **mosaics._asdict(), explain_func=bcosvit.quantus_explain, device="cpu"
    )
    maps = bcosvit.explain(model, mosaics.x_batch, torch.as_tensor(mosaics.y_batch)).contributions[:, 0]
    mass = positive_mass_per_cell(maps, 2).double()  # (M, 4), cells row-major
    expected = (mass * torch.as_tensor(mosaics.custom_batch)).sum(dim=1) / mass.sum(dim=1)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4)


def test_quantus_randomisation_and_complexity_metrics_run_through_quantus_explain():
    model = _model()
    x, y = _batch(4)
    args = dict(model=model, x_batch=x, y_batch=y, explain_func=bcosvit.quantus_explain, device="cpu")
    random_logit = quantus.RandomLogit(num_classes=10, seed=0, disable_warnings=True)(**args)
    sparseness = quantus.Sparseness(disable_warnings=True)(**args, explain_func_kwargs={"reduce_channels": False})
    complexity = quantus.Complexity(disable_warnings=True)(**args)
    assert len(random_logit) == 4 and np.isfinite(random_logit).all()
    assert all(0 <= s <= 1 for s in sparseness) and np.isfinite(complexity).all()


@pytest.mark.parametrize("metric", ["MaxSensitivity", "LocalLipschitzEstimate"])
@pytest.mark.parametrize("name", [BCOS, TWIN])
def test_quantus_robustness_explains_the_perturbed_batches(metric, name):
    model = _model(name)
    x, y = _batch(3)
    seen = []

    def explain(model, inputs, targets, **kwargs):
        seen.append(inputs.copy())
        return bcosvit.quantus_explain(model, inputs, targets, **kwargs)

    scores = getattr(quantus, metric)(nr_samples=3, disable_warnings=True)(
        model=model, x_batch=x, y_batch=y, explain_func=explain, explain_func_kwargs=_kwargs(model), device="cpu"
    )
    assert len(scores) == 3 and np.isfinite(scores).all() and all(s > 0 for s in scores)
    perturbed = [batch for batch in seen if not np.array_equal(batch, x)]
    assert len(perturbed) == 3 and all(batch.shape == x.shape for batch in perturbed)


# --- float64 models ------------------------------------------------------------------------------


def test_a_float64_model_refuses_quantus_float32_predictions_until_wrapped_in_cast_inputs(build):
    model = build(BCOS, **TINY)
    x, y = _batch(3)
    metric = quantus.PixelFlipping(features_in_step=16, return_auc_per_sample=True, disable_warnings=True)
    with pytest.raises(bcosvit.InputError, match="dtype torch.float32 but the model has torch.float64"):
        metric(model=model, x_batch=x, y_batch=y, explain_func=bcosvit.quantus_explain, device="cpu")
    wrapped = bcosvit.CastInputs(model)
    assert not wrapped.training and wrapped.model is model
    areas = metric(model=wrapped, x_batch=x, y_batch=y, explain_func=bcosvit.quantus_explain, device="cpu")
    assert len(areas) == 3 and np.isfinite(areas).all()
    robustness = quantus.MaxSensitivity(nr_samples=2, disable_warnings=True)
    assert np.isfinite(robustness(model=wrapped, x_batch=x, y_batch=y, explain_func=bcosvit.quantus_explain)).all()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(torch.as_tensor(x)), model(torch.as_tensor(x, dtype=torch.float64)))
    np.testing.assert_array_equal(bcosvit.quantus_explain(wrapped, x, y), bcosvit.quantus_explain(model, x, y))
    randomised = quantus.MPRT(disable_warnings=True)(
        model=wrapped, x_batch=x, y_batch=y, explain_func=bcosvit.quantus_explain
    )  # every layer of the wrapped model, re-initialised in turn, explained in float64
    owners = [f"model.{n}" for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    assert list(randomised) == ["original", *owners[::-1]]
    assert all(np.isfinite(s).all() for s in randomised.values())


# --- Captum ----------------------------------------------------------------------------------------


def test_bcos_attribution_is_a_captum_attribution_shaped_like_its_inputs(build, images):
    from captum.attr import GradientAttribution

    model = build(BCOS, **TINY, in_chans=3)
    x, y = images(2, 3, 8), torch.tensor([1, 4])
    attribution = bcosvit.BcosAttribution(model)
    assert isinstance(attribution, GradientAttribution) and attribution.multiplies_by_inputs
    maps = attribution.attribute(x, target=y)
    assert maps.shape == x.shape and maps.dtype == x.dtype and not maps.requires_grad
    torch.testing.assert_close(maps, exact_channel_maps(model, x, y))
    (as_tuple,) = attribution.attribute((x,), target=y)
    torch.testing.assert_close(as_tuple, maps)
    weights = bcosvit.BcosAttribution(model, kind="weights")
    assert not weights.multiplies_by_inputs
    torch.testing.assert_close(
        weights.attribute(x.float(), target=y), exact_channel_maps(model, x, y, kind="weights").float()
    )
    with pytest.raises(bcosvit.ConfigError, match="standard model"):
        bcosvit.BcosAttribution(build(TWIN, **TINY))


def test_captum_infidelity_of_the_exact_weights_is_exactly_how_much_the_dynamic_weights_move(build, images):
    """``I·(w_x - w_(1-x))`` is the change of the explanation's linear map at ``x``; ``f(x) - f(x - I)``
    is that change plus ``(w(x - I) - w(x))·[x - I, 1 - x + I] + positional(x - I) - positional(x)``:
    infidelity is the square of that term, 0 only where the dynamic weights do not move."""
    model = build(BCOS, **TINY)
    x, y = images(3, 1, 8), torch.tensor([1, 3, 5])
    noise = 0.05 * torch.randn(3, 1, 8, 8, dtype=torch.float64)

    def perturb(inputs):
        return noise, inputs - noise

    weights = bcosvit.BcosAttribution(model, kind="weights").attribute(x, target=y)
    score = infidelity(model, perturb, x, weights, target=y, n_perturb_samples=1, normalize=False)
    at_x, at_perturbed = bcosvit.explain(model, x, y), bcosvit.explain(model, x - noise, y)
    moved = ((at_perturbed.weights - at_x.weights)[:, 0] * at_perturbed.inputs).flatten(1).sum(dim=1)
    moved = moved + (at_perturbed.positional - at_x.positional)[:, 0]
    torch.testing.assert_close(score, moved**2, rtol=1e-6, atol=1e-12)
    assert (score > 0).all()  # a random model's weights do move

    # the contributions relative to b with "multiplied by inputs" perturbations I / (x - b): the same products
    @infidelity_perturb_func_decorator(True)
    def perturb_by_inputs(inputs, baselines):
        return inputs - noise

    contributions = bcosvit.BcosAttribution(model).attribute(x, target=y, baselines=0.25)
    by_inputs = infidelity(
        model, perturb_by_inputs, x, contributions, baselines=0.25, target=y, n_perturb_samples=1, normalize=False
    )
    torch.testing.assert_close(by_inputs, score, rtol=1e-6, atol=1e-12)
    zero = infidelity(model, lambda inputs: (0 * inputs, inputs), x, weights, target=y, n_perturb_samples=2)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_captum_sensitivity_max_runs_on_the_exact_and_the_posthoc_attributions(build, images):
    model, twin = build(BCOS, **TINY), build(TWIN, **TINY)
    x, y = images(2, 1, 8), torch.tensor([1, 3])
    for attribution in (
        bcosvit.BcosAttribution(model),
        bcosvit.BcosAttribution(model, kind="weights"),
        bcosvit.PosthocAttribution(twin, "rollout"),
        bcosvit.PosthocAttribution(twin, "integrated_gradients", n_steps=4),
    ):
        score = sensitivity_max(attribution.attribute, x, target=y, n_perturb_samples=3)
        assert score.shape == (2,) and torch.isfinite(score).all() and (score >= 0).all()
    posthoc = bcosvit.PosthocAttribution(twin, "transformer_attribution").attribute(x, target=y)
    expected = bcosvit.attribution.attribute("transformer_attribution", twin, x, y)
    assert posthoc.shape == (2, 1, 8, 8) and posthoc.dtype == torch.float64
    torch.testing.assert_close(posthoc[:, 0], expected.double())
    with pytest.raises(bcosvit.ConfigError, match="unknown attribution method"):
        bcosvit.PosthocAttribution(twin, "lime")


# --- pytorch-grad-cam -------------------------------------------------------------------------------


def test_gradcam_target_layers_are_the_last_block_or_its_first_norm_for_a_class_token_model():
    mean_pooled, class_token = _model(), _model(class_token=True, global_pool="token")
    assert bcosvit.gradcam_target_layers(mean_pooled) == [mean_pooled.blocks[-1]]
    assert bcosvit.gradcam_target_layers(class_token) == [class_token.blocks[-1].norm1]
    assert bcosvit.gradcam_target_layers(bcosvit.CastInputs(mean_pooled)) == [mean_pooled.blocks[-1]]


def test_gradcam_reshape_transform_drops_the_prefix_tokens_and_lays_out_the_grid_row_major():
    model = _model(class_token=True, global_pool="token", reg_tokens=2)
    tokens = torch.arange(3 + 6, dtype=torch.float32)[None, :, None].expand(2, -1, 5)  # token index as value
    grid = bcosvit.gradcam_reshape_transform(model, input_size=(8, 12))(tokens)  # 2×3 patch tokens
    assert grid.shape == (2, 5, 2, 3)
    assert grid[0, 0].tolist() == [[3, 4, 5], [6, 7, 8]]
    square = bcosvit.gradcam_reshape_transform(model)(torch.zeros(1, 3 + 4, 5))
    assert square.shape == (1, 5, 2, 2)
    with pytest.raises(bcosvit.InputError, match="input_size"):
        bcosvit.gradcam_reshape_transform(model)(tokens)


def _gradcam(model, x, targets, transform=None, layers=None) -> np.ndarray:
    layers = bcosvit.gradcam_target_layers(model) if layers is None else layers
    with GradCAM(model, layers, reshape_transform=transform or bcosvit.gradcam_reshape_transform(model)) as cam:
        return cam(x, targets=[ClassifierOutputTarget(int(k)) for k in targets])


@pytest.mark.parametrize("name", [BCOS, TWIN])
def test_pytorch_grad_cam_with_our_transform_is_our_gradcam_and_a_dropped_token_0_is_not(name):
    model = bcosvit.create_model(name, depth=2).eval()  # mean-pooled, no class token: 7×7 tokens
    x, y = torch.rand(3, 1, 28, 28), [1, 3, 5]
    cam = _gradcam(model, x, y)
    assert cam.shape == (3, 28, 28) and np.isfinite(cam).all()
    ours = bcosvit.attribution.attribute("gradcam", model, x, y).numpy()
    ours = ours - ours.min(axis=(1, 2), keepdims=True)
    ours = ours / (1e-7 + ours.max(axis=(1, 2), keepdims=True))  # pytorch-grad-cam scales each map to [0, 1]
    np.testing.assert_allclose(cam, ours, atol=1e-3)
    transform = bcosvit.gradcam_reshape_transform(model)

    def drops_token_0(tokens):  # the ViT tutorial's recipe, padded back to 7×7 with the last token
        return transform(torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1))

    wrong = _gradcam(model, x, y, drops_token_0)
    assert np.abs(wrong - cam).max() > 0.1


@pytest.mark.parametrize("name", [BCOS, TWIN])
def test_pytorch_grad_cam_on_a_class_token_model_needs_the_last_blocks_norm(name):
    model = bcosvit.create_model(name, depth=2, class_token=True, global_pool="token").eval()
    x, y = torch.rand(2, 1, 28, 28), [2, 7]
    cam = _gradcam(model, x, y)
    assert cam.shape == (2, 28, 28) and np.isfinite(cam).all() and (cam.max(axis=(1, 2)) > 0.5).all()
    after_the_last_block = _gradcam(model, x, y, layers=[model.blocks[-1]])
    assert not after_the_last_block.any()  # the head reads token 0 only: the patch tokens' gradients are 0


def test_pytorch_grad_cam_on_a_non_square_input_with_the_input_size():
    model = bcosvit.create_model(BCOS, depth=1).eval()
    x = torch.rand(2, 1, 28, 36)
    transform = bcosvit.gradcam_reshape_transform(model, input_size=x.shape[-2:])
    cam = _gradcam(model, x, [0, 1], transform)
    assert cam.shape == (2, 28, 36) and np.isfinite(cam).all()
