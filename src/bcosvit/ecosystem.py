"""bcosvit models in the tools people already use: Quantus, Captum and pytorch-grad-cam.

One call per tool (docs: the ecosystem table)::

    scores = quantus.PixelFlipping(...)(model, x, y, explain_func=bcosvit.quantus_explain)
    attr = bcosvit.BcosAttribution(model).attribute(images, target=labels)   # a Captum Attribution
    cam = GradCAM(model, bcosvit.gradcam_target_layers(model),
                  reshape_transform=bcosvit.gradcam_reshape_transform(model))

**The exact explanation per input channel.** A B-cos model explains its logit as the linear map
``w(x)·[x, 1 - x] + positional + logit_bias`` of its encoded input, whose ``2C`` channels are the
image's ``C`` channels and their inverses (``bcosvit.Explanation``). Outside tools want maps shaped
like the image ``(N, C, H, W)``; channel ``c`` of a map folds the pair ``(c, C + c)``:

- ``kind="contributions"``: the pair's contributions added, ``w_c·x_c + w_(C+c)·(1 - x_c)`` per pixel;
  summed over the channels these are ``Explanation.contributions``, which add up to the logit minus
  ``positional + logit_bias``. With a baseline image ``b`` they are ``(w_c - w_(C+c))·(x_c - b_c)``
  (the pair's change from ``[b, 1 - b]``), summing to the logit minus ``Explanation.at_baseline``.
- ``kind="weights"``: the weight of the image channel itself, ``w_c - w_(C+c)``
  (``Explanation.signed_weights``): ``[x + dx, 1 - x - dx]`` moves the two halves of the pair in
  opposite directions, so this is the dynamic linear map's gradient with respect to ``x`` (what the
  ``2C`` weights amount to for the image, by the chain rule). It is *not* the model's ordinary input gradient:
  ``w(x)`` holds the input-dependent factors (cosines, norms, attention) fixed.

So ``contributions == weights · (x - b)`` channel by channel for a baseline ``b``, which is how
Captum's "multiplied by inputs" attributions relate to their gradients.

**Quantus** casts its inputs to float32 (``torch.Tensor(x)`` in its ``PyTorchModel.predict``), which
a float64 ``VisionTransformer`` refuses (``check_input``): give Quantus ``CastInputs(model)``, a
wrapper that converts any float input to the model's dtype and device (``bcosvit.inputs.as_model_input``)
and is otherwise the model (``quantus_explain`` and the other functions here unwrap it). Quantus 0.6.0
(the newest release) integrates its AUCs with ``np.trapz``, which numpy 2.4 removed:
``patch_quantus_for_numpy2()`` replaces Quantus' one integration helper with ``np.trapezoid``.
Quantus' ``Focus`` metric scores 2×2 mosaics with two images of the target class:
``focus_mosaics`` builds them (with ``bcosvit.metrics.tile_grids``) together with the quadrant
positions Focus takes as ``custom_batch``.

**Captum.** ``BcosAttribution(model)`` is the exact explanation as a ``captum.attr.GradientAttribution``
(``(N, C, H, W)`` like the inputs: ``captum.metrics.infidelity`` and ``sensitivity_max`` take it).
Captum's own input attributions (``Saliency``, ``InputXGradient``, ``IntegratedGradients`` ...)
take a bcosvit model as their ``forward_func`` directly (images in [0, 1] in the model's dtype); every
``bcosvit.attribution`` method, Captum's or not, is ``PosthocAttribution(model, method)``: Captum's
``attribute(inputs, target=...)`` around ``bcosvit.attribution.attribute(method, model, inputs, target)``
(which is the same call without the object), with Captum's input conventions (tuples of one tensor:
the metrics pass them).

**pytorch-grad-cam.** Its ViT recipe drops token 0 as a class token and reshapes a fixed 14×14
grid; bcosvit models put ``model.num_prefix_tokens`` tokens (class token, then register tokens;
none for the published mean-pooled models) before a row-major patch grid of any size:
``gradcam_reshape_transform`` and ``gradcam_target_layers`` say so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from captum.attr import Attribution, GradientAttribution
from torch import Tensor, nn

from .errors import ConfigError, InputError
from .explanation import BaselineLike, baseline_image, explain
from .inputs import ImagesLike, as_model_input
from .metrics.pointing import tile_grids
from .models.vit import VisionTransformer, check_images, check_pixel_values
from .targets import TargetLike

__all__ = [
    "KINDS",
    "BcosAttribution",
    "CastInputs",
    "FocusMosaics",
    "PosthocAttribution",
    "exact_channel_maps",
    "focus_mosaics",
    "gradcam_reshape_transform",
    "gradcam_target_layers",
    "patch_quantus_for_numpy2",
    "quantus_explain",
]

Kind = Literal["contributions", "weights"]
KINDS: tuple[str, ...] = ("contributions", "weights")


# --- Models as outside tools call them ---------------------------------------------------------


class CastInputs(nn.Module):
    """``model`` taking images of any float dtype and device: ``model(as_model_input(model, x))``.

    For tools that build their own input tensors, such as Quantus (``torch.Tensor(x)``: float32,
    whatever the model's dtype). The wrapped model is ``self.model`` (its modules are this module's
    ``model.*``, so Quantus' layer randomisation reaches every one of them); the wrapper starts in the
    model's training mode. ``quantus_explain``, ``BcosAttribution`` and the Grad-CAM helpers accept it
    in place of the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, x: ImagesLike, *args: Any, **kwargs: Any) -> Any:
        """Images ``(N, C, H, W)`` in [0, 1], any float dtype (or uint8) -> ``model``'s output."""
        return self.model(as_model_input(self.model, x), *args, **kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, CastInputs) else model


