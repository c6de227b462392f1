"""The Hugging Face hub (issue 28 item 5): save_pretrained / from_pretrained / push_to_hub through
huggingface_hub's mixin, with the weights wing's checks on what is loaded.

Nothing reaches the network: folders on disk, a hub cache laid out as huggingface_hub lays it out
(read with ``HF_HUB_OFFLINE``), and ``HfApi``'s two calls of a push replaced by fakes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

import bcosvit
from bcosvit.errors import CheckpointError, ConfigError

huggingface_hub = pytest.importorskip("huggingface_hub")
hf_constants = pytest.importorskip("huggingface_hub.constants")
from bcosvit.weights import hf_hub  # noqa: E402  (after the skip: it imports huggingface_hub)

REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the cache's refs/main holds


def _model(build, name: str = "bcos_vit_nano_patch4_28", **overrides) -> bcosvit.VisionTransformer:
    """A small trained-looking float64 model: random weights, named classes unless headless."""
    options = {"depth": 2, "image_size": 8, "class_names": [f"class {i}" for i in range(10)], **overrides}
    if options.get("num_classes") == 0:
        options["class_names"] = None
    model = build(name, **options)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def _hub_cache(root: Path, repo_id: str, files: Path) -> Path:
    """``files`` (a saved folder) as huggingface_hub's cache holds a downloaded repository:
    ``models--ORG--NAME/snapshots/<commit>/...`` and ``refs/main`` naming the commit."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(files, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return root


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache, with huggingface_hub offline (any request raises ``OfflineModeIsEnabled``)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


# --- a local folder ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bcos_vit_nano_patch4_28", "vit_nano_patch4_28"])
def test_save_pretrained_then_from_pretrained_gives_the_same_logits_exactly(build, images, tmp_path, name):
    model = _model(build, name)
    folder = tmp_path / "saved"
    assert bcosvit.save_pretrained(model, folder) is None
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text()) == model.config.to_dict()  # the ViTConfig dict
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict()) and f.get_tensor("head.weight").dtype == torch.float64
    loaded = bcosvit.from_pretrained(folder, dtype=torch.float64)
    assert isinstance(loaded, hf_hub.HubVisionTransformer) and isinstance(loaded, bcosvit.VisionTransformer)
    assert not loaded.training and loaded.config == model.config
    assert loaded.config.class_names == model.config.class_names
    x = images(3, 1, 8)
    assert torch.equal(loaded(x), model(x))
    if model.is_bcos:  # an ordinary bcosvit model: explained as any
        assert torch.equal(bcosvit.explain(loaded, x).weights, bcosvit.explain(model, x).weights)


def test_the_mixins_methods_and_the_functions_write_the_same_files(build, images, tmp_path):
    model = _model(build)
    hub = hf_hub.as_hub_model(model)
    assert hub.head is model.head and hf_hub.as_hub_model(hub) is hub  # shared, not copied
    hub.save_pretrained(tmp_path / "method")
    hf_hub.save_pretrained(model, tmp_path / "function")
    for name in ("config.json", "README.md"):
        assert (tmp_path / "method" / name).read_text() == (tmp_path / "function" / name).read_text()
    again = hf_hub.HubVisionTransformer.from_pretrained(str(tmp_path / "method"))
    assert next(again.parameters()).dtype == torch.get_default_dtype()  # as load_model: torch's default
    x = images(2, 1, 8)
    torch.testing.assert_close(again(x.float()), model(x).float(), rtol=1e-4, atol=1e-5)
    resized = bcosvit.from_pretrained(tmp_path / "method", image_size=16, dtype=torch.float64)
    assert resized.image_size == 16 and resized(images(1, 1, 16)).shape == (1, 10)
    with pytest.raises(ConfigError, match="expected a bcosvit VisionTransformer"):
        hf_hub.as_hub_model(nn.Linear(2, 2))


