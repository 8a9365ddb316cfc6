"""Aspect-ratio buckets at a given resolution, and the resize-then-crop that puts an image into its bucket.

A bucket for resolution R is (width, height) with both sides multiples of 16 (the VAE's 8 times the patch 2), area at
most R*R and as close to it as the grid allows, and width/height inside [min_aspect, max_aspect]. Each image goes to
the bucket nearest in log aspect ratio; it is scaled to cover the bucket and cropped (centre or random, recorded).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

from krea2_train import facts

STEP = facts.PIXEL_MULTIPLE


@lru_cache(maxsize=64)
def make_buckets(resolution: int, min_aspect: float = 0.5, max_aspect: float = 2.0, step: int = STEP
                 ) -> tuple[tuple[int, int], ...]:
    """All (w, h) buckets for `resolution`, sorted by aspect ratio (w/h)."""
    if resolution % step:
        raise ValueError(f"resolution {resolution} must be a multiple of {step}")
    if not 0 < min_aspect <= 1 <= max_aspect:
        raise ValueError(f"aspect range [{min_aspect}, {max_aspect}] must contain 1 (data.min_aspect <= 1 <= "
                         "data.max_aspect)")
    area = resolution * resolution
    buckets = set()
    # Landscape side: the largest height on the grid keeping area <= R^2 for each width; portrait by mirroring, so
    # the set is symmetric.
    for w in range(resolution, area // step + 1, step):
        h = (area // w) // step * step
        if h >= step and w / h <= max(max_aspect, 1 / min_aspect):
            buckets.update({(w, h), (h, w)})
    buckets = {b for b in buckets if min_aspect <= b[0] / b[1] <= max_aspect}
    # Several widths can share one height after rounding: keep the largest area.
    by_h, by_w = {}, {}
    for w, h in buckets:
        if h not in by_h or w > by_h[h][0]:
            by_h[h] = (w, h)
        if w not in by_w or h > by_w[w][1]:
            by_w[w] = (w, h)
    return tuple(sorted(set(by_h.values()) & set(by_w.values()), key=lambda b: b[0] / b[1]))


def nearest_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log space); ties go to the larger area."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


@dataclass(frozen=True)
class Placement:
    """How one image becomes one bucket-sized crop: resize to `resized`, then crop the box at (left, top)."""
    bucket: tuple[int, int]
    resized: tuple[int, int]
    left: int
    top: int

    def as_dict(self) -> dict:
        return {"bucket": list(self.bucket), "resized": list(self.resized), "left": self.left, "top": self.top}


def place(width: int, height: int, bucket: tuple[int, int], crop: str = "center", rng: random.Random | None = None
          ) -> Placement:
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    if crop == "center":
        left, top = (rw - bw) // 2, (rh - bh) // 2
    elif crop == "random":
        rng = rng or random.Random(0)
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        raise ValueError(f"data.crop={crop!r}: use center or random")
    return Placement(tuple(bucket), (rw, rh), left, top)


def needs_upscale(width: int, height: int, bucket: tuple[int, int]) -> bool:
    return width < bucket[0] or height < bucket[1]


def apply(img: Image.Image, placement: Placement) -> Image.Image:
    """Resize (Lanczos; PIL's reducing_gap makes big downscales fast) and crop to the bucket."""
    if img.size != placement.resized:
        img = img.resize(placement.resized, Image.LANCZOS, reducing_gap=3.0)
    bw, bh = placement.bucket
    return img.crop((placement.left, placement.top, placement.left + bw, placement.top + bh))
