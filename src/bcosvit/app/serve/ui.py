"""The Gradio page of ``bcosvit serve``: layout, and callbacks that map ``Explorer`` steps onto components.

Every callback runs one ``Explorer`` step (``session.py``) and returns what the page shows; bad input
(an unreadable or oversized file, a standard model asked for an exact explanation, a click before
any image) becomes a message in the page's status line, never a trace, and the page keeps what it
showed. Nothing is fetched from outside: analytics off, no share link, the theme's fonts local or
the system's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from ...errors import BcosVitError  # noqa: E402
from . import views  # noqa: E402
from .session import UNIT_CHOICES, Explorer, Session  # noqa: E402

LOG = logging.getLogger("bcosvit.serve")
_UNIT_NAMES = {"max": "largest channel", "norm": "token norm", "channel": "channel"}
UNIT_LABELS = {_UNIT_NAMES[unit]: unit for unit in UNIT_CHOICES}  # the page's name of each session.UNIT_CHOICES
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "Consolas", "monospace")
MAX_FILE_SIZE = views.MAX_UPLOAD_BYTES
SERIAL = {"concurrency_id": "bcosvit-serve", "concurrency_limit": 1}  # one queue for all events (build_app)
CSS = """
#input-picture img, .bcos-picture img { image-rendering: pixelated; }
#status p { margin: 0; }
"""


def theme() -> gr.themes.Theme:
    """Gradio's default theme with system fonts: the page loads no font from anywhere."""
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def for_page(picture: np.ndarray) -> np.ndarray:
    """A picture as the page shows it (enlarged, nearest neighbour). Tests replace it to check
    that the browser check catches a broken picture."""
    return views.enlarge(picture)


def _status(message: str, ok: bool = True) -> str:
    return message if ok else f"**Error:** {message}"


