"""Exact explanations of B-cos models: ``w(x)`` from one backward pass (SPEC §2.3, §6).

In explanation mode a B-cos model is the linear map ``logit = w(x)·z + positional + logit_bias``
of its encoded input ``z = [x, 1 - x]``. The gradient of the logit with respect to ``z`` is
``w(x)``; the gradient with respect to the embedded tokens, multiplied with the additive
positional embedding, is the positional term. Both come from the same backward pass, for the
whole batch at once, and once per explained class when several classes are asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from .errors import ConfigError, InputError
from .layers import explanation_mode
from .models.vit import VisionTransformer

TargetLike = int | Sequence[int] | Sequence[Sequence[int]] | Tensor | None


@dataclass
class Explanation:
    """The dynamic linear explanation of a batch.

    ``[T,]`` marks the axis present when several targets per image were asked for.

    Attributes:
        logits: ``(N, K)`` model outputs.
        target: ``(N,)`` or ``(N, T)`` explained classes (or units, for intermediate explanations).
        outputs: ``(N, [T])`` the explained values (the target logits, or the intermediate units).
        inputs: ``(N, 2C, H, W)`` encoded input ``[x, 1 - x]`` the weights apply to.
        weights: ``(N, [T,] 2C, H, W)`` dynamic linear weights ``w(x)``.
        contributions: ``(N, [T,] H, W)`` = ``(weights * inputs).sum`` over channels.
        positional: ``(N, [T])`` contribution of the additive positional embedding (0 when none).
        logit_bias: the constant added to every logit (0 for intermediate units).
        completeness_error: ``(N, [T])`` ``|outputs - contributions.sum - positional - logit_bias|``, float64.
    """

    logits: Tensor
    target: Tensor
    outputs: Tensor
    inputs: Tensor
    weights: Tensor
    contributions: Tensor
    positional: Tensor
    logit_bias: float
    completeness_error: Tensor

    @property
    def probabilities(self) -> Tensor:
        """``(N, K)`` class probabilities ``sigmoid(logits)`` (the B-cos training objective is BCE)."""
        return torch.sigmoid(self.logits)

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
        """``(N, [T])`` completeness error divided by ``max(|outputs|, 1e-12)``."""
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


_PLURAL = {"class": "classes", "token": "tokens", "channel": "channels"}


def normalize_target(target: TargetLike, default: Tensor, num_outputs: int, what: str = "class") -> Tensor:
    """Turn ``target`` into a long tensor ``(N,)`` or ``(N, T)``; ``default`` ``(N,)`` is used for None."""
    n = default.shape[0]
    if target is None:
        return default
    if isinstance(target, int):
        t = torch.full((n,), target, dtype=torch.long)
    else:
        t = torch.as_tensor(target)
        if t.is_floating_point():
            raise InputError(f"{what} targets must be integers, got dtype {t.dtype}")
        t = t.long()
        if t.ndim == 0:
            t = t.expand(n)
        elif t.ndim > 2 or t.shape[0] != n:
            raise InputError(
                f"target must be an int, a sequence of {n} {_PLURAL[what]} (one per image) or a tensor of shape "
                f"({n}, T); got shape {tuple(t.shape)}"
            )
        elif t.ndim == 2 and t.shape[1] == 0:
            raise InputError(f"target of shape {tuple(t.shape)} names no {_PLURAL[what]}; give at least one per image")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_outputs):
        raise InputError(f"{what} targets must lie in [0, {num_outputs - 1}], got values {t.unique().tolist()[:10]}")
    return t.to(default.device)


@contextlib.contextmanager
def attribution_state(model: VisionTransformer, explanation: bool = True) -> Iterator[None]:
    """Eval mode, gradients on, no gradient checkpointing, explanation mode on (exact explanations)
    or off (post-hoc gradients); the model's previous states are restored on exit."""
    was_training, checkpointing = model.training, model.grad_checkpointing
    model.eval()
    model.grad_checkpointing = False
    try:
        with explanation_mode(model, enabled=explanation), torch.enable_grad():
            yield
    finally:
        model.train(was_training)
        model.grad_checkpointing = checkpointing


