"""timm teachers (``timm:NAME``): read from a weights file or the local cache only, converted with
``from_timm`` to the same logits, refused clearly when anything does not fit, and named by
``bcosvit train --bcosify-from`` and ``bcosvit align --teacher`` into runs that record and resume them.

The timm models are tiny (32 px, 8 px patches, 2 blocks of width 48) and never pretrained: their
random weights are saved to a file in ``tmp_path``; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bcosvit import ConfigError, load_model
from bcosvit.app.cli import main
from bcosvit.app.data import load_dataset
from bcosvit.app.training.recipes import build_recipe
from bcosvit.app.training.teacher import (
    TimmSource,
    bcos_student,
    bcos_twin_name,
    load_teacher,
    teacher_input,
    teacher_source,
)
from tests.test_train import SUBSET

timm = pytest.importorskip("timm")

ARCH = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2, num_classes=10)


def source_of(**kwargs) -> str:
    """``timm:ARCH?KEY=VALUE&...`` for the tiny model with ``kwargs`` changed."""
    return f"timm:{ARCH}?" + "&".join(f"{k}={v}" for k, v in {**TINY, **kwargs}.items())


SOURCE = source_of()
HEADLESS = source_of(num_classes=0)


def timm_model(**kwargs) -> torch.nn.Module:
    return timm.create_model(ARCH, pretrained=False, **{**TINY, **kwargs}).eval()


def saved(tmp_path: Path, name: str = "teacher.safetensors", **kwargs) -> tuple[torch.nn.Module, Path]:
    """A tiny random timm ViT and the safetensors file of its weights."""
    model = timm_model(**kwargs)
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


# --- loading ------------------------------------------------------------------------------------


def test_load_teacher_from_a_weights_file_computes_timms_logits_in_float64(tmp_path):
    model, path = saved(tmp_path)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # timm's model is built, loaded and converted in float64
    try:
        teacher = load_teacher(SOURCE, weights=path)
    finally:
        torch.set_default_dtype(previous)
    assert not teacher.is_bcos and not teacher.training and teacher.num_classes == 10
    assert (teacher.in_chans, teacher.image_size, teacher.config.depth) == (3, 32, 2)
    images = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    mean, std = (torch.tensor(model.pretrained_cfg[k], dtype=torch.float64).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        expected = model.double()((images - mean) / std)
        logits = teacher(images)
    assert logits.dtype == torch.float64
    assert float((logits - expected).abs().max() / expected.abs().max()) < 1e-9


def test_a_torch_checkpoint_around_the_state_dict_loads_the_same_weights(tmp_path):
    model, path = saved(tmp_path)
    reference = load_teacher(SOURCE, weights=path).state_dict()
    for key in ("state_dict", "model"):
        checkpoint = tmp_path / f"{key}.pt"
        torch.save({key: model.state_dict(), "epoch": 3, "optimizer": {}}, checkpoint)
        state = load_teacher(SOURCE, weights=checkpoint).state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    assert load_teacher(SOURCE, weights=plain).num_classes == 10


def test_weights_of_another_model_are_refused_naming_missing_unexpected_and_shapes(tmp_path):
    _, deeper = saved(tmp_path, "deeper.safetensors", depth=3)
    with pytest.raises(ConfigError, match=r"unexpected \['blocks\.2\.") as info:
        load_teacher(SOURCE, weights=deeper)
    assert "timm.create_model('vit_tiny_patch16_224'" in str(info.value) and "depth=2" in str(info.value)
    with pytest.raises(ConfigError, match=r"missing \['blocks\.2\."):
        load_teacher(source_of(depth=3), weights=saved(tmp_path)[1])
    _, wider = saved(tmp_path, "wider.safetensors", embed_dim=64)
    with pytest.raises(ConfigError, match=r"shape mismatch .*file \(64,\) vs model \(48,\)"):
        load_teacher(SOURCE, weights=wider)


@pytest.mark.parametrize("name", ["broken.safetensors", "broken.pt"])
def test_a_corrupt_weights_file_is_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not a weights file" * 10)
    with pytest.raises(ConfigError, match="is corrupt or no"):
        load_teacher(SOURCE, weights=path)


def test_a_weights_file_that_is_no_state_dict_a_folder_or_missing_is_refused(tmp_path):
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ConfigError, match="holds no state dict"):
        load_teacher(SOURCE, weights=tensor)
    with pytest.raises(ConfigError, match="is a directory"):
        load_teacher(SOURCE, weights=tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_teacher(SOURCE, weights=tmp_path / "nowhere.safetensors")


def test_a_pickle_with_code_and_a_file_far_larger_than_the_model_are_refused(tmp_path, monkeypatch):
    from bcosvit.app.training import teacher

    code = tmp_path / "code.pt"
    torch.save({"state_dict": {"x": Path("/")}}, code)  # a pickled object: weights_only refuses it
    with pytest.raises(ConfigError, match=r"corrupt or no PyTorch \(weights_only\)"):
        load_teacher(SOURCE, weights=code)
    model, _ = saved(tmp_path)
    padded = tmp_path / "padded.safetensors"
    values = sum(v.numel() for v in model.state_dict().values())
    save_file({**model.state_dict(), "extra": torch.zeros(6 * values)}, str(padded))
    monkeypatch.setattr(teacher, "_WEIGHTS_SLACK", 0)
    with pytest.raises(ConfigError, match="more than 5 times the float32 weights of timm.create_model"):
        load_teacher(SOURCE, weights=padded)


def test_a_weights_file_changed_since_the_run_recorded_it_is_refused(tmp_path):
    _, path = saved(tmp_path)
    recorded = teacher_source(SOURCE, path)
    save_file({k: v.contiguous() for k, v in timm_model().state_dict().items()}, str(path))  # other random weights
    with pytest.raises(ConfigError, match="has changed since it was recorded"):
        load_teacher(recorded)


def test_an_unknown_timm_name_suggests_close_names():
    with pytest.raises(ConfigError, match="close names: vit_tiny_patch16_224"):
        load_teacher("timm:vit_tiny_patch16_22")
    with pytest.raises(ConfigError, match="no pretrained tag 'nope'; its tags: vit_tiny_patch16_224.augreg"):
        load_teacher(f"timm:{ARCH}.nope")
    with pytest.raises(ConfigError, match="unexpected keyword argument 'bogus'"):
        load_teacher(source_of(bogus=1))
    with pytest.raises(ConfigError, match="not a VisionTransformer"):
        load_teacher("timm:resnet18")


def test_without_weights_an_empty_cache_says_pass_weights_or_fill_it(tmp_path, monkeypatch):
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    online = hf_constants.HF_HUB_OFFLINE
    with pytest.raises(ConfigError, match="not in the local cache.*pass --weights FILE.*fill the cache"):
        load_teacher(f"timm:{ARCH}?img_size=32")
    assert "HF_HUB_OFFLINE" not in os.environ and hf_constants.HF_HUB_OFFLINE == online  # for that call only
    assert not any((tmp_path / "hf").rglob("*.safetensors")) and not (tmp_path / "torch").exists()


def test_without_weights_the_teacher_comes_from_the_users_own_cache_offline(tmp_path, monkeypatch):
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    model = timm_model()
    repo = tmp_path / f"models--timm--{model.pretrained_cfg['hf_hub_id'].split('/')[-1]}"  # Hugging Face's layout
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    teacher = load_teacher(SOURCE)
    assert torch.equal(teacher.state_dict()["blocks.1.mlp.fc2.weight"], model.state_dict()["blocks.1.mlp.fc2.weight"])


def test_no_download_is_started_while_timm_is_asked_for_weights(tmp_path):
    from bcosvit.app.training.teacher import _offline

    with _offline(), pytest.raises(RuntimeError, match="downloads nothing"):
        torch.hub.load_state_dict_from_url("https://example.invalid/weights.pth", model_dir=str(tmp_path))
    assert not any(tmp_path.iterdir()) and torch.hub.download_url_to_file.__module__ == "torch.hub"


def test_without_timm_a_timm_teacher_says_pip_install_timm(tmp_path, monkeypatch):
    _, path = saved(tmp_path)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ConfigError, match="pip install timm"):
        load_teacher(SOURCE, weights=path)


def test_the_recorded_source_is_canonical_with_the_files_path_and_sha256(tmp_path, monkeypatch):
    _, path = saved(tmp_path)
    monkeypatch.chdir(tmp_path)
    recorded = teacher_source(f"{SOURCE}&global_pool=token", "teacher.safetensors", features=True)
    spec = TimmSource.parse(recorded)
    assert spec.weights == str(path) and spec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert spec.features and spec.kwargs == {**TINY, "global_pool": "token"}
    assert str(spec) == recorded == teacher_source(recorded)  # canonical: reading it back changes nothing
    assert recorded.startswith(f"timm:{ARCH}?depth=2&embed_dim=48&global_pool=token&img_size=32&")
    assert bcos_twin_name(recorded) == f"bcos_timm:{ARCH}" and teacher_input(recorded) == (3, 32)
    odd = tmp_path / "a b&c=d.safetensors"
    path.rename(odd)
    assert TimmSource.parse(teacher_source(SOURCE, odd)).weights == str(odd)  # escaped and read back
    with pytest.raises(ConfigError, match="is the weights file of a timm teacher"):
        teacher_source("vitc_micro_28", odd)
    for bad, message in [
        ("timm:", "needs a model name"),
        (f"timm:{ARCH}?depth", "expected KEY=VALUE"),
        (f"timm:{ARCH}?depth=2&depth=3", "given twice"),
        (f"timm:{ARCH}?pretrained=true", "choose where timm reads weights"),
        (f"timm:{ARCH}?sha256=abc", "64 hex digits"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TimmSource.parse(bad)


def test_a_recipe_key_names_a_timm_teacher_whose_input_size_the_data_take(tmp_path, monkeypatch):
    _, path = saved(tmp_path)
    monkeypatch.chdir(tmp_path)
    tables = {"train": {"model": f"bcos_timm:{ARCH}", "bcosify_from": f"{SOURCE}&weights=teacher.safetensors"}}
    config = build_recipe("", tables).stages[0].config
    assert config.image_size == 32 and config.is_bcos
    assert TimmSource.parse(config.bcosify_from).weights == str(path)
    assert TimmSource.parse(config.bcosify_from).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match="do not go together"):
        build_recipe("", {"train": {"bcosify_from": SOURCE}})  # a registered model for a timm teacher
    with pytest.raises(ConfigError, match="do not go together"):
        build_recipe("", {"train": {"model": f"bcos_timm:{ARCH}"}})  # the timm family without its teacher


def test_fashion_mnist_is_read_as_rgb_for_a_teacher_that_reads_rgb():
    grey, spec = load_dataset("fashion-mnist", "test", SUBSET, 32)
    rgb, rgb_spec = load_dataset("fashion-mnist", "test", SUBSET, 32, in_chans=3)
    image, _ = rgb[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert all(torch.equal(channel, grey[0][0][0]) for channel in image)
    assert (rgb_spec.in_chans, rgb_spec.mean, spec.in_chans) == (3, spec.mean * 3, 1)


# --- bcosvit train / align ----------------------------------------------------------------------

QUICK = ["--data-dir", SUBSET, "--batch-size", "32", "--no-progress"]
QUICK += ["--set", "train_subset=64", "--set", "test_subset=32"]


def test_train_bcosify_from_a_timm_teacher_records_it_and_resumes(tmp_path, capsys):
    _, path = saved(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--bcosify-from", SOURCE, "--weights", str(path), "--out", str(out), "--epochs", "2", *QUICK]
    assert main([*args, "--stop-after", "1", "--set", "explain_examples=false"]) == 0
    stored = json.loads((out / "config.json").read_text())
    spec = TimmSource.parse(stored["bcosify_from"])
    assert (spec.name, spec.weights, spec.kwargs) == (ARCH, str(path), TINY)
    assert spec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert stored["model"] == f"bcos_timm:{ARCH}" and stored["image_size"] == 32
    assert main([*args, "--resume", "--set", "explain_examples=false"]) == 0
    printed = capsys.readouterr().out
    assert f"training bcos_timm:{ARCH}" in printed and "resuming" in printed and "epoch 2/2" in printed
    model = load_model(out)
    assert model.is_bcos and (model.in_chans, model.image_size, model.config.b) == (3, 32, 2.0)
    assert json.loads((out / "model.json").read_text())["model_name"] == f"bcos_timm:{ARCH}"
    save_file({k: v.contiguous() for k, v in timm_model().state_dict().items()}, str(path))  # the file changes
    assert main([*args, "--resume", "--set", "explain_examples=false"]) == 2
    assert "different settings for ['bcosify_from']" in capsys.readouterr().err


def test_train_refuses_teacher_features_and_weights_without_a_timm_teacher(tmp_path, capsys):
    _, path = saved(tmp_path)
    out = str(tmp_path / "run")
    assert main(["train", "--bcosify-from", SOURCE, "--weights", str(path), "--teacher-features", "--out", out]) == 2
    assert "--teacher-features is bcosvit align's" in capsys.readouterr().err
    assert main(["train", "--weights", str(path), "--out", out]) == 2
    assert "--bcosify-from timm:NAME" in capsys.readouterr().err
    assert main(["train", "--bcosify-from", "vitc_micro_28", "--weights", str(path), "--out", out]) == 2
    assert "is the weights file of a timm teacher" in capsys.readouterr().err


def test_align_to_a_timm_teacher_runs_both_stages_and_resumes(tmp_path, capsys):
    _, path = saved(tmp_path)
    out = tmp_path / "aloe"
    args = ["align", "--teacher", SOURCE, "--weights", str(path), "--out", str(out), "--epochs", "1", *QUICK]
    assert main(args) == 0  # with the explanation figure of the last stage, on RGB test images
    printed = capsys.readouterr().out
    assert "aligning to timm:" in printed and "linear probe" in printed
    stored = json.loads((out / "align" / "config.json").read_text())
    assert stored["align_to"] == stored["bcosify_from"] == teacher_source(SOURCE, path)
    assert stored["image_size"] == 32 and (out / "head" / "explanations.png").is_file()
    model = load_model(out / "head")
    assert model.is_bcos and model.num_classes == 10 and model.in_chans == 3
    assert main([*args, "--resume"]) == 0
    assert "stage head: finished" in capsys.readouterr().out


def test_a_headless_teacher_needs_teacher_features_and_gives_the_student_a_head(tmp_path, capsys):
    _, path = saved(tmp_path, num_classes=0)
    out = tmp_path / "aloe"
    args = ["align", "--teacher", HEADLESS, "--weights", str(path), "--out", str(out), "--epochs", "1", *QUICK]
    args += ["--set", "explain_examples=false"]
    assert main(args) == 2  # refused before anything is written
    assert "headless backbone" in (err := capsys.readouterr().err) and "--teacher-features" in err
    assert not out.exists()
    assert main([*args, "--teacher-features"]) == 0
    model = load_model(out / "head")
    assert model.is_bcos and model.num_classes == 10 and model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert TimmSource.parse(json.loads((out / "head" / "config.json").read_text())["bcosify_from"]).features
    features = teacher_source(HEADLESS, path, features=True)
    assert bcos_student(features, 10).num_classes == 10
    with pytest.raises(ConfigError, match="headless backbone.*--teacher-features"):
        bcos_student(teacher_source(HEADLESS, path), 10)
