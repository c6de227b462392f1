"""The command line: listing models and recipes, and clear errors instead of tracebacks."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bcosvit.app.cli import main, unique_labels

SUBSET = str(Path(__file__).parent / "data" / "fashion-mnist")


def test_models_lists_the_registry_with_parameter_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "bcos_vit_tiny_patch16_224" in out and "vit_tiny_patch16_224" in out
    line = next(line for line in out.splitlines() if line.startswith("bcos_vit_tiny_patch16_224 "))
    assert "5.80M" in line and "B-cos" in line


def test_models_filter_and_empty_result(capsys):
    assert main(["models", "bcos_*_28"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if line.strip() and "_28" in line]
    assert names and all(n.startswith("bcos_") and n.endswith("_28") for n in names)
    assert main(["models", "resnet*"]) == 1


@pytest.mark.slow
def test_bad_training_value_gives_a_one_line_error_not_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "bcosvit", "train", "--recipe", "fmnist-demo", "--epochs", "0", "--data-dir", SUBSET],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("bcosvit train: error: recipe ") and "Traceback" not in result.stderr
    assert "fmnist-demo.toml with the command line's options: epochs must be >= 1, got 0" in result.stderr


@pytest.mark.slow
def test_missing_dataset_gives_install_instructions(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bcosvit",
            "train",
            "--recipe",
            "fmnist-demo",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "apt-get install dataset-fashion-mnist" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_recipe_lists_the_available_ones(capsys):
    assert main(["train", "--recipe", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'; available: cifar10, finetune, fmnist, " in err and "fmnist-demo" in err


def test_list_recipes_gives_each_recipe_a_line_with_its_description(capsys):
    assert main(["train", "--list-recipes"]) == 0
    lines = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert lines["fmnist-demo"].startswith("The main job: bcos_vitc_micro_28 with RoPE, 2 epochs")
    assert "four cosine cycles" in lines["fmnist-bcos_vitc_micro_28"] and "imagenet" in lines


def test_a_copied_recipe_with_a_wrong_key_is_refused_naming_file_stage_and_key(tmp_path, capsys):
    copy = tmp_path / "mine.toml"
    copy.write_text('description = "mine"\n[stages.warm]\nepochs = 1\n[stages.long]\nepoch = 30\n')
    assert main(["train", "--recipe", str(copy), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"error: recipe {copy}, stage long: unknown training option(s) ['epoch']" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--lr", "inf"], "lr must be a finite number, got inf"),
        (["--lr", "nan"], "lr must be a finite number, got nan"),
        (["--set", "test_subset=-1"], "test_subset must be >= 1"),
        (["--set", "test_subset=0"], "test_subset must be >= 1"),
        (["--stop-after", "0"], "--stop-after must be >= 1"),
        (["--set", "lr=fast"], "the command line: training options: 'lr' must be of type float, got 'fast'"),
        (["--set", "learning_rate=0.1"], "the command line: unknown training option(s) ['learning_rate']"),
        (["--set", "cycle1.lr=0.1"], "--set cycle1.KEY: recipe"),
        (["--set", "lr"], "--set expects KEY=VALUE or STAGE.KEY=VALUE, got 'lr'"),
    ],
)
def test_train_rejects_bad_options_before_any_work(tmp_path, capsys, options, message):
    code = main(["train", "--recipe", "fmnist-demo", "--data-dir", SUBSET, "--out", str(tmp_path / "run"), *options])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("bcosvit train: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # a run writes its folder (config.json) before it reads any data


def test_explain_refuses_an_existing_file_as_out_before_reading_images(tmp_path, monkeypatch, capsys):
    def reached(*args, **kwargs):
        raise AssertionError("explain read the images despite an unusable --out")

    monkeypatch.setattr("bcosvit.app.explain_files.load_image", reached)
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    assert main(["explain", str(tmp_path / "image.png"), "--out", str(taken)]) == 2
    assert f"output folder (--out) {taken} is an existing file" in capsys.readouterr().err
    assert taken.read_text() == "keep me"


def test_labels_are_the_shortest_distinguishing_path_suffixes_then_numbered():
    paths = [("/", "a", "model.safetensors"), ("/", "b", "model.safetensors"), ("/", "x", "run"), ("/", "y", "run")]
    paths += [("/", "c", "other"), ("/", "x", "run"), ("/", "runs", "vitc"), ("vitc",), ("vitc",)]
    assert unique_labels(paths) == [
        "a/model.safetensors",
        "b/model.safetensors",
        "x/run",
        "y/run",
        "other",
        "x/run#2",
        "runs/vitc",
        "vitc",
        "vitc#2",
    ]
    assert unique_labels([("/", "run"), ("/", "a", "run")]) == ["/run", "a/run"]


# --- Published ImageNet weights: bcosvit convert, --pretrained imagenet, --weights (no network) ---------


def _photo(path: Path) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(1)
    pixels = (torch.rand(300, 260, 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def _ranked_classes(out: str) -> list[str]:
    """The class names of explain's line for the (one) image: ``photo.png (...): name p, name p | ...``."""
    line = next(line for line in out.splitlines() if "completeness error" in line)
    ranked = line.split(": ", 1)[1].split(" | ")[0]
    return [item.rsplit(" ", 1)[0] for item in ranked.split(", ")]


