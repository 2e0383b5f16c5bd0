"""Building blocks of a self-contained HTML report: a page with its own style, tables, figures
embedded as base64 PNG, warning boxes. No script, no external resource: a report opens offline."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1100px;padding:1em 2em;
color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.decision{display:inline-block;padding:.3em .8em;border-radius:4px;font-weight:bold;color:#fff}
.anomalous{background:#c62828}.normal{background:#2e7d32}
.warning{border-left:6px solid #e6a100;background:#fff6dc;padding:.5em 1em;margin:.6em 0}
.note{color:#555;font-size:.9em}figure{margin:.8em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{color:#444;font-size:.9em}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dt{font-weight:bold}dd{margin:0}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A cell's text: numbers to ``digits`` significant figures, booleans as yes/no, blanks as '–'."""
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | Mapping[str, str],
    *,
    raw: Iterable[str] = (),
    table_id: str = "",
) -> str:
    """An HTML table of ``rows``; ``columns`` are keys (or key -> header); ``raw`` columns hold HTML."""
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    raw = set(raw)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers.values())
    body = []
    for row in rows:
        cells = []
        for key in headers:
            value = row.get(key)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            text = str(value) if key in raw and value is not None else esc(fmt(value))
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def png_data_uri(figure: Any, dpi: int = 80) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_data_uri(path: Any) -> str:
    """A PNG file on disk as a data URI."""
    from pathlib import Path

    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def figure(uri: str, caption: str, alt: str = "") -> str:
    return (
        f'<figure><img src="{uri}" alt="{esc(alt or caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def warning(text: str) -> str:
    return f'<div class="warning" role="alert">{esc(text)}</div>'


def definitions(items: Mapping[str, Any]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(fmt(v))}</dd>" for k, v in items.items()) + "</dl>"


def page(title: str, body: str) -> str:
    """A complete HTML document: ``body`` under an ``<h1>`` of ``title``, styled inline."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>\n{body}\n</body></html>\n"
    )
