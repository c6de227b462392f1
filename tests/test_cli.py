"""The command line: listing models and clear errors instead of tracebacks."""

import subprocess
import sys
from pathlib import Path

from bcosvit.cli import main

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


def test_bad_training_value_gives_a_one_line_error_not_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "bcosvit", "train", "--preset", "fmnist-demo", "--epochs", "0", "--data-dir", SUBSET],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: epochs must be >= 1" in result.stderr and "Traceback" not in result.stderr


def test_missing_dataset_gives_install_instructions(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bcosvit",
            "train",
            "--preset",
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


def test_unknown_preset_lists_the_available_ones(capsys):
    assert main(["train", "--preset", "nope"]) == 2
    assert "fmnist-demo" in capsys.readouterr().err
