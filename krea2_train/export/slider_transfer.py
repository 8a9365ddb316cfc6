"""The transfer report's slider section: how a concept slider trained on Raw acts on Turbo along its own direction.

For a slider target (prompts c_t, c+, c-) at noisy latents x_t (Turbo's own sample of c_t, noised at several
sigmas), the slider direction is Raw's u = v_raw(x_t, c+) - v_raw(x_t, c-) (what training pushed along), and the
effect of a model M at strength s is the projection of the LoRA's velocity change onto it:

    e_M(s) = sum_sigma <v_M^s(x_t, c_t) - v_M^0(x_t, c_t), u> / sum_sigma |u|^2

Without CFG, Raw at +1 should read about +guidance (what it was trained to), at -1 about -guidance; Raw's reported
effect is that of its CFG-guided velocity (as it is sampled, and as the report's general fit measures Raw), with the
unguided one beside it. Reported for Turbo against Raw at each swept strength:
    monotonic    e_turbo strictly increases over the swept strengths (0 included, e(0) = 0)
    symmetric    |e(s) + e(-s)| / (|e(s)| + |e(-s)|) below 0.2 for every swept pair
    ratio        Turbo's span e(1) - e(-1) over Raw's (below 1: the slider acts weaker on Turbo)
    suggested    Turbo strength matching Raw at 1 (1 / ratio), and the range [-r, r]: the widest swept range over
                 which Turbo's effect stays monotonic and its change points along u (against u at negative strengths;
                 beyond it the slider no longer moves along its direction)
"""

from __future__ import annotations

import torch

SLIDER_STRENGTHS = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)
PICTURE_STRENGTHS = (-2.0, -1.0, 0.0, 1.0, 2.0)  # slider_grid.png's columns (Turbo samples)
SYMMETRY_LIMIT = 0.2
STRENGTH_RANGE = (0.25, 3.0)


def _dot(a, b) -> float:
    return float((a.double() * b.double()).sum())


def encode_sliders(text_encoder, sliders) -> list[dict]:
    """Per slider target (dicts or config SliderTargets): its prompts, guidance and (1, L, 12, D) embeddings."""
    out = []
    for s in sliders:
        get = s.get if isinstance(s, dict) else lambda k, d=None, s=s: getattr(s, k, d)
        item = {"target": get("target"), "positive": get("positive"), "negative": get("negative"),
                "guidance": float(get("guidance", 1.0))}
        for k in ("target", "positive", "negative"):
            item[f"{k}_embeds"], item[f"{k}_mask"] = text_encoder.encode([item[k]])
        out.append(item)
    return out


@torch.no_grad()
def slider_effects(transformer, lora, item: dict, inputs, grid, strengths=SLIDER_STRENGTHS, direction=None,
                   negative=None, guidance: float = 0.0) -> dict:
    """{"effect": {s: e(s)}, "conditional": {s: e(s) without CFG}, "cosine": {s: cos(delta(s), u)}, "direction": u
    per sigma} on `transformer` (module docstring). `direction`: Raw's u, already measured; None: measured here
    (this is Raw). `negative` ((1, L, 12, D) embeds, mask) and `guidance` > 0: the effect is that of the guided
    velocity, d_cond + guidance * (d_cond - d_uncond), as Raw is sampled."""
    from krea2_train.export.transfer import _deltas
    from krea2_train.inference import predict_velocity

    device = next(transformer.parameters()).device
    if direction is None:
        direction = []
        for x, s in inputs:
            x, s = x.to(device), s.to(device)
            vp = predict_velocity(transformer, x, s, item["positive_embeds"].to(device), item["positive_mask"].to(device),
                                  grid).float().cpu()
            vn = predict_velocity(transformer, x, s, item["negative_embeds"].to(device), item["negative_mask"].to(device),
                                  grid).float().cpu()
            direction.append(vp - vn)
    cond = _deltas(transformer, lora, list(strengths), inputs, item["target_embeds"], item["target_mask"], grid)
    deltas = cond
    if guidance > 0 and negative is not None:
        uncond = _deltas(transformer, lora, list(strengths), inputs, *negative, grid)
        deltas = {st: [c + guidance * (c - u) for c, u in zip(cond[st], uncond[st])] for st in cond}
    norm = sum(_dot(u, u) for u in direction)

    def along(ds):
        return sum(_dot(d, u) for d, u in zip(ds, direction))

    effect, conditional, cosine = {}, {}, {}
    for st, ds in deltas.items():
        proj = along(ds)
        effect[st] = proj / norm if norm > 0 else 0.0
        conditional[st] = along(cond[st]) / norm if norm > 0 else 0.0
        dn = sum(_dot(d, d) for d in ds) ** 0.5
        cosine[st] = proj / (dn * norm ** 0.5) if dn > 0 and norm > 0 else 0.0
    return {"effect": effect, "conditional": conditional, "cosine": cosine, "direction": direction}


