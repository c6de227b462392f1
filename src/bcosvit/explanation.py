"""Exact explanations of B-cos models: ``w(x)`` from one backward pass (docs/design.md: completeness).

In explanation mode a B-cos model is the linear map ``logit = w(x)·z + positional + logit_bias``
of its encoded input ``z = [x, 1 - x]``. The gradient of the logit with respect to ``z`` is
``w(x)``; the gradient with respect to the embedded tokens, multiplied with the additive
positional embedding, is the positional term. Both come from the same backward pass, for the
whole batch at once, and once per explained class when several classes are asked for.

Every function here takes images as a tensor or an array-like (numpy array, nested lists) of shape
``(N, C, H, W)``: floats in [0, 1] of any dtype, or uint8 in [0, 255]. They are converted to the
model's dtype and device (``bcosvit.inputs.as_model_input``) and every tensor returned is in that
dtype, on that device.

Every result keeps its target axis, whatever form the target takes (as Captum's results do not
depend on the argument's form): ``(N, T, ...)`` with ``T = 1`` for None, an int, a class name or one
class per image, ``T`` for an ``(N, T)`` tensor and ``k`` for ``TopK(k)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, InputError
from .inputs import ImagesLike, as_model_input
from .layers.detach import attribution_state
from .models.vit import Capture, CaptureRecord, VisionTransformer, check_pixel_values, class_probabilities
from .targets import TargetLike, normalize_target, target_columns

BaselineLike = Any  # a pixel value in [0, 1], or a tensor/array broadcastable to (C, H, W)


@dataclass
class Explanation:
    """The dynamic linear explanation of a batch, for ``T`` targets per image.

    The target axis ``T`` is always there (``T = 1`` for one target per image). Tensors are in the
    model's dtype and on its device, except ``target`` (long) and ``completeness_error`` (float64).

    Channel order: the encoded input is ``[x, 1 - x]`` along the channel axis, so of the ``2C``
    channels of ``inputs`` and ``weights`` the first ``C`` belong to the image ``x`` and the last
    ``C`` to its inverse ``1 - x``; ``signed_weights`` folds them into one weight per image channel.

    Attributes:
        logits: ``(N, K)`` model outputs.
        target: ``(N, T)`` explained classes (or units, for intermediate explanations).
        outputs: ``(N, T)`` the explained values (the target logits, or the intermediate units).
        inputs: ``(N, 2C, H, W)`` encoded input ``[x, 1 - x]`` the weights apply to.
        weights: ``(N, T, 2C, H, W)`` dynamic linear weights ``w(x)`` (channels ``[x, 1 - x]``).
        contributions: ``(N, T, H, W)`` = ``(weights * (inputs - [b, 1 - b])).sum`` over channels, with
            ``b`` the baseline image (``explain(..., baseline=b)``); without a baseline ``(weights * inputs).sum``.
        positional: ``(N, T)`` contribution of the additive positional embedding (0 when none).
        logit_bias: the constant added to every logit (0 for intermediate units).
        at_baseline: ``(N, T)`` the explanation's linear map at the baseline image,
            ``w(x)·[b, 1 - b] + positional + logit_bias`` (without a baseline: at the encoded input 0,
            ``positional + logit_bias``). ``contributions`` sum to ``outputs - at_baseline``.
        completeness_error: ``(N, T)`` ``|outputs - contributions.sum - at_baseline|``, in float64.
    """

    logits: Tensor
    target: Tensor
    outputs: Tensor
    inputs: Tensor
    weights: Tensor
    contributions: Tensor
    positional: Tensor
    logit_bias: float
    at_baseline: Tensor
    completeness_error: Tensor

    @property
    def signed_weights(self) -> Tensor:
        """``(N, T, C, H, W)`` ``w_x - w_(1-x)``: the weight of brightening each pixel of each channel.

        The linear map changes by ``(signed_weights * dx).sum()`` when the image changes by ``dx``
        (``[x + dx, 1 - x - dx]`` moves the two halves of the encoding in opposite directions).
        """
        image_part, inverse_part = self.weights.chunk(2, dim=-3)
        return image_part - inverse_part

    @property
    def probabilities(self) -> Tensor:
        """``(N, K)`` class probabilities ``sigmoid(logits)`` (``bcosvit.models.class_probabilities`` of
        a B-cos model: its training objective is BCE)."""
        return class_probabilities(self.logits, is_bcos=True)

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __getitem__(self, index: int | slice | Tensor) -> Explanation:
        """The explanation of a subset of the batch (an int keeps a batch axis of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        batched = {f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "logit_bias"}
        return replace(self, **batched)

    @property
    def relative_completeness_error(self) -> Tensor:
        """``(N, T)`` completeness error divided by ``max(|outputs|, 1e-12)``."""
        return self.completeness_error / self.outputs.abs().clamp_min(1e-12)


def _require_bcos(model: nn.Module) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"explain() needs a bcosvit VisionTransformer, got {type(model).__name__}")
    if not model.is_bcos:
        raise ConfigError(
            "explain() gives exact explanations of B-cos models only; this is a standard model "
            "(use the post-hoc methods in bcosvit.attribution for it)"
        )
    return model