def guarded(count: int) -> Callable:
    """Wrap a callback with ``count`` outputs after the status line: an error leaves those outputs
    as they are (``gr.skip()``) and puts its message in the status line (and a warning toast)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)  # keeps the signature: Gradio passes gr.SelectData by its annotation
        def run(*args):
            try:
                return fn(*args)
            except BcosVitError as exc:
                message = str(exc)
            except Exception as exc:  # never a trace in the page; the server log has it
                LOG.exception("bcosvit serve: unexpected error in %s", fn.__name__)
                message = f"internal error ({type(exc).__name__}: {exc}); the server log has the details"
            gr.Warning(message)
            return (_status(message, ok=False), *[gr.skip()] * count)

        return run

    return wrap


class Page:
    """The callbacks of one server, over its ``Explorer``."""

    def __init__(self, explorer: Explorer, export_dir: Path) -> None:
        self.explorer = explorer
        self.export_dir = export_dir

    # outputs of a full update: see build_app for the component order
    def _everything(self, session: Session, took: float) -> tuple:
        return (
            _status(f"explained {session.label} in {took * 1000:.0f} ms"),
            session.conversion,
            *self._class_outputs(session),
            *self._unit_outputs(session),
            session,
        )

    def _class_outputs(self, session: Session) -> tuple:
        choices = [(f"{s.name}  {s.probability:.4f}", s.index) for s in session.scores]
        view = session.class_view
        pictures = views.strip_pictures(session.strip)
        return (
            gr.Radio(choices=choices, value=session.target),
            self._numbers_markdown(session),
            for_page(view.colour_on_black),
            for_page(view.contributions),
            for_page(view.overlay),
            [(for_page(p), c) for p, c in pictures],
        )

    def _unit_outputs(self, session: Session) -> tuple:
        model = self.explorer.model(session.label)
        view = session.unit_view
        return (
            for_page(views.input_picture(model, session.image, session.token)),
            gr.Slider(maximum=model.config.depth, value=session.layer % (model.config.depth + 1)),
            self.explorer.unit_title(session),
            for_page(view.colour_on_black),
            for_page(view.contributions),
            for_page(view.overlay),
        )

    def _numbers_markdown(self, session: Session) -> str:
        n = self.explorer.numbers(session)
        return (
            f"**{n['class']}** (class {n['index']}): probability **{n['probability']:.4f}**, "
            f"logit {n['logit']:.4f} = contributions {n['contributions (sum)']:.4f} + positional term "
            f"{n['positional term']:.4f} + logit bias {n['logit bias']:.4f}; "
            f"completeness error **{n['completeness error']:.3e}**"
        )

    # --- callbacks -----------------------------------------------------------------------------

    def open(self, path: str | None, label: str, layer: int, unit: str, channel: float, session: Session) -> tuple:
        start = time.perf_counter()
        session = self.explorer.open(_with_unit(session, layer, unit, channel), path, label)
        return self._everything(session, time.perf_counter() - start)

    def paste(self, path: str | None, label: str, layer: int, unit: str, channel: float, session: Session) -> tuple:
        if path is None:  # the pasted image was cleared
            return (gr.skip(),) * 15
        return self.open(path, label, layer, unit, channel, session)

    def pick_example(self, label: str, layer: int, unit: str, channel: float, session: Session, evt: gr.SelectData):
        return self.open(str(views.example_images()[evt.index]), label, layer, unit, channel, session)

    def switch_model(self, label: str, layer: int, unit: str, channel: float, session: Session) -> tuple:
        if session.path is None:  # nothing to explain yet
            return (_status(f"model {label}: upload an image, paste one or pick an example"), *[gr.skip()] * 14)
        return self.open(None, label, layer, unit, channel, session)

    def select_class(self, target: int | None, session: Session) -> tuple:
        if target is None or target == session.target:
            return (gr.skip(),) * 8
        start = time.perf_counter()
        session = self.explorer.select_class(session, int(target))
        took = time.perf_counter() - start
        return (_status(f"class {target} explained in {took * 1000:.0f} ms"), *self._class_outputs(session), session)

    def select_unit(self, layer: int, unit: str, channel: float, session: Session) -> tuple:
        start = time.perf_counter()
        session = self.explorer.select_unit(session, int(layer), UNIT_LABELS[unit], int(channel or 0))
        return self._unit_update(session, time.perf_counter() - start)

    def click_token(self, layer: int, unit: str, channel: float, session: Session, evt: gr.SelectData) -> tuple:
        start = time.perf_counter()
        model = self.explorer.model(session.label)
        size = model.image_size * views.enlargement(model.image_size)  # the side of the picture clicked on
        x, y = evt.index
        session = self.explorer.click(session, x, y, size, size, int(layer), UNIT_LABELS[unit], int(channel or 0))
        return self._unit_update(session, time.perf_counter() - start)

    def _unit_update(self, session: Session, took: float) -> tuple:
        return (_status(f"unit explained in {took * 1000:.0f} ms"), *self._unit_outputs(session), session)

    def compare(self, label: str | None, session: Session) -> tuple:
        if session.image is None:
            return (gr.skip(),) * 4
        if not label:
            return (gr.skip(), [], "no standard model loaded to compare with", session)
        start = time.perf_counter()
        session = self.explorer.compare(session, label)
        took = time.perf_counter() - start
        pictures = views.comparison_pictures(session.class_view, session.maps)
        text = (
            f"{session.label} (exact) beside {label} (post-hoc), class {session.target}; "
            f"computed in {took * 1000:.0f} ms. Each map is scaled on its own (red: evidence for the class)."
        )
        return (gr.skip(), [(for_page(p), c) for p, c in pictures], text, session)

    def export(self, session: Session) -> tuple:
        folder = Path(tempfile.mkdtemp(dir=self.export_dir))
        png, npz = self.explorer.export(session, folder)
        return (_status(f"exported {png.name} and {npz.name}"), [str(png), str(npz)])


def _with_unit(session: Session, layer: int, unit: str, channel: float) -> Session:
    return dataclasses.replace(session, layer=int(layer), unit=UNIT_LABELS[unit], channel=int(channel or 0))


def build_app(explorer: Explorer, export_dir: str | Path | None = None) -> gr.Blocks:
    """The page: input, prediction and explanation, holistic views, side by side, export."""
    export_dir = Path(export_dir or tempfile.mkdtemp(prefix="bcosvit-serve-"))
    page = Page(explorer, export_dir)
    examples = views.example_images()
    standard = explorer.standard_labels()
    with gr.Blocks(title="bcosvit: holistic explanations", analytics_enabled=False) as app:
        session = gr.State(Session())
        gr.Markdown(
            "## bcosvit explorer\nEvery unit of a B-cos ViT is an exact linear function of the input, "
            "`W_{1->l}(x) x`. Pick a model and an image, then a class, a layer and a token."
        )
        status = gr.Markdown("upload an image, paste one or pick an example", elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(explorer.labels, value=explorer.default_label, label="Model", elem_id="model")
                upload = gr.UploadButton("Upload an image", file_types=["image"], type="filepath", elem_id="upload")
                paste = gr.Image(
                    label="...or paste one", sources=["clipboard"], type="filepath", height=120, elem_id="paste"
                )
                gallery = gr.Gallery(
                    [(str(p), p.stem) for p in examples],
                    label="...or pick an example (Fashion-MNIST test images)",
                    columns=5,
                    height=150,
                    allow_preview=False,
                    elem_id="examples",
                )
                conversion = gr.Markdown(elem_id="conversion")
            with gr.Column(scale=2):
                classes = gr.Radio([], label="Top classes (probability); click to explain another", elem_id="classes")
                numbers = gr.Markdown(elem_id="numbers")
                with gr.Row():
                    colour = _picture("Colour explanation", "colour")
                    contributions = _picture("Contributions", "contributions")
                    overlaid = _picture("Overlay", "overlay")
        gr.Markdown("### Holistic view: any unit of any block\nClick a token of the input to explain its unit.")
        with gr.Row():
            picker = gr.Image(
                label="Input (click a token)", interactive=False, format="png", elem_id="input-picture", height=260
            )
            with gr.Column():
                depth = explorer.model(explorer.default_label).config.depth
                layer = gr.Slider(
                    0, depth, value=depth, step=1, label="Layer (0: embedded tokens, k: block k)", elem_id="layer"
                )
                unit = gr.Radio(list(UNIT_LABELS), value="largest channel", label="Unit of the token", elem_id="unit")
                channel = gr.Number(0, precision=0, minimum=0, label="Channel (for 'channel')", elem_id="channel")
                unit_text = gr.Markdown(elem_id="unit-text")
            unit_colour = _picture("Unit: colour explanation", "unit-colour")
            unit_contributions = _picture("Unit: contributions", "unit-contributions")
            unit_overlay = _picture("Unit: overlay", "unit-overlay")
        strip = gr.Gallery(
            label="Evidence for the class block by block (per-token contributions; each sums to logit - bias)",
            columns=8,
            height=200,
            allow_preview=False,
            elem_id="strip",
        )
        gr.Markdown("### Side by side: the exact explanation and post-hoc maps of a standard model")
        with gr.Row():
            compare_with = gr.Dropdown(
                standard, value=standard[0] if standard else None, label="Standard model", elem_id="compare-with"
            )
            compare_text = gr.Markdown(elem_id="compare-text")
        compared = gr.Gallery(columns=5, height=270, allow_preview=False, elem_id="compared", label="Maps")
        gr.Markdown("### Export")
        with gr.Row():
            export = gr.Button("Export the figure (PNG) and the arrays (.npz)", elem_id="export")
            exported = gr.File(label="Files", file_count="multiple", elem_id="exported")

        class_outputs = [classes, numbers, colour, contributions, overlaid, strip]
        unit_outputs = [picker, layer, unit_text, unit_colour, unit_contributions, unit_overlay]
        everything = [status, conversion, *class_outputs, *unit_outputs, session]
        unit_inputs = [layer, unit, channel, session]
        # One queue for every event of the page (SERIAL): each step reads the session as the step before it
        # left it. Separate queues would let the side-by-side step, chained after a class switch, run beside
        # a token click and write back the session it started from, undoing the click.
        compare_outputs = [status, compared, compare_text, session]
        compare_fn = guarded(len(compare_outputs) - 1)(page.compare)
        compare_step = {"fn": compare_fn, "inputs": [compare_with, session], **SERIAL}

        def chain(event):  # every new explanation of a class also updates the side-by-side maps
            event.then(outputs=compare_outputs, **compare_step)

        skipped = len(everything) - 1  # the outputs after the status line that an error leaves as they are
        chain(upload.upload(guarded(skipped)(page.open), [upload, model, *unit_inputs], everything, **SERIAL))
        chain(paste.change(guarded(skipped)(page.paste), [paste, model, *unit_inputs], everything, **SERIAL))
        chain(gallery.select(guarded(skipped)(page.pick_example), [model, *unit_inputs], everything, **SERIAL))
        chain(model.change(guarded(skipped)(page.switch_model), [model, *unit_inputs], everything, **SERIAL))
        class_outputs_ = [status, *class_outputs, session]
        chain(
            classes.select(
                guarded(len(class_outputs_) - 1)(page.select_class), [classes, session], class_outputs_, **SERIAL
            )
        )
        unit_outputs_ = [status, *unit_outputs, session]
        unit_step = {
            "fn": guarded(len(unit_outputs_) - 1)(page.select_unit),
            "inputs": unit_inputs,
            "outputs": unit_outputs_,
            **SERIAL,
        }
        layer.release(**unit_step)  # the slider's value is also set by a new image: its change is no user's choice
        unit.change(**unit_step)
        channel.submit(**unit_step)
        picker.select(guarded(len(unit_outputs_) - 1)(page.click_token), unit_inputs, unit_outputs_, **SERIAL)
        compare_with.change(outputs=compare_outputs, **compare_step)
        export.click(guarded(1)(page.export), [session], [status, exported], **SERIAL)
    return app


def _picture(label: str, elem_id: str) -> gr.Image:
    return gr.Image(
        label=label, interactive=False, format="png", elem_id=elem_id, elem_classes="bcos-picture", height=200
    )


def launch(app: gr.Blocks, port: int, host: str = "127.0.0.1", block: bool = True) -> None:
    """Serve ``app`` on ``host:port``: no share link, no analytics, no server-side rendering (it would
    need Node), uploads bounded by ``views.MAX_UPLOAD_BYTES``."""
    app.queue()  # the events share one queue of their own (SERIAL): one step at a time, in order
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        max_file_size=MAX_FILE_SIZE,
        prevent_thread_lock=not block,
        show_error=False,
        quiet=not block,
        theme=theme(),
        css=CSS,
        footer_links=[],
        allowed_paths=[str(p.parent) for p in views.example_images()[:1]],
    )