def test_the_model_card_names_architecture_classes_preprocessing_and_explanation(build, tmp_path):
    model = _model(build, resize_size=10)
    hf_hub.save_pretrained(model, tmp_path / "bcos")
    card = huggingface_hub.ModelCard.load(tmp_path / "bcos" / "README.md")
    assert card.data.library_name == "bcosvit" and card.data.pipeline_tag == "image-classification"
    assert {"bcos", "explainable-ai", "pytorch_model_hub_mixin"} <= set(card.data.tags)
    text = card.text
    for needle in (
        "`embed_dim` | `64`",
        "`depth` | `2`",
        "`resize_size` | `10`",
        "`class 0`, `class 1`",
        "10 classes",
        "resized to 10 px",
        "centre 8×8 crop",
        "[x, 1 - x]",
        "bcosvit.explain(model",
        '"crop_pct": 0.8',
        'bcosvit.from_pretrained("ORG/NAME")',
    ):
        assert needle in text, needle
    twin = _model(build, "vit_nano_patch4_28", num_classes=0)
    hf_hub.save_pretrained(twin, tmp_path / "twin", model_card_kwargs={"title": "My backbone"})
    card = huggingface_hub.ModelCard.load(tmp_path / "twin" / "README.md")
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert "# My backbone" in card.text and "headless backbone" in card.text
    assert "(x - mean) / std" in card.text and "bcosvit.attribution.attribute" in card.text


# --- the hub: a push to a fake endpoint, a pull from the cache offline ----------------------------


def test_push_to_hub_uploads_the_saved_files_and_they_load_back_from_the_cache(
    build, images, tmp_path, monkeypatch, offline_cache
):
    model = _model(build)
    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = {"repo_id": repo_id, **kwargs}
        shutil.copytree(folder_path, tmp_path / "uploaded")  # what the hub would receive, in one commit
        return f"https://huggingface.co/{repo_id}/commit/{REVISION}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = bcosvit.push_to_hub(model, "bcos-lab/nano", private=True, commit_message="a B-cos nano")
    assert url.endswith(REVISION) and calls["create_repo"]["private"] is True
    assert calls["upload_folder"]["repo_id"] == "bcos-lab/nano"
    assert calls["upload_folder"]["commit_message"] == "a B-cos nano"
    uploaded = tmp_path / "uploaded"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert 'bcosvit.from_pretrained("bcos-lab/nano")' in (uploaded / "README.md").read_text()

    _hub_cache(offline_cache, "bcos-lab/nano", uploaded)
    x = images(2, 1, 8)
    for kwargs in ({}, {"revision": REVISION}, {"local_files_only": True}, {"cache_dir": offline_cache}):
        loaded = bcosvit.from_pretrained("bcos-lab/nano", dtype=torch.float64, **kwargs)
        assert torch.equal(loaded(x), model(x)), kwargs


def test_a_repository_missing_from_the_cache_offline_is_a_clear_error(offline_cache):
    with pytest.raises(CheckpointError, match=r"config.json of 'bcos-lab/absent' is not in the local hub cache"):
        bcosvit.from_pretrained("bcos-lab/absent")
    with pytest.raises(CheckpointError, match="neither a folder nor a Hugging Face repository id"):
        bcosvit.from_pretrained("no/such/folder")


def test_a_repository_without_safetensors_is_refused_without_reading_pickles(build, tmp_path, monkeypatch):
    hf_hub.save_pretrained(_model(build), tmp_path / "saved")
    config = str(tmp_path / "saved" / "config.json")

    def download(*, repo_id, filename, **options):
        if filename == "config.json":
            return config
        raise huggingface_hub.errors.EntryNotFoundError(f"404: {filename} is not in {repo_id}")

    monkeypatch.setattr(hf_hub, "hf_hub_download", download)
    with pytest.raises(CheckpointError, match=r"'bcos-lab/pickled' has no model.safetensors.*safetensors only"):
        bcosvit.from_pretrained("bcos-lab/pickled")


