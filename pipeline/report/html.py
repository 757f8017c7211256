"""The report page: plain HTML with a small inline style, every string escaped, relative links only (the folder
can be moved, zipped or opened from file:// without a server)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
nav a{margin-right:1em}
.warning{background:#fee;border:2px solid #c00;padding:.5em 1em;font-weight:bold}
.note{color:#555}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
th{background:#f3f3f3;position:sticky;top:0}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #ddd;padding:6px;background:#fafafa}
figure img{width:128px;height:128px;image-rendering:auto;margin-right:2px}
figure img.grid{width:auto;height:auto}
figcaption{font-size:.8em;max-width:400px;overflow-wrap:anywhere}
.wrong{color:#b00}.right{color:#070}
.plots img{margin:4px;border:1px solid #eee}
""".strip()


@dataclass(frozen=True)
class Tile:
    """One shown image: picture files (relative URLs) and caption lines."""
    image_id: str
    heatmap: str
    image: str | None
    overlay: str | None
    caption: Sequence[str]
    verdict: bool | None = None  # True correct, False wrong, None unknown
    problem: str | None = None


def table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_values(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _img(src: str, alt: str, width: int | None = None, height: int | None = None) -> str:
    size = (f' width="{width}"' if width else "") + (f' height="{height}"' if height else "")
    return f'<img src="{escape(src)}" alt="{escape(alt)}"{size}>'


def tile(t: Tile) -> str:
    pictures = []
    if t.image:
        pictures.append(_img(t.image, f"{t.image_id}: image", 128, 128))
    pictures.append(_img(t.heatmap, f"{t.image_id}: heat map", 128, 128))
    if t.overlay:
        pictures.append(_img(t.overlay, f"{t.image_id}: overlay", 128, 128))
    verdict = {True: ' class="right"', False: ' class="wrong"'}.get(t.verdict, "")
    lines = [f"<b>{escape(t.image_id)}</b>"] + [escape(line) for line in t.caption]
    if t.problem:
        lines.append(f'<span class="note">{escape(t.problem)}: heat map only</span>')
    return f"<figure>{''.join(pictures)}<figcaption{verdict}>{'<br>'.join(lines)}</figcaption></figure>"


def gallery(tiles: Sequence[Tile], empty: str) -> str:
    if not tiles:
        return f'<p class="note">{escape(empty)}</p>'
    return '<div class="gallery">' + "".join(tile(t) for t in tiles) + "</div>"


def section(anchor: str, title: str, body: str, note: str | None = None) -> str:
    intro = f'<p class="note">{escape(note)}</p>' if note else ""
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>{intro}{body}</section>'


def plots(items: Sequence[tuple[str, str]]) -> str:
    if not items:
        return '<p class="note">No statistics to plot.</p>'
    return '<div class="plots">' + "".join(_img(src, title) for title, src in items) + "</div>"


def page(title: str, warning: str | None, sections: Sequence[tuple[str, str, str]], legend: str | None) -> str:
    """The whole document; `sections` are (anchor, heading, html) in order, linked from the top."""
    nav = " ".join(f'<a href="#{escape(anchor)}">{escape(name)}</a>' for anchor, name, _ in sections)
    banner = f'<p class="warning">{escape(warning)}</p>' if warning else ""
    legend_html = (f'<p class="note">Colour: {_img(legend, "colour map legend", 255, 12)} '
                   "from −max|R| (left) through 0 (centre) to +max|R| (right), each map scaled by its own "
                   "max|R|. Tiles: image (the model's crop), heat map, overlay.</p>") if legend else ""
    body = "".join(html for _, _, html in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{banner}<nav>{nav}</nav>"
            f"{legend_html}{body}</body></html>\n")
