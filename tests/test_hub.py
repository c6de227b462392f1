"""The published ImageNet weights (bcosvit.weights.hub): fetched, verified, converted once and cached.

No network: the registry entry points at a ``file://`` URL of a checkpoint the test writes itself
(the reference's full-size ViT-Ti with random weights, named like a published file), and torch.hub's
folder is a temporary one.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bcosvit
from bcosvit.errors import CheckpointError, ConfigError
from bcosvit.weights import hub
from bcosvit.weights.convert import CONVERSION_VERSION

NAME = "bcos_vit_tiny_patch16_224"
REPO = Path(__file__).resolve().parents[1]


def cache_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_registry_holds_the_sixteen_published_files():
    from bcos.models.pretrained import URLS

    from bcosvit.weights.published import CONVERTIBLE

    assert sorted(hub.PUBLISHED) == sorted(CONVERTIBLE)
    assert sorted(entry.url for entry in hub.PUBLISHED.values()) == sorted(URLS["vit_final"].values())
    for entry in hub.PUBLISHED.values():
        assert entry.file_name.endswith(f"-{entry.sha256_prefix}.pth") and len(entry.sha256_prefix) == 10
        assert 50 < entry.top1 < entry.top5 < 100
    assert hub.PUBLISHED["vitc_small_224"].reference == "standard_vitc_s_patch1_14"
    assert (hub.PUBLISHED["bcos_vit_tiny_patch16_224"].top1, hub.PUBLISHED["bcos_vit_tiny_patch16_224"].top5) == (
        59.960,
        81.838,
    )


def test_download_verifies_converts_and_matches_the_reference_logits(reference, hub_dir, publish):
    publish(reference.path)
    model = bcosvit.create_model(NAME, pretrained="imagenet", progress=False)
    assert not model.training and model.num_classes == 1000
    assert model.config.class_names[:2] == ["tench", "goldfish"]
    with torch.no_grad():
        torch.testing.assert_close(model(reference.image), reference.logits, atol=1e-4, rtol=0)
    assert cache_files(hub_dir) == [
        f"bcosvit/{NAME}-imagenet.json",
        f"bcosvit/{NAME}-imagenet.safetensors",
        f"checkpoints/{reference.path.name}",
    ]
    meta = bcosvit.weights.read_metadata(hub.converted_path(NAME))
    assert meta["source_sha256"] == reference.sha256 and meta["model_name"] == NAME


def test_second_call_reads_the_cache_without_download_or_conversion(reference, hub_dir, monkeypatch, publish):
    publish(reference.path)
    first = bcosvit.create_model(NAME, pretrained="imagenet", progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("the second call must not download or convert")

    monkeypatch.setattr(hub, "download_url_to_file", fail)
    monkeypatch.setattr("bcosvit.weights.convert.convert_official", fail)
    second = bcosvit.create_model(NAME, pretrained="imagenet")
    with torch.no_grad():
        assert torch.equal(first(reference.image), second(reference.image))
    assert second.config.class_names == first.config.class_names
    record = next(r for r in bcosvit.list_pretrained_weights() if r.name == NAME)
    assert (record.weights, record.status, record.location) == ("imagenet", "cached", str(hub.converted_path(NAME)))


def test_a_wrong_hash_is_refused_and_nothing_stays_in_the_cache(reference, hub_dir, tmp_path, publish):
    wrong = tmp_path / "bcos_simple_vit_ti_patch16_224-0123456789.pth"
    wrong.write_bytes(reference.path.read_bytes())
    publish(wrong)
    with pytest.raises(CheckpointError, match="is not the published one.*invalid hash value.*nothing was kept"):
        bcosvit.create_model(NAME, pretrained="imagenet", progress=False)
    assert cache_files(hub_dir) == []


def test_a_truncated_download_is_refused_without_a_cache_entry(reference, hub_dir, tmp_path, publish):
    truncated = tmp_path / reference.path.name
    truncated.write_bytes(reference.path.read_bytes()[: 2**20])
    publish(truncated)
    with pytest.raises(CheckpointError, match="invalid hash value"):
        bcosvit.create_model(NAME, pretrained="imagenet", progress=False)
    assert cache_files(hub_dir) == []


def test_a_connection_closed_early_leaves_no_partial_file(reference, hub_dir, monkeypatch, publish):
    entry = publish(reference.path)

    def cut(url, dst, hash_prefix=None, progress=True):
        Path(f"{dst}.1234.partial").write_bytes(b"half")  # what torch.hub writes ...
        Path(f"{dst}.1234.partial").unlink()  # ... and removes when the read fails
        raise http.client.IncompleteRead(b"half", 100)

    monkeypatch.setattr(hub, "download_url_to_file", cut)
    with pytest.raises(CheckpointError, match=f"cannot download .* from {entry.url}"):
        bcosvit.create_model(NAME, pretrained="imagenet")
    assert cache_files(hub_dir) == []


def test_a_damaged_file_in_the_hub_cache_is_replaced_by_a_verified_download(reference, hub_dir, publish):
    entry = publish(reference.path)
    cached = hub.hub_checkpoint_path(entry)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(reference.path.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="is not the published .* downloading it again"):
        path = hub.fetch_checkpoint(NAME, progress=False)
    assert path == cached and hub.sha256_of(cached) == reference.sha256


def test_a_damaged_hub_cache_file_is_removed_when_the_download_fails(reference, hub_dir, tmp_path, publish):
    entry = publish(tmp_path / "offline" / reference.path.name)
    cached = hub.hub_checkpoint_path(entry)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(reference.path.read_bytes()[:1000])
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="cannot download"):
        hub.fetch_checkpoint(NAME, progress=False)
    assert not cached.exists()


def test_no_network_names_the_url_the_cache_path_and_the_alternatives(hub_dir, tmp_path, publish):
    entry = publish(tmp_path / "unreachable" / "bcos_simple_vit_ti_patch16_224-4b0824b1c1.pth")
    with pytest.raises(CheckpointError) as caught:
        bcosvit.create_model(NAME, pretrained="imagenet", progress=False)
    message = str(caught.value)
    assert f"cannot download the ImageNet weights of {NAME} from {entry.url}" in message
    assert str(hub_dir / "checkpoints" / entry.file_name) in message
    assert "weights=PATH" in message and "--weights PATH" in message and hub.WEIGHTS_DIR_ENV in message


def test_weights_path_is_verified_and_used_without_download(reference, hub_dir, monkeypatch, tmp_path, publish):
    publish(reference.path)  # (its hash; the URL is not used)
    monkeypatch.setattr(hub, "download_url_to_file", lambda *a, **k: pytest.fail("no download with weights="))
    model = bcosvit.create_model(NAME, pretrained="imagenet", weights=reference.path)
    with torch.no_grad():
        torch.testing.assert_close(model(reference.image), reference.logits, atol=1e-4, rtol=0)
    assert hub.converted_path(NAME).exists() and not (hub_dir / "checkpoints").exists()
    # a folder holding the file by its published name works too
    assert hub.fetch_checkpoint(NAME, weights=reference.path.parent) == reference.path
    other = tmp_path / "other.pth"
    other.write_bytes(reference.path.read_bytes()[:-1] + b"x")
    with pytest.raises(CheckpointError, match=r"other.pth is not the published .*bcosvit convert"):
        bcosvit.create_model(NAME, pretrained="imagenet", weights=other)
    with pytest.raises(CheckpointError, match="no file at"):
        bcosvit.create_model(NAME, pretrained="imagenet", weights=tmp_path / "missing.pth")


def test_the_weights_dir_variable_supplies_the_file(reference, hub_dir, monkeypatch, tmp_path, publish):
    publish(reference.path)
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(reference.path.parent))
    monkeypatch.setattr(hub, "download_url_to_file", lambda *a, **k: pytest.fail("no download with the variable"))
    record = next(r for r in bcosvit.list_pretrained_weights() if r.name == NAME)
    assert (record.status, record.location) == ("cached", str(reference.path))
    model = bcosvit.create_model(NAME, pretrained="imagenet")
    with torch.no_grad():
        torch.testing.assert_close(model(reference.image), reference.logits, atol=1e-4, rtol=0)
    # a damaged file there is the user's: refused, not deleted
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / reference.path.name).write_bytes(b"not a checkpoint")
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(folder))
    with pytest.raises(CheckpointError, match="is not the published"):
        hub.fetch_checkpoint(NAME)
    assert (folder / reference.path.name).exists()


def test_a_damaged_conversion_cache_is_converted_again(reference, hub_dir, publish):
    publish(reference.path)
    bcosvit.create_model(NAME, pretrained="imagenet", progress=False)
    hub.converted_path(NAME).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ignoring the cached conversion"):
        model = bcosvit.create_model(NAME, pretrained="imagenet")
    with torch.no_grad():
        torch.testing.assert_close(model(reference.image), reference.logits, atol=1e-4, rtol=0)
    assert bcosvit.load_model(hub.converted_path(NAME)).num_classes == 1000


def test_a_conversion_cached_by_another_conversion_version_is_converted_again(reference, hub_dir, monkeypatch, publish):
    publish(reference.path)
    bcosvit.create_model(NAME, pretrained="imagenet", progress=False)
    assert bcosvit.weights.read_metadata(hub.converted_path(NAME))["conversion_version"] == CONVERSION_VERSION
    monkeypatch.setattr("bcosvit.weights.convert.CONVERSION_VERSION", CONVERSION_VERSION + 1)
    calls = []
    real = bcosvit.weights.convert.convert_official
    monkeypatch.setattr("bcosvit.weights.convert.convert_official", lambda *a, **k: calls.append(a) or real(*a, **k))
    bcosvit.create_model(NAME, pretrained="imagenet", progress=False)
    assert len(calls) == 1
    assert bcosvit.weights.read_metadata(hub.converted_path(NAME))["conversion_version"] == CONVERSION_VERSION + 1


def test_overrides_and_bad_pretrained_values(reference, hub_dir, publish):
    publish(reference.path)
    model = bcosvit.create_model(NAME, pretrained="imagenet", num_classes=10, image_size=160, progress=False)
    assert model.num_classes == 10 and model.image_size == 160 and model.config.class_names is None
    assert model(torch.rand(1, 3, 160, 160)).shape == (1, 10)
    with pytest.raises(ConfigError, match=r"cannot override \['depth'\]"):
        bcosvit.create_model(NAME, pretrained="imagenet", depth=3)
    with pytest.raises(ConfigError, match="pretrained must be False, True or 'shipped'"):
        bcosvit.create_model(NAME, pretrained="imagenet21k")
    with pytest.raises(ConfigError, match="pretrained='imagenet'"):
        bcosvit.create_model(NAME, pretrained=True)
    with pytest.raises(ConfigError, match="no published ImageNet weights for 'bcos_vit_micro_patch4_28'"):
        bcosvit.create_model("bcos_vit_micro_patch4_28", pretrained="imagenet")
    with pytest.raises(ConfigError, match="weights= is the published file"):
        bcosvit.create_model(NAME, weights=reference.path)


def test_list_pretrained_weights_reports_shipped_and_downloadable(hub_dir):
    records = {r.name: r for r in bcosvit.list_pretrained_weights()}
    assert set(bcosvit.list_pretrained()) <= {n for n, r in records.items() if r.status == "shipped"}
    assert {n for n, r in records.items() if r.weights == "imagenet"} == set(hub.PUBLISHED)
    tiny = records[NAME]
    assert (tiny.status, tiny.location, tiny.top1) == ("downloadable", hub.PUBLISHED[NAME].url, 59.96)
    assert [r.name for r in bcosvit.list_pretrained_weights("vitc_*")] == [
        "vitc_micro_28",
        "vitc_tiny_224",
        "vitc_small_224",
        "vitc_base_224",
        "vitc_large_224",
    ]


def _hubconf():
    """hubconf.py imported as torch.hub imports it (a module from a file path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hubconf_has_one_documented_entry_point_per_published_model():
    module = _hubconf()
    # torch.hub.list's rule: the callables whose names do not start with "_"
    entries = [name for name in dir(module) if callable(getattr(module, name)) and not name.startswith("_")]
    assert sorted(entries) == sorted(hub.PUBLISHED)
    assert "top-1 59.960%" in module.bcos_vit_tiny_patch16_224.__doc__
    assert all(__import__(dependency) for dependency in module.dependencies)


def test_hubconf_loads_the_published_models_through_torch_hub(reference, hub_dir, publish):
    publish(reference.path)
    model = torch.hub.load(str(REPO), NAME, source="local", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(reference.image), reference.logits, atol=1e-4, rtol=0)
    assert cache_files(hub_dir / "checkpoints") == [reference.path.name]
    untrained = torch.hub.load(str(REPO), "vitc_tiny_224", source="local", pretrained=False)
    assert isinstance(untrained, bcosvit.VisionTransformer) and not untrained.is_bcos


@pytest.mark.slow
def test_hubconf_imports_the_package_from_src_when_it_is_not_installed(tmp_path):
    # a new interpreter in which every path entry that holds a bcosvit package (an install, an editable
    # install, PYTHONPATH) but not torch is hidden: hubconf.py must find the package in src/ itself
    script = f"""
import sys
from pathlib import Path
sys.path[:] = [p for p in sys.path if not (Path(p, "bcosvit").is_dir() and not Path(p, "torch").is_dir())]
import torch
model = torch.hub.load({str(REPO)!r}, "bcos_vitc_tiny_224", source="local", pretrained=False)
import bcosvit
print(type(model).__name__, bcosvit.__file__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["VisionTransformer", str(REPO / "src" / "bcosvit" / "__init__.py")]


@pytest.mark.parametrize("where", ["missing", "file"])
def test_a_weights_dir_variable_that_names_no_folder_is_an_error_not_ignored(tmp_path, monkeypatch, where):
    target = tmp_path / "weights"
    if where == "file":
        target.write_text("not a folder")
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(target))
    with pytest.raises(CheckpointError, match=f"{hub.WEIGHTS_DIR_ENV} is set to .*which is not a folder"):
        hub.fetch_checkpoint(NAME)


def test_a_damaged_file_with_a_published_name_is_not_listed_as_cached(reference, hub_dir, publish):
    publish(reference.path)
    bcosvit.create_model(NAME, pretrained="imagenet", progress=False)
    record = next(r for r in bcosvit.list_pretrained_weights() if r.name == NAME)
    assert record.status == "cached" and record.location == str(hub.converted_path(NAME))
    hub.converted_path(NAME).write_bytes(b"garbage")
    record = next(r for r in bcosvit.list_pretrained_weights() if r.name == NAME)
    assert record.location == str(hub.hub_checkpoint_path(hub.PUBLISHED[NAME]))  # the download, verified
    hub.hub_checkpoint_path(hub.PUBLISHED[NAME]).write_bytes(b"garbage too")
    record = next(r for r in bcosvit.list_pretrained_weights() if r.name == NAME)
    assert record.status == "downloadable"
