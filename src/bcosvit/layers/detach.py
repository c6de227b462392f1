"""Explanation mode: one switch that makes every dynamic-linear layer detach its dynamic factors.

In explanation mode a layer computes the same forward value, but the input-dependent factors of
its weight matrix ``W(x)`` are treated as constants, so the input gradient of any output is the
row of the dynamic linear map ``W(x)`` (docs/design.md#explanation-mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


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
