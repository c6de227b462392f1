"""``bcosvit explain``: any image file in, one figure per image out; bad files are reported and skipped."""

import io
import os
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bcosvit
from bcosvit import InputError
from bcosvit.app.cli import main
from bcosvit.app.data import load_fashion_mnist
from bcosvit.images import read_image
from bcosvit.weights.checkpoint import save_weights

SUBSET = str(Path(__file__).parent / "data" / "fashion-mnist")


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
    item = read_image(files / "wide.jpg", in_chans=1, image_size=28)
    assert item.tensor.shape == (1, 28, 28) and 0 <= float(item.tensor.min()) <= float(item.tensor.max()) <= 1
    assert any("RGB -> L" in n for n in item.notes) and any("90x60 -> 28x28" in n for n in item.notes)
    assert read_image(files / "boot.png", 1, 28).notes == []
    assert read_image(files / "boot.png", 3, 32).tensor.shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("name", "message"),
    [("broken.png", "not an image format"), ("subdir", "is a directory"), ("missing.png", "does not exist")],
)
def test_unreadable_inputs_are_clear_errors(files, name, message):
    with pytest.raises(InputError, match=message):
        read_image(files / name, 1, 28)


def test_explain_command_writes_a_figure_per_readable_image_and_reports_the_rest(run, files, tmp_path, capsys):
    out = tmp_path / "out"
    paths = [str(files / n) for n in ("boot.png", "wide.jpg", "alpha.png", "broken.png", "subdir")]
    code = main(["explain", *paths, "--checkpoint", str(run), "--out", str(out), "--topk", "3"])
    text = capsys.readouterr().out
    assert code == 1  # some files were skipped
    assert sorted(p.name for p in out.iterdir()) == ["alpha.explained.png", "boot.explained.png", "wide.explained.png"]
    assert "skipped" in text and "broken.png" in text and "is a directory" in text
    assert "completeness error" in text and "converted colour mode RGBA -> L" in text
    line = next(line for line in text.splitlines() if line.startswith(str(files / "boot.png")))
    assert line.count(", ") >= 2  # three classes with probabilities


def test_explain_never_writes_over_an_input(run, files, capsys):
    before = (files / "boot.png").read_bytes()
    assert main(["explain", str(files / "boot.png"), "--checkpoint", str(run), "--out", str(files)]) == 0
    assert (files / "boot.png").read_bytes() == before
    assert f"| {files / 'boot.explained.png'}" in capsys.readouterr().out


def test_explain_never_writes_over_an_input_named_like_a_figure(run, files, tmp_path):
    (files / "boot.explained.png").write_bytes((files / "boot.png").read_bytes())  # an input, not ours
    inputs = [files / "boot.png", files / "boot.explained.png"]
    before = [p.read_bytes() for p in inputs]
    assert main(["explain", *map(str, inputs), "--checkpoint", str(run), "--out", str(files)]) == 0
    assert [p.read_bytes() for p in inputs] == before
    assert (files / "boot-2.explained.png").is_file() and (files / "boot.explained.explained.png").is_file()


