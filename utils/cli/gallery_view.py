"""Retrieval grids: each query is a row, its image then its top-k gallery images, with the
identity and score under each; a green frame marks a hit of the query's identity and a red
frame a miss (no frame when the query's identity is unknown). Drawn as a PNG with PIL and
as a self-contained HTML page (images embedded as base64)."""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from utils.atomic_io import atomic_path, atomic_write_text

THUMB = 96  # side of each image in the grid, pixels
PAD = 6
FRAME = 4
TEXT_H = 30  # two lines of caption
HEADER_H = 20
DEFAULT_TOPK = 10  # results per query of --search
HTML_ROWS = 200  # queries shown in search.html
GREEN, RED, BLUE, GREY = (30, 160, 60), (210, 40, 40), (40, 90, 200), (200, 200, 200)


@dataclass
class Hit:
    """One retrieved gallery item."""

    path: str
    identity: str | None
    score: float
    correct: bool | None = None  # None: the query's identity is unknown


@dataclass
class GridRow:
    """One query and its ranked hits."""

    query_path: str
    query_identity: str | None
    hits: list[Hit] = field(default_factory=list)


def cell_size() -> tuple[int, int]:
    """(width, height) of one cell of the grid."""
    return THUMB + 2 * FRAME + 2 * PAD, THUMB + 2 * FRAME + TEXT_H + PAD


def grid_layout(rows: int, columns: int) -> tuple[int, int]:
    """Pixel size of a grid of ``rows`` queries with ``columns`` = k + 1 cells each."""
    w, h = cell_size()
    return columns * w, HEADER_H + rows * h


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def thumbnail(path: str, side: int = THUMB) -> Image.Image:
    """The image scaled to fit ``side x side`` on a white square; a grey square if unreadable."""
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((side, side), Image.Resampling.BILINEAR)
            if max(img.size) < side:  # small faces (synthface is 64 px): scale up to fill
                scale = side / max(img.size)
                img = img.resize((max(1, round(img.width * scale)),
                                  max(1, round(img.height * scale))), Image.Resampling.BILINEAR)
            canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    except Exception:  # noqa: BLE001 - a missing thumbnail must not stop the report
        canvas.paste(GREY, (0, 0, side, side))
    return canvas


def _short(text: str, limit: int = 16) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _frame_colour(hit: Hit) -> tuple[int, int, int] | None:
    return None if hit.correct is None else (GREEN if hit.correct else RED)


def draw_grid(rows: Sequence[GridRow], topk: int, path: str | Path, title: str = "") -> Path:
    """Draw the grid to a PNG of :func:`grid_layout` ``(len(rows), topk + 1)`` pixels."""
    width, height = grid_layout(len(rows), topk + 1)
    cw, ch = cell_size()
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font()
    draw.text((PAD, 4), title or "query | top-k results (green: same identity, red: other)",
              fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = HEADER_H + r * ch
        cells = [(row.query_path, row.query_identity or "?", "query", BLUE)]
        cells += [(h.path, h.identity or "?", f"#{i + 1}  {h.score:.3f}", _frame_colour(h))
                  for i, h in enumerate(row.hits[:topk])]
        for c, (file, identity, caption, colour) in enumerate(cells):
            x = c * cw + PAD
            if colour is not None:
                draw.rectangle((x, y, x + THUMB + 2 * FRAME - 1, y + THUMB + 2 * FRAME - 1),
                               fill=colour)
            image.paste(thumbnail(file), (x + FRAME, y + FRAME))
            ty = y + THUMB + 2 * FRAME + 1
            draw.text((x, ty), _short(identity), fill=(0, 0, 0), font=font)
            draw.text((x, ty + 13), caption, fill=(60, 60, 60), font=font)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _data_uri(path: str) -> str:
    buffer = io.BytesIO()
    thumbnail(path).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html(rows: Sequence[GridRow], topk: int, path: str | Path, title: str = "") -> Path:
    """The same grid as one self-contained HTML page (thumbnails embedded as base64 JPEG)."""
    uris: dict[str, str] = {}

    def uri(file: str) -> str:
        if file not in uris:
            uris[file] = _data_uri(file)
        return uris[file]

    def cell(file: str, identity: str | None, caption: str, colour) -> str:
        border = f"rgb{colour}" if colour else "transparent"
        return (f'<td><img src="{uri(file)}" title="{html.escape(file)}" '
                f'style="border:{FRAME}px solid {border}"><br>'
                f'<b>{html.escape(identity or "?")}</b><br>{html.escape(caption)}</td>')

    lines = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
             f"<title>{html.escape(title or 'OPQN search')}</title>",
             "<style>body{font-family:sans-serif}td{text-align:center;font-size:11px;"
             "vertical-align:top;padding:3px}img{width:96px;height:96px}</style></head><body>",
             f"<h3>{html.escape(title or 'OPQN search')}</h3>",
             "<p>Each row: the query, then its top-k gallery images with identity and score. "
             "Green: same identity as the query; red: another; no frame: unknown.</p>",
             "<table>"]
    for row in rows:
        cells = [cell(row.query_path, row.query_identity, "query", BLUE)]
        cells += [cell(h.path, h.identity, f"#{i + 1} {h.score:.4f}", _frame_colour(h))
                  for i, h in enumerate(row.hits[:topk])]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines += ["</table></body></html>", ""]
    path = Path(path)
    atomic_write_text(path, "\n".join(lines))
    return path


def rows_json(rows: Sequence[GridRow]) -> list[dict]:
    """The ``queries`` list of ``search.json``: each query's ranked hits."""
    return [{"path": row.query_path, "identity": row.query_identity,
             "results": [{"rank": i + 1, "path": h.path, "identity": h.identity,
                          "score": h.score, "correct": h.correct}
                         for i, h in enumerate(row.hits)]} for row in rows]


def write_search_outputs(out: str | Path, result: dict, rows: Sequence[GridRow], topk: int,
                         grid_rows: int, html_rows: int, title: str) -> tuple[Path, Path, Path]:
    """``search.json`` (``result``), ``search.png`` (the first ``grid_rows`` rows) and
    ``search.html`` (the first ``html_rows``) under ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "search.json"
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    png = draw_grid(rows[:grid_rows], topk, out / "search.png", title)
    page = write_html(rows[:html_rows], topk, out / "search.html", title)
    return json_path, png, page