def _vit(model: nn.Module, what: str) -> VisionTransformer:
    model = _unwrap(model)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"{what} needs a bcosvit VisionTransformer, got {type(model).__name__}")
    return model


def _bcos(model: nn.Module, what: str) -> VisionTransformer:
    model = _vit(model, what)
    if not model.is_bcos:
        raise ConfigError(
            f"{what} gives the exact explanation of B-cos models; this is a standard model "
            "(pass method= one of bcosvit.attribution.METHODS for a post-hoc method)"
        )
    return model


# --- The exact explanation per input channel -------------------------------------------------


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def _target(target: Any) -> TargetLike:
    """Integer arrays and tensors as ``bcosvit.explain`` takes targets: a 0-d one as an int, ``(N,)`` as
    long; anything else unchanged (``explain``'s validation names what is wrong with it)."""
    if isinstance(target, np.integer):
        return int(target)
    if isinstance(target, np.ndarray | Tensor):
        tensor = torch.as_tensor(target)
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            return tensor
        return int(tensor) if tensor.ndim == 0 else tensor.long()
    return target


def _baseline(baseline: BaselineLike | Tensor, images: Tensor) -> Tensor:
    """``baseline`` as images broadcastable to ``images`` ``(N, C, H, W)``: a pixel value or a tensor
    broadcastable to ``(C, H, W)`` (``bcosvit.explain``'s forms), or one baseline image per image
    ``(N, C, H, W)`` (Captum's form)."""
    if isinstance(baseline, Tensor | np.ndarray) and np.ndim(baseline) == 4 and baseline.shape[0] == images.shape[0]:
        per_image = torch.as_tensor(baseline).to(device=images.device, dtype=images.dtype)
        if per_image.shape != images.shape:
            raise InputError(
                f"baselines of shape {tuple(per_image.shape)} do not match the images' {tuple(images.shape)}"
            )
        check_pixel_values(per_image)
        return per_image
    return baseline_image(baseline, images)


