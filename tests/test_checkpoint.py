"""Weights files: round trip, and clear errors for missing, corrupt or mismatched files."""

import json

import pytest
import torch

import bcosvit
from bcosvit import CheckpointError, ConfigError
from bcosvit.checkpoint import load_model, load_state_dict, save_weights


def saved_model(tmp_path, name="bcos_vit_nano_patch4_28", **overrides):
    torch.manual_seed(0)
    model = bcosvit.create_model(name, **overrides)
    save_weights(model, tmp_path / "model.safetensors", {"model_name": name, "epoch": 3})
    return model


def test_round_trip_restores_architecture_and_weights(tmp_path):
    model = saved_model(tmp_path, pos_embed="rope", embed_dim=32, attn_distance_penalty=0.5)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config and loaded.config.pos_embed == "rope"
    assert loaded.config.attn_distance_penalty == 0.5
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert json.loads((tmp_path / "model.json").read_text())["epoch"] == 3


def test_loaded_model_accepts_another_input_size_but_not_another_architecture(tmp_path):
    saved_model(tmp_path)
    assert load_model(tmp_path, image_size=36).image_size == 36
    with pytest.raises(ConfigError, match="cannot override \\['embed_dim'\\]"):
        load_model(tmp_path, embed_dim=128)


def test_missing_weights_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no weights at"):
        load_model(tmp_path)


def test_corrupt_weights_are_reported(tmp_path):
    saved_model(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_model(tmp_path)


def test_corrupt_metadata_is_reported(tmp_path):
    saved_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="metadata file .* is corrupt"):
        load_model(tmp_path)


def test_weights_of_another_model_are_reported_with_the_mismatch(tmp_path):
    saved_model(tmp_path)
    other = bcosvit.create_model("bcos_vit_micro_patch4_28")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_state_dict(other, tmp_path)
    standard = bcosvit.create_model("vit_nano_patch4_28")
    with pytest.raises(CheckpointError, match="missing .*unexpected|missing"):
        load_state_dict(standard, tmp_path)


def test_pretrained_without_shipped_weights_says_what_exists():
    name = "bcos_vit_mini_patch8_64"
    assert name not in bcosvit.list_pretrained()
    with pytest.raises(ConfigError, match="no shipped weights"):
        bcosvit.create_model(name, pretrained=True)
