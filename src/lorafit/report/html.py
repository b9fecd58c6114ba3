"""Self-contained HTML: PNGs embedded as data URIs, no script, nothing fetched, so a page opens from disk or offline."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em 1% 0.5em 0; vertical-align: top; width: 48%; } figure.wide { width: 98%; }
figcaption { color: #555; font-size: 0.9em; } img { width: 100%; height: auto; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def figure_html(png: Path, caption: str, wide: bool = False) -> str:
    alt = html.escape(caption)
    return f'<figure{" class=wide" if wide else ""}><img src="{data_uri(png)}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


def table(header: list[str] | None, rows: list[list], numeric: set[int] = frozenset()) -> str:
    cls = lambda j: ' class="num"' if j in numeric else ""  # noqa: E731
    head = (
        "<tr>" + "".join(f"<th{cls(j)}>{html.escape(str(h))}</th>" for j, h in enumerate(header)) + "</tr>"
        if header
        else ""
    )
    body = "".join(
        "<tr>" + "".join(f"<td{cls(j)}>{html.escape(str(v))}</td>" for j, v in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table>{head}{body}</table>"


def page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>\n'
        f"<body>\n{body}\n</body></html>\n"
    )


def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)
