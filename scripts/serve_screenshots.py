"""Screenshots of each view of ``bcosvit serve`` for the README: ``docs/images/serve-*.png``.

    python scripts/serve_screenshots.py

Serves the shipped models on a free local port, drives Debian's Chromium through Playwright (as the
browser tests do: tests/browser.py) and screenshots the views after an upload, a class switch and a
token click.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

import bcosvit  # noqa: E402
from bcosvit.app.serve import serve, views  # noqa: E402
from tests.browser import launch_chromium  # noqa: E402

OUT = ROOT / "docs" / "images"


def main() -> None:
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    models = {name: bcosvit.create_model(name, pretrained=True) for name in ("bcos_vitc_micro_28", "vitc_micro_28")}
    app = serve(models, port=port, block=False)
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            with page.expect_file_chooser() as chooser:
                page.locator("#upload").click()
            chooser.value.set_files(str(next(p for p in views.example_images() if "Sneaker" in p.name)))
            page.wait_for_function("document.querySelectorAll('#compared img').length == 5")
            picker = page.locator("#input-picture img")
            box = picker.bounding_box()
            side = min(box["width"], box["height"])
            picker.click(
                position={"x": (box["width"] - side) / 2 + side * 0.3, "y": (box["height"] - side) / 2 + side * 0.7}
            )
            page.wait_for_function("document.querySelector('#unit-text').innerText.includes('token (4, 2)')")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(OUT / "serve-page.png"), full_page=True)
            page.locator("#classes").locator("xpath=ancestor::div[contains(@class,'row')][1]").screenshot(
                path=str(OUT / "serve-input-prediction.png")
            )
            page.locator("#input-picture").locator("xpath=ancestor::div[contains(@class,'row')][1]").screenshot(
                path=str(OUT / "serve-holistic.png")
            )
            page.locator("#strip").screenshot(path=str(OUT / "serve-strip.png"))
            page.locator("#compared").screenshot(path=str(OUT / "serve-side-by-side.png"))
            page.locator("#export").click()
            page.wait_for_function("document.querySelectorAll('#exported a').length == 2")
            page.locator("#export").locator("xpath=ancestor::div[contains(@class,'row')][1]").screenshot(
                path=str(OUT / "serve-export.png")
            )
            browser.close()
    finally:
        app.close()
    for path in sorted(OUT.glob("serve-*.png")):  # 256 colours: a fraction of the size, the same look
        Image.open(path).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
        print(path, path.stat().st_size)


if __name__ == "__main__":
    main()
