"""Shared fixtures (deterministic seeds, a builder for float64 models) and the opt-in markers.

Tests by speed: a plain ``pytest`` runs the quick tests, which need nothing beyond the Python
packages, and deselects three kinds of test, each marked and registered in pyproject.toml:
``slow`` (training and evaluation runs, published-size models, a new Python interpreter for the
command line or an import check), ``browser`` (the HTML report in headless Chromium; needs
Debian's ``chromium``) and ``ddp`` (two processes started with ``torchrun``). ``pytest --all``
runs every test (``make test`` and CI do); ``pytest -m slow`` (or any ``-m`` expression) picks by
marker instead, and tests named by node id (``file.py::test``) always run. Mark a new test
``slow`` when it takes more than a few seconds on two cores; docs/results.md ("Test suite") has
the timings behind the split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import bcosvit

OPT_IN_MARKERS = ("slow", "browser", "ddp")

# The suite runs tiny tensors: intra-op threads only add overhead, and on a shared 2-core machine
# oversubscribed OpenMP threads made small training steps many times slower (docs/results.md, "Test suite").
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--all", action="store_true", help=f"also run the tests marked {', '.join(OPT_IN_MARKERS)} (make test)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the opt-in tests unless ``--all``, a ``-m`` expression or node ids were given."""
    if config.getoption("--all") or config.option.markexpr or any("::" in arg for arg in config.args):
        return
    opt_in = [item for item in items if any(item.get_closest_marker(name) for name in OPT_IN_MARKERS)]
    if opt_in:
        config.hook.pytest_deselected(items=opt_in)
        chosen = set(opt_in)
        items[:] = [item for item in items if item not in chosen]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _build(name: str, dtype: torch.dtype = torch.float64, **overrides) -> bcosvit.VisionTransformer:
    """Build ``name`` directly in ``dtype`` (no float32 copy of big models), in eval mode."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = bcosvit.create_model(name, **overrides)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


@pytest.fixture
def build():
    """``build(name, dtype=torch.float64, **overrides)`` -> model in eval mode."""
    return _build


@pytest.fixture
def images():
    """``images(n, c, h, w, dtype=torch.float64)`` -> uniform random images in [0, 1]."""

    def make(n: int, c: int, h: int, w: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.rand(n, c, h, h if w is None else w, dtype=dtype)

    return make


@pytest.fixture
def tiny(build):
    """A one-block float64 B-cos model on 8×8 greyscale inputs (2×2 tokens), 10 classes."""
    return build("bcos_vit_nano_patch4_28", image_size=8, depth=1, embed_dim=16, num_heads=2)


# --- Published ImageNet weights without network (tests/test_hub.py, tests/test_cli.py) --------------


@dataclasses.dataclass
class Reference:
    """A reference checkpoint named like a published file, and the reference model's logits on ``image``."""

    path: Path
    sha256: str
    image: torch.Tensor
    logits: torch.Tensor


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Reference:
    """The reference's full-size B-cos ViT-Ti (random weights) saved as
    ``bcos_simple_vit_ti_patch16_224-<sha256 prefix>.pth``, with its logits on one image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from bcos.models.pretrained import simple_vit_ti_patch16_224

        model = simple_vit_ti_patch16_224(pretrained=False).eval()
    folder = tmp_path_factory.mktemp("published")
    raw = folder / "raw.pth"
    torch.save(model.state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    path = raw.rename(folder / f"bcos_simple_vit_ti_patch16_224-{digest[:10]}.pth")
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(torch.cat([image, 1 - image], 1))  # the reference's B-cos input: [x, 1 - x]
    return Reference(path, digest, image, logits)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """torch.hub's folder in tmp_path (restored afterwards), and no BCOSVIT_WEIGHTS_DIR."""
    from bcosvit.weights import hub

    previous = torch.hub.get_dir()
    folder = tmp_path / "torch-hub"
    torch.hub.set_dir(str(folder))
    monkeypatch.delenv(hub.WEIGHTS_DIR_ENV, raising=False)
    yield folder
    torch.hub.set_dir(previous)


@pytest.fixture
def publish(monkeypatch) -> Callable:
    """``publish(path, name="bcos_vit_tiny_patch16_224")``: the registry entry of ``name`` points at
    ``path`` (a file:// URL; the hash in the file's name is the one checked)."""
    from bcosvit.weights import hub

    def point(path: Path, name: str = "bcos_vit_tiny_patch16_224"):
        entry = dataclasses.replace(hub.PUBLISHED[name], url=path.as_uri())
        monkeypatch.setitem(hub.PUBLISHED, name, entry)
        return entry

    return point
