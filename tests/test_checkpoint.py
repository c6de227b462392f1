"""Weights files: round trip, and clear errors for missing, corrupt or mismatched files."""

import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import bcosvit
from bcosvit import CheckpointError, ConfigError
from bcosvit.weights import checkpoint
from bcosvit.weights.checkpoint import load_model, load_state_dict, save_weights


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


def edit_metadata(folder, change):
    """Rewrite ``folder/model.json`` with ``change(meta)`` applied (it returns the new JSON value)."""
    path = folder / "model.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def test_edited_architecture_fails_on_the_weights_header_before_the_model_is_built(tmp_path):
    saved_model(tmp_path)
    edit_metadata(tmp_path, lambda m: {**m, "architecture": {**m["architecture"], "embed_dim": 96}})
    with pytest.raises(CheckpointError, match=r"architecture in model.json: shape mismatch .*vs model \(96"):
        load_model(tmp_path)


def test_an_architecture_beyond_the_bound_is_refused_from_its_config_alone(tmp_path):
    saved_model(tmp_path)
    edit_metadata(tmp_path, lambda m: {**m, "architecture": {**m["architecture"], "embed_dim": 16777216}})
    started = time.perf_counter()
    # building this model would need about 50 PB: the config is refused before any shape is made
    with pytest.raises(CheckpointError, match=r"needs about [0-9,]+ values .* more than the 2,147,483,648"):
        load_model(tmp_path)
    assert time.perf_counter() - started < 5


def test_a_consistent_pair_larger_than_the_bound_is_refused(tmp_path, monkeypatch):
    saved_model(tmp_path)
    monkeypatch.setattr(checkpoint, "MAX_MODEL_VALUES", 10_000)
    with pytest.raises(CheckpointError, match="needs [0-9,]+ values, more than the 10,000 a checkpoint may ask for"):
        load_model(tmp_path)


def _with_architecture(**change):
    return lambda m: {**m, "architecture": {**m["architecture"], **change}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: [m], "must hold a JSON object, got list"),
        (lambda m: None, "must hold a JSON object, got NoneType"),
        (lambda m: {k: v for k, v in m.items() if k != "architecture"}, "has no 'architecture'"),
        (lambda m: {**m, "notes": "x"}, r"unknown field\(s\) \['notes'\]"),
        (lambda m: {**m, "epoch": "3"}, "'epoch' must be of type int"),
        (lambda m: {**m, "ema": 1}, "'ema' must be of type bool"),
        (lambda m: {**m, "metrics": {"test_top1": "90%"}}, "'metrics' must map names to numbers"),
        (lambda m: {**m, "classes": ["a", "b"]}, "'classes' must be 10 strings"),
        (lambda m: {**m, "classes": list(range(10))}, "'classes' must be 10 strings"),
        (_with_architecture(num_classes="10"), "num_classes must be a non-negative integer, got '10'"),
        (_with_architecture(embed_dim=64.0), "embed_dim must be a positive integer"),
        (_with_architecture(mlp_ratio="4"), "mlp_ratio must be a finite number"),
        (_with_architecture(bcos="yes"), "bcos must be true or false"),
        (_with_architecture(stem_channels=[32, "64"]), "stem_channels must be null or a list of positive integers"),
        (_with_architecture(class_names=["a", "b"]), r"class_names needs one name per class \(10\), got 2"),
        (_with_architecture(class_names=[str(i) for i in range(9)] + [9]), "class_names must be null or a list of str"),
        (_with_architecture(depth=10**9), "depth 1000000000 is more than the 1024 blocks"),
        (_with_architecture(heads=2), r"unknown architecture option\(s\) \['heads'\]"),
    ],
)
def test_hand_edited_metadata_is_refused_naming_the_field(tmp_path, change, message):
    saved_model(tmp_path)
    edit_metadata(tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


def test_metadata_that_repeats_a_field_is_refused_naming_it(tmp_path):
    saved_model(tmp_path)
    path = tmp_path / "model.json"
    path.write_text(path.read_text().replace('"num_classes": 10', '"num_classes": 10, "num_classes": 12'))
    with pytest.raises(CheckpointError, match=r"repeats the field\(s\) \['num_classes'\]"):
        load_model(tmp_path)


def test_weights_and_metadata_from_different_saves_are_detected(tmp_path):
    # the crash window of a save: model.safetensors already renamed, model.json still the old one
    saved_model(tmp_path / "epoch3")
    torch.manual_seed(1)
    save_weights(bcosvit.create_model("bcos_vit_nano_patch4_28"), tmp_path / "epoch4" / "model.safetensors", {})
    shutil.copy(tmp_path / "epoch4" / "model.safetensors", tmp_path / "epoch3" / "model.safetensors")
    with pytest.raises(CheckpointError, match="come from different saves.*--resume"):
        load_model(tmp_path / "epoch3")


def test_pairs_written_before_weights_ids_still_load(tmp_path):
    model = saved_model(tmp_path)
    save_file(load_file(str(tmp_path / "model.safetensors")), str(tmp_path / "model.safetensors"))  # no header id
    edit_metadata(tmp_path, lambda m: {k: v for k, v in m.items() if k != "weights_id"})
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(load_model(tmp_path)(x), model.eval()(x), rtol=0, atol=0)


def test_ship_weights_copies_a_run_into_a_shipped_folder(tmp_path):
    from bcosvit.weights import ship_weights

    model = bcosvit.create_model("bcos_vit_nano_patch4_28", num_classes=3, class_names=["a", "b", "c"]).eval()
    run = tmp_path / "run"
    meta = {"model_name": "bcos_vit_nano_patch4_28", "epoch": 4, "classes": ["a", "b", "c"]}
    save_weights(model, run / "model.safetensors", meta)
    path = ship_weights(run, dest=tmp_path / "shipped")
    assert path == tmp_path / "shipped" / "bcos_vit_nano_patch4_28.safetensors"
    meta = bcosvit.weights.read_metadata(path)
    assert (meta["epoch"], meta["classes"], meta["shipped_from"]) == (4, ["a", "b", "c"], str(run))
    assert meta["weights_id"] != bcosvit.weights.read_metadata(run)["weights_id"]  # a save of its own
    shipped = load_model(path)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(shipped(x), model(x), rtol=0, atol=0)


def test_ship_weights_refuses_an_unregistered_name(tmp_path):
    from bcosvit.weights import ship_weights

    model = bcosvit.create_model("bcos_vit_nano_patch4_28").eval()
    save_weights(model, tmp_path / "run" / "model.safetensors", {"model_name": "bcos_vit_nano_patch4_28"})
    with pytest.raises(ConfigError, match="unknown model name 'not_a_model'"):
        ship_weights(tmp_path / "run", name="not_a_model", dest=tmp_path / "shipped")
    assert not (tmp_path / "shipped").exists()


def test_metadata_nested_thousands_deep_is_refused_as_corrupt(tmp_path):
    saved_model(tmp_path)
    (tmp_path / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="corrupt .nested too deeply"):
        load_model(tmp_path)


def test_metadata_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    saved_model(tmp_path)
    (tmp_path / "model.json").unlink()
    os.mkfifo(tmp_path / "model.json")
    with pytest.raises(CheckpointError, match=r"is a named pipe \(FIFO\), not a metadata file"):
        load_model(tmp_path)