def baseline_image(baseline: BaselineLike, images: Tensor) -> Tensor:
    """``baseline`` (a pixel value, or a tensor/array broadcastable to ``(C, H, W)``, in [0, 1]) as an
    image ``(1, C, H, W)`` in the dtype and on the device of ``images`` ``(N, C, H, W)``."""
    try:
        value = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"baseline must be a number or a tensor broadcastable to (C, H, W); got {baseline!r} ({exc})"
        ) from None
    try:
        image = value.expand(images.shape[1:]).unsqueeze(0)
    except RuntimeError:
        raise InputError(
            f"baseline of shape {tuple(value.shape)} does not broadcast to the images' {tuple(images.shape[1:])}; "
            "give a number or a tensor broadcastable to (C, H, W)"
        ) from None
    check_pixel_values(image)
    return image


def dynamic_linear_weights(
    record: CaptureRecord,
    outputs: Tensor,
    create_graph: bool = False,
    *,
    layer: int | Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The dynamic linear map of ``outputs`` ``(N, T)``, computed from ``record`` in explanation mode.

    One backward pass per column of ``outputs``, each for the whole batch. Neither switches modes
    nor checks anything: the caller ran ``model(images, capture=...)`` in explanation mode (for
    ``w(x)``; outside it the same call gives plain input gradients) and ``outputs`` come from it.

    Args:
        record: the capturing pass's record.
        outputs: ``(N, T)`` values computed from it (target logits, or units of ``record.tokens``).
        create_graph: keep the graph so the results can be differentiated again (a loss on the
            explanation that trains the parameters).
        layer: a key of ``record.tokens``, or a sequence of them: also return the gradients with
            respect to those tokens (all layers from the same backward passes).

    Returns:
        ``weights`` ``(N, T, C', H, W)`` = ``∂outputs/∂record.inputs`` (``w(x)``), ``positional``
        ``(N, T)`` = ``∂outputs/∂record.embedded · record.positional`` (0 where the model adds no
        positional embedding), and ``(N, T, L, D)`` = ``∂outputs/∂record.tokens[layer]`` (for a
        sequence of K layers ``(N, T, K, L, D)``; None without ``layer``).
    """
    several = layer is not None and not isinstance(layer, int)
    layers = [] if layer is None else list(layer) if several else [layer]
    sources = [record.inputs]
    if record.positional is not None:
        sources.append(record.embedded)
    first_token_source = len(sources)
    sources.extend(record.tokens[k] for k in layers)
    weights, positional, token_grads = [], [], []
    num_targets = outputs.shape[1]
    for t in range(num_targets):
        grads = torch.autograd.grad(
            outputs[:, t].sum(),
            sources,
            retain_graph=create_graph or t < num_targets - 1,
            create_graph=create_graph,
            allow_unused=True,
        )
        grads = [torch.zeros_like(s) if g is None else g for s, g in zip(sources, grads)]
        weights.append(grads[0])
        if record.positional is not None:
            positional.append((grads[1] * record.positional).sum(dim=(1, 2)))
        if layers:
            per_layer = grads[first_token_source:]
            token_grads.append(torch.stack(per_layer, dim=1) if several else per_layer[0])
    return (
        torch.stack(weights, dim=1),
        torch.stack(positional, dim=1) if positional else outputs.new_zeros(outputs.shape),
        torch.stack(token_grads, dim=1) if token_grads else None,
    )


def _assemble(
    logits: Tensor,
    target: Tensor,
    outputs: Tensor,
    inputs: Tensor,
    weights: Tensor,
    positional: Tensor,
    bias: float,
    encoded_baseline: Tensor | None = None,
) -> Explanation:
    """The ``Explanation`` from the passes' results ``(N, T, ...)`` (``target`` ``(N, T)``) and the encoded
    ``inputs`` ``(N, 2C, H, W)``;
    ``encoded_baseline`` ``(1, 2C, H, W)`` is ``[b, 1 - b]`` of the baseline image (None: contributions
    relative to the encoded input 0)."""
    detach = not weights.requires_grad
    inputs = inputs.detach() if detach else inputs
    if encoded_baseline is None:
        contributions = (weights * inputs.unsqueeze(1)).sum(dim=2)
        baseline_term = torch.zeros_like(positional)
    else:
        contributions = (weights * (inputs - encoded_baseline).unsqueeze(1)).sum(dim=2)
        baseline_term = (weights * encoded_baseline.unsqueeze(1)).flatten(2).sum(dim=2)
    # In float64, so that a float32 model's error is not rounded away against the logit bias.
    error = (
        outputs.detach().double()
        - contributions.detach().double().flatten(2).sum(dim=2)
        - baseline_term.detach().double()
        - positional.detach().double()
        - bias
    ).abs()
    at_baseline = baseline_term + positional + bias
    return Explanation(
        logits=logits.detach() if detach else logits,
        target=target,
        outputs=outputs.detach() if detach else outputs,
        inputs=inputs,
        weights=weights,
        contributions=contributions,
        positional=positional.detach() if detach else positional,
        logit_bias=bias,
        at_baseline=at_baseline.detach() if detach else at_baseline,
        completeness_error=error,
    )


def _class_targets(model: VisionTransformer, logits: Tensor, target: TargetLike) -> tuple[Tensor, Tensor]:
    """The classes to explain ``(N, T)`` (None: the predicted ones; ``TopK(k)``: the ``k`` largest
    logits), and their logits ``(N, T)``."""
    target = target_columns(target, logits, "class", model.config.class_names)
    return target, logits.gather(1, target)


def explain(
    model: nn.Module,
    images: ImagesLike,
    target: TargetLike = None,
    *,
    baseline: BaselineLike | None = None,
    create_graph: bool = False,
) -> Explanation:
    """Exact explanations ``w(x)`` of a B-cos model for a batch of images.

    Args:
        model: a B-cos ``VisionTransformer``.
        images: ``(N, C, H, W)`` in [0, 1] (any float dtype, or uint8 in [0, 255]), a tensor or an
            array-like (numpy, lists); computed in the model's dtype on the model's device.
        target: None (the predicted class), an int (the same class for every image), a sequence of
            N classes, an ``(N, T)`` tensor of T classes per image, or ``bcosvit.TopK(k)`` (each
            image's k most likely classes, from the same forward pass). Classes may be given by name
            (a str, or lists of them) when the model has ``config.class_names``. One forward pass
            serves all targets; each target costs one backward pass for the whole batch.
        baseline: None, or the baseline image's pixel value in [0, 1] or a tensor broadcastable to
            ``(C, H, W)`` (e.g. per-channel means ``(C, 1, 1)``): the contributions are then the
            weights applied to the change from the baseline, ``w(x)·([x, 1 - x] - [b, 1 - b])``, and
            sum to the target logit minus the explanation's linear map at the baseline image
            (``at_baseline``; the positional term and the logit bias cancel). A pixel equal to the
            baseline contributes 0. Without a baseline the contributions are relative to the encoded
            input 0, which no image encodes to (a black pixel is ``[0, 1]``).
        create_graph: keep the graph so the weights can be differentiated again (explanation-
            regularised training); parameter gradients are otherwise never touched.

    Returns:
        an ``Explanation`` of ``T`` targets per image (``weights`` ``(N, T, 2C, H, W)``, ``T = 1``
        unless an ``(N, T)`` tensor or ``TopK`` asks for more), in the model's dtype and on its
        device; its ``completeness_error`` ``(N, T)`` checks ``logit = contributions.sum + at_baseline``,
        i.e. ``w·z + positional + bias``.

    Raises ``ConfigError`` under ``torch.inference_mode()`` (explanations need autograd; they work
    under ``torch.no_grad()``).
    """
    model = _require_bcos(model)
    images = as_model_input(model, images)
    encoded_baseline = None if baseline is None else model.encode(baseline_image(baseline, images))
    with attribution_state(model, input_gradients_only=not create_graph):
        logits, record = model(images, capture=Capture(), check=False)  # as_model_input checked the images
        target, outputs = _class_targets(model, logits, target)
        weights, positional, _ = dynamic_linear_weights(record, outputs, create_graph)
    bias = model.logit_bias_value
    return _assemble(logits, target, outputs, record.inputs, weights, positional, bias, encoded_baseline)


UNIT_CHOICES = ("max", "norm")  # explain_unit's channel choices by name, besides channel indices and TopK


def explain_unit(
    model: nn.Module,
    images: ImagesLike,
    layer: int,
    token: int | Sequence[int] | Tensor,
    channel: TargetLike,
) -> Explanation:
    """Explain intermediate units: ``W_{1->layer}(x)`` for channel(s) of one token per image.

    Args:
        layer: 0 for the embedded tokens (after the positional embedding), ``k`` for the output of
            block ``k`` (1-based), ``-1`` for the last block.
        token: the token index (row-major over the token grid, after the class token where the model
            has one: index 0 is then the class token), one int or one per image.
        channel: the channel(s) of that token to explain, in the same forms as ``explain``'s target
            (``TopK(k)``: the token's ``k`` largest channels); or ``"max"``: each image's channel of
            largest value at that token; or ``"norm"``: the token's norm ``||h|| = (h / ||h||) · h``,
            the unit along the token's own direction (the direction, like every input-dependent
            factor in explanation mode, held constant).

    Returns:
        an ``Explanation`` whose ``outputs`` are the unit values ``(N, T)`` and ``target`` the
        channels ``(N, T)`` (for ``"norm"``: -1; ``T = 1`` for one channel), in the model's dtype and
        on its device (``images`` as in ``explain``).
    """
    model = _require_bcos(model)
    images = as_model_input(model, images)
    with attribution_state(model, input_gradients_only=True):
        logits, record = model(images, capture=Capture(layers=(layer,)), check=False)
        tokens = record.tokens[layer]
        n, num_tokens, dim = tokens.shape
        token_index = normalize_target(
            token, torch.zeros(n, dtype=torch.long, device=tokens.device), num_tokens, "token", name="token"
        )
        if token_index.ndim != 1:
            raise InputError(f"token must be an int or one index per image, got shape {tuple(token_index.shape)}")
        if channel is None:
            raise InputError(f"channel is required: the unit(s) of the token to explain, or one of {UNIT_CHOICES}")
        picked = tokens[torch.arange(n, device=tokens.device), token_index]  # (N, D)
        if isinstance(channel, str) and channel in UNIT_CHOICES:
            channel = picked.detach().argmax(dim=1) if channel == "max" else None
        if channel is None:  # "norm": the token along its own direction
            direction = picked.detach() / picked.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)
            channels = torch.full((n, 1), -1, dtype=torch.long, device=tokens.device)
            outputs = (picked * direction).sum(dim=1, keepdim=True)
        else:
            channels = target_columns(channel, picked, "channel")
            outputs = picked.gather(1, channels)
        weights, positional, _ = dynamic_linear_weights(record, outputs)
    return _assemble(logits.detach(), channels, outputs, record.inputs, weights, positional, 0.0)


def token_contributions(
    model: nn.Module, images: ImagesLike, target: TargetLike = None, layer: int | Sequence[int] = -1
) -> Tensor:
    """Per-token contributions to the target logits at a chosen layer (or at several).

    Everything after ``layer`` is bias-free and dynamic linear, so the contributions of the tokens
    ``h`` at that layer, ``(∂logit/∂h · h)`` summed over channels, add up exactly to
    ``logit - logit_bias`` (including the positional part carried by the tokens); a class token's
    share is not on the grid and is left out.

    Args:
        layer: 0 for the embedded tokens, ``k`` for the output of block ``k``, -1 for the last; or
            a sequence of K such layers, all computed from one forward and one backward pass per
            target (e.g. ``range(model.config.depth + 1)``: where the evidence sits block by block).

    Returns:
        ``(N, T, rows, cols)`` contributions on the token grid, or ``(N, T, K, rows, cols)`` for a
        sequence of K layers, in the model's dtype and on its device (``images`` and ``target`` as
        in ``explain``: ``T = 1`` for one class per image, ``k`` for ``TopK(k)``).
    """
    model = _require_bcos(model)
    images = as_model_input(model, images)
    several = not isinstance(layer, int)
    layers = tuple(layer) if several else (layer,)
    if not layers:
        raise InputError("layer must be a layer index or a non-empty sequence of them")
    with attribution_state(model, input_gradients_only=True):
        logits, record = model(images, capture=Capture(layers=layers), check=False)
        target, outputs = _class_targets(model, logits, target)
        _, _, token_grads = dynamic_linear_weights(record, outputs, layer=list(layers))
    tokens = torch.stack([record.tokens[k].detach() for k in layers], dim=1)  # (N, K, L, D)
    per_token = (token_grads * tokens.unsqueeze(1)).sum(dim=-1)  # (N, T, K, L)
    per_token = per_token[..., record.num_prefix_tokens :].unflatten(-1, record.grid)  # (N, T, K, rows, cols)
    return per_token if several else per_token[:, :, 0]