def test_convert_writes_a_model_folder_that_explain_accepts(reference, tmp_path, capsys):
    import bcosvit

    out = tmp_path / "converted"
    assert main(["convert", str(reference.path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bcos_vit_tiny_patch16_224 weights" in printed and f"--checkpoint {out}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    meta = bcosvit.weights.read_metadata(out)
    assert meta["model_name"] == "bcos_vit_tiny_patch16_224" and meta["source_sha256"] == reference.sha256
    model = bcosvit.load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(model(reference.image), reference.logits, atol=1e-4, rtol=0)
    names = model.config.class_names
    photo = _photo(tmp_path / "photo.png")
    assert main(["explain", str(photo), "--checkpoint", str(out), "--out", str(tmp_path / "figures")]) == 0
    ranked = _ranked_classes(capsys.readouterr().out)
    assert len(ranked) == 2 and set(ranked) <= set(names)
    assert (tmp_path / "figures" / "photo.explained.png").is_file()


def test_convert_refuses_a_non_empty_out_unless_forced_and_bad_files(reference, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert main(["convert", str(reference.path), "--out", str(out)]) == 2
    assert f"--out {out} is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["convert", str(reference.path), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", "notes.txt"]
    capsys.readouterr()
    assert main(["convert", str(reference.path), "--out", str(tmp_path / "x"), "--name", "bcos_vitc_tiny_224"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bcosvit convert: error: weights in ") and "bcos_vitc_tiny_224" in err
    broken = tmp_path / "broken.pth"
    broken.write_bytes(reference.path.read_bytes()[:5000])
    assert main(["convert", str(broken), "--out", str(tmp_path / "y")]) == 2
    assert "is corrupt" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_a_conversion_that_fails_after_creating_out_leaves_no_folder(reference, tmp_path, capsys, monkeypatch):
    from bcosvit.errors import CheckpointError
    from bcosvit.weights import convert

    def fail(*args, **kwargs):
        raise CheckpointError("conversion failed")

    monkeypatch.setattr(convert, "convert_official", fail)
    assert main(["convert", str(reference.path), "--out", str(tmp_path / "new")]) == 2
    assert "conversion failed" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_explain_with_published_imagenet_weights(reference, hub_dir, publish, tmp_path, capsys):
    import bcosvit

    publish(reference.path)
    photo = _photo(tmp_path / "photo.jpg")
    args = ["explain", str(photo), "--model", "bcos_vit_tiny_patch16_224", "--out", str(tmp_path / "figures")]
    assert main(args) == 2
    assert "--pretrained imagenet" in capsys.readouterr().err
    assert main([*args, "--pretrained", "imagenet", "--topk", "3"]) == 0
    out = capsys.readouterr().out
    names = bcosvit.load_model(bcosvit.weights.hub.converted_path("bcos_vit_tiny_patch16_224")).config.class_names
    assert "explaining 1 file(s) with bcos_vit_tiny_patch16_224" in out and "1000 classes" in out
    assert len(_ranked_classes(out)) == 3 and set(_ranked_classes(out)) <= set(names)
    assert (tmp_path / "figures" / "photo.explained.png").is_file()


def test_explain_with_weights_names_the_model_by_the_published_file(reference, hub_dir, publish, tmp_path, capsys):
    publish(reference.path)
    photo = _photo(tmp_path / "photo.png")
    assert main(["explain", str(photo), "--weights", str(reference.path), "--out", str(tmp_path / "f")]) == 0
    assert "with bcos_vit_tiny_patch16_224" in capsys.readouterr().out
    assert not (hub_dir / "checkpoints").exists()  # the file was used where it is
    other = tmp_path / "mine.pth"
    other.write_bytes(b"x")
    assert main(["explain", str(photo), "--weights", str(other)]) == 2
    assert "is not named like a published file; add --model NAME" in capsys.readouterr().err
    assert main(["explain", str(photo), "--pretrained", "imagenet"]) == 2
    assert "--pretrained chooses the weights of --model NAME" in capsys.readouterr().err


def test_models_shows_shipped_and_published_weights(hub_dir, capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tiny = next(line for line in lines if line.startswith("bcos_vit_tiny_patch16_224 "))
    assert tiny.endswith("imagenet 60.0% (downloadable)")
    assert next(line for line in lines if line.startswith("vitc_micro_28 ")).endswith("shipped")


def test_a_setting_nested_thousands_deep_is_refused_with_a_message(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "--set", "model_options=" + "[" * 100_000 + "]" * 100_000])
    err = capsys.readouterr().err
    assert code == 2 and "nested too deeply" in err and "Traceback" not in err


@pytest.mark.parametrize("port", ["80000", "0", "http"])
def test_serve_refuses_a_port_outside_1_65535_with_a_message(port, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", port])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "port number" in err and "Traceback" not in err


def test_a_recipe_that_is_a_folder_or_a_fifo_is_named_as_such(tmp_path, capsys):
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    for source, message in ((tmp_path, "is a folder; pass a recipe's name"), (fifo, "is not a regular file")):
        assert main(["train", "--recipe", str(source), "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            'model_options={"embed_dim": 16777216, "num_heads": 1}',
            "more than the 2,147,483,648 a bcosvit model may have",
        ),
        ('model_options={"depth": 100000}', "depth 100000 is more than the 1024 blocks"),
        ("num_workers=1000", r"num_workers must lie in \[0, 64\]"),
    ],
)
def test_training_options_beyond_the_bounds_are_refused_before_anything_starts(tmp_path, capsys, setting, message):
    started = time.perf_counter()
    out = tmp_path / "run"
    assert main(["train", "--recipe", "fmnist-demo", "--out", str(out), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and not out.exists()
    assert time.perf_counter() - started < 5


def test_a_headless_backbone_is_refused_by_explain_and_evaluate_naming_what_gives_it_a_head(tmp_path, capsys):
    import bcosvit
    from bcosvit.weights.checkpoint import load_model, save_weights

    model = bcosvit.create_model("bcos_vit_nano_patch4_28", num_classes=0)
    path = save_weights(model, tmp_path / "backbone", {"model_name": "bcos_vit_nano_patch4_28"})
    assert load_model(path).num_classes == 0  # the library loads it: a feature extractor
    from PIL import Image

    Image.new("L", (28, 28), 128).save(tmp_path / "image.png")
    for command in (
        ["explain", str(tmp_path / "image.png"), "--checkpoint", str(path), "--out", str(tmp_path / "x")],
        ["evaluate", "--checkpoint", str(path), "--out", str(tmp_path / "e")],
    ):
        assert main(command) != 0
        err = capsys.readouterr().err
        assert "headless backbone" in err and "--teacher-features" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "e").exists()
