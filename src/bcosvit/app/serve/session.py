"""What one visitor of ``bcosvit serve`` is looking at, and the steps that change it.

``Explorer`` holds the loaded models; its methods take a ``Session`` (the visitor's image, model,
class, layer, token and unit, and the views computed for them) and return the updated one. They are
the server-side work behind every click: ``bcosvit.app.serve.ui`` only maps them onto Gradio
components, and benchmarks/serve_latency.py times them. No Gradio here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ...errors import ConfigError, InputError
from ...explanation import UNIT_CHOICES as LIBRARY_UNIT_CHOICES
from ...inputs import as_model_input
from ...models.registry import twin_name
from ...models.vit import VisionTransformer
from ...visualize import save_figure
from . import views
from .views import ClassScore, ExplanationView

# the unit of a token: explain_unit's named ones (largest channel, norm direction), or a channel by index
UNIT_CHOICES = (*LIBRARY_UNIT_CHOICES, "channel")


@dataclass
class Session:
    """One visitor's page: the input, the selections and the views computed for them."""

    label: str | None = None  # the explained model
    path: Path | None = None  # the file the input was read from
    image: Tensor | None = None  # (1, C, S, S) converted for the model
    conversion: str = ""
    scores: list[ClassScore] = field(default_factory=list)
    target: int | None = None
    layer: int = -1
    token: int | None = None
    unit: str = "max"
    channel: int = 0
    class_view: ExplanationView | None = None
    unit_view: ExplanationView | None = None
    strip: Tensor | None = None
    compare_label: str | None = None
    maps: dict[str, Tensor] = field(default_factory=dict)


