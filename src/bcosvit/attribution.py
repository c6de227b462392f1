"""Post-hoc attribution baselines for any ``VisionTransformer`` (docs/design.md: post-hoc baselines), B-cos or
standard twin.

One call, in the spirit of Captum's ``attribute(inputs, target=...)``::

    maps = bcosvit.attribution.attribute("integrated_gradients", model, images, target)

``images`` are ``(N, C, H, W)`` in [0, 1]: a tensor or an array-like (numpy, lists) of any float
dtype, or uint8 in [0, 255], computed in the model's dtype on the model's device (the same
conversion and checks as ``bcosvit.explain``). ``target`` may name classes when the model has
``config.class_names``. ``maps`` are ``(N, H, W)`` float32 torch tensors at input resolution,
detached, on the model's device. Every method explains the whole batch at once.

Methods (``METHODS``):

- ``"input_x_gradient"``: ``x · ∂logit/∂x`` (Captum ``InputXGradient``), summed over channels.
- ``"integrated_gradients"``: Captum ``IntegratedGradients`` from a black image (all zeros, i.e.
  the baseline is the image ``x = 0``, *before* the model's own encoding; for a B-cos model the
  encoded baseline is ``[0, 1]``, for a standard twin it is ``(0 - mean) / std``), Gauss-Legendre
  quadrature with ``n_steps`` points (default 20), summed over channels. The sum of the map
  approximates ``logit(x) - logit(0)`` (completeness).
- ``"gradient"``: plain saliency (Captum ``Saliency``): by default the *absolute* input gradient
  ``|∂logit/∂x|`` (Simonyan et al. 2014; Captum's default), summed over channels. The signed
  gradient is available with ``abs=False``; signed, input-weighted maps are ``input_x_gradient``.
- ``"gradcam"``: Grad-CAM on the tokens after the last block ``h = forward_features(x)`` ``(N, L, D)``:
  channel weights ``α_d = mean_tokens ∂logit/∂h_d``, map ``ReLU(Σ_d α_d h_d)`` on the token grid,
  bilinearly upsampled to ``(H, W)``.
- ``"rollout"``: attention rollout (Abnar & Zuidema 2020): per block the head-averaged attention
  plus identity, rows re-normalised, ``R = Â_L ··· Â_1``. Class-agnostic: ``target`` is ignored.
- ``"transformer_attribution"``: the gradient-weighted rollout of Chefer, Gur & Wolf, "Generic
  Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"
  (ICCV 2021), for self-attention: ``Ā_l = mean_heads (∇A_l ⊙ A_l)^+``, ``R = I``,
  ``R ← R + Ā_l R`` for blocks ``l = 1 .. L``. (Not the LRP-based method of their CVPR 2021 paper.)
- ``"bcos"``: the exact explanation of a B-cos model, ``bcosvit.explain(...).contributions``; with
  ``baseline=b``, ``bcosvit.explain(..., baseline=b).contributions``: the same weights applied to the
  change from the baseline image ``b``.

Token relevance: a model that pools by averaging its patch tokens (``global_pool="avg"``, the
published models) lets the logit see every output token equally, so for ``rollout`` and
``transformer_attribution`` the relevance of input token ``j`` is the mean over the output patch
tokens ``i`` of ``R[i, j]``; a model that classifies from a class token (``global_pool="token"``)
reads the class token's row. Token maps are laid out on the token grid
``(H // patch_size, W // patch_size)`` and bilinearly upsampled (``align_corners=False``) to ``(H, W)``.

All methods run in eval mode with gradient checkpointing and explanation mode switched off (the
post-hoc methods need the model's ordinary gradients), restore those states afterwards, and compute
gradients with ``torch.autograd.grad`` only, so parameter ``.grad`` fields are never touched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from torch import Tensor, nn

from .errors import ConfigError
from .explanation import BaselineLike, baseline_image, explain
from .inputs import ImagesLike, as_model_input
from .layers.detach import attribution_state
from .models.vit import Capture, VisionTransformer
from .targets import TargetLike, normalize_target

AttributionFn = Callable[..., Tensor]

__all__ = [
    "ATTRIBUTION_METHODS",
    "METHODS",
    "attention_rollout",
    "attribute",
    "bcos",
    "gradcam",
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "rollout",
    "transformer_attribution",
    "transformer_attribution_matrix",
]


# --- Shared plumbing ---------------------------------------------------------------------------


def _require_vit(model: nn.Module) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"attribution methods need a bcosvit VisionTransformer, got {type(model).__name__}")
    return model


def _prepare(model: nn.Module, images: ImagesLike) -> tuple[VisionTransformer, Tensor]:
    """The model, checked, and ``images`` as the tensor it computes with (``bcosvit.inputs.as_model_input``)."""
    model = _require_vit(model)
    return model, as_model_input(model, images)


def _targets(model: VisionTransformer, images: Tensor, target: TargetLike) -> Tensor:
    """``(N,)`` long targets on the images' device; None: the predicted classes."""
    if target is None:
        with torch.no_grad():
            return model(images).argmax(dim=1)
    default = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    return normalize_target(target, default, model.num_classes, "class", model.config.class_names, per_image=True)


