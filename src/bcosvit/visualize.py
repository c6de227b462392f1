"""Pictures of B-cos explanations: colour explanations, contribution maps, figures.

Everything here is a plain function on numpy arrays or torch tensors (tensors are detached and
moved to the CPU; nothing is differentiated). Figures are ``matplotlib.figure.Figure`` objects on
an Agg canvas; pyplot and its global state are never touched, so the module is safe to use in
scripts, servers and worker processes without a display.

Conventions:
    * image arrays returned by this module are ``float32`` in ``[0, 1]``, channels last:
      ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA;
    * a batch axis ``N`` in front is accepted by ``colour_explanation`` and ``contribution_map``
      and kept in front of their outputs;
    * shape problems raise ``bcosvit.errors.InputError`` and bad option values
      ``bcosvit.errors.ConfigError``; both are ``ValueError`` subclasses.

Channel handling for the colour of a picture with ``C`` colour channels (the encoded input of a
B-cos model has ``2C`` channels ``[x, 1 - x]``), used for colour explanations and input images
alike:
    * ``C == 1``: grey, ``R = G = B`` = the single channel;
    * ``C == 2``: ``R`` = channel 0, ``G`` = channel 1, ``B = 0``;
    * ``C == 3``: RGB;
    * ``C > 3``: the first three channels are shown as RGB. For colour explanations the alpha
      channel (and the sign of the contribution map) still uses all ``2C`` channels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.colors
import matplotlib.image
import numpy as np
import torch
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .errors import ConfigError, InputError
from .explanation import Explanation
from .fileio import atomic_write

ArrayLike = np.ndarray | torch.Tensor
FIGURE_SOFTWARE = "bcosvit"  # the Software text chunk of PNG figures written by save_figure

__all__ = [
    "colour_explanation",
    "contribution_map",
    "explanation_figure",
    "literal_text",
    "overlay",
    "save_figure",
    "save_png",
    "to_display_image",
]


# ----------------------------------------------------------------------------------------------
# helpers


def literal_text(text: object) -> str:
    """``str(text)`` escaped so that matplotlib shows it as written: every ``$`` becomes ``\\$``.

    Matplotlib reads text between two ``$`` as mathtext: ``a$x^2$.png`` would show a superscript
    and ``a$\\foo$.png`` fails to render at all. Use this for every title and label built from user
    data (file names, class names, row labels). With all dollars escaped the text is not mathtext
    and matplotlib shows each ``\\$`` as ``$`` (there is no other escape outside math mode).
    """
    return str(text).replace("$", r"\$")


def _to_numpy(value: ArrayLike, name: str) -> np.ndarray:
    """A float64 numpy copy of a tensor or array (uint8 kept as is for the caller to scale)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.uint8:
            return value.numpy()
        return value.double().numpy()
    try:
        array = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise InputError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}") from exc
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{name} must hold numbers, got dtype {array.dtype}")
    return array.astype(np.float64)


def _check_finite(array: np.ndarray, name: str) -> None:
    if array.dtype != np.uint8 and not np.isfinite(array).all():
        raise InputError(f"{name} contains NaN or Inf values")


def _check_percentile(percentile: float) -> float:
    try:
        value = float(percentile)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"percentile must be a number in (0, 100], got {percentile!r}") from exc
    if not 0.0 < value <= 100.0:
        raise ConfigError(f"percentile must lie in (0, 100], got {percentile!r}")
    return value