def summarize(raw: dict, turbo: dict, guidance: float) -> dict:
    """The report's numbers for one slider target from `slider_effects` on Raw and on Turbo (module docstring)."""
    e_t = {0.0: 0.0, **turbo["effect"]}
    e_r = {0.0: 0.0, **raw["effect"]}
    order = sorted(e_t)
    monotonic = all(e_t[b] > e_t[a] for a, b in zip(order, order[1:]))
    pairs = sorted(s for s in e_t if s > 0 and -s in e_t)
    asym = {s: abs(e_t[s] + e_t[-s]) / (abs(e_t[s]) + abs(e_t[-s])) if abs(e_t[s]) + abs(e_t[-s]) > 0 else 0.0
            for s in pairs}
    symmetric = bool(pairs) and all(a < SYMMETRY_LIMIT for a in asym.values())
    span_t = e_t.get(1.0, 0.0) - e_t.get(-1.0, 0.0)
    span_r = e_r.get(1.0, 0.0) - e_r.get(-1.0, 0.0)
    ratio = span_t / span_r if span_r > 0 else None
    suggested = min(max(1.0 / ratio, STRENGTH_RANGE[0]), STRENGTH_RANGE[1]) if ratio and ratio > 0 else None
    reach = 0.0  # the widest swept [-r, r] over which Turbo moves monotonically along the direction
    for s in pairs:
        inside = [x for x in order if -s <= x <= s]
        mono = all(e_t[b] > e_t[a] for a, b in zip(inside, inside[1:]))
        # along the direction: the change points with u at +s and against it at -s
        if mono and all(turbo["cosine"][x] * x > 0 for x in inside if x != 0):
            reach = s
        else:
            break
    return {
        "guidance": guidance,
        "turbo_effect": {f"{s:+g}": round(e_t[s], 4) for s in order},
        "raw_effect": {f"{s:+g}": round(e_r[s], 4) for s in sorted(e_r)},  # under CFG when Raw is sampled so
        "raw_effect_without_cfg": {f"{s:+g}": round(v, 4) for s, v in sorted({0.0: 0.0, **raw["conditional"]}.items())},
        "turbo_cosine": {f"{s:+g}": round(v, 4) for s, v in sorted(turbo["cosine"].items())},
        "monotonic": monotonic,
        "asymmetry": {f"{s:g}": round(a, 4) for s, a in asym.items()},
        "symmetric": symmetric,
        "ratio": None if ratio is None else round(ratio, 4),
        "suggested_turbo_strength": None if suggested is None else round(suggested, 3),
        "suggested_turbo_range": [-reach, reach] if reach else None,
    }


def slider_reading(section: list[dict]) -> str:
    """One sentence per slider. The range is measured (the swept strengths over which Turbo moves monotonically along
    the direction), the strength matching Raw's +-1 is fitted; they are different figures and said apart."""
    parts = []
    for i, s in enumerate(section):
        max_swept = max(abs(float(k)) for k in (s.get("turbo_effect") or SLIDER_STRENGTHS))  # what was swept
        rng = s["suggested_turbo_range"]
        parts.append(
            f"slider {i} ({s['positive']!r} vs {s['negative']!r}) on Turbo: "
            + ("monotonic" if s["monotonic"] else "NOT monotonic") + ", "
            + ("symmetric" if s["symmetric"] else "asymmetric") + ", "
            + (f"{s['ratio']:.2f}x of Raw's effect" if s["ratio"] is not None else "no Raw effect to compare")
            + (f", moves steadily over {rng[0]:g} to {rng[1]:g}" + (" (all that was swept)" if rng[1] >= max_swept
                                                                     else "") if rng
               else ", no swept range moves it monotonically")
            + (f"; Raw's +-1 is Turbo's +-{s['suggested_turbo_strength']:.2f}"
               + (" (beyond the swept range: check it in the grid)"
                  if rng and s["suggested_turbo_strength"] > rng[1] else "")
               if s["suggested_turbo_strength"] is not None else ""))
    return "; ".join(parts)
