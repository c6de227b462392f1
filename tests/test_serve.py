"""The functions behind each view of ``bcosvit serve`` and the steps of a session, without a browser."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import bcosvit
from bcosvit.app.serve import views
from bcosvit.app.serve.session import Explorer, Session
from bcosvit.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def shipped():
    return {name: bcosvit.create_model(name, pretrained=True) for name in ("bcos_vitc_micro_28", "vitc_micro_28")}


@pytest.fixture(scope="module")
def explorer(shipped):
    return Explorer(shipped)


@pytest.fixture(scope="module")
def opened(explorer):
    """A session on the shipped example coat, explained with the shipped B-cos model."""
    return explorer.open(Session(), next(p for p in views.example_images() if "Coat" in p.name))


def test_example_images_are_one_fashion_mnist_test_image_per_class_and_the_model_gets_them_right(shipped):
    model = shipped["bcos_vitc_micro_28"]
    examples = views.example_images()
    assert len(examples) == 10
    for path in examples:
        loaded = views.read_input(path, model)
        assert loaded.original_size == (28, 28) and loaded.notes == []
        predicted = model.config.class_names[views.top_classes(model, views.model_input(loaded, model), 1)[0].index]
        assert path.stem.split("-", 1)[1] == predicted.replace("/top", "").replace(" ", "-")  # 0009-Sneaker.png


def test_read_input_converts_as_explain_does_and_says_so(shipped, tmp_path):
    model = shipped["bcos_vitc_micro_28"]
    Image.new("RGB", (56, 40), (255, 0, 0)).save(tmp_path / "red.png")
    loaded = views.read_input(tmp_path / "red.png", model)
    assert loaded.tensor.shape == (1, 28, 28)
    text = views.conversion_text(loaded, model)
    assert text.startswith("red.png: 56x40 RGB -> 1x28x28 (converted colour mode RGB -> L; resized 56x40 -> 28x28")


def test_read_input_refuses_unreadable_too_many_bytes_and_too_many_pixels(shipped, tmp_path, monkeypatch):
    model = shipped["bcos_vitc_micro_28"]
    (tmp_path / "text.png").write_text("no image")
    with pytest.raises(InputError, match="not an image format Pillow can read"):
        views.read_input(tmp_path / "text.png", model)
    Image.new("L", (60, 50)).save(tmp_path / "big.png")
    monkeypatch.setattr(views, "MAX_UPLOAD_PIXELS", 2999)
    with pytest.raises(InputError, match="60x50 = 3000 pixels, more than the 2999 allowed"):
        views.read_input(tmp_path / "big.png", model)
    monkeypatch.setattr(views, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(InputError, match=r"big.png is \d+ bytes, more than the 10 allowed"):
        views.read_input(tmp_path / "big.png", model)


def test_class_view_numbers_are_those_of_explain(shipped, opened, explorer):
    model = shipped["bcos_vitc_micro_28"]
    expl = bcosvit.explain(model, opened.image)
    numbers = explorer.numbers(opened)
    assert numbers["class"] == "Coat" and numbers["index"] == int(expl.target[0, 0]) == opened.scores[0].index
    assert numbers["probability"] == float(expl.probabilities[0, expl.target[0, 0]])
    assert numbers["probability"] == pytest.approx(opened.scores[0].probability, abs=1e-6)  # a plain forward pass
    assert numbers["completeness error"] == float(expl.completeness_error[0])
    assert numbers["positional term"] == 0.0  # rotary embedding: no additive positional term
    view = opened.class_view
    assert (
        view.colour.shape == (28, 28, 4)
        and view.contributions.shape == (28, 28, 4)
        and view.overlay.shape == (28, 28, 3)
    )
    np.testing.assert_array_equal(view.explanation.weights.numpy(), expl.weights.numpy())


def test_top_classes_are_ranked_by_logit_with_sigmoid_for_bcos_and_softmax_for_standard(shipped, opened):
    bcos = views.top_classes(shipped["bcos_vitc_micro_28"], opened.image, 10)
    assert [s.logit for s in bcos] == sorted((s.logit for s in bcos), reverse=True)
    assert bcos[0].probability == pytest.approx(1 / (1 + np.exp(-bcos[0].logit)), rel=1e-6)
    standard = views.top_classes(shipped["vitc_micro_28"], opened.image, 10)
    assert sum(s.probability for s in standard) == pytest.approx(1.0, abs=1e-5)


def test_switching_class_changes_the_pictures_and_the_strip(explorer, opened):
    other = explorer.select_class(opened, opened.scores[1].index)
    assert other.target == opened.scores[1].index and other.maps == {}
    assert not np.array_equal(other.class_view.contributions, opened.class_view.contributions)
    assert not torch.equal(other.strip, opened.strip)


def test_block_strip_has_one_map_per_block_each_summing_to_logit_minus_bias(shipped, opened):
    model = shipped["bcos_vitc_micro_28"]
    strip = opened.strip
    assert strip.shape == (model.config.depth + 1, 7, 7)
    expected = opened.class_view.output - model.logit_bias_value
    torch.testing.assert_close(strip.sum(dim=(1, 2)), torch.full((6,), expected), rtol=1e-4, atol=1e-4)
    pictures = views.strip_pictures(strip)
    assert [c for _, c in pictures] == ["embedding"] + [f"block {k}" for k in range(1, 6)]
    assert pictures[0][0].shape[:2] == (224, 224)


def test_a_click_on_the_input_picture_explains_the_unit_of_the_token_under_it(explorer, opened, shipped):
    model = shipped["bcos_vitc_micro_28"]
    assert views.token_at(model, 0, 0, 224, 224) == 0
    assert views.token_at(model, 223, 223, 224, 224) == 48
    assert views.token_at(model, 40, 200, 224, 224) == 6 * 7 + 1
    clicked = explorer.click(opened, 40, 200, 224, 224, 2, "max", 0)
    assert clicked.token == 43 and clicked.layer == 2
    same = bcosvit.explain_unit(model, opened.image, 2, 43, "max")
    np.testing.assert_array_equal(clicked.unit_view.explanation.weights.numpy(), same.weights.numpy())
    assert "block 2, token (6, 1), channel" in explorer.unit_title(clicked)
    norm = explorer.select_unit(clicked, 0, "norm")
    assert norm.token == 43 and "embedded tokens, token (6, 1), norm" in explorer.unit_title(norm)
    assert not np.array_equal(norm.unit_view.contributions, clicked.unit_view.contributions)
    channel = explorer.select_unit(norm, -1, "channel", 7)
    assert int(channel.unit_view.explanation.target[0, 0]) == 7 and channel.layer == -1
    with pytest.raises(InputError, match="channel must lie in 0..127"):
        explorer.select_unit(norm, 1, "channel", 128)
    with pytest.raises(InputError, match="layer must lie in 0..5"):
        explorer.select_unit(norm, 6, "max")


def test_input_picture_frames_the_selected_token(shipped, opened):
    model = shipped["bcos_vitc_micro_28"]
    plain = views.input_picture(model, opened.image)
    framed = views.input_picture(model, opened.image, 0)
    assert plain.shape == (224, 224, 3)
    changed = np.argwhere((plain != framed).any(axis=-1))
    assert changed.max(axis=0).tolist() == [31, 31]  # only the first token's 32x32 cell


def test_side_by_side_maps_of_the_standard_twin_are_bcosvit_attributions(explorer, opened, shipped):
    assert explorer.default_comparison("bcos_vitc_micro_28") == "vitc_micro_28"
    compared = explorer.compare(opened, "vitc_micro_28")
    assert list(compared.maps) == list(views.COMPARISON_METHODS)
    expected = bcosvit.attribution.gradcam(shipped["vitc_micro_28"], opened.image, [opened.target])[0]
    torch.testing.assert_close(compared.maps["gradcam"], expected)
    pictures = views.comparison_pictures(compared.class_view, compared.maps)
    assert [c for _, c in pictures][0] == "B-cos (exact)" and len(pictures) == 5
    with pytest.raises(ConfigError, match="the comparison model is a B-cos model"):
        explorer.compare(opened, "bcos_vitc_micro_28")


def test_a_standard_model_asked_for_an_exact_explanation_is_a_clear_error(explorer, opened):
    with pytest.raises(ConfigError, match="vitc_micro_28 is a standard model: exact explanations need a B-cos model"):
        explorer.open(opened, None, "vitc_micro_28")


def test_steps_before_any_image_say_to_give_one(explorer):
    with pytest.raises(InputError, match="no image yet"):
        explorer.select_class(Session(), 1)
    with pytest.raises(InputError, match="no image yet"):
        explorer.open(Session(), None)


def test_export_writes_the_figure_and_the_raw_arrays(explorer, opened, tmp_path):
    session = explorer.compare(opened, "vitc_micro_28")
    png, npz = explorer.export(session, tmp_path)
    assert Image.open(png).format == "PNG" and Image.open(png).size[0] > 500
    arrays = np.load(npz)
    np.testing.assert_array_equal(arrays["weights"], session.class_view.explanation.weights[0, 0].numpy())
    np.testing.assert_array_equal(arrays["contributions"], session.class_view.explanation.contributions[0, 0].numpy())
    assert arrays["image"].shape == (1, 28, 28) and arrays["unit_weights"].shape == (2, 28, 28)
    assert arrays["block_contributions"].shape == (6, 7, 7) and arrays["posthoc_gradcam"].shape == (28, 28)
    assert float(arrays["completeness_error"]) == session.class_view.completeness_error
    assert np.load(io.BytesIO(views.npz_bytes({"a": np.ones(2)})))["a"].tolist() == [1.0, 1.0]


def test_serve_command_loads_the_models_and_starts_the_server(monkeypatch, capsys):
    import bcosvit.app.serve as serve_module
    from bcosvit.app.cli import main

    started = {}
    monkeypatch.setattr(serve_module, "serve", lambda models, **kw: started.update(models=models, **kw))
    assert main(["serve", "--model", "bcos_vitc_micro_28", "vitc_micro_28", "--port", "7999"]) == 0
    assert list(started["models"]) == ["bcos_vitc_micro_28", "vitc_micro_28"] and started["port"] == 7999
    assert "serving on http://127.0.0.1:7999" in capsys.readouterr().out


@pytest.mark.slow
def test_the_command_line_and_the_views_do_not_import_gradio():
    code = (
        "import sys, bcosvit.app.cli, bcosvit.app.serve.views, bcosvit.app.serve.session\n"
        "bcosvit.app.cli.build_parser()\nprint('gradio' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stdout + result.stderr


def test_the_units_of_the_page_are_the_librarys_and_a_channel_by_index(explorer, opened):
    from bcosvit.app.serve.session import UNIT_CHOICES
    from bcosvit.explanation import UNIT_CHOICES as LIBRARY_UNIT_CHOICES

    assert UNIT_CHOICES == (*LIBRARY_UNIT_CHOICES, "channel") == ("max", "norm", "channel")
    for unit in LIBRARY_UNIT_CHOICES:  # each named unit the page offers is one explain_unit takes
        assert explorer.select_unit(opened, 1, unit).unit == unit
    with pytest.raises(InputError, match=r"unit must be one of \('max', 'norm', 'channel'\)"):
        explorer.select_unit(opened, 1, "mean")


def test_upload_errors_name_the_file_not_the_server_s_temporary_folder(shipped, tmp_path):
    upload = tmp_path / "gradio" / "0123abcd"
    upload.mkdir(parents=True)
    (upload / "photo.png").write_text("no image")
    with pytest.raises(InputError) as caught:
        views.read_input(upload / "photo.png", shipped["bcos_vitc_micro_28"])
    assert "photo.png" in str(caught.value) and str(tmp_path) not in str(caught.value)
