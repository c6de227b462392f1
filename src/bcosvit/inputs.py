"""Images as the tensor a model computes with: the one conversion (and check) behind every function of
the library that takes images (explanations, attributions, metrics, the explorer).

Images are ``(N, C, H, W)``: a tensor or an array-like (numpy array, nested lists) of floats in [0, 1]
of any float dtype, or of uint8 in [0, 255]. ``as_model_input`` turns them into a tensor in the
model's dtype on the model's device and checks them: any model's input with
``bcosvit.models.vit.check_images`` (a floating-point ``(N, C, H, W)`` tensor), a bcosvit
``VisionTransformer``'s with its ``check_input`` (which begins with ``check_images``; then the size,
device, dtype, NaN/Inf and values far outside [0, 1]).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .errors import InputError
from .models.vit import VisionTransformer, check_images

__all__ = ["ImagesLike", "as_model_input", "model_tensor"]

ImagesLike = Any  # a Tensor, numpy array or nested lists of shape (N, C, H, W); see as_model_input


def model_tensor(model: nn.Module) -> Tensor | None:
    """The tensor whose device and dtype ``model`` computes in: its first floating-point parameter (else
    its first floating-point buffer); None for a model that has neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def as_model_input(model: nn.Module, images: ImagesLike) -> Tensor:
    """``images`` as the checked ``(N, C, H, W)`` tensor ``model`` computes with.

    Accepts a tensor or an array-like (numpy array, nested lists) of floats in [0, 1] of any float
    dtype, or of uint8 in [0, 255] (divided by 255). Returns a tensor on the device and in the dtype
    of ``model``'s first floating-point parameter (``model_tensor``; unchanged for a model without
    one), ``images`` itself when it already is one. Raises ``InputError`` for other dtypes, for what
    ``check_images`` rejects (not ``(N, C, H, W)``) and, for a bcosvit ``VisionTransformer``, for what
    ``model.check_input`` rejects (channels, size, NaN/Inf, values far outside [0, 1]).
    """
    if not isinstance(images, Tensor):
        try:
            images = torch.as_tensor(images)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"expected images as a tensor or an array of shape (N, C, H, W), got {type(images).__name__} ({exc})"
            ) from None
    if images.is_inference():
        images = images.clone()  # a tensor made under torch.inference_mode() cannot be saved for backward
    if not images.is_floating_point() and images.dtype != torch.uint8:
        raise InputError(
            f"expected float images in [0, 1] or uint8 images in [0, 255], got dtype {images.dtype}; "
            "convert them to float and divide by their maximum value (255 for 8-bit images)"
        )
    reference = model_tensor(model)
    converted = images if reference is None else images.to(device=reference.device, dtype=reference.dtype)
    if images.dtype == torch.uint8:
        converted = converted / 255
    if isinstance(model, VisionTransformer):
        model.check_input(converted)
    else:
        check_images(converted)
    return converted