def exact_channel_maps(
    model: nn.Module,
    images: ImagesLike,
    target: TargetLike = None,
    *,
    kind: Kind = "contributions",
    baseline: BaselineLike | Tensor | None = None,
) -> Tensor:
    """The exact explanation of a B-cos model per input channel ``(N, C, H, W)`` (module docstring).

    Args:
        model: a B-cos ``VisionTransformer`` (or ``CastInputs`` of one).
        images: ``(N, C, H, W)`` in [0, 1], any float dtype (or uint8), as ``bcosvit.explain`` takes them.
        target: one class per image, as ``bcosvit.explain`` takes it (None: the predicted classes).
        kind: ``"contributions"`` (pair contributions, ``w_c·x_c + w_(C+c)·(1 - x_c)``) or
            ``"weights"`` (``w_c - w_(C+c)``, the dynamic linear map's gradient with respect to ``x``).
        baseline: contributions only: the change from a baseline image, ``(w_c - w_(C+c))·(x_c - b_c)``;
            a pixel value, a tensor broadcastable to ``(C, H, W)``, or one baseline per image
            ``(N, C, H, W)``.

    Returns:
        ``(N, C, H, W)`` in the model's dtype, on its device, detached. Summed over channels,
        ``"contributions"`` are ``bcosvit.explain(model, images, target, baseline=...).contributions[:, 0]``.
    """
    model = _bcos(model, "exact_channel_maps")
    kind = _check_kind(kind)
    if kind == "weights" and baseline is not None:
        raise ConfigError("a baseline changes the contributions only; kind='weights' takes none")
    images = as_model_input(model, images)
    explanation = explain(model, images, _target(target))
    if explanation.weights.shape[1] != 1:
        raise InputError(f"one target per image, got {explanation.weights.shape[1]} per image")
    signed = explanation.signed_weights[:, 0]  # (N, C, H, W)
    if kind == "weights":
        return signed
    if baseline is not None:
        return signed * (images - _baseline(baseline, images))
    pair = explanation.weights[:, 0] * explanation.inputs  # (N, 2C, H, W): [w_x·x, w_(1-x)·(1 - x)]
    image_part, inverse_part = pair.chunk(2, dim=1)
    return image_part + inverse_part


# --- Quantus -----------------------------------------------------------------------------------


def quantus_explain(
    model: nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray | int | None,
    *,
    kind: Kind = "contributions",
    method: str | None = None,
    reduce_channels: bool = True,
    baseline: BaselineLike | None = None,
    device: Any = None,
    **options: Any,
) -> np.ndarray:
    """Quantus' ``explain_func``: ``explain_func=bcosvit.quantus_explain`` (options in ``explain_func_kwargs``).

    Args:
        model: what Quantus passes on: a bcosvit ``VisionTransformer``, or ``CastInputs`` of one
            (wrap a float64 model so that Quantus' float32 inputs reach it).
        inputs: ``(N, C, H, W)`` images in [0, 1], a numpy array of any float dtype (Quantus: float32)
            or a tensor; computed in the model's dtype on the model's device.
        targets: ``(N,)`` integer classes (or one int for all; None: the predicted classes).
        kind: without ``method``, the exact B-cos explanation per input channel: ``"contributions"``
            or ``"weights"`` (``exact_channel_maps``; B-cos models only).
        method: a ``bcosvit.attribution`` method by name (``bcosvit.attribution.METHODS``) instead:
            any model, ``bcosvit.attribution.attribute(method, model, inputs, targets, **options)``.
        reduce_channels: sum the exact maps over the channels: ``(N, 1, H, W)`` (Quantus' usual
            form; the contributions are then ``Explanation.contributions``). False: ``(N, C, H, W)``,
            one map per input channel. The post-hoc methods' maps are summed over channels already
            (``reduce_channels=False`` raises for them).
        baseline: the contributions relative to a baseline image (``exact_channel_maps``), or the
            ``baseline`` option of the ``"bcos"`` and ``"integrated_gradients"`` methods.
        device: the device Quantus adds to the keywords; ignored: everything runs on the model's device.
        **options: the method's options (``n_steps``, ``abs`` ...); none without ``method``.

    Returns:
        float32 numpy ``(N, 1, H, W)`` (or ``(N, C, H, W)`` with ``reduce_channels=False``), batch first.
    """
    del device  # the model's device decides
    targets = _target(targets)
    if method is not None:
        from .attribution import attribute

        if not reduce_channels:
            raise ConfigError(
                f"attribution method {method!r} gives maps summed over channels; use reduce_channels=True"
            )
        if baseline is not None:
            options["baseline"] = baseline
        maps = attribute(method, _vit(model, "quantus_explain"), inputs, targets, **options)[:, None]
    else:
        if options:
            raise ConfigError(
                f"quantus_explain got unknown option(s) {sorted(options)}; the exact explanation takes kind, "
                "reduce_channels and baseline (method-specific options need method=)"
            )
        maps = exact_channel_maps(_bcos(model, "quantus_explain"), inputs, targets, kind=kind, baseline=baseline)
        if reduce_channels:
            maps = maps.sum(dim=1, keepdim=True)
    return maps.detach().to(device="cpu", dtype=torch.float32).numpy()


