"""The HTML report is self-contained and renders in a real browser without errors."""

import numpy as np
import pytest

from bcosvit.app.report import Section, Table, render_html, write_report
from bcosvit.visualize import save_png

from .browser import check_page


@pytest.fixture
def figures(tmp_path):
    rng = np.random.default_rng(0)
    return [save_png(rng.random((40, 60, 3)), tmp_path / f"figure{i}.png") for i in range(2)]


def test_report_embeds_figures_and_tables_without_external_resources(tmp_path, figures):
    page = render_html("T", [Section("S", "text <b>", [Table(["a", "b"], [[1, 0.12345], ["x&y", 2.0]])], figures)])
    assert page.count("data:image/png;base64,") == 2
    assert 'src="http' not in page and "href=" not in page
    assert "0.123" in page and "x&amp;y" in page and "text &lt;b&gt;" in page


@pytest.mark.browser
def test_report_renders_in_headless_chromium_with_all_images_and_no_console_errors(tmp_path, figures):
    path = write_report(
        tmp_path / "report.html", "Report", [Section("Figures", tables=[Table(["k"], [[1]])], figures=figures)]
    )
    check = check_page(path, tmp_path / "screenshot.png")
    assert check.console_errors == [] and check.failed_requests == [] and check.broken_images == []
    assert check.images == 2 and check.images_ok_marker == "true"
    assert check.screenshot.stat().st_size > 5000


@pytest.mark.browser
def test_browser_check_catches_missing_images_and_script_errors(tmp_path, figures):
    page = render_html("Broken", [Section("S", figures=figures)])
    page = page.replace("data:image/png;base64,", "missing-file.png#", 1).replace(
        "</body>", "<script>undefinedFunction();</script></body>"
    )
    (tmp_path / "broken.html").write_text(page)
    check = check_page(tmp_path / "broken.html", tmp_path / "shot.png")
    assert check.broken_images and check.images_ok_marker == "false"
    assert any("undefinedFunction" in e for e in check.console_errors)
