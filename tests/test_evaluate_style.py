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


# ---------------------------------------------------------------------------------------------- look fit
def _latents(mean, std, n=32, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return mean.view(1, -1, 1, 1) + std.view(1, -1, 1, 1) * torch.randn(n, mean.numel(), 8, 8, generator=g)


def _models(match, side_effect=0.0, cap=None):
    """Raw without / with the LoRA, Turbo alone, and Turbo + LoRA at s: the LoRA moves the channel means by `shift`
    on Raw; on Turbo by s / match of it (so `match` is where it equals Raw's effect), capped at `cap` of it, plus
    a `side_effect` on the spreads that Raw does not show."""
    import torch

    m, sd = torch.zeros(16), torch.ones(16)
    shift = torch.linspace(-1, 1, 16)
    raw_alone, raw_lora = _latents(m + 0.3, sd, seed=1), _latents(m + 0.3 + shift, sd, seed=2)

    def turbo(s):
        t = s / match if cap is None else min(s / match, cap)
        return _latents(m + t * shift, sd * (1 + side_effect * s), seed=3 + int(s * 100))

    return raw_alone, raw_lora, turbo, _latents(m, sd, seed=3)


@pytest.mark.parametrize("match", [0.65, 1.35])
def test_look_fit_finds_where_turbo_changes_as_raw_does(match):
    from krea2_train.evaluate.strength import look_fit

    raw_alone, raw_lora, turbo, alone = _models(match)
    fit = look_fit(raw_alone, raw_lora, turbo, alone)
    assert fit["strength"] == pytest.approx(match, rel=0.06), fit
    assert fit["left_at_strength"] < 0.2 and fit["effect_difference"]["0.2"] > 0.6


def test_look_fit_says_how_much_of_raws_effect_turbo_misses():
    from krea2_train.evaluate.strength import look_fit

    raw_alone, raw_lora, turbo, alone = _models(0.5, cap=0.7)  # at most 70% of Raw's effect, from 0.35 on
    fit = look_fit(raw_alone, raw_lora, turbo, alone)
    assert fit["left_at_strength"] == pytest.approx(0.3, abs=0.08) and fit["strength"] >= 0.35, fit


def test_look_fit_takes_the_first_minimum_not_an_overdriven_dip():
    """The demo-like curve: falls to its best at 0.7, climbs, dips a little lower again at 1.5: 0.7, refined."""
    from krea2_train.evaluate.strength import first_minimum, refine_minimum

    curve = {0.2: 1.0, 0.4: 0.9, 0.5: 0.66, 0.6: 0.37, 0.7: 0.2, 0.8: 0.22, 0.9: 0.33, 1.2: 0.24, 1.5: 0.19,
             1.75: 0.3, 2.0: 0.5}
    first = first_minimum(curve, climb=0.1)
    assert first == 0.7 and 0.7 < refine_minimum(curve, first) < 0.75
    assert first_minimum(curve, climb=0.5) == 1.5  # no climb that large: the lowest point
    assert first_minimum({0.2: 0.9, 0.3: 0.5, 0.4: 0.52, 0.5: 0.2, 0.6: 0.6}, climb=0.1) == 0.5  # a wiggle is noise
    parabola = {x: (x - 0.73) ** 2 for x in (0.5, 0.6, 0.7, 0.8, 0.9)}
    assert refine_minimum(parabola, 0.7) == pytest.approx(0.73) and refine_minimum(parabola, 0.5) == 0.5