def patch_quantus_for_numpy2() -> bool:
    """Make Quantus' AUCs work on numpy >= 2.4, which removed ``np.trapz``.

    Quantus 0.6.0 (its newest release) integrates every curve (``PixelFlipping``,
    ``RegionPerturbation``, ``Selectivity``, ``IROF``) with ``quantus.helpers.utils.calculate_auc``,
    which calls ``np.trapz``; this replaces that one function in Quantus' module with the same
    integral by ``np.trapezoid`` (the function numpy renamed it to, same arguments). Numpy itself is
    not touched. Idempotent; does nothing where ``np.trapz`` exists.

    Returns:
        True when Quantus' helper is (now) the patched one, False when nothing needed patching.
    """
    if hasattr(np, "trapz"):
        return False
    from quantus.helpers import utils

    def calculate_auc(values: np.ndarray, dx: int = 1, batched: bool = False) -> np.ndarray:
        """Area under the curve by the composite trapezoidal rule (Quantus' ``calculate_auc`` on numpy 2)."""
        return np.trapezoid(np.array(values), dx=dx, axis=1 if batched else -1)

    calculate_auc.bcosvit_patch = True  # type: ignore[attr-defined]
    if not getattr(utils.calculate_auc, "bcosvit_patch", False):
        utils.calculate_auc = calculate_auc
    return True


class FocusMosaics(NamedTuple):
    """Quantus ``Focus`` inputs: ``metric(model, **mosaics._asdict(), explain_func=...)``.

    Attributes:
        x_batch: ``(M, C, 2H, 2W)`` float32 mosaics of four images (``bcosvit.metrics.tile_grids``, 2×2).
        y_batch: ``(M,)`` int64 the target class of each mosaic.
        custom_batch: ``(M, 4)`` int64, 1 where a quadrant holds an image of the target class, in
            Focus' order (top-left, top-right, bottom-left, bottom-right), which is ``tile_grids``'
            row-major cell order.
    """

    x_batch: np.ndarray
    y_batch: np.ndarray
    custom_batch: np.ndarray


def focus_mosaics(
    images: ImagesLike, labels: Sequence[int] | Tensor | np.ndarray, num_mosaics: int, *, seed: int = 0
) -> FocusMosaics:
    """Mosaics for Quantus' ``Focus`` (Arias-Duart et al., FUZZ-IEEE 2022): two images of the target
    class and two of other classes, in random quadrants.

    For each mosaic (drawn in turn with a ``torch.Generator`` seeded with ``seed``): a target class
    uniformly among the classes with at least two images, two distinct images of it, two distinct
    images of any other classes, and a random order of the four quadrants. The paper builds mosaics
    from images the model classifies correctly: select them first (e.g.
    ``bcosvit.metrics.confident_images_by_class``).

    Args:
        images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)`` their classes.
        num_mosaics: ``M``, the number of mosaics.

    Returns:
        ``FocusMosaics`` (numpy, as Quantus takes them).
    """
    images = torch.as_tensor(images)
    check_images(images)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise InputError(f"one label per image: {images.shape[0]} images, {labels.shape[0]} labels")
    if num_mosaics < 1:
        raise ConfigError(f"num_mosaics must be at least 1, got {num_mosaics}")
    classes, counts = labels.unique(return_counts=True)
    eligible = [int(k) for k, n in zip(classes, counts) if n >= 2 and int((labels != k).sum()) >= 2]
    if not eligible:
        raise InputError("Focus mosaics need a class with two images and two images of other classes")
    generator = torch.Generator().manual_seed(seed)

    def pick(pool: Tensor, k: int) -> Tensor:
        return pool[torch.randperm(len(pool), generator=generator)[:k]]

    cells, targets, positions = [], [], []
    for _ in range(num_mosaics):
        target = eligible[int(torch.randint(len(eligible), (), generator=generator))]
        chosen = torch.cat([pick((labels == target).nonzero()[:, 0], 2), pick((labels != target).nonzero()[:, 0], 2)])
        order = torch.randperm(4, generator=generator)
        cells.append(chosen[order])
        targets.append(target)
        positions.append((order < 2).long())  # the first two chosen are the target's
    mosaics = tile_grids(images[torch.cat(cells)], 2)
    return FocusMosaics(
        mosaics.to(torch.float32).numpy(),
        np.asarray(targets, dtype=np.int64),
        torch.stack(positions).numpy().astype(np.int64),
    )


