"""A self-contained HTML report: tables of metrics and PNG figures embedded as data URIs.

The page has no external resources, so it can be mailed or archived as one file and shows the
same everywhere; a small inline script marks the page once every image has decoded.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..fileio import atomic_write


@dataclass
class Table:
    """Rows of cells under ``headers``; numbers are formatted with ``precision`` decimals."""

    headers: Sequence[str]
    rows: Sequence[Sequence[object]]
    precision: int = 3
    caption: str = ""


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; } caption { text-align: left; color: #555; padding: 0.3em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; } th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; } p.meta { color: #666; font-size: 0.9em; }
"""

_CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var broken = Array.prototype.filter.call(document.images, function (img) { return !(img.naturalWidth > 0); });
  document.body.setAttribute("data-images-ok", broken.length === 0 ? "true" : "false");
});
"""


def _cell(value: object, precision: int) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.{precision}f}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def render_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(_cell(v, table.precision) for v in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_figure(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    name = html.escape(Path(path).name)
    return f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'


def render_html(title: str, sections: Sequence[Section], meta: str = "") -> str:
    """The whole page as a string."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if meta:
        parts.append(f'<p class="meta">{html.escape(meta)}</p>')
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        parts.extend(render_table(t) for t in section.tables)
        parts.extend(render_figure(f) for f in section.figures)
    parts.append(f"<script>{_CHECK_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, title: str, sections: Sequence[Section], meta: str = "") -> Path:
    """Write the report atomically; every figure is read and embedded."""
    page = render_html(title, sections, meta)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
