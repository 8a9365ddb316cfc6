"""Checking the suggested Turbo strength against pictures: the strength at which Turbo + LoRA reaches the style that
Raw + LoRA reaches (both measured with the style score of `style.py`), found by a sweep.

    check = style_match(reference, raw_lora_images, {0.0: turbo, 1.0: [...], 1.5: [...]}, suggested=1.3)

`matched_strength` is where Turbo's distance to the training set falls to Raw + LoRA's (linear between sweep
points; the closest sweep point when it is never reached); `suggestion_error` is |suggested - matched| / matched.
"""

from __future__ import annotations

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
