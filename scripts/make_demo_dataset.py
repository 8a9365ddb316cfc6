#!/usr/bin/env python
"""Regenerate datasets/demo: 16 procedurally drawn images in one distinctive flat "bauhaus poster" style (bold shapes
with thick dark outlines, a four-colour palette on cream paper, fine diagonal hatching), each with a .txt caption.

Deterministic: the same seed gives byte-identical files. Everything here is drawn from scratch with PIL, so the
dataset is dedicated to the public domain (CC0 1.0).

    python scripts/make_demo_dataset.py [--out datasets/demo] [--count 16] [--seed 7]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = {"red": (214, 64, 48), "mustard": (232, 176, 48), "teal": (32, 128, 128), "navy": (30, 42, 84)}
PAPER = (243, 233, 210)
INK = (28, 24, 22)
SIZES = [(512, 512), (576, 448), (448, 576), (640, 400), (400, 640)]
SHAPES = ["circle", "square", "triangle", "half circle", "bar"]
TRIGGER = "k2demo"


def _shape(draw: ImageDraw.ImageDraw, kind: str, box, colour, outline: int):
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=colour, outline=INK, width=outline)
    elif kind == "square":
        draw.rectangle(box, fill=colour, outline=INK, width=outline)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour, outline=INK, width=outline)
    elif kind == "half circle":
        draw.pieslice((x0, y0, x1, y1 + (y1 - y0)), 180, 360, fill=colour, outline=INK, width=outline)
    else:  # bar
        h = max(8, (y1 - y0) // 4)
        draw.rectangle((x0, y0 + h, x1, y0 + 2 * h), fill=colour, outline=INK, width=outline)


def _where(cx, cy, w, h) -> str:
    v = "top" if cy < h / 3 else "bottom" if cy > 2 * h / 3 else "middle"
    s = "left" if cx < w / 3 else "right" if cx > 2 * w / 3 else "centre"
    return "centre" if (v, s) == ("middle", "centre") else f"{v} {s}" if v != "middle" else f"{s}"


def make_image(rng: random.Random, size):
    w, h = size
    img = Image.new("RGB", size, PAPER)
    draw = ImageDraw.Draw(img)
    # The style's signature: fine diagonal hatching across the paper.
    for k in range(-h, w, 12):
        draw.line([(k, 0), (k + h, h)], fill=(228, 214, 186), width=1)
    outline = max(4, min(w, h) // 40)
    parts = []
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice(SHAPES)
        name, colour = rng.choice(list(PALETTE.items()))
        s = rng.randint(min(w, h) // 5, min(w, h) // 2)
        x0, y0 = rng.randint(0, w - s), rng.randint(0, h - s)
        _shape(draw, kind, (x0, y0, x0 + s, y0 + s), colour, outline)
        parts.append(f"a {name} {kind} at the {_where(x0 + s / 2, y0 + s / 2, w, h)}")
    draw.rectangle((0, 0, w - 1, h - 1), outline=INK, width=outline)  # poster frame
    caption = ", ".join(parts) + ", flat bauhaus poster, thick black outlines, cream hatched paper"
    return img, caption


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "datasets" / "demo"))
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for i in range(args.count):
        img, caption = make_image(rng, SIZES[i % len(SIZES)])
        img.save(out / f"poster_{i:02d}.png", optimize=True)
        (out / f"poster_{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")
    (out / "LICENSE").write_text(
        "CC0 1.0 Universal (public domain dedication)\n\n"
        "The images and captions in this folder were generated procedurally by scripts/make_demo_dataset.py\n"
        "(PIL drawing primitives, no source images, no models). To the extent possible under law, the authors\n"
        "have waived all copyright and related rights to them. https://creativecommons.org/publicdomain/zero/1.0/\n")
    (out / "README.md").write_text(
        f"# Demo dataset: flat bauhaus posters\n\n{args.count} small images ({', '.join(f'{a}x{b}' for a, b in SIZES)}) "
        "in one distinctive style: bold geometric shapes with thick black outlines, a red/mustard/teal/navy palette "
        "on cream paper with fine diagonal hatching. Each `poster_NN.png` has a `poster_NN.txt` caption describing "
        f"the shapes; configs add the trigger word `{TRIGGER}`.\n\n"
        f"Made by `python scripts/make_demo_dataset.py --count {args.count} --seed {args.seed}` (deterministic).\n\n"
        "Licence: CC0 1.0 (public domain), see LICENSE.\n")
    print(f"wrote {args.count} images to {out}")


if __name__ == "__main__":
    main()
