"""The passes every metric makes: a model or an attribution method run over images in batches, in
``attribution_state`` (eval mode, restored afterwards), with the checks of their inputs and outputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..inputs import as_model_input
from ..layers.detach import attribution_state
from ..models.vit import check_images, class_probabilities
from ..targets import required_classes

AttributionMethod = Callable[[nn.Module, Tensor, Tensor], Tensor]


def is_bcos_model(model: nn.Module, is_bcos: bool | None) -> bool:
    """``is_bcos`` when given, else ``model.is_bcos`` (``ConfigError`` when the model has none)."""
    if is_bcos is not None:
        return bool(is_bcos)
    value = getattr(model, "is_bcos", None)
    if value is None:
        raise ConfigError(
            f"{type(model).__name__} has no 'is_bcos' attribute; pass is_bcos=True (sigmoid probabilities) "
            "or is_bcos=False (softmax probabilities)"
        )
    return bool(value)


def target_probabilities(logits: Tensor, target: Tensor, is_bcos: bool) -> Tensor:
    """``(N,)`` probability of ``target`` ``(N,)`` from ``logits`` ``(N, K)`` (``class_probabilities``:
    sigmoid for B-cos models, softmax for standard ones)."""
    return class_probabilities(logits, is_bcos, target.to(logits.device).long()[:, None]).squeeze(1)


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")


def as_maps(maps: Tensor, images: Tensor) -> Tensor:
    """Validate a method's output for ``images`` ``(B, C, H, W)``: ``(B, H, W)`` (channels summed), float64."""
    if not isinstance(maps, Tensor):
        raise InputError(f"the attribution method must return a tensor, got {type(maps).__name__}")
    b, c, h, w = images.shape
    if maps.ndim == 4 and maps.shape[0] == b and maps.shape[2:] == (h, w):
        maps = maps.sum(dim=1)
    if maps.shape != (b, h, w):
        raise InputError(
            f"the attribution method must return maps of shape (N, H, W) = {(b, h, w)} for images {(b, c, h, w)}, "
            f"got {tuple(maps.shape)}"
        )
    maps = maps.detach().double()
    if not bool(torch.isfinite(maps).all()):
        raise InputError("the attribution method returned NaN or Inf values")
    return maps


def compute_attributions(
    model: nn.Module, images: Tensor, target: Tensor | Sequence[int], method: AttributionMethod, batch_size: int = 32
) -> Tensor:
    """Run ``method`` over ``images`` ``(N, C, H, W)`` and ``target`` ``(N,)`` in batches.

    Returns:
        ``(N, H, W)`` float64 maps on the CPU (ready for ``deletion_insertion``).
    """
    check_images(images)
    check_batch_size(batch_size)
    target = required_classes(target, images.shape[0])
    out = []
    with attribution_state(model, explanation=None, gradients=None):
        for start in range(0, images.shape[0], batch_size):
            x = as_model_input(model, images[start : start + batch_size])
            t = target[start : start + batch_size].to(x.device)
            out.append(as_maps(method(model, x, t), x).cpu())
    return torch.cat(out) if out else images.new_zeros((0, *images.shape[2:]), dtype=torch.float64)


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, batch_size: int = 32) -> Tensor:
    """Logits ``(N, K)`` of ``model`` (in eval mode) for ``images`` ``(N, C, H, W)``, on the CPU."""
    check_images(images)
    check_batch_size(batch_size)
    with attribution_state(model, explanation=None, gradients=None):
        parts = [
            model(as_model_input(model, images[start : start + batch_size])).float().cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
    return torch.cat(parts) if parts else torch.zeros(0, 0)