def _finish(maps: Tensor) -> Tensor:
    """Detached float32 copy of ``maps`` ``(N, H, W)``."""
    return maps.detach().to(torch.float32)


def _to_pixels(token_maps: Tensor, images: Tensor, patch_size: int) -> Tensor:
    """Token relevance ``(N, L)`` -> ``(N, H, W)`` via the grid ``(H // p, W // p)`` and bilinear upsampling."""
    h, w = images.shape[-2:]
    grid = token_maps.unflatten(1, (h // patch_size, w // patch_size))
    return F.interpolate(grid[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]


# --- Captum methods on the input pixels ----------------------------------------------------------


def input_x_gradient(model: nn.Module, images: ImagesLike, target: TargetLike = None) -> Tensor:
    """``(x · ∂logit_target/∂x)`` summed over channels: images ``(N, C, H, W)`` -> ``(N, H, W)``."""
    model, images = _prepare(model, images)
    with attribution_state(model, explanation=False, input_gradients_only=True):
        target = _targets(model, images, target)
        attr = InputXGradient(model).attribute(images.detach().requires_grad_(True), target=target)
    return _finish(attr.sum(dim=1))


def integrated_gradients(
    model: nn.Module,
    images: ImagesLike,
    target: TargetLike = None,
    *,
    n_steps: int = 20,
    internal_batch_size: int | None = 64,
    baseline: BaselineLike = 0.0,
) -> Tensor:
    """Integrated gradients from a constant image (default: black, all zeros), summed over channels.

    Args:
        images: ``(N, C, H, W)`` in [0, 1].
        n_steps: quadrature points of Captum's Gauss-Legendre rule along the straight path.
        internal_batch_size: at most this many scaled images per forward/backward pass (bounds
            memory; raised to ``N`` when smaller); None: all ``N · n_steps`` at once. On the CPU
            small passes are faster: one quadrature step of a batch per pass is 9-22 % faster
            than two (``bcosvit evaluate`` passes its batch size).
        baseline: the baseline image's pixel value in [0, 1], or a tensor broadcastable to
            ``(C, H, W)`` (e.g. per-channel means ``(C, 1, 1)``).

    Returns:
        ``(N, H, W)``; its sum approximates ``logit(x) - logit(baseline)``.
    """
    model, images = _prepare(model, images)
    if n_steps < 1:
        raise ConfigError(f"n_steps must be a positive integer, got {n_steps}")
    with attribution_state(model, explanation=False, input_gradients_only=True):
        target = _targets(model, images, target)
        batch = None if internal_batch_size is None else max(int(internal_batch_size), images.shape[0])
        attr = IntegratedGradients(model).attribute(
            images.detach().requires_grad_(True),
            baselines=baseline_image(baseline, images).expand_as(images),
            target=target,
            n_steps=n_steps,
            internal_batch_size=batch,
        )
    return _finish(attr.sum(dim=1))


def gradient(model: nn.Module, images: ImagesLike, target: TargetLike = None, *, abs: bool = True) -> Tensor:
    """Saliency: ``|∂logit_target/∂x|`` (signed with ``abs=False``) summed over channels -> ``(N, H, W)``."""
    model, images = _prepare(model, images)
    with attribution_state(model, explanation=False, input_gradients_only=True):
        target = _targets(model, images, target)
        attr = Saliency(model).attribute(images.detach().requires_grad_(True), target=target, abs=abs)
    return _finish(attr.sum(dim=1))


# --- Token-based methods -------------------------------------------------------------------------


def gradcam(model: nn.Module, images: ImagesLike, target: TargetLike = None) -> Tensor:
    """Grad-CAM on the last block's tokens: images ``(N, C, H, W)`` -> non-negative ``(N, H, W)``."""
    model, images = _prepare(model, images)
    with attribution_state(model, explanation=False, input_gradients_only=True):
        target = _targets(model, images, target)
        logits, record = model(images, capture=Capture(layers=(-1,)))
        tokens = record.tokens[-1]  # (N, L, D)
        (grads,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), tokens)
        prefix = record.num_prefix_tokens  # a class token has no place on the grid
        tokens, grads = tokens[:, prefix:], grads[:, prefix:]
        weights = grads.mean(dim=1, keepdim=True)  # (N, 1, D): mean gradient over tokens
        cam = torch.relu((weights * tokens).sum(dim=-1)).detach()  # (N, L)
    return _finish(_to_pixels(cam, images, model.patch_size))


def attention_rollout(attentions: list[Tensor]) -> Tensor:
    """Rollout matrix ``Â_L ··· Â_1`` ``(N, L, L)`` from per-block attention maps ``(N, heads, L, L)``.

    ``Â_l`` is the head-averaged attention plus the identity (the residual path), rows re-normalised
    to sum to 1; every row of the result therefore sums to 1.
    """
    if not attentions:
        raise ConfigError("attention rollout needs at least one block")
    first = attentions[0]
    eye = torch.eye(first.shape[-1], dtype=first.dtype, device=first.device)
    rollout = eye.expand(first.shape[0], -1, -1)
    for attn in attentions:
        a = attn.mean(dim=1) + eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    return rollout


def rollout(model: nn.Module, images: ImagesLike, target: TargetLike = None) -> Tensor:
    """Attention rollout, class-agnostic (``target`` is ignored): ``(N, C, H, W)`` -> ``(N, H, W)``.

    Token relevance is the mean over output tokens (rows) of the rollout matrix, or the class token's
    row for a model that classifies from its class token.
    """
    model, images = _prepare(model, images)
    with attribution_state(model, explanation=False, gradients=False):
        _, record = model(images, capture=Capture(attention=True))
        relevance = _patch_relevance(attention_rollout(record.attentions), model)  # (N, L)
    return _finish(_to_pixels(relevance, images, model.patch_size))


def _patch_relevance(matrix: Tensor, model: nn.Module) -> Tensor:
    """Relevance of the patch tokens ``(N, L_patches)`` from a token-to-token matrix ``(N, L, L)``:
    the class token's row for a model that classifies from it, else the mean over the patch rows."""
    prefix = getattr(model, "num_prefix_tokens", 0)
    if getattr(model, "global_pool", "avg") == "token":
        return matrix[:, 0, prefix:]
    return matrix[:, prefix:, prefix:].mean(dim=1)


def transformer_attribution_matrix(attentions: list[Tensor], gradients: list[Tensor]) -> Tensor:
    """Chefer et al. (ICCV 2021) relevance ``R`` ``(N, L, L)`` from attention maps and their gradients.

    Args:
        attentions: per block ``A_l`` ``(N, heads, L, L)``, first block first.
        gradients: per block ``∂logit/∂A_l``, same shapes.

    Returns:
        ``R`` after ``R = I``; ``R ← R + mean_heads((∇A_l ⊙ A_l)^+) · R`` over the blocks in order.
    """
    if not attentions or len(attentions) != len(gradients):
        raise ConfigError(
            f"need one gradient per attention map and at least one block, got {len(attentions)} maps "
            f"and {len(gradients)} gradients"
        )
    first = attentions[0]
    eye = torch.eye(first.shape[-1], dtype=first.dtype, device=first.device)
    relevance = eye.expand(first.shape[0], -1, -1)
    for attn, grad in zip(attentions, gradients, strict=True):
        a_bar = (grad * attn).clamp_min(0).mean(dim=1)
        relevance = relevance + a_bar @ relevance
    return relevance


def transformer_attribution(model: nn.Module, images: ImagesLike, target: TargetLike = None) -> Tensor:
    """Gradient-weighted attention rollout (Chefer et al., ICCV 2021): ``(N, C, H, W)`` -> ``(N, H, W)``.

    One backward pass gives ``∂logit_target/∂A_l`` for every block; token relevance is the mean over
    output tokens (rows) of ``R - I`` (a class-token model: its row). The identity, with which ``R`` starts, gives
    every token the same share 1/L whatever the class; a class-token model's map leaves it out too
    (it reads ``R[cls, patches]``), so it is left out here.
    """
    model, images = _prepare(model, images)
    with attribution_state(model, explanation=False, input_gradients_only=True):
        target = _targets(model, images, target)
        logits, record = model(images, capture=Capture(attention=True))
        grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), record.attentions)
        with torch.no_grad():
            matrix = transformer_attribution_matrix([a.detach() for a in record.attentions], list(grads))
            eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
            relevance = _patch_relevance(matrix - eye, model)
    return _finish(_to_pixels(relevance, images, model.patch_size))


