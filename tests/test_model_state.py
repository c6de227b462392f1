"""``attribution_state``: the one context manager in which models are explained and measured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bcosvit
from bcosvit import metrics
from bcosvit.errors import ConfigError
from bcosvit.layers import is_explanation_mode
from bcosvit.layers.detach import attribution_state


def _state(model: nn.Module) -> tuple:
    return [m.training for m in model.modules()], model.grad_checkpointing, is_explanation_mode(model)


def test_every_state_is_restored_also_after_an_exception(tiny):
    tiny.train()
    tiny.blocks[0].eval()  # a frozen part keeps its own mode
    tiny.set_grad_checkpointing(True)
    before = _state(tiny)
    with pytest.raises(RuntimeError, match="inside"), attribution_state(tiny):
        assert not any(m.training for m in tiny.modules())
        assert not tiny.grad_checkpointing and is_explanation_mode(tiny) and torch.is_grad_enabled()
        raise RuntimeError("inside")
    assert _state(tiny) == before and before[0][0] and not tiny.blocks[0].training


@pytest.mark.parametrize("explanation", [True, False, None])
@pytest.mark.parametrize("gradients", [True, False, None])
def test_explanation_mode_and_gradients_are_switched_or_left_as_they_are(tiny, explanation, gradients):
    bcosvit.layers.set_explanation_mode(tiny, True)
    with torch.no_grad(), attribution_state(tiny, explanation=explanation, gradients=gradients):
        assert is_explanation_mode(tiny) == (True if explanation is None else explanation)
        assert torch.is_grad_enabled() == (False if gradients is None else gradients)
    assert is_explanation_mode(tiny) and torch.is_grad_enabled()


def test_any_module_can_be_measured_and_inference_mode_refuses_gradients_only():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    with torch.inference_mode():
        with attribution_state(model, explanation=None, gradients=None):
            assert not model.training and not hasattr(model, "grad_checkpointing")
        with pytest.raises(ConfigError, match="need autograd"), attribution_state(model):
            pass
    assert all(m.training for m in model.modules())


def test_explanations_attributions_and_metrics_leave_a_training_model_training(tiny, images):
    x, target = images(4, 1, 8), torch.arange(4)
    tiny.train()
    tiny.set_grad_checkpointing(True)
    before = _state(tiny)
    bcosvit.explain(tiny, x, target)
    bcosvit.attribution.attribute("gradcam", tiny, x, target)
    metrics.predict_logits(tiny, x)
    metrics.compute_attributions(tiny, x, target, lambda m, i, t: i[:, 0])
    metrics.deletion_insertion(tiny, x, target, torch.rand(4, 8, 8), steps=2)
    assert _state(tiny) == before
