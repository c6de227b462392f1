"""Explanation mode: one switch that makes every dynamic-linear layer detach its dynamic factors, and
the state models are explained and measured in (``attribution_state``), which includes it.

In explanation mode a layer computes the same forward value, but the input-dependent factors of
its weight matrix ``W(x)`` are treated as constants, so the input gradient of any output is the
row of the dynamic linear map ``W(x)`` (docs/design.md#explanation-mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ConfigError


class DetachableModule(nn.Module):
    """Base for layers whose dynamic factors can be detached (``self.detach`` is the switch)."""

    def __init__(self) -> None:
        super().__init__()
        self.detach = False


def set_explanation_mode(model: nn.Module, enabled: bool) -> None:
    """Switch explanation mode on or off for every detachable layer inside ``model``."""
    for module in model.modules():
        if isinstance(module, DetachableModule):
            module.detach = enabled


def is_explanation_mode(model: nn.Module) -> bool:
    """True when any detachable layer of ``model`` is in explanation mode."""
    return any(m.detach for m in model.modules() if isinstance(m, DetachableModule))


@contextlib.contextmanager
def explanation_mode(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Context manager (and decorator) putting ``model`` in explanation mode.

    Every layer's previous state is restored on exit, also when an exception is raised::

        with explanation_mode(model):
            logits = model(images)        # gradients of logits w.r.t. the encoded input = w(x)
    """
    previous = {m: m.detach for m in model.modules() if isinstance(m, DetachableModule)}
    try:
        for module in previous:
            module.detach = enabled
        yield model
    finally:
        for module, state in previous.items():
            module.detach = state


def _require_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise ConfigError(
            "explanations and gradient-based attributions need autograd, which torch.inference_mode() switches off; "
            "call them outside the inference_mode block (torch.no_grad() around them is fine: they switch "
            "gradients on themselves)"
        )


@contextlib.contextmanager
def attribution_state(
    model: nn.Module,
    explanation: bool | None = True,
    gradients: bool | None = True,
    *,
    input_gradients_only: bool = False,
) -> Iterator[nn.Module]:
    """Context manager for explaining or measuring ``model``: eval mode, no gradient checkpointing,
    explanation mode on (exact explanations) or off (post-hoc gradients), gradients on or off.

    ``explanation=None`` or ``gradients=None`` leaves explanation mode or autograd as they are (the
    metrics run any model, and any attribution method, which sets its own). ``input_gradients_only``:
    the parameters stop requiring gradients inside the block, so the forward pass records no graph
    for them (weight normalisation, weight-gradient inputs): for passes that differentiate with
    respect to the input or activations only (10-15 % of an explanation's time on the main job's
    model). Every module's training flag, the gradient checkpointing switch (of models that have
    one), explanation mode and each parameter's ``requires_grad`` are restored on exit, also when an
    exception is raised. Raises ``ConfigError`` under ``torch.inference_mode()`` when gradients are
    asked for.
    """
    if gradients:
        _require_autograd()
    training = {module: module.training for module in model.modules()}
    checkpointing = getattr(model, "grad_checkpointing", None)
    trainable = [p for p in model.parameters() if p.requires_grad] if input_gradients_only else []
    model.eval()
    if checkpointing is not None:
        model.grad_checkpointing = False
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        with contextlib.ExitStack() as stack:
            if explanation is not None:
                stack.enter_context(explanation_mode(model, enabled=explanation))
            if gradients is not None:
                stack.enter_context(torch.set_grad_enabled(gradients))
            yield model
    finally:
        for module, was_training in training.items():
            module.training = was_training
        if checkpointing is not None:
            model.grad_checkpointing = checkpointing
        for parameter in trainable:
            parameter.requires_grad_(True)
