"""The style score tells the demo posters' style from others, and the strength check finds where Turbo's style
distance reaches Raw + LoRA's."""

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from krea2_train.evaluate.strength import _matched, style_match
from krea2_train.evaluate.style import StyleReference

DEMO = Path(__file__).resolve().parents[1] / "datasets" / "demo"


def posters():
    return [Image.open(p) for p in sorted(DEMO.glob("*.png"))]


def flat_shapes(n, seed=0):
    """Another style: one flat saturated shape on a plain background, no outline, no texture."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (128, 128), tuple(rng.randrange(256) for _ in range(3)))
        x, y, s = rng.randrange(20, 60), rng.randrange(20, 60), rng.randrange(30, 60)
        ImageDraw.Draw(img).ellipse((x, y, x + s, y + s), fill=tuple(rng.randrange(256) for _ in range(3)))
        out.append(img)
    return out


def test_style_score_separates_the_posters_from_other_styles():
    imgs = posters()
    ref = StyleReference.from_images(imgs[:8])  # held-out half: the other 8 posters
    on_style = ref.distance(imgs[8:])
    other = ref.distance(flat_shapes(16))
    noise = ref.distance([(np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)] * 4)
    assert on_style < 0.25 * other and on_style < 0.25 * noise, (on_style, other, noise)
    assert on_style < 2 * ref.spread
    # a mix moves the score part of the way: the distance is a graded measure, not a yes/no
    mixed = ref.distance(imgs[8:12] + flat_shapes(4))
    assert on_style < mixed < other
    assert ref.closure(flat_shapes(16), imgs[8:]) > 0.75 and abs(ref.closure(flat_shapes(16), flat_shapes(16))) < 1e-9


def test_matched_strength_interpolates_where_the_distance_reaches_the_target():
    dist = {0.0: 1.0, 1.0: 0.6, 2.0: 0.2}
    s, reached = _matched(dist, 0.4)
    assert reached and s == pytest.approx(1.5)
    s, reached = _matched(dist, 0.05)  # never reached: the closest swept strength
    assert not reached and s == 2.0


def test_style_match_reports_the_suggestion_error():
    imgs, other = posters(), flat_shapes(8)
    ref = StyleReference.from_images(imgs)
    # Turbo "moves toward the style" with strength: more posters replace flat shapes as the strength grows
    turbo = {0.0: other, 1.0: other[:4] + imgs[:4], 2.0: imgs[:8]}
    raw = other[:4] + imgs[:4]  # Raw + LoRA reaches what Turbo reaches at 1.0
    result = style_match(ref, raw, turbo, suggested=1.2)
    assert result["matched_strength"] == pytest.approx(1.0, abs=0.05) and result["matched_reached"]
    assert result["suggestion_error"] == pytest.approx(abs(1.2 - result["matched_strength"]) / result["matched_strength"])
    assert 0 < result["turbo_closure_at_1"] < 1
