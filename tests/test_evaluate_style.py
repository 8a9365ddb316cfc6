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
def test_refine_minimum_finds_a_parabolas_vertex():
    from krea2_train.evaluate.strength import refine_minimum

    curve = {s: (s - 0.73) ** 2 + 0.1 for s in (0.5, 0.6, 0.7, 0.8, 0.9)}
    assert refine_minimum(curve) == pytest.approx(0.73, abs=1e-9)
    assert refine_minimum({0.2: 0.1, 0.3: 0.4, 0.4: 0.9}) == 0.2  # a minimum at the end stays there


def _latents(mean, std, n=6, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return mean.view(1, -1, 1, 1) + std.view(1, -1, 1, 1) * torch.randn(n, mean.numel(), 8, 8, generator=g)


@pytest.mark.parametrize("match", [0.65, 1.35])
def test_look_fit_finds_where_turbo_looks_like_raw(match):
    """Turbo + LoRA's latents move linearly with strength from Turbo alone's look; Raw + LoRA's look is reached at
    `match`. The fit returns it from samples of other noise (a strength past it overshoots, one short falls short)."""
    import torch

    from krea2_train.evaluate.strength import look_fit

    m0, s0 = torch.zeros(16), torch.ones(16)
    m1, s1 = torch.linspace(-1, 1, 16), torch.full((16,), 1.5)  # Raw + LoRA: other channel means and spreads
    raw = _latents(m1, s1, n=32, seed=1)

    def turbo(s):
        t = s / match
        return _latents(m0 + t * (m1 - m0), s0 + t * (s1 - s0), n=32, seed=2)

    fit = look_fit(raw, turbo, turbo(0.0))
    assert fit["strength"] == pytest.approx(match, rel=0.05), fit
    assert not fit["at_grid_edge"] and fit["turbo_alone_distance"] > 3 * min(fit["look_distance"].values())


def test_look_fit_says_when_raw_is_out_of_reach():
    import torch

    from krea2_train.evaluate.strength import look_fit

    raw = _latents(torch.full((16,), 10.0), torch.ones(16), seed=1)  # a look Turbo would need strength ~50 for
    fit = look_fit(raw, lambda s: _latents(torch.full((16,), 0.2 * s), torch.ones(16), seed=2),
                   _latents(torch.zeros(16), torch.ones(16), seed=2))
    assert fit["strength"] == 3.0 and fit["at_grid_edge"]


def test_look_fit_takes_the_first_minimum_not_an_overdriven_dip():
    """A curve that falls to Raw's look at 0.5, climbs, and dips lower again at 1.5 (the demo LoRA's shape): 0.5."""
    from krea2_train.evaluate.strength import first_minimum, refine_minimum

    curve = {0.2: 0.83, 0.3: 0.79, 0.4: 0.57, 0.5: 0.27, 0.6: 0.38, 0.7: 0.48, 1.0: 0.42, 1.4: 0.23, 1.5: 0.22,
             1.75: 0.3, 2.0: 0.41}
    first = first_minimum(curve, rise=0.085)
    assert first == 0.5 and 0.5 < refine_minimum(curve, first) < 0.55
    assert first_minimum(curve, rise=0.5) == 1.5  # no climb that large: the lowest point
    assert first_minimum({0.2: 0.9, 0.3: 0.5, 0.4: 0.52, 0.5: 0.2, 0.6: 0.6}, rise=0.1) == 0.5  # a wiggle is noise
