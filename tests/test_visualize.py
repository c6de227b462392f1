"""Tests of bcosvit.visualize: colour explanations (docs/design.md: colour explanation), contribution maps,
overlays, files, figures."""

from __future__ import annotations

import dataclasses

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import bcosvit
from bcosvit import visualize
from bcosvit.visualize import (
    colour_explanation,
    contribution_map,
    explanation_figure,
    overlay,
    save_figure,
    save_png,
    to_display_image,
)


def _random_pair(channels: int, size: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(2 * channels, size, size))
    x = rng.uniform(size=(channels, size, size))
    return weights, np.concatenate([x, 1 - x])


def _pixel_case(pixels: list[list[float]], x: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Weights for a 1 x len(pixels) image, one list of 2C weights per pixel; inputs constant x / 1-x."""
    weights = np.array(pixels, dtype=np.float64).T[:, None, :]  # (2C, 1, P)
    c = weights.shape[0] // 2
    inputs = np.concatenate([np.full((c, 1, weights.shape[2]), x), np.full((c, 1, weights.shape[2]), 1 - x)])
    return weights, inputs


# ------------------------------------------------------------------------------------------------
# colour_explanation: shapes, dtypes, ranges


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_colour_explanation_shape_dtype_range(channels):
    weights, inputs = _random_pair(channels, size=7)
    rgba = colour_explanation(weights, inputs)
    assert rgba.shape == (7, 7, 4)
    assert rgba.dtype == np.float32
    assert np.isfinite(rgba).all()
    assert rgba.min() >= 0.0 and rgba.max() <= 1.0
    assert rgba[..., 3].max() == pytest.approx(1.0)  # the percentile maps to full opacity
    if channels == 1:
        np.testing.assert_array_equal(rgba[..., 0], rgba[..., 1])
        np.testing.assert_array_equal(rgba[..., 0], rgba[..., 2])
    if channels == 2:
        np.testing.assert_array_equal(rgba[..., 2], 0.0)


def test_colour_explanation_batch_matches_single_images_and_accepts_tensors():
    pairs = [_random_pair(3, size=5, seed=s) for s in range(3)]
    weights = np.stack([w for w, _ in pairs])
    inputs = np.stack([x for _, x in pairs])
    batch = colour_explanation(torch.from_numpy(weights).float(), torch.from_numpy(inputs).float(), smooth=3)
    assert batch.shape == (3, 5, 5, 4) and batch.dtype == np.float32
    for i, (w, x) in enumerate(pairs):
        np.testing.assert_allclose(batch[i], colour_explanation(w, x, smooth=3), atol=1e-5)


def test_colour_explanation_accepts_tensors_with_grad():
    weights, inputs = _random_pair(1)
    w = torch.tensor(weights, requires_grad=True)
    np.testing.assert_allclose(colour_explanation(w, torch.tensor(inputs)), colour_explanation(weights, inputs))


# ------------------------------------------------------------------------------------------------
# colour_explanation: hand-computed values


def test_colour_is_ratio_of_positive_to_negative_channel_greyscale():
    # w_0 vs w_1 (C = 1): all weight on x -> 1, all on 1-x -> 0, equal -> 0.5, 3:1 -> 0.75;
    # negative weights are clamped to 0 before the ratio: (1, -1) -> 1, (-1, 2) -> 0
    weights, inputs = _pixel_case([[1, 0], [0, 1], [1, 1], [3, 1], [2, -1], [1, -1], [-1, 2]])
    rgba = colour_explanation(weights, inputs, percentile=100)
    expected = np.array([1.0, 0.0, 0.5, 0.75, 1.0, 1.0, 0.0])
    for k in range(3):
        np.testing.assert_allclose(rgba[0, :, k], expected, atol=1e-6)


def test_colour_rgb_channels_and_zero_over_zero():
    # C = 3; pixel 0: only G positive -> (0, 1, 0); pixel 1: R on x, G on 1-x, B equal -> (1, 0, .5)
    # pixel 2: all weights negative (clamped away) -> colour 0
    weights, inputs = _pixel_case(
        [
            [0, 2, 0, 0, 0, 0],
            [1, 0, 1, 0, 1, 1],
            [-1, -1, -1, -1, -1, -1],
        ]
    )
    rgba = colour_explanation(weights, inputs, percentile=100)
    np.testing.assert_allclose(rgba[0, 0, :3], [0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(rgba[0, 1, :3], [1, 0, 0.5], atol=1e-6)
    np.testing.assert_allclose(rgba[0, 2, :3], [0, 0, 0], atol=1e-6)


def test_colour_two_and_more_than_three_channels():
    # C = 2: R and G from the two channels, B = 0
    weights, inputs = _pixel_case([[1, 0, 0, 1]])
    np.testing.assert_allclose(colour_explanation(weights, inputs)[0, 0, :3], [1, 0, 0], atol=1e-6)
    # C = 4: the first three channels are shown; weight only on the 4th gives black but opaque
    weights, inputs = _pixel_case([[0, 0, 0, 5, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    rgba = colour_explanation(weights, inputs, percentile=100)
    np.testing.assert_allclose(rgba[0, 0], [0, 0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(rgba[0, 1], [1, 1, 1, 2 / 5], atol=1e-6)


def test_alpha_is_weight_norm_and_zero_where_contribution_negative():
    # x = 1: contribution = w_0. Norms: 5, 10, 5 (negative contribution), 0
    weights, inputs = _pixel_case([[3, 4], [6, 8], [-3, 4], [0, 0]], x=1.0)
    rgba = colour_explanation(weights, inputs, percentile=100)
    np.testing.assert_allclose(rgba[0, :, 3], [0.5, 1.0, 0.0, 0.0], atol=1e-6)
    # all-zero weights: transparent everywhere, no NaN
    zero = colour_explanation(np.zeros((2, 3, 3)), np.ones((2, 3, 3)))
    assert np.isfinite(zero).all()
    np.testing.assert_array_equal(zero, 0.0)


def test_alpha_percentile_clipping():
    values = np.arange(1, 101, dtype=np.float64).reshape(10, 10)
    weights = np.stack([values, np.zeros_like(values)])
    inputs = np.full_like(weights, 0.5)
    scale = np.percentile(values, 50)  # 50.5
    alpha = colour_explanation(weights, inputs, percentile=50)[..., 3]
    np.testing.assert_allclose(alpha, np.clip(values / scale, 0, 1), atol=1e-6)
    assert (alpha == 1.0).sum() == 50  # everything above the percentile saturates
    alpha_default = colour_explanation(weights, inputs)[..., 3]
    np.testing.assert_allclose(alpha_default, np.clip(values / np.percentile(values, 99.5), 0, 1), atol=1e-6)


def test_alpha_percentile_falls_back_to_max_when_percentile_is_zero():
    weights = np.zeros((2, 20, 20))
    weights[0, 3, 4] = 2.0  # one pixel of 400: the 99.5th percentile is 0
    alpha = colour_explanation(weights, np.full_like(weights, 0.5))[..., 3]
    assert alpha[3, 4] == pytest.approx(1.0)
    assert alpha.sum() == pytest.approx(1.0)


def test_alpha_smoothing_same_size_and_spreads():
    weights = np.zeros((2, 9, 9))
    weights[0, 4, 4] = 1.0
    weights[0, 0, 0] = 1.0
    inputs = np.full_like(weights, 0.5)
    for smooth in (0, 1):
        alpha = colour_explanation(weights, inputs, smooth=smooth, percentile=100)[..., 3]
        assert np.count_nonzero(alpha) == 2
    alpha = colour_explanation(weights, inputs, smooth=3, percentile=100)[..., 3]
    assert alpha.shape == (9, 9)
    assert np.count_nonzero(alpha[2:7, 2:7]) == 9  # the centre pixel spread over its 3x3 window
    assert alpha[0, 0] == pytest.approx(1.0)  # corner window has 4 pixels in the image: 1/4 is the max
    assert alpha[4, 4] == pytest.approx(4 / 9)
    # even window sizes keep the size too
    assert colour_explanation(weights, inputs, smooth=4).shape == (9, 9, 4)
    # a constant map stays constant (borders are not darkened)
    flat = colour_explanation(np.ones((2, 5, 5)), np.full((2, 5, 5), 0.5), smooth=5)[..., 3]
    np.testing.assert_allclose(flat, 1.0)


# ------------------------------------------------------------------------------------------------
# colour_explanation: errors


@pytest.mark.parametrize(
    ("weights_shape", "inputs_shape", "message"),
    [
        ((5, 4, 4), (5, 4, 4), r"expected an even number of channels \[x, 1-x\], got 5"),
        ((4, 4), (4, 4), r"\(2C, H, W\) or \(N, 2C, H, W\), got \(4, 4\)"),
        ((1, 2, 2, 4, 4), (1, 2, 4, 4), r"an explanation's weights \(N, T, 2C, H, W\): pass weights\[:, t\]"),
        ((2, 4, 4), (2, 4, 5), r"inputs must have the shape of weights \(2, 4, 4\)"),
        ((2, 4, 4), (1, 2, 4, 4), r"inputs must have the shape of weights"),
        ((0, 4, 4), (0, 4, 4), r"non-empty"),
    ],
)
def test_colour_explanation_bad_shapes(weights_shape, inputs_shape, message):
    with pytest.raises(ValueError, match=message):
        colour_explanation(np.ones(weights_shape), np.ones(inputs_shape))


def test_colour_explanation_bad_values_and_options():
    weights, inputs = _random_pair(1)
    bad = weights.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="weights contains NaN or Inf"):
        colour_explanation(bad, inputs)
    for percentile in (0, -1, 100.5):
        with pytest.raises(ValueError, match=r"percentile must lie in \(0, 100\]"):
            colour_explanation(weights, inputs, percentile=percentile)
    for smooth in (-1, 2.5, True):
        with pytest.raises(ValueError, match="smooth must be a non-negative int"):
            colour_explanation(weights, inputs, smooth=smooth)


# ------------------------------------------------------------------------------------------------
# contribution_map


def test_contribution_map_centre_white_ends_saturated():
    values = np.array([[-2.0, -1.0, 0.0, 1.0, 2.0]])
    rgba = contribution_map(values, percentile=100)
    assert rgba.shape == (1, 5, 4) and rgba.dtype == np.float32
    np.testing.assert_allclose(rgba[0, 2], [1, 1, 1, 1])  # 0 -> white
    np.testing.assert_allclose(rgba[0, 4], [1, 0, 0, 1])  # max positive -> red
    np.testing.assert_allclose(rgba[0, 0], [0, 0, 1, 1])  # max negative -> blue
    # symmetric: +v and -v are mirror colours (R <-> B)
    np.testing.assert_allclose(rgba[0, 3, [0, 1, 2]], rgba[0, 1, [2, 1, 0]], atol=1e-6)
    assert 0 < rgba[0, 3, 1] < 1  # half-way is a lighter red


def test_contribution_map_zero_map_is_white_and_percentile_clips():
    np.testing.assert_allclose(contribution_map(np.zeros((3, 3))), 1.0)
    values = np.linspace(-1, 1, 101)[None].repeat(3, axis=0)
    values[0, 0] = -100.0  # an outlier: without clipping everything else would be white-ish
    rgba = contribution_map(values, percentile=95)
    assert np.allclose(rgba[1, -1], [1, 0, 0, 1])  # +1 saturates after clipping
    loose = contribution_map(values, percentile=100)
    assert loose[1, -1, 1] > 0.9  # +1 is almost white next to a -100 outlier


def test_contribution_map_batch_and_tensor_and_errors():
    values = torch.randn(2, 4, 5)
    batch = contribution_map(values)
    assert batch.shape == (2, 4, 5, 4)
    np.testing.assert_allclose(batch[1], contribution_map(values[1]), atol=1e-6)
    assert 0 <= batch.min() and batch.max() <= 1
    with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\), got \(1, 2, 4, 5\) .*pass contributions\[:, t\]"):
        contribution_map(np.zeros((1, 2, 4, 5)))
    with pytest.raises(ValueError, match="unknown matplotlib colour map 'nope'"):
        contribution_map(np.zeros((2, 2)), cmap="nope")
    with pytest.raises(ValueError, match="percentile"):
        contribution_map(np.zeros((2, 2)), percentile=0)


# ------------------------------------------------------------------------------------------------
# to_display_image / overlay


def test_to_display_image_layouts():
    rng = np.random.default_rng(1)
    chw = rng.uniform(size=(3, 6, 5))
    expected = np.moveaxis(chw, 0, -1)
    np.testing.assert_allclose(to_display_image(chw), expected, atol=1e-6)
    np.testing.assert_allclose(to_display_image(expected), expected, atol=1e-6)
    np.testing.assert_allclose(to_display_image(torch.from_numpy(chw)), expected, atol=1e-6)
    grey = rng.uniform(size=(6, 5))
    out = to_display_image(grey)
    assert out.shape == (6, 5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.repeat(grey[..., None], 3, axis=-1), atol=1e-6)
    np.testing.assert_allclose(to_display_image(grey[None]), out)
    five = rng.uniform(size=(5, 6, 7))
    np.testing.assert_allclose(to_display_image(five), np.moveaxis(five[:3], 0, -1), atol=1e-6)
    two = to_display_image(rng.uniform(size=(2, 6, 7)))
    np.testing.assert_array_equal(two[..., 2], 0.0)
    as_uint8 = to_display_image(np.full((4, 4, 3), 255, dtype=np.uint8))
    np.testing.assert_allclose(as_uint8, 1.0)
    np.testing.assert_allclose(to_display_image(np.full((4, 4), 7.0)), 1.0)  # clipped
    with pytest.raises(ValueError, match=r"\(H, W\), \(C, H, W\) or \(H, W, C\)"):
        to_display_image(np.zeros((1, 1, 4, 4)))


def test_overlay_compositing():
    image = np.full((2, 2), 0.5)
    rgba = np.zeros((2, 2, 4))
    rgba[0, 0] = [1, 0, 0, 1]  # opaque red
    rgba[0, 1] = [0, 0, 1, 0.5]  # half blue
    out = overlay(image, rgba)
    assert out.shape == (2, 2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [1, 0, 0])
    np.testing.assert_allclose(out[0, 1], [0.25, 0.25, 0.75])
    np.testing.assert_allclose(out[1, 1], [0.5, 0.5, 0.5])  # transparent: the grey image
    dark = overlay(image, rgba, image_weight=0.0)
    np.testing.assert_allclose(dark[1, 1], 0.0)
    np.testing.assert_allclose(dark[0, 1], [0, 0, 0.5])
    np.testing.assert_allclose(overlay(image, rgba[..., :3]), rgba[..., :3])  # RGB = opaque
    with pytest.raises(ValueError, match="image and explanation sizes differ"):
        overlay(np.zeros((3, 3)), rgba)
    with pytest.raises(ValueError, match=r"rgba must have shape \(H, W, 4\)"):
        overlay(image, np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"image_weight must lie in \[0, 1\]"):
        overlay(image, rgba, image_weight=2.0)


def test_overlay_of_colour_explanation_on_tensor_image():
    weights, inputs = _random_pair(3, size=8)
    out = overlay(torch.from_numpy(inputs[:3]), colour_explanation(weights, inputs), image_weight=0.5)
    assert out.shape == (8, 8, 3)
    assert 0 <= out.min() and out.max() <= 1


# ------------------------------------------------------------------------------------------------
# files


def test_save_png_roundtrip_atomic(tmp_path):
    rgb = np.zeros((5, 7, 3))
    rgb[1, 2] = [1.0, 0.5, 0.0]
    path = tmp_path / "deep" / "er" / "image.png"
    assert save_png(rgb, path) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["image.png"]  # no temp file left
    back = matplotlib.image.imread(path)
    assert back.shape[:2] == (5, 7)
    np.testing.assert_allclose(back[1, 2, :3], [1.0, 128 / 255, 0.0], atol=1e-6)
    np.testing.assert_allclose(back[0, 0, :3], 0.0)
    # RGBA float and uint8 overwrite the same file
    rgba = colour_explanation(*_random_pair(1, size=7))
    save_png(rgba, path)
    back = matplotlib.image.imread(path)
    assert back.shape == (7, 7, 4)
    np.testing.assert_allclose(back, np.round(rgba * 255) / 255, atol=1e-6)
    save_png(np.full((3, 3, 3), 200, dtype=np.uint8), path)
    np.testing.assert_allclose(matplotlib.image.imread(path)[..., :3], 200 / 255, atol=1e-6)
    assert sorted(p.name for p in path.parent.iterdir()) == ["image.png"]


def test_save_png_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "image.png"
    save_png(np.ones((2, 2, 3)), path)
    before = path.read_bytes()

    def broken(fname, *args, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(visualize.matplotlib.image, "imsave", broken)
    with pytest.raises(OSError, match="disk full"):
        save_png(np.zeros((2, 2, 3)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]


def test_save_png_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) or \(H, W, 4\) image, got shape \(2, 2, 2\)"):
        save_png(np.zeros((2, 2, 2)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        save_png(np.full((2, 2, 3), np.nan), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# figures from a real explanation


@pytest.fixture(scope="module")
def nano_explanation():
    torch.manual_seed(0)
    model = bcosvit.create_model("bcos_vit_nano_patch4_28")
    images = torch.rand(2, 1, 28, 28)
    return images, bcosvit.explain(model, images, target=torch.tensor([[0, 1], [2, 3]]))


def test_explanation_figure_several_targets(nano_explanation, tmp_path):
    images, expl = nano_explanation
    names = [f"class{k}" for k in range(expl.logits.shape[1])]
    fig = explanation_figure(images, expl, class_names=names)
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 * (1 + 2 * 2) and len(fig.axes) - len(panels) == 2 * 2  # a colour bar per map
    titles = [ax.get_title() for ax in panels]
    p = expl.probabilities
    assert titles[1] == f"class0: p={visualize.probability_text(float(p[0, 0]))}"
    assert titles[3] == f"class1: p={visualize.probability_text(float(p[0, 1]))}"
    assert titles[5 + 3] == f"class3: p={visualize.probability_text(float(p[1, 3]))}"
    assert titles[2].startswith("contributions (sum ")
    assert all(not ax.get_xticks().size and not ax.get_yticks().size for ax in panels)
    # the colour explanation panel shows RGB over black: transparent pixels are black
    shown = panels[1].get_images()[0].get_array()
    expected = colour_explanation(expl.weights[0, 0], expl.inputs[0])
    np.testing.assert_allclose(shown, expected[..., :3] * expected[..., 3:], atol=1e-6)
    path = tmp_path / "figs" / "explanation.png"
    assert save_figure(fig, path, dpi=50) == path
    back = matplotlib.image.imread(path)
    assert back.ndim == 3 and back.shape[0] > 50 and back.shape[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["explanation.png"]


def test_explanation_figure_single_target_defaults(nano_explanation, tmp_path):
    images, _ = nano_explanation
    model = bcosvit.create_model("bcos_vit_nano_patch4_28")
    expl = bcosvit.explain(model, images)  # predicted class, target (N, 1)
    fig = explanation_figure(None, expl, max_images=1)
    assert len(fig.axes) == 3 + 1  # and the contribution map's colour bar
    predicted = int(expl.target[0, 0])
    probability = visualize.probability_text(float(expl.probabilities[0, predicted]))
    assert fig.axes[1].get_title() == f"{predicted}: p={probability}"
    save_figure(fig, tmp_path / "single.svg")
    assert (tmp_path / "single.svg").read_text().lstrip().startswith("<?xml")


def test_explanation_figure_bad_input(nano_explanation):
    images, expl = nano_explanation
    with pytest.raises(ValueError, match=r"images must have shape \(N, C, H, W\) = \(2, C, 28, 28\)"):
        explanation_figure(images[:, :, :14], expl)
    with pytest.raises(ValueError, match="max_images must be a positive int"):
        explanation_figure(images, expl, max_images=0)
    with pytest.raises(ValueError, match="explanation must be a bcosvit Explanation"):
        explanation_figure(images, {"weights": expl.weights})
    squeezed = dataclasses.replace(expl, weights=expl.weights[:, 0])  # the target axis is always there
    with pytest.raises(ValueError, match=r"expected \(N, T, 2C, H, W\)"):
        explanation_figure(images, squeezed)
    with pytest.raises(ValueError, match=r"explanation.target has shape \(2,\), expected \(2, 2\)"):
        explanation_figure(images, dataclasses.replace(expl, target=expl.target[:, 0]))
    with pytest.raises(ValueError, match="save_figure needs a matplotlib Figure"):
        save_figure("not a figure", "x.png")


def shown_text(text) -> str:
    """What matplotlib draws for a Text artist: the string after mathtext handling; fails if it is mathtext."""
    shown, is_math = text._preprocess_math(text.get_text())
    assert not is_math, f"{text.get_text()!r} is rendered as mathtext"
    return shown


def test_explanation_figure_shows_dollar_signs_in_class_names_and_row_labels_literally(nano_explanation, tmp_path):
    images, expl = nano_explanation
    names = [f"class{k}" for k in range(expl.logits.shape[1])]
    names[0], names[3] = "a$x^2$", r"b$\foo$"  # mathtext that renders wrongly / fails to parse
    fig = explanation_figure(images, expl, class_names=names, row_labels=["true: $_$", "cost $5"])
    save_figure(fig, tmp_path / "dollars.png")  # draws every text: raised ValueError for b$\foo$
    assert shown_text(fig.axes[1].title).startswith("a$x^2$: p=")
    assert shown_text(fig.axes[5 + 3].title).startswith(r"b$\foo$: p=")
    assert shown_text(fig.axes[0].yaxis.label) == "true: $_$"
    assert shown_text(fig.axes[5].yaxis.label) == "cost $5"


def test_save_figure_marks_png_figures_as_written_by_bcosvit(tmp_path):
    from PIL import Image

    fig = Figure()
    path = save_figure(fig, tmp_path / "figure.png")
    assert Image.open(path).info["Software"] == visualize.FIGURE_SOFTWARE == "bcosvit"


@pytest.mark.parametrize(("p", "text"), [(0.934, "0.93"), (0.031, "0.031"), (0.0026, "0.0026"), (4.2e-5, "4.2e-05")])
def test_probabilities_keep_two_significant_digits(p, text):
    assert visualize.probability_text(p) == text


def test_a_224_pixel_explanation_renders_its_panels_at_full_size_with_colour_bars(tmp_path):
    model = bcosvit.create_model("bcos_vit_nano_patch4_28", in_chans=3, image_size=224, depth=1, num_classes=1000)
    x = torch.rand(1, 3, 224, 224)
    fig = visualize.explanation_figure(x, bcosvit.explain(model, x, target=bcosvit.TopK(2)))
    panels = [ax for ax in fig.axes if ax.get_images()]
    colour_bars = [ax for ax in fig.axes if not ax.get_images()]
    fig.canvas.draw()
    widths = [ax.get_window_extent().width for ax in panels]
    assert len(panels) == 5 and len(colour_bars) == 2 and min(widths) >= 224  # were 165 px
    assert panels[0].get_ylabel() == ""  # a lone image has no "image 0"
    assert all(not ax.get_title().endswith("p=0.00") for ax in panels)  # 1000 classes: significant digits