@dataclass
class _Pass:
    logits: Tensor
    inputs: Tensor  # leaf: encoded images
    embedded: Tensor | None  # tokens after the positional embedding (when it is additive)
    positional: Tensor | None  # (L, D) the additive embedding itself
    layer_tokens: Tensor | None  # tokens at the requested layer


def _forward(model: VisionTransformer, images: Tensor, layer: int | None) -> _Pass:
    """One explanation-mode forward pass capturing the tensors the backward pass needs."""
    captured: dict[str, Tensor] = {}

    def encoded_leaf(module, args, output):
        captured["inputs"] = output.detach().requires_grad_(True)
        return captured["inputs"]

    def capture(name):
        def hook(module, args, output):
            captured[name] = output[0] if isinstance(output, tuple) else output
            if name == "embedded":
                captured["grid"] = args[1]

        return hook

    handles = [model.encode.register_forward_hook(encoded_leaf)]
    if model.pos_embed is not None:
        handles.append(model.pos_embed.register_forward_hook(capture("embedded")))
    if layer is not None:
        module = model.blocks[layer - 1] if layer > 0 else (model.pos_embed or model.tokenizer)
        handles.append(module.register_forward_hook(capture("layer_tokens")))
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    positional = model.pos_embed.embedding(captured["grid"]) if model.pos_embed is not None else None
    return _Pass(logits, captured["inputs"], captured.get("embedded"), positional, captured.get("layer_tokens"))


