"""``bcosvit serve``: a local web page to walk through the exact explanations of B-cos models.

``views`` holds the computations behind each view (no Gradio), ``session`` a visitor's state and the
steps that change it (no Gradio), ``ui`` the Gradio page over them; Gradio is imported only by ``ui``,
so ``import bcosvit`` and the other commands never load it.
"""

from __future__ import annotations

from pathlib import Path

from ...models.vit import VisionTransformer


def serve(
    models: dict[str, VisionTransformer],
    port: int = 7860,
    host: str = "127.0.0.1",
    block: bool = True,
    export_dir: str | Path | None = None,
):
    """Serve the explorer for ``models`` (label -> model) on ``host:port``; returns the Gradio app
    (``block=False``: at once, the server running in a thread; ``app.close()`` ends it)."""
    try:
        from . import ui
    except ImportError as exc:  # gradio is an optional extra
        from ...errors import ConfigError

        raise ConfigError(f"bcosvit serve needs Gradio: pip install 'bcosvit[serve]' ({exc})") from exc
    from .session import Explorer

    app = ui.build_app(Explorer(models), export_dir)
    ui.launch(app, port, host, block)
    return app