# --- Exact B-cos explanation ---------------------------------------------------------------------


def bcos(
    model: nn.Module, images: ImagesLike, target: TargetLike = None, *, baseline: BaselineLike | None = None
) -> Tensor:
    """Exact B-cos contributions ``w(x) · [x, 1 - x]`` summed over channels -> ``(N, H, W)``.

    ``bcosvit.explain(model, images, target, baseline=baseline).contributions`` of the one target per
    image (``[:, 0]``), as float32. With
    ``baseline`` (a pixel value, or an image broadcastable to ``(C, H, W)``, in [0, 1]) the same weights
    apply to the change from the baseline instead: ``w(x) · ([x, 1 - x] - [b, 1 - b])``. That map sums to
    the target logit minus the explanation's linear map evaluated at the baseline image (``positional``
    and the logit bias cancel), so it is the explanation's own account of what replacing pixels by
    ``b`` takes away; a pixel already equal to ``b`` gets 0. The plain contributions (no baseline) are
    relative to the encoded input ``0``, which no image encodes to: a black pixel is ``[0, 1]``.

    B-cos models only; a standard model raises ``ConfigError``.
    """
    model, images = _prepare(model, images)
    if not model.is_bcos:
        raise ConfigError(
            "the 'bcos' attribution method is the exact explanation of B-cos models; this is a standard model "
            f"(use one of the post-hoc methods: {', '.join(m for m in METHODS if m != 'bcos')})"
        )
    if target is not None:  # None: explain's own forward pass picks the predicted classes (no second forward)
        target = _targets(model, images, target)
    expl = explain(model, images, target, baseline=baseline)  # explain() restores the model's state
    return _finish(expl.contributions[:, 0])  # (N, 1, H, W): the one target per image


