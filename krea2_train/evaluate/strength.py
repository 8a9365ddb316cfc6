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
# delta: on the micro demo the velocity fit said 1.05 where pictures say 0.62. So the strength is chosen where
# Turbo + LoRA's samples *look like* Raw + LoRA's: the same prompts, other seeds than the pictures that check it.
# "Look" = per-channel mean, spread and mean spatial gradient of the VAE latents (colour, contrast and edge density
# as the VAE encodes them; no palette or content, so any LoRA's look). Each feature is scaled by how far Turbo alone
# is from Raw + LoRA in it (plus a quarter of its image-to-image spread, so features the LoRA does not move add
# noise, not weight): distance 1 ~ Turbo alone, 0 = Raw + LoRA's look.
# The minimum is narrow (micro demo: 0.24 at 0.7, 0.57 at 0.5, 0.41 at 1.0, and a second dip near 1.4 where the
# LoRA overdrives: see look_fit), so the grid is 0.1 apart where LoRAs are used.
LOOK_GRID = tuple(round(0.2 + 0.1 * i, 1) for i in range(14)) + (1.75, 2.0, 2.5, 3.0)


def latent_look(latents) -> torch.Tensor:
    """(B, 3 C) look features of unpacked latents (B, C, h, w): per-channel mean, std and mean |gradient|."""
    z = latents.float()
    grad = (z[..., 1:] - z[..., :-1]).abs().mean((2, 3)) + (z[..., 1:, :] - z[..., :-1, :]).abs().mean((2, 3))
    return torch.cat([z.mean((2, 3)), z.std((2, 3)), grad], 1)


def look_scale(target_latents, turbo_alone) -> torch.Tensor:
    """Per-feature unit of `look_distance`: |Turbo alone - target| + a quarter of the image-to-image spread."""
    ft, f0 = latent_look(target_latents), latent_look(turbo_alone)
    spread = torch.cat([ft, f0]).std(0) if len(ft) + len(f0) > 1 else torch.zeros_like(ft[0])
    return ((f0.mean(0) - ft.mean(0)).abs() + 0.25 * spread).clamp_min(1e-6)


def look_distance(target_latents, latents, scale) -> float:
    """RMS over features of (mean look of `latents` - mean look of `target_latents`) / scale."""
    diff = (latent_look(latents).mean(0) - latent_look(target_latents).mean(0)) / scale
    return float(diff.pow(2).mean().sqrt())


def first_minimum(dist: dict[float, float], rise: float) -> float:
    """The strength of the first minimum along increasing strength that the curve then climbs out of by `rise`
    (a later, deeper dip is an overdriven LoRA passing another look, not Raw's); the global minimum if none."""
    pts = sorted(dist.items())
    best = pts[0]
    for s, d in pts[1:]:
        if d < best[1]:
            best = (s, d)
        elif d >= best[1] + rise:
            return best[0]
    return best[0]


def refine_minimum(dist: dict[float, float], at: float | None = None) -> float:
    """A minimum of a sampled curve: the point `at` (default the lowest), moved to the vertex of the parabola through
    it and its two neighbours when it has both (kept between them); an end point is returned as is."""
    pts = sorted(dist.items())
    i = [p[0] for p in pts].index(at) if at is not None else min(range(len(pts)), key=lambda k: pts[k][1])
    if i == 0 or i == len(pts) - 1:
        return pts[i][0]
    (x0, y0), (x1, y1), (x2, y2) = pts[i - 1], pts[i], pts[i + 1]
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if den == 0:
        return x1
    x = x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / den
    return min(max(x, x0), x2)


def look_fit(raw_lora_latents, sample_turbo, turbo_alone, grid=LOOK_GRID) -> dict:
    """The Turbo strength whose samples look most like `raw_lora_latents` (B, C, h, w): `sample_turbo(strength)`
    returns Turbo + LoRA latents for the same prompts and seeds, `turbo_alone` those without the LoRA. Every grid
    strength is sampled; the first minimum the curve climbs out of (by a tenth of Turbo alone's distance: sample
    noise is smaller) moves to the vertex of the parabola through it and its neighbours. The micro demo LoRA dips
    a second time near 1.5, where the overdriven LoRA's pictures happen to sit as far from the posters as Raw's."""
    scale = look_scale(raw_lora_latents, turbo_alone)
    alone = look_distance(raw_lora_latents, turbo_alone, scale)
    curve = {float(s): look_distance(raw_lora_latents, sample_turbo(float(s)), scale) for s in grid}
    strength = refine_minimum(curve, first_minimum(curve, rise=0.1 * alone))
    return {"strength": round(strength, 3), "look_distance": {f"{s:g}": round(d, 4) for s, d in sorted(curve.items())},
            "turbo_alone_distance": round(alone, 4),
            "at_grid_edge": strength <= min(grid) or strength >= max(grid)}
