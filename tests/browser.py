"""Open a local HTML file or a local web app in headless Chromium (Debian's ``chromium``) through Playwright."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class PageCheck:
    screenshot: Path
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    images: int = 0
    images_ok_marker: str | None = None


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("headless Chromium is needed: install Debian's 'chromium' package (make test does, as root)")
    return path


BROKEN_IMAGES_JS = (
    "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src)"
)


def watch(page, result) -> None:
    """Record on ``result`` (with ``console_errors`` and ``failed_requests`` lists) every console error,
    uncaught exception, failed request and HTTP error response (status 400 and above) of ``page``."""
    page.on("console", lambda m: result.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: result.console_errors.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: result.failed_requests.append(f"{r.failure} {r.url}"))
    page.on("response", lambda r: result.failed_requests.append(f"{r.status} {r.url}") if r.status >= 400 else None)


def broken_images(page) -> list[str]:
    """The ``<img>`` elements of ``page`` that did not load or decode (alt text or source)."""
    return page.evaluate(BROKEN_IMAGES_JS)


def launch_chromium(playwright):
    """Debian's Chromium, headless, through a ``sync_playwright()`` context."""
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)


def check_page(html: Path, screenshot: Path) -> PageCheck:
    """Load ``html``, wait for it, screenshot the full page and collect every problem seen."""
    from playwright.sync_api import sync_playwright

    result = PageCheck(screenshot)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            watch(page, result)
            page.goto(Path(html).resolve().as_uri())
            page.wait_for_load_state("load")
            result.images = page.evaluate("document.images.length")
            result.broken_images = broken_images(page)
            result.images_ok_marker = page.evaluate("document.body.getAttribute('data-images-ok')")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return result