# --- what is loaded is checked first ------------------------------------------------------------


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda f: (f / "config.json").write_text("{not json"), r"config file .*config.json is corrupt"),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "must hold a JSON object, got list"),
        (lambda f: (f / "config.json").write_text('{"depth": 2, "depth": 3}'), r"repeats the field\(s\) \['depth'\]"),
        (lambda f: (f / "config.json").write_bytes(b'{"depth": "\xff"}'), "is corrupt"),
        (lambda f: _edit_config(f, dropout=0.1), "invalid architecture: unknown architecture option.*dropout"),
        (lambda f: _edit_config(f, embed_dim="64"), "invalid architecture: embed_dim must be a positive integer"),
        (lambda f: _edit_config(f, num_classes=2**40, class_names=None), "invalid architecture: .* more than the"),
        (lambda f: _edit_config(f, depth=500), r"config.json asks for depth 500, but the weights file holds \d+"),
        (lambda f: _edit_config(f, embed_dim=32), r"model.safetensors do not match the architecture in config.json"),
        (lambda f: _edit_config(f, num_classes=4, class_names=None), r"shape mismatch head.weight: file \(10, 64\)"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"), "corrupt"),
        (lambda f: (f / "config.json").unlink(), r"has no config.json"),
        (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"), "a pickled pytorch_model.bin is never"),
    ],
)
def test_a_corrupt_or_mismatched_folder_is_a_clear_checkpoint_error(build, tmp_path, corrupt, message):
    folder = tmp_path / "saved"
    hf_hub.save_pretrained(_model(build), folder)
    corrupt(folder)
    with pytest.raises(CheckpointError, match=message):
        bcosvit.from_pretrained(folder)


def test_an_oversized_config_is_refused_before_it_is_read(build, tmp_path, monkeypatch):
    hf_hub.save_pretrained(_model(build), tmp_path)
    monkeypatch.setattr(bcosvit.weights.checkpoint, "MAX_METADATA_BYTES", 64)  # the bound read_json_file applies
    with pytest.raises(CheckpointError, match=r"config.json is \d+ bytes, more than the 64"):
        bcosvit.from_pretrained(tmp_path)


def test_nothing_is_allocated_before_the_shapes_are_checked(build, tmp_path, monkeypatch):
    hf_hub.save_pretrained(_model(build), tmp_path)
    _edit_config(tmp_path, embed_dim=32)
    built = []
    monkeypatch.setattr(hf_hub.HubVisionTransformer, "__init__", lambda self, config: built.append(config))
    with pytest.raises(CheckpointError, match="do not match"):
        bcosvit.from_pretrained(tmp_path)
    assert built == []  # the skeleton is a plain VisionTransformer on "meta"; no HubVisionTransformer was built


# --- huggingface_hub stays optional -------------------------------------------------------------


@pytest.mark.slow
def test_import_bcosvit_imports_huggingface_hub_only_on_first_use():
    code = (
        "import sys, bcosvit\n"
        "assert 'huggingface_hub' not in sys.modules\n"
        "bcosvit.from_pretrained\n"
        "assert 'huggingface_hub' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_without_huggingface_hub_the_models_work_and_the_hub_says_what_to_install(tmp_path):
    code = f"""
import sys
sys.modules["huggingface_hub"] = None  # import huggingface_hub raises ImportError
import torch, bcosvit
from bcosvit.errors import ConfigError
from bcosvit.weights import hf_hub
assert not hf_hub.hub_available()
model = bcosvit.create_model("bcos_vit_nano_patch4_28", depth=1)
assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)
hub = hf_hub.HubVisionTransformer(model.config)
for call in (lambda: bcosvit.from_pretrained("org/name"), lambda: bcosvit.save_pretrained(model, {str(tmp_path)!r}),
             lambda: hub.push_to_hub("org/name")):
    try:
        call()
    except ConfigError as exc:
        assert "pip install huggingface_hub" in str(exc), exc
    else:
        raise AssertionError("no error")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
