"""Labelled image grids for people to read: a heading above each column (the setting) and the prompt above each row.
Used by training previews and the transfer report."""

from __future__ import annotations

import io
import textwrap

MIN_CELL = 192  # small samples (tiny/micro models) are enlarged so that the text fits beside them


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap size
        return ImageFont.load_default()


def grid_image(columns: list[list], labels: list[str], row_labels: list[str] | None = None):
    """columns[c][r]: PIL images, one column per setting, one row per prompt -> one PIL image."""
    from PIL import Image, ImageDraw

    w, h = columns[0][0].size
    if w < MIN_CELL:  # enlarge without smoothing: the pixels are what is judged
        f = -(-MIN_CELL // w)
        columns = [[im.resize((w * f, h * f), Image.NEAREST) for im in col] for col in columns]
        w, h = w * f, h * f
    font = _font(13)
    head = 20
    chars = max(20, (w * len(columns)) // 7)
    wrapped = [textwrap.wrap(t, chars)[:2] for t in (row_labels or [])]
    band = 16 * max((len(x) for x in wrapped), default=0) + (4 if wrapped else 0)
    rows = len(columns[0])
    grid = Image.new("RGB", (w * len(columns), head + rows * (band + h)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(labels):
        draw.text((c * w + 4, 3), label, fill="black", font=font)
    for r in range(rows):
        top = head + r * (band + h)
        for i, line in enumerate(wrapped[r] if r < len(wrapped) else []):
            draw.text((4, top + 2 + 16 * i), line, fill=(60, 60, 60), font=font)
        for c, col in enumerate(columns):
            grid.paste(col[r], (c * w, top + band))
    return grid


def image_grid(columns: list[list], labels: list[str], row_labels: list[str] | None = None) -> bytes:
    """`grid_image` as PNG bytes."""
    buf = io.BytesIO()
    grid_image(columns, labels, row_labels).save(buf, format="PNG")
    return buf.getvalue()