class Explorer:
    """The models of one server, by label, and the steps of a session."""

    def __init__(self, models: dict[str, VisionTransformer], topk: int = 5) -> None:
        if not models:
            raise ConfigError("bcosvit serve needs at least one model")
        self.models = dict(models)
        self.topk = topk

    @property
    def labels(self) -> list[str]:
        return list(self.models)

    @property
    def default_label(self) -> str:
        """The first B-cos model (else the first model)."""
        return next((label for label, m in self.models.items() if m.is_bcos), self.labels[0])

    def standard_labels(self) -> list[str]:
        return [label for label, m in self.models.items() if not m.is_bcos]

    def default_comparison(self, label: str) -> str | None:
        """The standard model to compare ``label`` with: its twin by name when loaded, else the first
        standard model that takes the same input and has the same classes."""
        model = self.models[label]
        twin = twin_name(label)
        if twin in self.models and not self.models[twin].is_bcos:
            return twin
        for other, candidate in self.models.items():
            if views.comparable(model, candidate) is None and _same_input(model, candidate):
                return other
        return None

    def model(self, label: str | None) -> VisionTransformer:
        if label not in self.models:
            raise ConfigError(f"no model {label!r} in this server; loaded: {', '.join(self.labels)}")
        return self.models[label]

    # --- steps ------------------------------------------------------------------------------------

    def open(self, session: Session, path: str | Path | None, label: str | None = None) -> Session:
        """Read ``path`` (None: the session's file again) for model ``label`` (None: the session's)
        and explain its predicted class, the current unit and the block strip."""
        label = label or session.label or self.default_label
        path = Path(path) if path is not None else session.path
        if path is None:
            raise InputError("no image yet: upload one, paste one or pick an example")
        model = self.model(label)
        loaded = views.read_input(path, model)
        image = views.model_input(loaded, model)
        scores = views.top_classes(model, image, self.topk)
        if not model.is_bcos:
            raise ConfigError(
                f"{label} is a standard model: exact explanations need a B-cos model (its prediction: "
                f"{scores[0].name} {scores[0].probability:.3f}); pick a B-cos model, and compare with this one "
                "under 'Side by side'"
            )
        rows, cols = views.token_grid(model)
        depth = model.config.depth
        keep = session.label == label and session.token is not None
        new = dataclasses.replace(
            session,
            label=label,
            path=path,
            image=image,
            conversion=views.conversion_text(loaded, model),
            scores=scores,
            target=None,
            layer=session.layer if -depth - 1 <= session.layer <= depth else -1,
            token=session.token if keep else model.num_prefix_tokens + (rows // 2) * cols + cols // 2,
            compare_label=self.default_comparison(label) if session.label != label else session.compare_label,
            maps={},
        )
        new = self.select_class(new, scores[0].index)
        return self.select_unit(new, new.layer, new.unit, new.channel)

    def select_class(self, session: Session, target: int) -> Session:
        """Explain class ``target``: the class view and the block strip (the comparison is separate)."""
        model, image = self._ready(session)
        if not 0 <= int(target) < model.num_classes:
            raise InputError(f"class {target} is not one of the model's {model.num_classes} classes")
        view = views.class_view(model, image, int(target))
        strip = views.block_strip(model, image, int(target))
        return dataclasses.replace(session, target=int(target), class_view=view, strip=strip, maps={})

    def select_unit(
        self, session: Session, layer: int, unit: str, channel: int | None = None, token: int | None = None
    ) -> Session:
        """Explain a unit of ``token`` (None: the session's) at ``layer``: ``unit`` "max", "norm" or
        "channel" (then ``channel``)."""
        model, image = self._ready(session)
        if unit not in UNIT_CHOICES:
            raise InputError(f"unit must be one of {UNIT_CHOICES}, got {unit!r}")
        token = session.token if token is None else int(token)
        channel = int(channel if channel is not None else session.channel)
        if unit == "channel" and not 0 <= channel < model.embed_dim:
            raise InputError(f"channel must lie in 0..{model.embed_dim - 1}, got {channel}")
        view = views.unit_view(model, image, int(layer), token, channel if unit == "channel" else unit)
        return dataclasses.replace(session, layer=int(layer), unit=unit, channel=channel, token=token, unit_view=view)

    def click(
        self, session: Session, x: float, y: float, width: int, height: int, layer: int, unit: str, channel: int
    ) -> Session:
        """A click at ``(x, y)`` on the input picture ``width`` x ``height``: explain that token's unit."""
        model, _ = self._ready(session)
        token = views.token_at(model, x, y, width, height)
        return self.select_unit(session, layer, unit, channel, token)

    def compare(self, session: Session, label: str | None) -> Session:
        """Post-hoc maps of the standard model ``label`` for the session's image and class."""
        model, _ = self._ready(session)
        if label is None:
            return dataclasses.replace(session, compare_label=None, maps={})
        standard = self.model(label)
        problem = views.comparable(model, standard)
        if problem is None and not _same_input(model, standard):
            problem = "it takes other input (channels or size)"
        if problem:
            raise ConfigError(f"cannot compare {session.label} with {label}: {problem}")
        image = as_model_input(standard, session.image)  # the same input, in the other model's dtype and device
        maps = views.comparison(standard, image, session.target)
        return dataclasses.replace(session, compare_label=label, maps=maps)

    def export(self, session: Session, folder: str | Path) -> tuple[Path, Path]:
        """Write the page's figure (PNG) and raw arrays (``.npz``) into ``folder``; returns both paths."""
        model, image = self._ready(session)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{session.path.stem}-{session.label}-class{session.target}"
        figure = views.view_figure(
            image,
            self.class_title(session),
            session.class_view,
            self.unit_title(session),
            session.unit_view,
            session.strip,
            session.maps,
        )
        png = save_figure(figure, folder / f"{stem}.png")
        arrays = views.export_arrays(image, session.class_view, session.unit_view, session.strip, session.maps)
        npz = folder / f"{stem}.npz"
        npz.write_bytes(views.npz_bytes(arrays))
        return png, npz

    # --- texts ------------------------------------------------------------------------------------

    def numbers(self, session: Session) -> dict[str, float | int | str]:
        model, _ = self._ready(session)
        return views.class_numbers(session.class_view, views.class_names(model))

    def class_title(self, session: Session) -> str:
        n = self.numbers(session)
        return f"{session.label}: {n['class']} (p={n['probability']:.4f})"

    def unit_title(self, session: Session) -> str:
        model, _ = self._ready(session)
        return views.unit_label(model, session.unit_view, session.layer, session.token)

    def _ready(self, session: Session) -> tuple[VisionTransformer, Tensor]:
        if session.image is None or session.label is None:
            raise InputError("no image yet: upload one, paste one or pick an example")
        return self.model(session.label), session.image


def _same_input(a: VisionTransformer, b: VisionTransformer) -> bool:
    return (a.in_chans, a.image_size, a.config.resize_size) == (b.in_chans, b.image_size, b.config.resize_size)