def _to_rgb(colours: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` channels in [0, 1] -> ``(H, W, 3)`` by the module's channel convention."""
    c = colours.shape[0]
    if c == 1:
        rgb = np.repeat(colours, 3, axis=0)
    elif c == 2:
        rgb = np.concatenate([colours, np.zeros_like(colours[:1])], axis=0)
    else:
        rgb = colours[:3]
    return np.moveaxis(rgb, 0, -1)


def _box_filter(image: np.ndarray, size: int) -> np.ndarray:
    """Mean over a ``size x size`` window (stride 1) with output of the input's shape ``(H, W)``.

    Pixels outside the image are ignored rather than counted as zeros, so borders are not darkened.
    Even sizes put the extra row/column after the centre.
    """
    if size <= 1:
        return image
    lo = (size - 1) // 2
    hi = size - 1 - lo

    def window_sums(a: np.ndarray) -> np.ndarray:
        padded = np.pad(a, ((lo, hi), (lo, hi)))
        integral = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1))
        integral[1:, 1:] = padded.cumsum(0).cumsum(1)
        return integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]

    sums = window_sums(image)
    counts = window_sums(np.ones_like(image))
    return sums / counts


def _robust_scale(values: np.ndarray, percentile: float) -> float:
    """The ``percentile`` percentile of non-negative ``values``, falling back to the max; 0 if all zero."""
    if values.size == 0:
        return 0.0
    scale = float(np.percentile(values, percentile))
    if scale <= 0.0:
        scale = float(values.max())
    return scale


# ----------------------------------------------------------------------------------------------
# colour explanations (docs/design.md#colour-explanation)


def _colour_one(weights: np.ndarray, inputs: np.ndarray, smooth: int, percentile: float) -> np.ndarray:
    c = weights.shape[0] // 2
    contributions = (inputs * weights).sum(axis=0)  # (H, W)

    # 2. scale per pixel by the max |w| over channels, clamp at 0
    peak = np.abs(weights).max(axis=0, keepdims=True)
    scaled = np.divide(weights, peak, out=np.zeros_like(weights), where=peak > 0).clip(min=0.0)

    # 3. colour of channel i = w_i / (w_i + w_{i+C}); 0/0 (both clamped away) -> 0
    positive, negative = scaled[:c], scaled[c:]
    total = positive + negative
    colours = np.divide(positive, total, out=np.zeros_like(positive), where=total > 0)

    # 4. alpha: L2 norm of the (unscaled) weights, zero where the contribution is negative,
    #    smoothed, divided by its percentile, clipped to [0, 1]
    alpha = np.sqrt((weights**2).sum(axis=0))
    alpha = np.where(contributions < 0, 0.0, alpha)
    alpha = _box_filter(alpha, smooth)
    scale = _robust_scale(alpha, percentile)
    alpha = np.zeros_like(alpha) if scale <= 0 else (alpha / scale).clip(0.0, 1.0)

    rgba = np.concatenate([_to_rgb(colours), alpha[..., None]], axis=-1)
    return rgba.clip(0.0, 1.0).astype(np.float32)


def colour_explanation(
    weights: ArrayLike,
    inputs: ArrayLike,
    smooth: int = 1,
    percentile: float = 99.5,
) -> np.ndarray:
    """The colour explanation image (docs/design.md#colour-explanation).

    Steps (per image):
        1. contribution map ``m = sum_channels inputs * weights``;
        2. per pixel, ``w`` is divided by its max absolute value over channels (pixels whose
           weights are all 0 stay 0) and clamped at 0;
        3. colour of channel ``i`` = ``w_i / (w_i + w_{i+C})``; where both are 0 the colour is 0
           (as in the published B-cos code);
        4. alpha = L2 norm over channels of the *unscaled* weights, set to 0 where ``m < 0``,
           averaged over a ``smooth x smooth`` window (stride 1, same size output, pixels
           outside the image ignored), divided by its ``percentile`` percentile over the image
           (falling back to the maximum when that percentile is 0) and clipped to ``[0, 1]``;
        5. RGBA: colour channels mapped to RGB (``C == 1`` grey; ``C == 2`` R, G and B = 0;
           ``C == 3`` RGB; ``C > 3`` the first three channels), alpha last.

    The contribution map needs the encoded input, so ``inputs`` is required
    (``Explanation.inputs``).

    Args:
        weights: ``(2C, H, W)`` or a batch ``(N, 2C, H, W)`` of dynamic linear weights ``w(x)`` of
            one target per image (``Explanation.weights[:, t]``, of ``(N, T, 2C, H, W)``).
        inputs: the encoded input ``[x, 1 - x]`` of the same shape as ``weights``.
        smooth: averaging window of the alpha channel in pixels; 0 or 1 for no smoothing.
        percentile: the alpha percentile (in ``(0, 100]``) that is mapped to full opacity.

    Returns:
        ``float32`` RGBA in ``[0, 1]``: ``(H, W, 4)``, or ``(N, H, W, 4)`` for a batch.
    """
    w = _to_numpy(weights, "weights").astype(np.float64)
    x = _to_numpy(inputs, "inputs").astype(np.float64)
    if w.ndim not in (3, 4):
        raise InputError(
            f"weights must have shape (2C, H, W) or (N, 2C, H, W), got {tuple(w.shape)}"
            + (" (an explanation's weights (N, T, 2C, H, W): pass weights[:, t])" if w.ndim == 5 else "")
        )
    if w.shape[-3] % 2 != 0:
        raise InputError(f"expected an even number of channels [x, 1-x], got {w.shape[-3]}")
    if w.shape[-3] == 0 or w.shape[-2] == 0 or w.shape[-1] == 0:
        raise InputError(f"weights must have channels and a non-empty image, got shape {tuple(w.shape)}")
    if x.shape != w.shape:
        raise InputError(
            f"inputs must have the shape of weights {tuple(w.shape)} (the encoded input [x, 1-x]), got {tuple(x.shape)}"
        )
    _check_finite(w, "weights")
    _check_finite(x, "inputs")
    if isinstance(smooth, bool) or not isinstance(smooth, int | np.integer) or smooth < 0:
        raise ConfigError(f"smooth must be a non-negative int (window size in pixels), got {smooth!r}")
    percentile = _check_percentile(percentile)

    if w.ndim == 3:
        return _colour_one(w, x, int(smooth), percentile)
    out = np.zeros((w.shape[0], w.shape[2], w.shape[3], 4), dtype=np.float32)
    for i in range(w.shape[0]):
        out[i] = _colour_one(w[i], x[i], int(smooth), percentile)
    return out


# ----------------------------------------------------------------------------------------------
# contribution maps


def _diverging_cmap(cmap: str) -> matplotlib.colors.Colormap:
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as exc:
        raise ConfigError(f"unknown matplotlib colour map {cmap!r} (try 'bwr', 'RdBu_r' or 'coolwarm')") from exc
    # an odd number of entries puts one entry exactly at the centre (0 -> white for 'bwr')
    return colormap.resampled(colormap.N + 1) if colormap.N % 2 == 0 else colormap


def probability_text(p: float) -> str:
    """A probability with two significant digits where it matters: ``0.93``, ``0.031``, ``4.2e-05``
    (with 1000 classes most probabilities print as ``0.00`` with two decimals)."""
    if p >= 0.095 or p == 0:
        return f"{p:.2f}"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _contribution_colour_bar(fig: Figure, ax, contributions: torch.Tensor, percentile: float = 99.5) -> None:
    """A colour bar beside a ``contribution_map`` panel, in contribution units (logit units per
    pixel): its ends are the scale the map was normalised by."""
    values = contributions.detach().double().numpy()
    scale = _robust_scale(np.abs(values), percentile) or 1.0
    mappable = ScalarMappable(Normalize(-scale, scale), _diverging_cmap("bwr"))
    bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02, ticks=[-scale, 0, scale])
    bar.ax.set_yticklabels([f"{-scale:.2g}", "0", f"{scale:.2g}"], fontsize=7)


def contribution_map(contributions: ArrayLike, percentile: float = 99.5, cmap: str = "bwr") -> np.ndarray:
    """Signed contributions as a diverging colour image with 0 in the centre of the colour map.

    Per image, values are divided by the ``percentile`` percentile of their absolute values
    (falling back to the maximum when that is 0; an all-zero map stays 0), clipped to
    ``[-1, 1]`` and mapped so that -1, 0, +1 are the low end, centre and high end of ``cmap``
    (blue, white, red for ``"bwr"``).

    Args:
        contributions: ``(H, W)`` or a batch ``(N, H, W)`` (``Explanation.contributions[:, t]``, of
            ``(N, T, H, W)``).
        percentile: in ``(0, 100]``; the absolute value mapped to the ends of the colour map.
        cmap: the name of a matplotlib colour map, preferably a diverging one.

    Returns:
        ``float32`` RGBA in ``[0, 1]`` (alpha 1): ``(H, W, 4)``, or ``(N, H, W, 4)`` for a batch.
    """
    values = _to_numpy(contributions, "contributions").astype(np.float64)
    if values.ndim not in (2, 3):
        raise InputError(
            f"contributions must have shape (H, W) or (N, H, W), got {tuple(values.shape)}"
            + (" (an explanation's contributions (N, T, H, W): pass contributions[:, t])" if values.ndim == 4 else "")
        )
    _check_finite(values, "contributions")
    percentile = _check_percentile(percentile)
    colormap = _diverging_cmap(cmap)

    batch = values if values.ndim == 3 else values[None]
    normalised = np.zeros_like(batch)
    for i, image in enumerate(batch):
        scale = _robust_scale(np.abs(image), percentile)
        if scale > 0:
            normalised[i] = (image / scale).clip(-1.0, 1.0)
    rgba = np.asarray(colormap((normalised + 1.0) / 2.0), dtype=np.float32).clip(0.0, 1.0)
    return rgba if values.ndim == 3 else rgba[0]


# ----------------------------------------------------------------------------------------------
# images and overlays


def to_display_image(image: ArrayLike) -> np.ndarray:
    """An image as ``float32`` RGB ``(H, W, 3)`` in ``[0, 1]`` for display.

    Accepted layouts: ``(H, W)`` greyscale; ``(C, H, W)``; ``(H, W, C)``. Torch tensors are
    always read as ``(C, H, W)``. Numpy arrays are read as ``(H, W, C)`` when their last axis is
    at most 4 long and shorter than their first axis, otherwise as ``(C, H, W)``. Channels follow
    the module convention (1: grey, 2: R and G, 3: RGB, more: the first three). ``uint8`` images
    are divided by 255; float values are clipped to ``[0, 1]``.
    """
    array = _to_numpy(image, "image")
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        channels_last = (
            not isinstance(image, torch.Tensor) and array.shape[-1] <= 4 and array.shape[-1] < array.shape[0]
        )
        if channels_last:
            array = np.moveaxis(array, -1, 0)
    else:
        raise InputError(f"image must have shape (H, W), (C, H, W) or (H, W, C), got {tuple(array.shape)}")
    if 0 in array.shape:
        raise InputError(f"image must not be empty, got shape {tuple(np.shape(image))}")
    if array.dtype == np.uint8:
        array = array.astype(np.float64) / 255.0
    _check_finite(array, "image")
    return _to_rgb(array.clip(0.0, 1.0)).astype(np.float32)


def overlay(image: ArrayLike, rgba: ArrayLike, image_weight: float = 1.0) -> np.ndarray:
    """Alpha-composite an RGBA explanation over an image.

    ``out = rgb * alpha + image_weight * image * (1 - alpha)``; ``image_weight = 0`` shows the
    explanation over black.

    Args:
        image: ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` in ``[0, 1]`` (see ``to_display_image``).
        rgba: ``(H, W, 4)`` in ``[0, 1]`` (e.g. from ``colour_explanation``); ``(H, W, 3)`` is
            taken as fully opaque.
        image_weight: in ``[0, 1]``, how bright the image shows beneath the explanation.

    Returns:
        ``float32`` RGB ``(H, W, 3)`` in ``[0, 1]``.
    """
    weight = float(image_weight)
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"image_weight must lie in [0, 1], got {image_weight!r}")
    background = to_display_image(image).astype(np.float64)
    colour = _to_numpy(rgba, "rgba")
    if colour.dtype == np.uint8:
        colour = colour.astype(np.float64) / 255.0
    if colour.ndim != 3 or colour.shape[-1] not in (3, 4):
        raise InputError(f"rgba must have shape (H, W, 4) or (H, W, 3), got {tuple(colour.shape)}")
    if colour.shape[:2] != background.shape[:2]:
        raise InputError(
            f"image and explanation sizes differ: image {background.shape[:2]}, rgba {tuple(colour.shape[:2])}"
        )
    _check_finite(colour, "rgba")
    colour = colour.clip(0.0, 1.0)
    alpha = colour[..., 3:] if colour.shape[-1] == 4 else np.ones_like(colour[..., :1])
    out = colour[..., :3] * alpha + weight * background * (1.0 - alpha)
    return out.clip(0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# files


def save_png(array: ArrayLike, path: str | os.PathLike[str]) -> Path:
    """Write an image as PNG atomically (temporary file in the same directory, then ``os.replace``).

    Args:
        array: ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA (``(H, W)`` is written as grey), either
            float in ``[0, 1]`` (clipped) or ``uint8``.
        path: the file to write; parent directories are created.

    Returns:
        the path written.
    """
    image = _to_numpy(array, "array")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or 0 in image.shape:
        raise InputError(f"save_png needs an (H, W, 3) or (H, W, 4) image, got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        _check_finite(image, "array")
        image = np.round(image.clip(0.0, 1.0) * 255.0).astype(np.uint8)
    return atomic_write(path, lambda tmp: matplotlib.image.imsave(tmp, np.ascontiguousarray(image), format="png"))


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Save a figure atomically; the format follows the file suffix (PNG when there is none).

    PNG files carry the text chunk ``Software: bcosvit`` (``FIGURE_SOFTWARE``), by which
    ``bcosvit explain`` recognises its own figures (the only files it replaces).

    Returns:
        the path written.
    """
    if not isinstance(fig, Figure):
        raise InputError(f"save_figure needs a matplotlib Figure, got {type(fig).__name__}")
    target = Path(path)
    fmt = target.suffix.lstrip(".").lower() or "png"
    metadata = {"Software": FIGURE_SOFTWARE} if fmt == "png" else None
    if type(fig.canvas) is FigureCanvasBase:
        FigureCanvasAgg(fig)
    return atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt, metadata=metadata))