# --- Captum ------------------------------------------------------------------------------------


def _captum_inputs(inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, bool]:
    """Captum's inputs (a tensor, or a tuple of one: Captum's metrics pass tuples) -> the tensor, and
    whether the result goes back as a tuple."""
    as_tuple = isinstance(inputs, tuple)
    if as_tuple:
        if len(inputs) != 1:
            raise InputError(f"bcosvit models take one input tensor, got a tuple of {len(inputs)}")
        inputs = inputs[0]
    if not isinstance(inputs, Tensor):
        raise InputError(f"Captum attributions take a tensor of images, got {type(inputs).__name__}")
    return inputs, as_tuple


class BcosAttribution(GradientAttribution):
    """The exact explanation of a B-cos model as a Captum attribution (``exact_channel_maps``).

    ``BcosAttribution(model, kind).attribute(inputs, target=labels)`` -> ``(N, C, H, W)`` like the inputs,
    so Captum's metrics take it: ``captum.metrics.infidelity(model, perturb, inputs, attributions,
    target=labels)`` and ``captum.metrics.sensitivity_max(BcosAttribution(model).attribute, inputs,
    target=labels)``.

    For infidelity (``E[(I·attr - (f(x) - f(x - I)))²]``) the matching form is ``kind="weights"`` with
    perturbations ``I``, or ``kind="contributions"`` with ``baselines=b`` and a perturbation function
    decorated with ``captum.metrics.infidelity_perturb_func_decorator(True)`` (``I / (x - b)``): the
    two give the same ``I·attr = (w_x - w_(1-x))·I``. That equals ``f(x) - f(x - I)`` exactly where the
    dynamic weights do not change between ``x`` and ``x - I``; the infidelity measures exactly how much
    they do (``((w(x - I) - w(x))·[x - I, 1 - x + I] + positional(x - I) - positional(x))²``).

    Args:
        model: a B-cos ``VisionTransformer`` (or ``CastInputs`` of one): Captum's ``forward_func``.
        kind: ``"contributions"`` (default; ``multiplies_by_inputs``) or ``"weights"``.
    """

    def __init__(self, model: nn.Module, kind: Kind = "contributions") -> None:
        self.model = _bcos(model, "BcosAttribution")
        super().__init__(model)
        self.kind = _check_kind(kind)

    @property
    def multiplies_by_inputs(self) -> bool:
        """True for the contributions (weights times the change from the baseline), as Captum marks
        ``InputXGradient``; False for the weights."""
        return self.kind == "contributions"

    def attribute(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetLike = None,
        baselines: BaselineLike | Tensor | tuple[Tensor] | None = None,
    ) -> Tensor | tuple[Tensor]:
        """Exact attributions of ``inputs`` ``(N, C, H, W)`` in [0, 1] for ``target`` (one class per
        image, or None: the predicted ones).

        ``inputs`` may be a tuple of one tensor (the result is then a tuple too, as Captum's are).
        ``baselines``: contributions relative to a baseline image (a pixel value, a tensor
        broadcastable to ``(C, H, W)`` or one per image ``(N, C, H, W)``).

        Returns:
            ``(N, C, H, W)`` detached, in the dtype and on the device of ``inputs``.
        """
        images, as_tuple = _captum_inputs(inputs)
        if isinstance(baselines, tuple):
            (baselines,) = baselines
        maps = exact_channel_maps(self.model, images, target, kind=self.kind, baseline=baselines)
        maps = maps.detach().to(device=images.device, dtype=images.dtype if images.is_floating_point() else maps.dtype)
        return (maps,) if as_tuple else maps


