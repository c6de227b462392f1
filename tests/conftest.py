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