# ----------------------------------------------------------------------------------------------
# figures


def explanation_figure(
    images: ArrayLike | None,
    explanation: Explanation,
    class_names: Sequence[str] | None = None,
    max_images: int = 16,
    row_labels: Sequence[str] | None = None,
) -> Figure:
    """A grid figure: one row per image, the input then, per explained target, its colour
    explanation (over black, so transparency shows as dark) and its contribution map.

    Panels are titled with the class name (or index) and its probability
    ``explanation.probabilities`` at the target.

    Args:
        images: ``(N, C, H, W)`` images in ``[0, 1]`` as given to ``explain``; None takes them
            from the encoded input (its first ``C`` channels).
        explanation: from ``bcosvit.explain``: ``weights`` ``(N, T, 2C, H, W)``, ``contributions``
            ``(N, T, H, W)`` and ``target`` ``(N, T)``, one column of panels per target.
        class_names: optional names indexed by class.
        max_images: at most this many rows (the first images).
        row_labels: one label per image for the rows (default ``image i``), e.g. the true class.

    Returns:
        a ``matplotlib.figure.Figure`` on an Agg canvas (save it with ``save_figure``).
    """
    if not isinstance(explanation, Explanation):
        raise InputError(f"explanation must be a bcosvit Explanation, got {type(explanation).__name__}")
    if isinstance(max_images, bool) or not isinstance(max_images, int | np.integer) or max_images < 1:
        raise ConfigError(f"max_images must be a positive int, got {max_images!r}")
    inputs = explanation.inputs.detach().cpu()
    if inputs.ndim != 4 or inputs.shape[1] % 2 != 0:
        raise InputError(f"explanation.inputs must have shape (N, 2C, H, W), got {tuple(inputs.shape)}")
    n, channels2, height, width = inputs.shape
    weights = explanation.weights.detach().cpu()
    contributions = explanation.contributions.detach().cpu()
    target = explanation.target.detach().cpu()
    if weights.ndim != 5 or weights.shape[0] != n or weights.shape[2:] != inputs.shape[1:]:
        raise InputError(
            f"explanation.weights {tuple(weights.shape)} do not match explanation.inputs {tuple(inputs.shape)}: "
            "expected (N, T, 2C, H, W)"
        )
    num_targets = weights.shape[1]
    for name, value, shape in (
        ("contributions", contributions, (n, num_targets, height, width)),
        ("target", target, (n, num_targets)),
    ):
        if tuple(value.shape) != shape:
            raise InputError(f"explanation.{name} has shape {tuple(value.shape)}, expected {shape}")
    if images is None:
        pictures = inputs[:, : channels2 // 2].numpy()
    else:
        pictures = _to_numpy(images, "images")
        if pictures.ndim == 3:
            pictures = pictures[:, None]
        if pictures.ndim != 4 or pictures.shape[0] != n or pictures.shape[-2:] != (height, width):
            raise InputError(
                f"images must have shape (N, C, H, W) = ({n}, C, {height}, {width}) to match the "
                f"explanation, got {tuple(np.shape(images))}"
            )
    probabilities = explanation.probabilities.detach().cpu().double()
    num_classes = probabilities.shape[1]

    rows = min(n, int(max_images))
    cols = 1 + 2 * num_targets
    # panels at least as many pixels wide as the images at save_figure's 100 dpi (224-px images
    # rendered at 165 px with a fixed 2 inches), with room for the contribution maps' colour bars
    panel = max(2.0, 1.25 * max(height, width) / 100)
    fig = Figure(figsize=(panel * cols + 0.5 * num_targets, (panel + 0.2) * max(rows, 1)), layout="constrained")
    FigureCanvasAgg(fig)
    if rows == 0:
        return fig
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        ax = axes[i, 0]
        ax.imshow(to_display_image(torch.from_numpy(np.ascontiguousarray(pictures[i]))))
        ax.set_title("input", fontsize=9)
        if row_labels is not None or rows > 1:  # a lone image needs no "image 0"
            ax.set_ylabel(literal_text(row_labels[i]) if row_labels is not None else f"image {i}", fontsize=9)
        for t in range(num_targets):
            index = int(target[i, t])
            if class_names is not None and 0 <= index < len(class_names):
                name = literal_text(class_names[index])
            else:
                name = str(index)
            if 0 <= index < num_classes:
                label = f"{name}: p={probability_text(float(probabilities[i, index]))}"
            else:
                label = name
            rgba = colour_explanation(weights[i, t], inputs[i])
            on_black = overlay(np.zeros((height, width)), rgba, image_weight=0.0)
            ax = axes[i, 1 + 2 * t]
            ax.set_facecolor("black")
            ax.imshow(on_black)
            ax.set_title(label, fontsize=9)
            ax = axes[i, 2 + 2 * t]
            ax.imshow(contribution_map(contributions[i, t]))
            ax.set_title(f"contributions (sum {float(contributions[i, t].sum()):.3g})", fontsize=9)
            _contribution_colour_bar(fig, ax, contributions[i, t])
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig
