"""The computations behind each view of ``bcosvit serve``: plain functions of a model and an image.

Nothing here imports Gradio: every function takes a ``VisionTransformer`` and images as tensors and
returns numpy pictures, numbers, dataclasses or a matplotlib figure, so each view is tested without
a browser (tests/test_serve.py) and timed without a server (benchmarks/serve_latency.py). The
explanations are the library's (``bcosvit.explain``, ``explain_unit``, ``token_contributions``,
``bcosvit.attribution``), the pictures ``bcosvit.visualize``'s, the image conversion
``bcosvit.load_image``'s, as ``bcosvit explain`` uses them.

Shapes: ``image`` is one converted input ``(1, C, S, S)`` in [0, 1] in the model's dtype; pictures
are ``float32`` channels-last in [0, 1], ``(H, W, 3)`` or ``(H, W, 4)``. Layers count as in
``explain_unit``: 0 the embedded tokens, ``k`` the output of block ``k``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ...attribution import attribute
from ...errors import ConfigError, InputError
from ...explanation import Explanation, explain, explain_unit, token_contributions
from ...images import LoadedImage, load_image
from ...inputs import as_model_input
from ...models.vit import VisionTransformer
from ...visualize import colour_explanation, contribution_map, literal_text, overlay, to_display_image

MAX_UPLOAD_BYTES = 20 * 2**20  # an uploaded file may have at most this many bytes ...
MAX_UPLOAD_PIXELS = 40_000_000  # ... and this many pixels (read from its header before decoding)
COMPARISON_METHODS = ("gradcam", "integrated_gradients", "rollout", "transformer_attribution")
DISPLAY_SIZE = 224  # pictures are enlarged (nearest neighbour) to at least this side for the page


# --- Input -----------------------------------------------------------------------------------------


def example_images() -> list[Path]:
    """The example images shipped with the package (Fashion-MNIST test images, one per class)."""
    folder = Path(str(resources.files("bcosvit") / "app" / "serve" / "examples"))
    return sorted(folder.glob("*.png"))


def read_input(path: str | Path, model: VisionTransformer, background: float = 0.0) -> LoadedImage:
    """``path`` converted for ``model`` by ``load_image`` (colour mode, resize, centre crop), with the
    upload bounds ``MAX_UPLOAD_BYTES`` and ``MAX_UPLOAD_PIXELS``; ``InputError`` says what was wrong,
    naming the file by its name only (an upload's path is the server's temporary folder)."""
    try:
        return load_image(path, model, background, max_pixels=MAX_UPLOAD_PIXELS, max_bytes=MAX_UPLOAD_BYTES)
    except InputError as exc:
        name = Path(path).name
        raise InputError(str(exc).replace(str(Path(path).parent / name), name).replace(str(path), name)) from None


def model_input(loaded: LoadedImage, model: VisionTransformer) -> Tensor:
    """The loaded image as the batch of one ``(1, C, S, S)`` that ``model`` computes with
    (``bcosvit.inputs.as_model_input``: its device and dtype, checked)."""
    return as_model_input(model, loaded.tensor.unsqueeze(0))


def conversion_text(loaded: LoadedImage, model: VisionTransformer) -> str:
    """What was done to the file to make the model's input, as ``bcosvit explain`` reports it."""
    width, height = loaded.original_size
    target = f"{model.in_chans}x{model.image_size}x{model.image_size}"
    steps = "; ".join(loaded.notes) if loaded.notes else "used as it is"
    return f"{loaded.path.name}: {width}x{height} {loaded.original_mode} -> {target} ({steps})"


# --- Prediction and the class explanation --------------------------------------------------------------


@dataclass
class ClassScore:
    index: int
    name: str
    probability: float
    logit: float


def class_names(model: VisionTransformer) -> list[str]:
    """The model's class names, or the class indices as strings."""
    return list(model.config.class_names or [str(i) for i in range(model.num_classes)])


def top_classes(model: VisionTransformer, image: Tensor, k: int = 5) -> list[ClassScore]:
    """The ``k`` classes of largest logit for ``image`` ``(1, C, S, S)``, with their probabilities
    (``VisionTransformer.probabilities``: sigmoid for a B-cos model, softmax for a standard one)."""
    with torch.no_grad():
        logits = model(image)[0]
    probabilities = model.probabilities(logits)  # the model's dtype
    names = class_names(model)
    order = logits.argsort(descending=True)[: min(k, model.num_classes)].tolist()
    return [ClassScore(i, names[i], float(probabilities[i]), float(logits[i])) for i in order]


