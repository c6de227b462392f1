"""``bcosvit serve`` in a real browser: Debian's Chromium driven by Playwright against the app served
on a free local port (in this process, so a test can break a picture on purpose)."""

from __future__ import annotations

import io
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bcosvit
from bcosvit.app.data import read_idx
from bcosvit.images import read_image

from .browser import broken_images, launch_chromium, watch

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHIPPED = ("bcos_vitc_micro_28", "vitc_micro_28")
TIMEOUT_MS = 20_000


@dataclass
class Problems:
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    def real_failures(self) -> list[str]:
        """Failed requests but Gradio's event stream, which its client closes when the events it waits
        for are done (Chromium reports that as net::ERR_ABORTED)."""
        return [r for r in self.failed_requests if not re.match(r"net::ERR_ABORTED \S+/gradio_api/queue/data\?", r)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models():
    return {name: bcosvit.create_model(name, pretrained=True) for name in SHIPPED}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    pytest.importorskip("gradio")
    from bcosvit.app.serve import serve

    port = _free_port()
    app = serve(models, port=port, block=False, export_dir=tmp_path_factory.mktemp("exports"))
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    problems = Problems()
    context = browser.new_context(viewport={"width": 1300, "height": 1000}, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    watch(tab, problems)
    tab.goto(server)
    tab.wait_for_selector("#upload")
    yield tab, problems
    context.close()


@pytest.fixture
def coat(tmp_path) -> tuple:
    """A Fashion-MNIST test image (a coat) as a 56x56 RGB file: the page converts it (mode, size)."""
    images = read_idx(Path(__file__).parent / "data" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz")
    path = tmp_path / "coat.png"
    Image.fromarray(images[6]).convert("RGB").resize((56, 56)).save(path)
    return path


def _src(page, selector: str) -> str:
    return page.locator(f"{selector} img").first.get_attribute("src") or ""


def _wait_for_new_picture(page, selector: str, old: str) -> str:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "([sel, old]) => { const i = document.querySelector(sel + ' img'); return i && i.src && i.src !== old "
            "&& i.complete && i.naturalWidth > 0; }",
            arg=[selector, old],
        )
    except PlaywrightTimeout:
        pytest.fail(f"{selector} shows no new picture; the page's status line: {page.inner_text('#status')!r}")
    return _src(page, selector)


def _upload(page, path) -> None:
    with page.expect_file_chooser() as chooser:
        page.locator("#upload").click()
    chooser.value.set_files(str(path))


def _wait_for_status(page, pattern: str) -> str:
    page.wait_for_function(
        "(p) => new RegExp(p).test(document.querySelector('#status').innerText)", arg=pattern, timeout=TIMEOUT_MS
    )
    return page.inner_text("#status")


def test_upload_explains_the_predicted_class_and_clicks_change_the_pictures(page, models, coat):
    tab, problems = page
    _upload(tab, coat)
    _wait_for_status(tab, "explained bcos_vitc_micro_28")
    tab.wait_for_function("document.querySelectorAll('#compared img').length == 5")  # side by side, chained

    # the page's numbers are bcosvit.explain's on the same converted input
    model = models["bcos_vitc_micro_28"]
    image = read_image(coat, 1, 28).tensor[None]
    expl = bcosvit.explain(model, image)
    predicted = int(expl.target[0, 0])
    names = model.config.class_names
    numbers = tab.inner_text("#numbers")
    assert numbers.startswith(f"{names[predicted]} (class {predicted})") and names[predicted] == "Coat"
    assert f"probability {float(expl.probabilities[0, predicted]):.4f}" in numbers
    assert f"completeness error {float(expl.completeness_error[0, 0]):.3e}" in numbers
    conversion = tab.inner_text("#conversion")
    assert "56x56 RGB -> 1x28x28" in conversion and "converted colour mode RGB -> L" in conversion
    ranked = torch.sigmoid(expl.logits[0]).argsort(descending=True)[:5].tolist()
    labels = tab.locator("#classes label").all_inner_texts()
    assert [label.rsplit(maxsplit=1)[0].strip() for label in labels] == [names[i] for i in ranked]

    # another class: a new explanation, and the numbers of that class
    colour, strip = _src(tab, "#colour"), _src(tab, "#strip")
    tab.locator("#classes label").nth(1).click()
    _wait_for_new_picture(tab, "#colour", colour)
    other = bcosvit.explain(model, image, [ranked[1]])
    tab.wait_for_function(f"document.querySelector('#numbers').innerText.includes('(class {ranked[1]})')")
    assert f"completeness error {float(other.completeness_error[0, 0]):.3e}" in tab.inner_text("#numbers")
    assert _src(tab, "#strip") != strip

    # another token (a click on the input's grid), another layer, another unit
    unit = _src(tab, "#unit-colour")
    picker = tab.locator("#input-picture img")
    box = picker.bounding_box()  # the square picture is drawn centred in this box (object-fit: contain)
    side = min(box["width"], box["height"])
    left, top = (box["width"] - side) / 2, (box["height"] - side) / 2
    picker.click(position={"x": left + side * 0.1, "y": top + side * 0.9})
    unit = _wait_for_new_picture(tab, "#unit-colour", unit)
    assert "token (6, 0)" in tab.inner_text("#unit-text")
    track = tab.locator("#layer input[type=range]")
    track.click(position={"x": 2, "y": track.bounding_box()["height"] / 2})  # layer 0
    unit = _wait_for_new_picture(tab, "#unit-colour", unit)
    assert tab.inner_text("#unit-text").startswith("embedded tokens, token (6, 0)")
    tab.locator("#unit label", has_text="token norm").click()
    _wait_for_new_picture(tab, "#unit-colour", unit)
    assert "norm: value" in tab.inner_text("#unit-text")

    # the side-by-side maps followed the class switch (a step chained after it, queued with the clicks
    # above: had it run beside them, it would have undone the token click)
    tab.wait_for_function(f"document.querySelector('#compare-text').innerText.includes('class {ranked[1]};')")
    assert tab.locator("#compared img").count() == 5

    # export: the figure and the arrays, downloadable
    tab.locator("#export").click()
    tab.wait_for_function("document.querySelectorAll('#exported a').length == 2")
    links = {a.get_attribute("download"): a.get_attribute("href") for a in tab.locator("#exported a").all()}
    stem = f"coat-bcos_vitc_micro_28-class{ranked[1]}"
    npz, png = links[f"{stem}.npz"], links[f"{stem}.png"]
    arrays = np.load(io.BytesIO(tab.request.get(npz).body()))
    assert arrays["weights"].shape == (2, 28, 28) and int(arrays["target"]) == ranked[1]
    assert arrays["block_contributions"].shape == (6, 7, 7)
    assert Image.open(io.BytesIO(tab.request.get(png).body())).size[0] > 500

    assert broken_images(tab) == []
    assert problems.console_errors == [] and problems.real_failures() == []


def test_bad_input_shows_a_message_and_the_server_keeps_serving(page, coat, tmp_path):
    tab, problems = page
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is no image")
    _upload(tab, broken)
    status = _wait_for_status(tab, "Error")
    assert "broken.png is not an image format Pillow can read" in status and "Traceback" not in tab.content()
    _upload(tab, coat)
    _wait_for_status(tab, "explained bcos_vitc_micro_28")
    assert "Coat" in tab.inner_text("#numbers")

    # a standard model asked for an exact explanation: a message, the page keeps the B-cos explanation
    tab.locator("#model input").click()
    tab.locator("[role=option]", has_text="vitc_micro_28").filter(has_not_text="bcos").click()
    status = _wait_for_status(tab, "Error")
    assert "vitc_micro_28 is a standard model: exact explanations need a B-cos model" in status
    assert "Coat" in tab.inner_text("#numbers")
    assert broken_images(tab) == []
    assert problems.console_errors == [] and problems.real_failures() == []


def test_the_browser_check_catches_a_broken_picture(page, coat, tmp_path, monkeypatch):
    # negative control: the server sends a file that is no PNG for every picture; the checks above must see it
    from bcosvit.app.serve import ui

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    monkeypatch.setattr(ui, "for_page", lambda picture: str(corrupt))
    tab, _ = page
    _upload(tab, coat)
    _wait_for_status(tab, "explained bcos_vitc_micro_28")
    tab.wait_for_function("document.querySelectorAll('#colour img').length == 1")
    tab.wait_for_function(f"({BROKEN}).length > 0")
    assert broken_images(tab)


BROKEN = "Array.from(document.images).filter(i => i.complete && !(i.naturalWidth > 0))"
