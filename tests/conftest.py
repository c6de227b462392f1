"""Shared fixtures: deterministic seeds and a builder for float64 models."""

from __future__ import annotations

import pytest
import torch

import bcosvit

# The suite runs tiny tensors: intra-op threads only add overhead, and on a shared 2-core machine
# oversubscribed OpenMP threads made a small B-cos training step ~100x slower (4 s instead of 40 ms).
torch.set_num_threads(1)


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