@dataclass
class ExplanationView:
    """One explained value (a class logit, or an intermediate unit) and its pictures.

    Attributes:
        explanation: the library's ``Explanation`` of the one image and target (``weights``
            ``(1, 1, 2C, S, S)``, ``outputs`` ``(1, 1)``, ...).
        colour: ``(S, S, 4)`` colour explanation; contributions: ``(S, S, 4)`` contribution map;
        overlay: ``(S, S, 3)`` the colour explanation over the input.
    """

    explanation: Explanation
    colour: np.ndarray
    contributions: np.ndarray
    overlay: np.ndarray

    @property
    def colour_on_black(self) -> np.ndarray:
        """``(S, S, 3)`` the colour explanation alone (over black), as the page and the figure show it."""
        return overlay(np.zeros(self.colour.shape[:2]), self.colour, image_weight=0.0)

    @property
    def output(self) -> float:
        return float(self.explanation.outputs[0, 0])

    @property
    def completeness_error(self) -> float:
        return float(self.explanation.completeness_error[0, 0])

    @property
    def positional(self) -> float:
        return float(self.explanation.positional[0, 0])


def _pictures(explanation: Explanation, image: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgba = colour_explanation(explanation.weights[0, 0], explanation.inputs[0])
    return rgba, contribution_map(explanation.contributions[0, 0]), overlay(image[0], rgba)


def class_view(model: VisionTransformer, image: Tensor, target: int | None = None) -> ExplanationView:
    """The exact explanation of class ``target`` (None: the predicted one) for ``image`` ``(1, C, S, S)``.
    ``ConfigError`` for a standard model (``bcosvit.explain``'s own message)."""
    expl = explain(model, image, None if target is None else int(target))
    return ExplanationView(expl, *_pictures(expl, image))


def class_numbers(view: ExplanationView, names: Sequence[str]) -> dict[str, float | int | str]:
    """The numbers the page shows for a class explanation."""
    expl = view.explanation
    index = int(expl.target[0, 0])
    return {
        "class": names[index],
        "index": index,
        "probability": float(expl.probabilities[0, index]),
        "logit": view.output,
        "contributions (sum)": float(expl.contributions[0, 0].sum()),
        "positional term": view.positional,
        "logit bias": float(expl.logit_bias),
        "completeness error": view.completeness_error,
    }


# --- Holistic views: units at any layer, and the evidence block by block --------------------------


def token_grid(model: VisionTransformer) -> tuple[int, int]:
    """``(rows, cols)`` of the patch tokens."""
    side = model.image_size // model.patch_size
    return side, side


def token_at(model: VisionTransformer, x: float, y: float, width: int, height: int) -> int:
    """The token index (``explain_unit``'s, after any class token) under the point ``(x, y)`` of a
    picture of the input ``width`` x ``height`` pixels large (a click on the page)."""
    rows, cols = token_grid(model)
    col = min(max(int(x * cols / width), 0), cols - 1)
    row = min(max(int(y * rows / height), 0), rows - 1)
    return model.num_prefix_tokens + row * cols + col


def token_position(model: VisionTransformer, token: int) -> tuple[int, int]:
    """``(row, col)`` of a patch token on the grid."""
    rows, cols = token_grid(model)
    index = token - model.num_prefix_tokens
    if not 0 <= index < rows * cols:
        raise InputError(f"token {token} is not a patch token (0..{rows * cols - 1} after the prefix)")
    return divmod(index, cols)


def resolve_layer(model: VisionTransformer, layer: int) -> int:
    """``layer`` as a block index in ``[0, depth]`` (negative values count from the last block)."""
    depth = model.config.depth
    if not -depth - 1 <= layer <= depth:
        raise InputError(f"layer must lie in 0..{depth} (0: embedded tokens, k: block k), got {layer}")
    return layer % (depth + 1)


def unit_view(
    model: VisionTransformer, image: Tensor, layer: int, token: int, unit: str | int = "max"
) -> ExplanationView:
    """``W_{1->layer}(x)`` of one unit of ``token`` at ``layer`` for ``image`` ``(1, C, S, S)``.

    ``unit``: a channel index, ``"max"`` (the token's channel of largest value) or ``"norm"`` (the
    token's norm, the unit along its own direction); see ``bcosvit.explain_unit``.
    """
    expl = explain_unit(model, image, resolve_layer(model, layer), int(token), unit)
    return ExplanationView(expl, *_pictures(expl, image))


def unit_label(model: VisionTransformer, view: ExplanationView, layer: int, token: int) -> str:
    """A one-line description of a unit view."""
    row, col = token_position(model, token)
    channel = int(view.explanation.target[0, 0])
    unit = "norm" if channel < 0 else f"channel {channel}"
    where = "embedded tokens" if resolve_layer(model, layer) == 0 else f"block {resolve_layer(model, layer)}"
    return (
        f"{where}, token ({row}, {col}), {unit}: value {view.output:.4g}, positional term {view.positional:.4g}, "
        f"completeness error {view.completeness_error:.3e}"
    )


def block_strip(model: VisionTransformer, image: Tensor, target: int) -> Tensor:
    """Per-token contributions to class ``target`` after every block: ``(depth + 1, rows, cols)``
    (index 0: the embedded tokens), from one forward and one backward pass. Each map sums to
    ``logit - logit_bias``: the evidence moves between tokens, its total stays."""
    layers = range(model.config.depth + 1)
    return token_contributions(model, image, int(target), layer=layers)[0, 0].detach()


def strip_pictures(strip: Tensor) -> list[tuple[np.ndarray, str]]:
    """Contribution maps ``(K, rows, cols)`` as ``(picture, caption)`` pairs, each map on its own scale."""
    captions = ["embedding"] + [f"block {k}" for k in range(1, strip.shape[0])]
    return [(enlarge(contribution_map(m)), c) for m, c in zip(strip, captions)]


# --- Side by side with a standard twin -----------------------------------------------------------------


def comparable(bcos_model: VisionTransformer, standard: VisionTransformer) -> str | None:
    """Why ``standard`` cannot be compared with ``bcos_model`` on the same image and class; None if it can."""
    if standard.is_bcos:
        return "the comparison model is a B-cos model; post-hoc maps are shown for standard models"
    if standard.num_classes != bcos_model.num_classes:
        return f"it has {standard.num_classes} classes, the B-cos model {bcos_model.num_classes}"
    return None


def comparison(
    standard: VisionTransformer,
    image: Tensor,
    target: int,
    methods: Sequence[str] = COMPARISON_METHODS,
    ig_steps: int = 16,
) -> dict[str, Tensor]:
    """Post-hoc maps ``(S, S)`` of ``standard`` for class ``target`` on ``image`` ``(1, C, S, S)``,
    one per method of ``bcosvit.attribution``."""
    if standard.is_bcos:
        raise ConfigError("post-hoc maps are compared for a standard model; this one is a B-cos model")
    maps = {}
    for method in methods:
        options = {"n_steps": ig_steps} if method == "integrated_gradients" else {}
        maps[method] = attribute(method, standard, image, [int(target)], **options)[0].detach()
    return maps


# --- Pictures for the page, figure and arrays for export ------------------------------------------


def enlargement(side: int, size: int = DISPLAY_SIZE) -> int:
    """The whole factor ``enlarge`` repeats a picture of ``side`` pixels by to reach ``size``."""
    return max(1, -(-size // side))


def enlarge(picture: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """``picture`` ``(H, W, C)`` repeated (nearest neighbour) to at least ``size`` pixels a side, so that
    a 28x28 map shows sharp pixels instead of a browser's blur."""
    factor = enlargement(max(picture.shape[:2]), size)
    return np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)


def input_picture(model: VisionTransformer, image: Tensor, token: int | None = None) -> np.ndarray:
    """The model's input ``(1, C, S, S)`` enlarged, with the token grid drawn and ``token`` framed:
    the picture the page's token clicks land on. ``(D, D, 3)``."""
    picture = enlarge(to_display_image(image[0]))
    size = picture.shape[0]
    rows, cols = token_grid(model)
    grid = picture.copy()
    for r in range(1, rows):
        grid[r * size // rows, :] = 0.5 * grid[r * size // rows, :] + 0.25
    for c in range(1, cols):
        grid[:, c * size // cols] = 0.5 * grid[:, c * size // cols] + 0.25
    if token is not None:
        row, col = token_position(model, token)
        top, bottom = row * size // rows, (row + 1) * size // rows - 1
        left, right = col * size // cols, (col + 1) * size // cols - 1
        frame = np.array([1.0, 0.8, 0.0], dtype=np.float32)
        grid[top : top + 2, left : right + 1] = frame
        grid[bottom - 1 : bottom + 1, left : right + 1] = frame
        grid[top : bottom + 1, left : left + 2] = frame
        grid[top : bottom + 1, right - 1 : right + 1] = frame
    return grid


def comparison_pictures(bcos_view: ExplanationView, maps: dict[str, Tensor]) -> list[tuple[np.ndarray, str]]:
    """The exact contribution map beside the post-hoc maps, as ``(picture, caption)`` pairs."""
    pictures = [(enlarge(bcos_view.contributions), "B-cos (exact)")]
    return pictures + [(enlarge(contribution_map(m)), name.replace("_", " ")) for name, m in maps.items()]


def view_figure(
    image: Tensor,
    class_title: str,
    view: ExplanationView,
    unit_title: str | None = None,
    unit: ExplanationView | None = None,
    strip: Tensor | None = None,
    maps: dict[str, Tensor] | None = None,
) -> Figure:
    """The page's current pictures in one figure: the input and the class explanation (colour,
    contributions, overlay), the unit explanation, the block strip and the post-hoc maps, a row each."""
    rows: list[tuple[str, list[tuple[np.ndarray, str]]]] = [
        (
            class_title,
            [
                (to_display_image(image[0]), "input"),
                (view.colour_on_black, "colour explanation"),
                (view.contributions, "contributions"),
                (view.overlay, "overlay"),
            ],
        )
    ]
    if unit is not None:
        rows.append(
            (
                unit_title or "unit",
                [
                    (unit.colour_on_black, "colour explanation"),
                    (unit.contributions, "contributions"),
                    (unit.overlay, "overlay"),
                ],
            )
        )
    if strip is not None:
        rows.append(("evidence block by block", strip_pictures(strip)))
    if maps:
        rows.append(("exact vs post-hoc", comparison_pictures(view, maps)))
    cols = max(len(panels) for _, panels in rows)
    fig = Figure(figsize=(1.9 * cols, 2.5 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    for (title, panels), sub in zip(rows, fig.subfigures(len(rows), 1, squeeze=False)[:, 0]):
        sub.suptitle(literal_text(title), fontsize=9, x=0.01, ha="left")
        for ax, panel in zip(sub.subplots(1, cols, squeeze=False)[0], panels + [None] * cols):
            ax.axis("off")
            if panel is not None:
                ax.imshow(panel[0], interpolation="nearest")
                ax.set_title(literal_text(panel[1]), fontsize=8)
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """A figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def export_arrays(
    image: Tensor,
    view: ExplanationView,
    unit: ExplanationView | None = None,
    strip: Tensor | None = None,
    maps: dict[str, Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """The raw arrays behind the page, for ``np.savez``: the input ``(C, S, S)``; of the class
    explanation its ``weights`` ``(2C, S, S)``, ``contributions`` ``(S, S)``, target, logits ``(K,)``,
    positional term and completeness error; of the unit explanation the same under ``unit_``; the
    block strip ``(depth + 1, rows, cols)``; the post-hoc maps ``(S, S)`` under ``posthoc_<method>``."""

    def numpy(value: Tensor) -> np.ndarray:
        return value.detach().cpu().numpy()

    def fields(prefix: str, expl: Explanation) -> dict[str, np.ndarray]:
        return {
            f"{prefix}weights": numpy(expl.weights[0, 0]),
            f"{prefix}contributions": numpy(expl.contributions[0, 0]),
            f"{prefix}target": numpy(expl.target[0, 0]),
            f"{prefix}output": numpy(expl.outputs[0, 0]),
            f"{prefix}positional": numpy(expl.positional[0, 0]),
            f"{prefix}completeness_error": numpy(expl.completeness_error[0, 0]),
        }

    arrays = {"image": numpy(image[0]), "logits": numpy(view.explanation.logits[0]), **fields("", view.explanation)}
    if unit is not None:
        arrays.update(fields("unit_", unit.explanation))
    if strip is not None:
        arrays["block_contributions"] = numpy(strip)
    for method, values in (maps or {}).items():
        arrays[f"posthoc_{method}"] = numpy(values)
    return arrays


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of an ``.npz`` file."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