# --- Registry and the uniform entry point --------------------------------------------------------

ATTRIBUTION_METHODS: dict[str, AttributionFn] = {
    "input_x_gradient": input_x_gradient,
    "integrated_gradients": integrated_gradients,
    "gradient": gradient,
    "gradcam": gradcam,
    "rollout": rollout,
    "transformer_attribution": transformer_attribution,
    "bcos": bcos,
}
METHODS: tuple[str, ...] = tuple(ATTRIBUTION_METHODS)


def attribute(method: str, model: nn.Module, images: ImagesLike, target: TargetLike = None, **options) -> Tensor:
    """Attribution maps of ``model`` for ``images`` by the named method.

    Args:
        method: one of ``METHODS``.
        model: any ``bcosvit.VisionTransformer`` (B-cos or standard; ``"bcos"`` needs a B-cos model).
        images: ``(N, C, H, W)`` in [0, 1] (any float dtype, or uint8 in [0, 255]), a tensor or an
            array-like (numpy, lists); computed in the model's dtype on the model's device.
        target: ``(N,)`` classes to explain (also an int or a list; class names when the model has
            ``config.class_names``); None: the predicted classes.
        **options: method-specific keywords (``n_steps``, ``internal_batch_size``, ``baseline`` for
            integrated gradients; ``abs`` for gradient; ``baseline`` for bcos).

    Returns:
        ``(N, H, W)`` float32 torch tensor, detached, on the model's device.

    Raises ``ConfigError`` under ``torch.inference_mode()`` for every method but ``rollout``: they
    need autograd (they work under ``torch.no_grad()``).
    """
    fn = ATTRIBUTION_METHODS.get(method)
    if fn is None:
        raise ConfigError(f"unknown attribution method {method!r}; available: {', '.join(METHODS)}")
    accepted = [
        name for name, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"attribution method {method!r} got unknown option(s) {unknown}; "
            f"it accepts {accepted if accepted else 'no options'}"
        )
    return fn(model, images, target, **options)
