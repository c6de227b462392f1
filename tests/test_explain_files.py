"""``bcosvit explain``: any image file in, one figure per image out; bad files are reported and skipped."""

import numpy as np
import pytest
import torch
from PIL import Image

import bcosvit
from bcosvit import InputError
from bcosvit.checkpoint import save_weights
from bcosvit.cli import main
from bcosvit.data import load_fashion_mnist
from bcosvit.imageio import load_image

SUBSET = "tests/data/fashion-mnist"


@pytest.fixture
def run(tmp_path):
    model = bcosvit.create_model(
        "bcos_vit_nano_patch4_28", class_names=list(load_fashion_mnist("test", SUBSET).classes)
    )
    save_weights(model, tmp_path / "run" / "model.safetensors", {"model_name": "bcos_vit_nano_patch4_28"})
    return tmp_path / "run"


@pytest.fixture
def files(tmp_path):
    ds = load_fashion_mnist("test", SUBSET)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(ds.images[0, 0].numpy()).save(folder / "boot.png")  # greyscale 28x28
    rgb = np.repeat(ds.images[1, 0].numpy()[:, :, None], 3, axis=2)
    Image.fromarray(rgb).resize((90, 60)).save(folder / "wide.jpg")  # RGB, other size
    Image.fromarray(np.dstack([rgb, np.full((28, 28), 255, np.uint8)])).save(folder / "alpha.png")  # RGBA
    (folder / "broken.png").write_bytes(b"\x89PNG this is not an image")
    (folder / "subdir").mkdir()
    return folder


def test_load_image_converts_mode_and_size_and_says_so(files):
    item = load_image(files / "wide.jpg", in_chans=1, image_size=28)
    assert item.tensor.shape == (1, 28, 28) and 0 <= float(item.tensor.min()) <= float(item.tensor.max()) <= 1
    assert any("RGB -> L" in n for n in item.notes) and any("90x60 -> 28x28" in n for n in item.notes)
    assert load_image(files / "boot.png", 1, 28).notes == []
    assert load_image(files / "boot.png", 3, 32).tensor.shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("name", "message"),
    [("broken.png", "not an image format"), ("subdir", "is a directory"), ("missing.png", "does not exist")],
)
def test_unreadable_inputs_are_clear_errors(files, name, message):
    with pytest.raises(InputError, match=message):
        load_image(files / name, 1, 28)


def test_explain_command_writes_a_figure_per_readable_image_and_reports_the_rest(run, files, tmp_path, capsys):
    out = tmp_path / "out"
    paths = [str(files / n) for n in ("boot.png", "wide.jpg", "alpha.png", "broken.png", "subdir")]
    code = main(["explain", *paths, "--checkpoint", str(run), "--out", str(out), "--topk", "3"])
    text = capsys.readouterr().out
    assert code == 1  # some files were skipped
    assert sorted(p.name for p in out.iterdir()) == ["alpha.png", "boot.png", "wide.png"]
    assert "skipped" in text and "broken.png" in text and "is a directory" in text
    assert "completeness error" in text and "converted colour mode RGBA -> L" in text
    line = next(line for line in text.splitlines() if line.startswith(str(files / "boot.png")))
    assert line.count(", ") >= 2  # three classes with probabilities


def test_explain_command_accepts_a_class_name_as_target(run, files, tmp_path, capsys):
    assert (
        main(
            [
                "explain",
                str(files / "boot.png"),
                "--checkpoint",
                str(run),
                "--out",
                str(tmp_path / "o"),
                "--target",
                "ankle boot",
            ]
        )
        == 0
    )
    assert "Ankle boot" in capsys.readouterr().out


def test_explain_command_rejects_unknown_class_and_standard_models(run, files, tmp_path, capsys):
    assert main(["explain", str(files / "boot.png"), "--checkpoint", str(run), "--target", "hat"]) == 2
    assert "unknown class 'hat'" in capsys.readouterr().err
    standard = bcosvit.create_model("vit_nano_patch4_28")
    save_weights(standard, tmp_path / "std" / "model.safetensors", {})
    assert main(["explain", str(files / "boot.png"), "--checkpoint", str(tmp_path / "std")]) == 2
    assert "needs a B-cos model" in capsys.readouterr().err


def test_explanation_of_a_file_is_complete(run, files):
    model = bcosvit.checkpoint.load_model(run)
    image = load_image(files / "boot.png", 1, 28).tensor[None]
    e = bcosvit.explain(model, image, target=torch.tensor([[9, 7]]))
    assert float(e.completeness_error.max()) < 1e-5


def test_explain_shows_a_file_name_with_dollar_signs_literally(run, files, tmp_path, monkeypatch, capsys):
    from bcosvit import explain_files as module

    titles = []

    def save_and_record_title(figure, path, **kwargs):
        shown, is_math = figure._suptitle._preprocess_math(figure._suptitle.get_text())
        titles.append(None if is_math else shown)
        return save_figure(figure, path, **kwargs)

    save_figure = module.save_figure
    monkeypatch.setattr(module, "save_figure", save_and_record_title)
    names = ["a$x^2$.png", r"b$\foo$.png"]  # mathtext that renders wrongly / fails to parse
    for name in names:
        (files / name).write_bytes((files / "boot.png").read_bytes())
    code = main(["explain", *(str(files / n) for n in names), "--checkpoint", str(run), "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr()
    assert titles == names