def _backward(
    outputs: Tensor,
    state: _Pass,
    extra: Tensor | None,
    create_graph: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Backward passes for ``outputs`` ``(N, T)``: weights ``(N, T, 2C, H, W)``, positional ``(N, T)``,
    and (if ``extra`` is given) the gradient w.r.t. ``extra`` ``(N, T, ...)``."""
    sources = [state.inputs]
    if state.embedded is not None:
        sources.append(state.embedded)
    if extra is not None:
        sources.append(extra)
    weights, positional, extras = [], [], []
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
        if state.embedded is not None:
            positional.append((grads[1] * state.positional).sum(dim=(1, 2)))
        else:
            positional.append(outputs.new_zeros(outputs.shape[0]))
        if extra is not None:
            extras.append(grads[-1])
    return (
        torch.stack(weights, dim=1),
        torch.stack(positional, dim=1),
        torch.stack(extras, dim=1) if extra is not None else None,
    )


def _assemble(
    logits: Tensor, target: Tensor, outputs: Tensor, state: _Pass, weights: Tensor, positional: Tensor, bias: float
) -> Explanation:
    detach = not weights.requires_grad
    inputs = state.inputs.detach() if detach else state.inputs
    contributions = (weights * inputs.unsqueeze(1)).sum(dim=2)
    # In float64, so that a float32 model's error is not rounded away against the logit bias.
    error = (
        outputs.detach().double()
        - contributions.detach().double().flatten(2).sum(dim=2)
        - positional.detach().double()
        - bias
    ).abs()
    if target.ndim == 1:
        outputs, weights, contributions, positional, error = (
            t.squeeze(1) for t in (outputs, weights, contributions, positional, error)
        )
    return Explanation(
        logits=logits.detach() if detach else logits,
        target=target,
        outputs=outputs.detach() if detach else outputs,
        inputs=inputs,
        weights=weights,
        contributions=contributions,
        positional=positional.detach() if detach else positional,
        logit_bias=bias,
        completeness_error=error,
    )


def explain(model: nn.Module, images: Tensor, target: TargetLike = None, *, create_graph: bool = False) -> Explanation:
    """Exact explanations ``w(x)`` of a B-cos model for a batch of images.

    Args:
        model: a B-cos ``VisionTransformer``.
        images: ``(N, C, H, W)`` in [0, 1].
        target: None (the predicted class), an int (the same class for every image), a sequence of
            N classes, or an ``(N, T)`` tensor of T classes per image. One forward pass serves all
            targets; each target costs one backward pass for the whole batch.
        create_graph: keep the graph so the weights can be differentiated again (explanation-
            regularised training); parameter gradients are otherwise never touched.

    Returns:
        an ``Explanation``; its ``completeness_error`` checks ``logit = w·z + positional + bias``.
    """
    model = _require_bcos(model)
    with attribution_state(model):
        state = _forward(model, images, layer=None)
        logits = state.logits
        target = normalize_target(target, logits.argmax(dim=1).detach(), logits.shape[1])
        index = target if target.ndim == 2 else target[:, None]
        outputs = logits.gather(1, index)
        weights, positional, _ = _backward(outputs, state, None, create_graph)
    return _assemble(logits, target, outputs, state, weights, positional, model.logit_bias_value)


def _check_layer(model: VisionTransformer, layer: int) -> int:
    depth = len(model.blocks)
    if not -depth - 1 <= layer <= depth:
        raise ConfigError(f"layer must lie in [0, {depth}] (0: embedded tokens, {depth}: last block), got {layer}")
    return layer % (depth + 1)


def explain_unit(
    model: nn.Module, images: Tensor, layer: int, token: int | Sequence[int] | Tensor, channel: TargetLike
) -> Explanation:
    """Explain intermediate units: ``W_{1->layer}(x)`` for channel(s) of one token per image.

    Args:
        layer: 0 for the embedded tokens (after the positional embedding), ``k`` for the output of
            block ``k`` (1-based), ``-1`` for the last block.
        token: the token index (row-major over the token grid), one int or one per image.
        channel: the channel(s) of that token to explain, in the same forms as ``explain``'s target.

    Returns:
        an ``Explanation`` whose ``outputs`` are the unit values and ``target`` the channels.
    """
    model = _require_bcos(model)
    layer = _check_layer(model, layer)
    with attribution_state(model):
        state = _forward(model, images, layer)
        tokens = state.layer_tokens
        n, num_tokens, dim = tokens.shape
        token_index = normalize_target(
            token, torch.zeros(n, dtype=torch.long, device=tokens.device), num_tokens, "token"
        )
        if token_index.ndim != 1:
            raise InputError(f"token must be an int or one index per image, got shape {tuple(token_index.shape)}")
        if channel is None:
            raise InputError("channel is required: the unit(s) of the token to explain")
        channels = normalize_target(channel, token_index, dim, "channel")
        picked = tokens[torch.arange(n, device=tokens.device), token_index]  # (N, D)
        index = channels if channels.ndim == 2 else channels[:, None]
        outputs = picked.gather(1, index)
        weights, positional, _ = _backward(outputs, state, None, create_graph=False)
        if layer == 0 and model.pos_embed is None:
            positional = torch.zeros_like(positional)
    return _assemble(state.logits.detach(), channels, outputs, state, weights, positional, 0.0)


def token_contributions(model: nn.Module, images: Tensor, target: TargetLike = None, layer: int = -1) -> Tensor:
    """Per-token contributions to the target logits at a chosen layer.

    Everything after ``layer`` is bias-free and dynamic linear, so the contributions of the tokens
    ``h`` at that layer, ``(∂logit/∂h · h)`` summed over channels, add up exactly to
    ``logit - logit_bias`` (including the positional part carried by the tokens).

    Args:
        layer: 0 for the embedded tokens, ``k`` for the output of block ``k``, -1 for the last.

    Returns:
        ``(N, [T,] rows, cols)`` contributions on the token grid.
    """
    model = _require_bcos(model)
    layer = _check_layer(model, layer)
    with attribution_state(model):
        state = _forward(model, images, layer)
        logits = state.logits
        target = normalize_target(target, logits.argmax(dim=1).detach(), logits.shape[1])
        index = target if target.ndim == 2 else target[:, None]
        outputs = logits.gather(1, index)
        _, _, token_grads = _backward(outputs, state, state.layer_tokens, create_graph=False)
    per_token = (token_grads * state.layer_tokens.detach().unsqueeze(1)).sum(dim=-1)  # (N, T, L)
    rows = images.shape[-2] // model.patch_size
    per_token = per_token.unflatten(-1, (rows, -1))
    return per_token.squeeze(1) if target.ndim == 1 else per_token
