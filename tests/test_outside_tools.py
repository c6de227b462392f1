"""Outside tools see every layer: Quantus' model-parameter randomisation test (MPRT) re-initialises
a model layer by layer through each module's ``reset_parameters``, so a layer without one is
silently left as trained.
"""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch
from quantus.helpers.model.pytorch_model import PyTorchModel
from torch import nn

import bcosvit

TINY = dict(image_size=8, embed_dim=8, depth=1, num_heads=2)
MODELS = {
    "bcos": ("bcos_vit_nano_patch4_28", {}),
    "twin": ("vit_nano_patch4_28", {}),
    "bcos-convstem-learned": ("bcos_vitc_micro_28", {"pos_embed": "learned"}),
    "twin-convstem-learned": ("vitc_micro_28", {"pos_embed": "learned"}),
}


def _parameter_owners(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters directly, in ``named_modules`` order."""
    return [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def _as_if_trained(name: str, **overrides) -> bcosvit.VisionTransformer:
    """A tiny model whose every parameter has moved away from its initial value (ones, zeros included)."""
    model = bcosvit.create_model(name, **TINY, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 + torch.rand_like(p))
    return model


@pytest.mark.parametrize("name, overrides", MODELS.values(), ids=MODELS.keys())
def test_quantus_cascading_randomisation_visits_every_layer_and_changes_every_parameter(name, overrides):
    model = _as_if_trained(name, **overrides)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    images = torch.rand(2, 1, 8, 8)
    wrapped = PyTorchModel(model, channel_first=True, softmax=False, device="cpu")

    visited = []
    with torch.no_grad():
        previous = model(images)
        for layer, randomised in wrapped.get_random_layer_generator(order="top_down", seed=42):
            visited.append(layer)
            logits = randomised(images)
            assert not torch.allclose(logits, previous), f"randomising {layer!r} left the logits unchanged"
            previous = logits

    assert visited == _parameter_owners(model)[::-1]
    assert wrapped.random_layer_generator_length == len(visited)
    for n, p in randomised.named_parameters():
        assert not torch.isclose(p, trained[n]).any(), f"{n} kept some of its trained values"


@pytest.mark.parametrize("name", ["bcos_vit_nano_patch4_28", "vit_nano_patch4_28"])
def test_quantus_mprt_scores_every_layer(name):
    model = _as_if_trained(name)
    images = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    metric = quantus.MPRT(disable_warnings=True)
    # the exact B-cos explanation, or input × gradient for the twin
    kwargs = {} if model.is_bcos else {"method": "input_x_gradient"}
    scores = metric(
        model=model,
        x_batch=images,
        y_batch=np.array([1, 3]),
        explain_func=bcosvit.quantus_explain,
        explain_func_kwargs=kwargs,
        device="cpu",
    )
    assert list(scores) == ["original", *_parameter_owners(model)[::-1]]
    assert all(len(s) == 2 and np.isfinite(s).all() for s in scores.values())