def test_explain_gives_inputs_with_the_same_stem_their_own_figures(run, files, tmp_path, capsys):
    (files / "a").mkdir()
    (files / "b").mkdir()
    (files / "a" / "x.png").write_bytes((files / "boot.png").read_bytes())
    (files / "b" / "x.jpg").write_bytes((files / "wide.jpg").read_bytes())
    out = tmp_path / "out"
    inputs = [files / "a" / "x.png", files / "b" / "x.jpg"]
    assert main(["explain", *map(str, inputs), "--checkpoint", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["x-2.explained.png", "x.explained.png"]
    lines = capsys.readouterr().out.splitlines()
    for source, figure in zip(inputs, ["x.explained.png", "x-2.explained.png"]):  # the printed mapping is true
        assert any(line.startswith(str(source)) and line.endswith(f"| {out / figure}") for line in lines)


def test_explain_never_replaces_a_file_it_did_not_write_but_updates_its_own_figures(run, files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "boot.explained.png").write_bytes(b"the user's own file")
    Image.new("RGB", (4, 4)).save(out / "boot-2.explained.png")  # a PNG, but not written by bcosvit
    (out / "wide.explained.png").symlink_to(files / "wide.jpg")  # a link is never ours
    wide = (files / "wide.jpg").read_bytes()
    args = ["explain", str(files / "boot.png"), str(files / "wide.jpg"), "--checkpoint", str(run), "--out", str(out)]
    assert main(args) == 0
    assert (out / "boot.explained.png").read_bytes() == b"the user's own file"
    assert Image.open(out / "boot-2.explained.png").size == (4, 4)
    assert (out / "wide.explained.png").is_symlink() and (files / "wide.jpg").read_bytes() == wide
    ours = out / "boot-3.explained.png"
    assert Image.open(ours).info["Software"] == "bcosvit"
    assert main(args) == 0  # a rerun replaces its own figures instead of adding boot-4, wide-3
    names = [f"boot{s}.explained.png" for s in ("-2", "-3", "")] + ["wide-2.explained.png", "wide.explained.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert capsys.readouterr().out.count(f"| {ours}") == 2


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
    model = bcosvit.load_model(run)
    image = read_image(files / "boot.png", 1, 28).tensor[None]
    e = bcosvit.explain(model, image, target=torch.tensor([[9, 7]]))
    assert float(e.completeness_error.max()) < 1e-5


def test_explain_shows_a_file_name_with_dollar_signs_literally(run, files, tmp_path, monkeypatch, capsys):
    from bcosvit.app import explain_files as module

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


# ------------------------------------------------------------------------------------------------
# bit depths, orientation and transparency


def test_load_image_keeps_the_levels_of_a_16_bit_png(tmp_path):
    levels = np.linspace(0, 65535, 28 * 28).round().astype(np.uint16).reshape(28, 28)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    item = read_image(tmp_path / "deep.png", 1, 28)
    assert item.original_mode == "I;16"
    np.testing.assert_allclose(item.tensor[0].numpy(), levels / 65535, atol=1e-6)
    assert any("16-bit" in note for note in item.notes)


def test_load_image_uses_float_tiff_values_in_0_1_as_they_are_and_scales_others(tmp_path):
    gradient = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(28, 28)
    Image.fromarray(gradient).save(tmp_path / "unit.tif")
    Image.fromarray(gradient * 5 - 2).save(tmp_path / "wide.tif")
    unit = read_image(tmp_path / "unit.tif", 1, 28)
    np.testing.assert_allclose(unit.tensor[0].numpy(), gradient, atol=1e-6)
    assert unit.notes == []
    wide = read_image(tmp_path / "wide.tif", 1, 28)
    np.testing.assert_allclose(wide.tensor[0].numpy(), gradient, atol=1e-6)
    assert any("values in [-2, 3] min-max scaled to [0, 1]" in note for note in wide.notes)


@pytest.mark.parametrize(("orientation", "turns"), [(6, -1), (8, 1)])  # 6: turn clockwise; 8: anticlockwise
def test_load_image_turns_a_photo_upright_by_its_exif_orientation(tmp_path, orientation, turns):
    stored = np.zeros((28, 28), np.uint8)
    stored[:4, :10] = 255  # a bar along the top-left edge
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    item = read_image(tmp_path / "photo.png", 1, 28)
    np.testing.assert_array_equal(item.tensor[0].numpy(), np.rot90(stored, turns) / 255)
    assert any(f"EXIF orientation {orientation}" in note for note in item.notes)


def _cut_out(mode: str) -> Image.Image:
    """A white square on a transparent white background in ``mode``."""
    if mode == "P":
        image = Image.new("P", (28, 28), 1)  # palette entry 1 (white) is the transparent background
        image.putpalette([255, 255, 255] * 2)
        image.paste(0, (8, 8, 20, 20))
        image.info["transparency"] = 1
        return image
    rgba = np.full((28, 28, 4), 255, np.uint8)
    rgba[..., 3] = 0
    rgba[8:20, 8:20, 3] = 255
    return Image.fromarray(rgba).convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_load_image_composites_transparency_on_the_background_black_by_default(tmp_path, mode):
    _cut_out(mode).save(tmp_path / "cut.png")
    item = read_image(tmp_path / "cut.png", 1, 28)
    assert float(item.tensor[0, 0, 0]) == 0.0 and float(item.tensor[0, 14, 14]) == 1.0
    assert any("transparency composited on a black background" in note for note in item.notes)
    assert float(read_image(tmp_path / "cut.png", 3, 28, background=1.0).tensor[:, 0, 0].min()) == 1.0
    four = read_image(tmp_path / "cut.png", 4, 28)  # a model with an alpha channel gets the alpha
    assert float(four.tensor[3, 0, 0]) == 0.0 and float(four.tensor[3, 14, 14]) == 1.0


def test_load_image_rejects_a_background_outside_0_1(files):
    with pytest.raises(bcosvit.ConfigError, match=r"background must be .* in \[0, 1\], got 2"):
        read_image(files / "boot.png", 1, 28, background=2)


# ------------------------------------------------------------------------------------------------
# files that must not be decoded or opened


def _png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def test_explain_skips_images_above_the_pixel_limit_and_explains_the_others(run, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # boot.png has 784 pixels
    Image.new("L", (40, 40)).save(files / "big.png")  # 1600 pixels: Pillow itself only warns
    (files / "bomb.png").write_bytes(_png_claiming_size(100_000, 100_000))  # Pillow raises
    paths = [str(files / name) for name in ("big.png", "bomb.png", "boot.png")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["explain", *paths, "--checkpoint", str(run), "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert code == 1  # some files skipped, the others explained
    assert f"skipped {files / 'big.png'}: {files / 'big.png'} is 40x40 = 1600 pixels, more than the 1000" in text
    assert f"skipped {files / 'bomb.png'}: {files / 'bomb.png'} is too large to read safely" in text
    assert "wrote 1 figure(s)" in text
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_explain_refuses_a_fifo_at_once_and_explains_the_others(run, files, tmp_path, capsys):
    fifo = files / "pipe.png"
    os.mkfifo(fifo)
    result = {}
    args = ["explain", str(fifo), str(files / "boot.png"), "--checkpoint", str(run), "--out", str(tmp_path / "out")]
    worker = threading.Thread(target=lambda: result.update(code=main(args)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # unblock the reader hanging in open() before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=10)
        pytest.fail("explain blocked on a FIFO")
    assert result["code"] == 1
    assert f"skipped {fifo}: {fifo} is a named pipe (FIFO), not an image file" in capsys.readouterr().out


def test_explain_command_rejects_a_background_outside_0_1_before_writing(run, files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["explain", str(files / "alpha.png"), "--checkpoint", str(run), "--out", str(out), "--background", "2"]
    assert main(args) == 2
    assert "background must be a grey level or an (R, G, B) triple in [0, 1], got 2.0" in capsys.readouterr().err
    assert not out.exists()


def test_shipped_model_sees_transparent_cut_outs_as_the_fashion_mnist_images_they_came_from(tmp_path, capsys):
    ds = load_fashion_mnist("test", SUBSET)
    paths = []
    for k in range(3):  # a white object whose opacity is the test image: on black it is that image again
        grey = ds.images[k, 0].numpy()
        paths.append(tmp_path / f"cut{k}.png")
        Image.fromarray(np.dstack([np.full((28, 28, 3), 255, np.uint8), grey])).save(paths[-1])
        np.testing.assert_allclose(read_image(paths[-1], 1, 28).tensor[0].numpy(), grey / 255, atol=1e-6)
    args = ["explain", *map(str, paths), "--model", "bcos_vitc_micro_28", "--topk", "1", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    for k, path in enumerate(paths):  # on white (transparency dropped) all three were taken for a bag
        line = next(line for line in lines if line.startswith(str(path)))
        assert line.split(": ", 1)[1].startswith(ds.classes[int(ds.labels[k])] + " ")


def test_figure_names_step_over_symlink_loops_in_the_inputs_and_the_out_folder(tmp_path):
    from bcosvit.app.explain_files import figure_paths

    (tmp_path / "x.explained.png").symlink_to("x.explained.png")  # a link to itself
    (tmp_path / "loop.png").symlink_to("loop.png")
    names = figure_paths([Path("x.png")], tmp_path, [tmp_path / "loop.png", tmp_path / "x.png"])
    assert names == [tmp_path / "x-2.explained.png"]


def test_explain_files_explains_the_top_classes_from_one_forward_pass_per_batch(run, files, tmp_path, capsys):
    from bcosvit.app.explain_files import explain_files

    model = bcosvit.load_model(run)
    paths = [files / name for name in ("boot.png", "wide.jpg", "alpha.png")]
    images = torch.stack([read_image(path, 1, 28).tensor for path in paths]).to(model.norm.weight.dtype)
    with torch.no_grad():
        logits = model(images)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    results, failed = explain_files(model, paths, tmp_path / "top", topk=3, batch_size=2)
    assert failed == [] and len(forwards) == 2  # two batches: the explained pass picks the classes too
    assert [r.classes for r in results] == logits.topk(3, dim=1).indices.tolist()
    expected = torch.sigmoid(logits.topk(3, dim=1).values)
    torch.testing.assert_close(torch.tensor([r.probabilities for r in results]), expected, rtol=1e-5, atol=1e-6)
    fixed, _ = explain_files(model, paths[:1], tmp_path / "fixed", target="Bag", topk=3)
    assert fixed[0].classes == [8] and len(fixed[0].probabilities) == 1
    capsys.readouterr()


def test_a_file_name_too_long_for_its_figure_gets_a_short_distinct_one_and_the_batch_goes_on(
    run, files, tmp_path, capsys
):
    # 240-character stems: "<stem>.explained.png" and its temporary file were longer than 255 bytes
    names = ["a" * 240 + "1.png", "a" * 240 + "2.png"]
    for name in names:
        (files / name).write_bytes((files / "boot.png").read_bytes())
    inputs = [str(files / name) for name in names] + [str(files / "boot.png")]
    out = tmp_path / "out"
    assert main(["explain", *inputs, "--checkpoint", str(run), "--out", f"{out}/"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 3 and "boot.explained.png" in written
    assert all(len(name.encode()) <= 200 for name in written)
    assert f"wrote 3 figure(s) to {out}/\n" in capsys.readouterr().out


def test_a_figure_that_cannot_be_written_is_reported_and_the_others_are_written(
    run, files, tmp_path, capsys, monkeypatch
):
    from bcosvit.app import explain_files

    real = explain_files.save_figure

    def refuse_wide(figure, path):
        if "wide" in str(path):
            raise OSError(28, "No space left on device")
        return real(figure, path)

    monkeypatch.setattr(explain_files, "save_figure", refuse_wide)
    out = tmp_path / "out"
    code = main(
        ["explain", str(files / "wide.jpg"), str(files / "boot.png"), "--checkpoint", str(run), "--out", str(out)]
    )
    text = capsys.readouterr().out
    assert code == 1 and "cannot write its figure (No space left on device)" in text
    assert sorted(p.name for p in out.iterdir()) == ["boot.explained.png"]