class PosthocAttribution(Attribution):
    """A ``bcosvit.attribution`` method as a Captum attribution: ``PosthocAttribution(model, method, **options)``.

    ``.attribute(inputs, target=labels)`` is ``bcosvit.attribution.attribute(method, model, inputs,
    target, **options)`` as ``(N, 1, H, W)`` (the maps are summed over channels, as Captum's
    ``LayerGradCam`` gives them), in the dtype and on the device of ``inputs``; a tuple of one tensor
    in, a tuple out. For the methods Captum has itself (``Saliency``, ``InputXGradient``,
    ``IntegratedGradients``) Captum's classes take a bcosvit model directly, with per-channel results.
    ``captum.metrics.sensitivity_max(PosthocAttribution(model, "rollout").attribute, inputs,
    target=labels)`` runs on any method; ``infidelity`` wants attributions shaped like the inputs
    (one channel, or Captum's own classes).
    """

    def __init__(self, model: nn.Module, method: str, **options: Any) -> None:
        from .attribution import METHODS

        if method not in METHODS:
            raise ConfigError(f"unknown attribution method {method!r}; available: {', '.join(METHODS)}")
        self.model = _vit(model, "PosthocAttribution")
        super().__init__(model)
        self.method, self.options = method, options

    def attribute(  # type: ignore[override]
        self, inputs: Tensor | tuple[Tensor], target: TargetLike = None
    ) -> Tensor | tuple[Tensor]:
        """Maps ``(N, 1, H, W)`` of ``inputs`` ``(N, C, H, W)`` in [0, 1] for ``target`` (None: predicted)."""
        from .attribution import attribute

        images, as_tuple = _captum_inputs(inputs)
        maps = attribute(self.method, self.model, images, _target(target), **self.options)[:, None]
        maps = maps.to(device=images.device, dtype=images.dtype if images.is_floating_point() else maps.dtype)
        return (maps,) if as_tuple else maps


# --- pytorch-grad-cam --------------------------------------------------------------------------


def gradcam_reshape_transform(
    model: nn.Module, input_size: tuple[int, int] | None = None
) -> Callable[[Tensor], Tensor]:
    """pytorch-grad-cam's ``reshape_transform`` for ``model``'s tokens: ``(N, L, D)`` -> ``(N, D, rows, cols)``.

    Drops the ``model.num_prefix_tokens`` tokens before the patch grid (the class token, then the
    register tokens; none for a mean-pooled model without them, whose token 0 is the top-left patch)
    and lays the ``rows · cols`` patch tokens out row-major, as the model does. The transform sees
    only the tensor: without ``input_size`` the grid is square (``rows = cols = sqrt(L - prefix)``,
    the model's own aspect); for other inputs give ``input_size=(H, W)`` (the grid is then
    ``(H // patch_size, W // patch_size)``) and build one transform per input size. A token count
    that fits neither raises ``InputError``.
    """
    model = _vit(model, "gradcam_reshape_transform")
    prefix, patch = model.num_prefix_tokens, model.patch_size
    grid = None if input_size is None else (int(input_size[0]) // patch, int(input_size[1]) // patch)

    def reshape_transform(tokens: Tensor) -> Tensor:
        n, length, dim = tokens.shape
        patches = length - prefix
        rows, cols = grid if grid is not None else (math.isqrt(max(patches, 0)),) * 2
        if patches != rows * cols or patches <= 0:
            expected = f"a {rows}×{cols} grid" if grid is not None else "a square grid"
            raise InputError(
                f"{length} tokens less {prefix} prefix token(s) do not make {expected}; "
                "build the transform with input_size=(H, W) of the images"
            )
        return tokens[:, prefix:].reshape(n, rows, cols, dim).permute(0, 3, 1, 2)

    return reshape_transform


def gradcam_target_layers(model: nn.Module) -> list[nn.Module]:
    """The layer(s) to give pytorch-grad-cam: ``[model.blocks[-1]]``, or ``[model.blocks[-1].norm1]``
    for a model that classifies from its class token (``global_pool="token"``).

    A mean-pooled (or attention-pooled) model reads every patch token of the last block's output, so
    Grad-CAM there is Grad-CAM on the final features (``bcosvit.attribution.gradcam``). A class-token
    model reads only token 0 of that output: the patch tokens' gradients are 0 and the map would be
    empty, so, as pytorch-grad-cam's ViT tutorial does, the target is the last block's first norm,
    whose patch tokens the class token attends to in the last attention.
    """
    model = _vit(model, "gradcam_target_layers")
    last = model.blocks[-1]
    return [last.norm1] if model.global_pool == "token" else [last]
