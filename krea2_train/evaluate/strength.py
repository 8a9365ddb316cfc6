"""Checking the suggested Turbo strength against pictures: the strength at which Turbo + LoRA reaches the style that
Raw + LoRA reaches (both measured with the style score of `style.py`), found by a sweep.

    check = style_match(reference, raw_lora_images, {0.0: turbo, 1.0: [...], 1.5: [...]}, suggested=1.3)

`matched_strength` is where Turbo's distance to the training set falls to Raw + LoRA's (linear between sweep
points; the closest sweep point when it is never reached); `suggestion_error` is |suggested - matched| / matched.

`look_fit` (below) is how the transfer report makes its suggestion from samples, without the training images; the
check above then measures it on other images with another statistic.
"""

from __future__ import annotations

import torch

from krea2_train.config.sections import STRENGTH_SWEEP as DEFAULT_SWEEP  # noqa: F401 (one list, the config's default)


def _matched(dist: dict[float, float], target: float) -> tuple[float, bool]:
    """(strength where dist first falls to target, reached?) over increasing strengths."""
    pts = sorted(dist.items())
    for (s0, d0), (s1, d1) in zip(pts, pts[1:]):
        if d0 > target >= d1:
            return s0 + (s1 - s0) * (d0 - target) / (d0 - d1), True
    if pts and pts[0][1] <= target:
        return pts[0][0], True
    return min(pts, key=lambda p: abs(p[1] - target))[0], False


def style_match(reference, raw_lora_images, turbo_images: dict[float, list], suggested: float) -> dict:
    """The style figures of a transfer report. `turbo_images`: {strength: images}, 0.0 = Turbo alone."""
    target = reference.distance(raw_lora_images)
    dist = {float(s): reference.distance(ims) for s, ims in turbo_images.items()}
    matched, reached = _matched(dist, target)
    base = dist.get(0.0)

    def closure(s):
        return 1.0 - dist[s] / base if base and s in dist else None

    return {
        "measure": "style distance to the training images (evaluate/style.py; 0 = like them)",
        "training_set_spread": reference.spread,
        "raw_lora_distance": target,
        "turbo_distance": {f"{s:g}": d for s, d in sorted(dist.items())},
        "turbo_closure_at_1": closure(1.0),
        "turbo_closure_at_suggested": closure(float(suggested)),
        "matched_strength": round(matched, 3),
        "matched_reached": reached,
        "suggested_strength": float(suggested),
        "suggestion_error": abs(float(suggested) - matched) / matched if matched > 0 else None,
    }


# --------------------------------------------------------------------------------------------------- look fit
# The suggested Turbo strength, fitted on samples. Raw's effect under CFG is not a linear function of its velocity
# delta: on the micro demo the velocity fit said 0.89-1.05 where pictures say 0.60. So the fit is made on what the
# samplers produce: the LoRA's effect on Raw's samples (Raw + LoRA - Raw, 28 steps, CFG) and on Turbo's (Turbo +
# LoRA at s - Turbo, 8 steps), both in the "look" of the latents: per-channel mean, spread and mean spatial
# gradient (colour, contrast and edge density as the VAE encodes them; no palette or content, so any LoRA's look),
# each in units of its image-to-image spread. The suggestion is where the two effects differ least, relative to
# Raw's effect (1 = Turbo alone, 0 = the same effect): the first minimum the curve climbs out of by a tenth, so a
# later dip of an overdriven LoRA does not win, refined by a parabola. Measured against pictures (evaluate/style.py,
# other seeds) on the micro demo, the test LoRA and the edit demo: 15%, 9% and 6% off. Rules tried and dropped:
# nearest absolute look (the edit demo LoRA flattens Turbo's pictures, so Turbo alone looked "nearest", 84% off),
# Turbo's effect projected on Raw's reaching 1 (the test LoRA's plateaus at 0.85 from 0.6 on, 147% off).
LOOK_GRID = tuple(round(0.2 + 0.1 * i, 1) for i in range(14)) + (1.75, 2.0, 2.5, 3.0)
CLIMB = 0.1  # how far (relative to Raw's effect) the curve must climb out of a minimum for it to count


def latent_look(latents) -> torch.Tensor:
    """(B, 3 C) look features of unpacked latents (B, C, h, w): per-channel mean, std and mean |gradient|."""
    z = latents.float()
    grad = (z[..., 1:] - z[..., :-1]).abs().mean((2, 3)) + (z[..., 1:, :] - z[..., :-1, :]).abs().mean((2, 3))
    return torch.cat([z.mean((2, 3)), z.std((2, 3)), grad], 1)


def look_spread(*latent_sets) -> torch.Tensor:
    """Per-feature image-to-image spread: the mean over the sets of each set's std over its images (floored)."""
    stds = torch.stack([latent_look(z).std(0) for z in latent_sets if len(z) > 1])
    spread = stds.mean(0)
    return spread.clamp_min(1e-3 * float(spread.mean()) + 1e-12)


def first_minimum(curve: dict[float, float], climb: float) -> float:
    """The first minimum along increasing strength that the curve then climbs out of by `climb` (a later, deeper
    dip is an overdriven LoRA passing by, not the match); the lowest point if there is none."""
    pts = sorted(curve.items())
    best = pts[0]
    for s, d in pts[1:]:
        if d < best[1]:
            best = (s, d)
        elif d >= best[1] + climb:
            return best[0]
    return best[0]


def refine_minimum(curve: dict[float, float], at: float) -> float:
    """`at` moved to the vertex of the parabola through it and its two neighbours (kept between them); an end point
    stays."""
    pts = sorted(curve.items())
    i = [p[0] for p in pts].index(at)
    if i == 0 or i == len(pts) - 1:
        return at
    (x0, y0), (x1, y1), (x2, y2) = pts[i - 1], pts[i], pts[i + 1]
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if den == 0:
        return x1
    x = x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / den
    return min(max(x, x0), x2)


def look_fit(raw_alone, raw_lora, sample_turbo, turbo_alone, grid=LOOK_GRID) -> dict:
    """The Turbo strength at which the LoRA does to Turbo's samples what it does to Raw's. Latents (B, C, h, w):
    `raw_alone` / `raw_lora` Raw without / with the LoRA, `turbo_alone` Turbo without it, `sample_turbo(s)` Turbo
    with it at strength s; all for the same prompts and seeds. `effect_difference` is |Turbo's effect - Raw's| /
    |Raw's| per strength (1 at strength 0); `left_at_strength` its value at the suggestion."""
    base = latent_look(turbo_alone).mean(0)
    spread = look_spread(raw_alone, raw_lora, turbo_alone)
    raw_effect = (latent_look(raw_lora).mean(0) - latent_look(raw_alone).mean(0)) / spread
    size = float(raw_effect.norm())
    if size == 0:
        return {"strength": 1.0, "raw_effect_size": 0.0, "effect_difference": {}, "left_at_strength": None}
    curve = {}
    for s in grid:
        turbo_effect = (latent_look(sample_turbo(float(s))).mean(0) - base) / spread
        curve[float(s)] = float((turbo_effect - raw_effect).norm()) / size
    best = first_minimum(curve, CLIMB)
    strength = refine_minimum(curve, best)
    return {"strength": round(strength, 3), "effect_difference": {f"{k:g}": round(v, 4) for k, v in curve.items()},
            "left_at_strength": round(curve[best], 4),
            "raw_effect_size": round(size / raw_effect.numel() ** 0.5, 4)}
